"""Weight sources are checked against the graph: a checkpoint that does not fit raises a ShardwiseError
naming the tensor, what was expected and what was found, before any rank program runs; one that fits
gives exactly the numbers of the model's own weights.

Without the checks several of these cases would read quietly: a wider tensor or extra leading rows are
simply cut to the shard's slices, and give wrong numbers.
"""

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._pytree import tree_flatten

import shardwise
from shardwise.errors import ShardwiseError
from shardwise.models import build_model, example_inputs
from shardwise.runtime.lower import shard_tensor
from shardwise.runtime.simulate import run_lockstep, sim_group_name
from shardwise.runtime.weights import SafetensorsSource, StateSource, save_state

FIX = "checkpoint of the model the plan was made from"  # what every shape / key error tells the user to do


class Planned:
    """A tiny model planned on 2 chips (weights split), its call, and its eager output."""

    def __init__(self, name: str):
        self.model = build_model(name)
        self.args, self.kwargs = example_inputs(self.model, 2, 8)
        self.plan = shardwise.plan(self.model, self.args, self.kwargs, mesh="1x1x2")
        with torch.no_grad():
            self.eager = self.model(*self.args, **self.kwargs).logits

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The captured tensors as a checkpoint holds them: no derived keys, but the non-persistent buffers
        (llama's rotary inv_freq) that a model's state_dict leaves out, as save_state writes them."""
        derived = self.plan.program.sig.derived
        return {k: v.detach().clone() for k, v in self.plan.program.state.items() if k not in derived}

    def run(self, weights=None) -> list:
        """Every rank's program emitted with `weights` (default: the captured state), run in lockstep."""
        program = self.plan.program
        ranks = [self.plan.emit(r, group_name=sim_group_name, weights=weights) for r in range(program.mesh.size)]
        flat = program.flat_inputs(self.args, self.kwargs)
        inputs = [[shard_tensor(x, m.input_layouts[i], m.mesh, r) if i in m.input_layouts else x
                   for i, x in enumerate(flat)] for r, m in enumerate(ranks)]
        return program.gather_outputs(run_lockstep([m.program for m in ranks], inputs, program.mesh))

    def save(self, tmp_path, state: dict[str, torch.Tensor], name: str = "w.safetensors") -> str:
        path = str(tmp_path / name)
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        return path


@pytest.fixture(scope="module")
def llama():
    return Planned("llama-tiny")


@pytest.fixture(scope="module")
def gpt2():
    return Planned("gpt2-tiny")


def _equal(got: list, want: list) -> bool:
    a, b = tree_flatten(got)[0], tree_flatten(want)[0]
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_fitting_checkpoint_gives_exactly_the_models_numbers(name, request, tmp_path):
    """A file with the model's own tensors (GPT-2: the fused c_attn, sliced by derived keys), the same
    tensors in memory, and save_state's file all give exactly what the captured weights give (= eager)."""
    m = request.getfixturevalue(name)
    want = m.run()
    torch.testing.assert_close(want[0], m.eager, atol=1e-5, rtol=0)
    assert _equal(m.run(SafetensorsSource(m.save(tmp_path, m.state))), want)
    assert _equal(m.run(StateSource(m.state)), want)
    path = str(tmp_path / "saved.safetensors")
    save_state(m.plan.program.state, path)  # the captured state, derived keys left out
    assert _equal(m.run(SafetensorsSource(path)), want)


UP = "model.layers.0.mlp.up_proj.weight"  # [256, 64]: F (split over the 2 chips) × E
DOWN = "model.layers.1.mlp.down_proj.weight"  # [64, 256]
EMBED = "model.embed_tokens.weight"  # [256, 64]


def _set(key: str, make):
    return lambda state: state.update({key: make(state[key])})


CONVERT = "Convert the checkpoint to float32"  # what a dtype error tells the user to do


@pytest.mark.parametrize("corrupt, found, fix", [
    pytest.param(lambda s: s.update({k: v.half() for k, v in s.items()}),
                 r"is float16, but the graph expects float32", CONVERT, id="float16 file"),
    pytest.param(_set(UP, lambda t: t.bfloat16()), r"is bfloat16, but the graph expects float32", CONVERT,
                 id="one tensor in bfloat16"),
    pytest.param(_set(DOWN, lambda t: t.t()),
                 r"has shape \[256, 64\], but the graph expects a \[64, 256\] float32 tensor \(it looks transposed",
                 FIX, id="transposed tensor"),
    pytest.param(_set(UP, lambda t: t[:128]),
                 r"has shape \[128, 64\], but the graph expects a \[256, 64\] float32 tensor \(128 fewer elements "
                 r"along dim 0", FIX, id="smaller tensor"),
    pytest.param(_set(UP, lambda t: torch.cat([t, t[:, :8]], 1)),
                 r"has shape \[256, 72\], but the graph expects a \[256, 64\] float32 tensor \(8 more elements along "
                 r"dim 1", FIX, id="wider tensor"),
    pytest.param(_set(EMBED, lambda t: torch.cat([t[:4], t])),
                 r"has shape \[260, 64\], but the graph expects a \[256, 64\] float32 tensor \(4 extra leading rows",
                 FIX, id="extra leading rows"),
    pytest.param(lambda s: s.pop(UP),
                 r"is missing from the safetensors file .*closest names there: .*up_proj.weight.*; the graph expects "
                 r"a \[256, 64\] float32 tensor there", FIX, id="missing key"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_by_name(llama, tmp_path, corrupt, found, fix):
    """Each misfit raises at emit, before anything runs, naming the tensor, what was found and expected,
    and what to do; on every rank (each reads other slices)."""
    state = llama.state
    corrupt(state)
    source = SafetensorsSource(llama.save(tmp_path, state))
    for rank in range(2):
        with pytest.raises(ShardwiseError, match=found) as err:
            llama.plan.emit(rank, group_name=sim_group_name, weights=source)
        message = str(err.value)
        assert any(f"weight {k!r}" in message for k in llama.state), message
        assert fix in message, message


C_ATTN = "transformer.h.1.attn.c_attn"  # GPT-2's fused [E, 3E] projection: q, k, v are slices of it


@pytest.mark.parametrize("corrupt, found", [
    pytest.param(_set(C_ATTN + ".weight", lambda t: t[:, :160]),
                 r"'transformer.h.1.attn.c_attn.weight' .*has shape \[64, 160\], but the graph expects a \[64, 192\] "
                 r"float32 tensor \(32 fewer elements along dim 1", id="base too narrow for its last slice"),
    pytest.param(_set(C_ATTN + ".weight", lambda t: torch.cat([t, t[:8]])),
                 r"weight 'transformer.h.1.attn.c_attn.weight' \(sliced into .*\) in .* has shape \[72, 192\], "
                 r"whose slice .* is \[72, 64\], but the graph expects a \[64, 64\] float32 tensor",
                 id="base with extra rows"),
    pytest.param(_set(C_ATTN + ".weight", lambda t: torch.cat([t, t[:, :8]], 1)),
                 r"'transformer.h.1.attn.c_attn.weight' .*has shape \[64, 200\], but the graph expects a \[64, 192\] "
                 r"float32 tensor", id="base wider than the model's (every slice still fits)"),
    pytest.param(_set(C_ATTN + ".bias", lambda t: t.double()),
                 r"weight 'transformer.h.1.attn.c_attn.bias' \(sliced into .*\) in .* is float64, but the graph "
                 r"expects float32", id="base of another dtype"),
    pytest.param(lambda s: s.pop(C_ATTN + ".bias"),
                 r"weight 'transformer.h.1.attn.c_attn.bias' \(sliced into 'transformer.h.1.attn.c_attn.bias"
                 r"\[0:0\+64\]'.*\) is missing from the safetensors file", id="base missing"),
])
def test_derived_keys_check_their_base_tensor(gpt2, tmp_path, corrupt, found):
    """q, k and v are slices of c_attn: the base must exist, have the dtype, and hold each slice."""
    state = gpt2.state
    corrupt(state)
    source = SafetensorsSource(gpt2.save(tmp_path, state))
    with pytest.raises(ShardwiseError, match=found):
        gpt2.plan.emit(0, group_name=sim_group_name, weights=source)


def test_a_state_dict_in_memory_is_checked_too(llama):
    """A state dict passed as weights need not be the one captured: it is checked like a file."""
    state = llama.state
    state[DOWN] = state[DOWN].t().contiguous()
    with pytest.raises(ShardwiseError, match=r"weight 'model.layers.1.mlp.down_proj.weight' in the state dict has "
                                             r"shape \[256, 64\], but the graph expects a \[64, 256\]"):
        llama.plan.emit(0, group_name=sim_group_name, weights=StateSource(state))
    del state[DOWN]
    with pytest.raises(ShardwiseError, match=r"'model.layers.1.mlp.down_proj.weight' is missing from the state dict"):
        llama.plan.emit(0, group_name=sim_group_name, weights=StateSource(state))


def _truncated(path, good: bytes):
    path.write_bytes(good[: len(good) - 100])


def _junk(path, good: bytes):
    path.write_bytes(b"this is not a safetensors file\n" * 20)


def _empty(path, good: bytes):
    path.write_bytes(b"")


def _torch_save(path, good: bytes):
    torch.save({"w": torch.zeros(4)}, path)


@pytest.mark.parametrize("make", [_truncated, _junk, _empty, _torch_save])
def test_a_file_that_is_not_a_whole_safetensors_file_is_refused_on_open(llama, tmp_path, make):
    good = (tmp_path / "good.safetensors")
    save_state(llama.plan.program.state, str(good))
    bad = tmp_path / "bad.safetensors"
    make(bad, good.read_bytes())
    with pytest.raises(ShardwiseError, match=r"is not a readable safetensors file .*truncated.*download or save it"):
        SafetensorsSource(str(bad))


@pytest.mark.parametrize("where", ["missing.safetensors", "."])
def test_no_file_at_the_path_is_refused_on_open(tmp_path, where):
    with pytest.raises(ShardwiseError, match=r"no weights file at .*: expected a safetensors checkpoint there. "
                                             r"Write one with shardwise.runtime.weights.save_state"):
        SafetensorsSource(str(tmp_path / where))
