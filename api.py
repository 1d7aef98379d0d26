"""Public entry points: plan, simulate, verify (and Program, what a Plan emits from).

    >>> import shardwise, torch
    >>> model = shardwise.models.build_model("llama-tiny")
    >>> ids = torch.randint(0, 256, (8, 16))
    >>> plan = shardwise.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4", layouts="ffn=ws1d,attn=heads")
    >>> print(plan.summary())                       # per layer: layout, weights, collectives
    >>> logits = shardwise.simulate(plan, (ids,), {"use_cache": False})   # all 4 ranks in this process
    >>> shardwise.verify(model, (ids,), {"use_cache": False}, mesh="1x1x4").max_abs_diff
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import ShardwiseError
from .ir.layout import Layout
from .ir.mesh import Mesh
from .ir.plan import Plan
from .models import presets
from .passes.assign_layouts import parse_layouts
from .passes.canonicalize import canonicalize
from .passes.capture import capture
from .passes.emit import emit
from .passes.find_layers import LAYERS, find_layers
from .passes.graph_utils import SIGNATURE, signature
from .passes.insert_collectives import insert_collectives
from .passes.pipeline import Pass, run_pipeline
from .passes.propagate import IO_LAYOUTS
from .passes.summarize import replicated_weights
from .runtime.lower import shard_tensor
from .runtime.simulate import Trace, run_lockstep, sim_group_name


# ------------------------------------------------------------------------------------ the program
class ShardedModule(nn.Module):
    """One rank's program behind the original call signature: same inputs, same outputs."""

    def __init__(self, program: fx.GraphModule, in_spec, out_spec, input_layouts: dict[int, Layout], mesh: Mesh, rank: int):
        super().__init__()
        self.program = program
        self.in_spec, self.out_spec = in_spec, out_spec
        self.input_layouts, self.mesh, self.rank = input_layouts, mesh, rank

    def forward(self, *args, **kwargs):
        flat = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        return tree_unflatten(list(self.program(*flat)), self.out_spec)


class Program:
    """The planned global-view graph: emits rank programs and runs all of them in one process."""

    def __init__(self, gm: fx.GraphModule, mesh: Mesh):
        self.gm, self.mesh = gm, mesh
        self.sig = signature(gm)

    def emit(self, rank: int, *, group_name: Callable | None = None, weights=None, device=None) -> ShardedModule:
        """Rank `rank`'s program; by default on the real process groups of the current world."""
        if group_name is None:
            from .runtime.distributed import mesh_groups

            group_name = mesh_groups(self.mesh)
        prog = emit(self.gm, self.mesh, rank, group_name=group_name, weights=weights, device=device)
        return ShardedModule(prog, self.sig.in_spec, self.sig.out_spec, self.input_layouts(), self.mesh, rank)

    def input_layouts(self) -> dict[int, Layout]:
        io = self.gm.meta.get(IO_LAYOUTS, {})
        return {i: io[name] for i, name in enumerate(self.sig.inputs) if name in io}

    def flat_inputs(self, args: tuple, kwargs: dict | None) -> list[Any]:
        try:
            return list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs or {})), self.sig.in_spec))
        except Exception as e:
            raise ShardwiseError(f"inputs do not match the captured call ({self.sig.in_spec}): {e}") from None

    def simulate(self, args: tuple, kwargs: dict | None = None, *, trace: Trace | None = None) -> Any:
        flat = self.flat_inputs(args, kwargs)
        layouts = self.input_layouts()
        programs = [emit(self.gm, self.mesh, r, group_name=sim_group_name) for r in range(self.mesh.size)]
        inputs = [
            [shard_tensor(x, layouts[i], self.mesh, r) if i in layouts else x for i, x in enumerate(flat)]
            for r in range(self.mesh.size)
        ]
        outs = run_lockstep(programs, inputs, self.mesh, trace=trace)
        return tree_unflatten(self.gather_outputs(outs), self.sig.out_spec)

    def output_layouts(self) -> dict[int, Layout]:
        io = self.gm.meta.get(IO_LAYOUTS, {})
        return {int(k.split(":")[1]): v for k, v in io.items() if k.startswith("output:")}

    def gather_outputs(self, outs: list[list[Any]]) -> list[Any]:
        """Global outputs from every rank's: replicated ones must agree, split ones are reassembled."""
        split = self.output_layouts()
        return [unshard([o[j] for o in outs], split[j], self.mesh) if j in split else _agree([o[j] for o in outs], j)
                for j in range(len(outs[0]))]


def _agree(values: list, j: int):
    """A replicated output must be identical on every rank; a difference is a bug, never averaged away."""
    for r, v in enumerate(values[1:], 1):
        if isinstance(v, torch.Tensor) and not torch.equal(v, values[0]):
            raise RuntimeError(f"rank {r} returned a different output {j} from rank 0 for a replicated output")
    return values[0]


def unshard(pieces: list[torch.Tensor], layout: Layout, mesh: Mesh) -> torch.Tensor:
    """The global tensor from each rank's piece under `layout` (copies over replicated atoms must agree)."""
    from .runtime.weights import shard_index

    shape = [p * mesh.group_size(d) for p, d in zip(pieces[0].shape, layout.dims)]
    out = torch.empty(shape, dtype=pieces[0].dtype, device=pieces[0].device)
    written = torch.zeros(shape, dtype=torch.bool)
    for r, piece in enumerate(pieces):
        idx = shard_index(shape, layout, mesh, r)
        if written[idx].any() and not torch.equal(out[idx], piece):
            raise RuntimeError(f"rank {r}'s piece of a split output disagrees with another rank holding it")
        out[idx] = piece
        written[idx] = True
    return out


# ------------------------------------------------------------------------------------ plan
def _model_and_inputs(model, args, kwargs, batch: int, seq: int):
    if isinstance(model, str):
        name = model
        model = presets.build_model(name)
        if args is None:
            args, kwargs = presets.example_inputs(model, batch, seq)
        return model, tuple(args), dict(kwargs or {}), name
    if args is None:
        raise ShardwiseError("plan(model, args, ...): example inputs are needed to capture a model object")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    return model, args, dict(kwargs or {}), type(model).__name__


def capture_program(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """capture, canonicalize and find_layers: the graph every plan of this model starts from."""
    return prepare(capture(model, args, kwargs))


def prepare(gm: fx.GraphModule) -> fx.GraphModule:
    return run_pipeline(gm, [
        Pass("canonicalize", canonicalize, needs=(SIGNATURE,)),
        Pass("find_layers", find_layers, needs=(SIGNATURE,), makes=(LAYERS,)),
    ])


def _meshes(mesh, chips, objective: str) -> list[Mesh]:
    from .strategies.planner import meshes_for

    if mesh is not None:
        return [Mesh.parse(mesh)]
    if chips is None:
        raise ShardwiseError("plan needs a mesh (mesh='2x2x1') or a chip count (chips=8) to search meshes over")
    if not isinstance(chips, int) or chips < 1:
        raise ShardwiseError(f"chips={chips!r}: expected a positive number of chips")
    if objective == "cost":  # fewer chips may cost less per token: consider every divisor
        return [m for n in range(1, chips + 1) if chips % n == 0 for m in meshes_for(n)]
    return meshes_for(chips)


def plan(
    model: nn.Module | str,
    args: tuple | None = None,
    kwargs: dict | None = None,
    *,
    mesh: Mesh | str | None = None,
    chips: int | None = None,
    hardware: str = "tpu-v4",
    phase: str = "prefill",
    layouts: str | dict | None = None,
    batch: int = 8,
    seq: int = 16,
    context: int | None = None,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    objective: str = "latency",
    overlap: bool = False,
) -> Plan:
    """Plan `model` on `mesh` (or the best mesh of `chips`): a layout per layer, chosen by cost.

    With `args`, the call `model(*args, **kwargs)` is captured as is. Without, the model's step for
    `phase` is built (prefill: `seq` tokens into a KV cache of `context` positions; decode: one token at
    the end of a `context`-long cache, logits of the last token), and planned from one captured block.
    `layouts` forces layouts by layer kind ({"ffn": "ws2d", "attn": "batch"} or "ffn=ws2d,attn=batch");
    the rest is chosen by the cost model on `hardware` with `weight_dtype` weights ("bf16", "int8"; by
    default as captured) for the `objective` latency (seconds per step) or cost (chip-seconds per token).
    `model` may be a preset name (see shardwise.models.PRESETS).
    """
    from .ir.hardware import get_hardware
    from .planning import Question, choose, record
    from .strategies.cost import Precision

    q = Question(meshes=_meshes(mesh, chips, objective), hw=get_hardware(hardware),
                 precision=Precision(weights=weight_dtype, kv=kv_dtype), objective=objective, overlap=overlap,
                 request=parse_layouts(layouts), phase=phase)
    if args is not None:
        model, args, kwargs, q.model = _model_and_inputs(model, args, kwargs, batch, seq)
        return _plan_full(capture_program(model, args, kwargs), q)
    proto, n_blocks, q.model, build_full = _prototype(model, phase, batch, seq, context)
    choice, results = choose(proto, q, n_blocks)
    program = LazyProgram(lambda: _full_program(build_full, choice, q))
    return _finish(record(proto, choice, q, n_blocks), proto, choice, results, q, n_blocks, program)


def _plan_full(gm: fx.GraphModule, q) -> Plan:
    """Plan a whole captured graph (its blocks costed in place), insert the collectives, keep the program."""
    from .planning import choose, record

    choice, results = choose(gm, q, n_blocks=1)
    result = record(gm, choice, q, 1)
    insert_collectives(gm, choice.mesh)
    result.memory["replicated"] = [list(r) for r in replicated_weights(gm, choice.mesh)]
    return _finish(result, gm, choice, results, q, 1, Program(gm, choice.mesh))


def _finish(result: Plan, graph: fx.GraphModule, choice, results, q, n_blocks: int, program) -> Plan:
    from .planning import explain, param_count, totals

    params, wbytes = param_count(graph, n_blocks, q.precision)
    dims = graph.meta[LAYERS].dims
    totals(result, choice, q, params=params, weight_bytes=wbytes, tokens=max(1, dims.get("B", 1) * dims.get("L", 1)))
    result.explain = explain(choice, results, n_blocks)
    result.settings["layouts"] = dict(q.request)
    result.memory.setdefault("replicated", [])  # known once the full program is built (lazy for prototypes)
    result.program = program
    return result


def _prototype(model, phase: str, batch: int, seq: int, context: int | None):
    """(one-block step graph, number of blocks, name, builder of the full step model)."""
    from .models.steps import Step, phase_inputs
    from .passes.capture import one_block

    if isinstance(model, str):
        name = model
        full_layers = presets.get(name).config[presets._LAYERS_KEY[presets.get(name).family]]
        small = presets.build_model(name, layers=1)
        step = Step(small, last_only=True)
        proto = capture_program(step, phase_inputs(small, phase, batch=batch, seq=seq, context=context), {})
        return proto, full_layers, name, lambda: (presets.build_model(name), phase, batch, seq, context)
    with one_block(model) as n:
        step = Step(model, last_only=True)
        proto = capture_program(step, phase_inputs(model, phase, batch=batch, seq=seq, context=context), {})
    return proto, n, type(model).__name__, lambda: (model, phase, batch, seq, context)


def _full_program(build_full, choice, q) -> "Program":
    from .models.steps import Step, phase_inputs
    from .planning import apply, block_choices, candidates_of

    model, phase, batch, seq, context = build_full()
    gm = capture_program(Step(model, last_only=True), phase_inputs(model, phase, batch=batch, seq=seq,
                                                                   context=context), {})
    _, _, forced = candidates_of(q.request)
    apply(gm, choice.mesh, block_choices(gm.meta[LAYERS], choice.blocks, forced), insert=True)
    return Program(gm, choice.mesh)


class LazyProgram:
    """A Program built on first use: planning needs only one block; emit needs the whole model."""

    def __init__(self, build: Callable[[], Program]):
        self._build, self._program = build, None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._program is None:
            self._program = self._build()
        return getattr(self._program, name)


def plan_graph(gm: fx.GraphModule, meshes: list[Mesh], request: dict[str, str], *, model: str, hardware: str,
               phase: str, weight_dtype: str | None = None, objective: str = "latency") -> Plan:
    """Choose layouts for a captured and prepared graph (layouts not in `request` by cost), insert them."""
    from .ir.hardware import get_hardware
    from .planning import Question
    from .strategies.cost import Precision

    q = Question(meshes=meshes, hw=get_hardware(hardware), precision=Precision(weights=weight_dtype),
                 objective=objective, request=request, phase=phase, model=model)
    return _plan_full(gm, q)


# ------------------------------------------------------------------------------------ run and check
def simulate(plan: Plan, args: tuple, kwargs: dict | None = None) -> Any:
    """Run every rank of `plan` in this process (collectives computed across ranks); rank 0's output."""
    if plan.program is None:
        raise ShardwiseError("this Plan has no program (it was loaded from JSON): re-plan to simulate")
    return plan.program.simulate(tuple(args), kwargs)


@dataclass
class VerifyReport:
    model: str
    mesh: str
    layouts: dict[str, str]
    max_abs_diff: float | None  # None where not measured (decode on real ranks: tokens are compared)
    atol: float
    ranks: str  # "simulated" or "gloo" / "nccl"
    param_bytes_per_rank: list[int] = field(default_factory=list)
    param_bytes_total: int = 0
    replicated: list[list] = field(default_factory=list)
    phase: str = "prefill"
    tokens_equal: bool | None = None  # decode: greedy tokens identical to the unsharded model's
    bytes_rows: list[tuple[str, str, int, int]] = field(default_factory=list)  # (layer, kind, predicted, measured)

    @property
    def ok(self) -> bool:
        return ((self.max_abs_diff is None or self.max_abs_diff <= self.atol) and self.tokens_equal is not False
                and all(p == m for _, _, p, m in self.bytes_rows))

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"{verdict}: {self.model} on mesh {self.mesh} ({self.ranks} ranks), {self.phase}, "
                 f"layouts {self.layouts or 'chosen by cost'}"]
        if self.tokens_equal is None:
            lines.append(f"  max |sharded − unsharded| = {self.max_abs_diff:.3e}  (bound {self.atol:.0e})")
        else:
            logits = "" if self.max_abs_diff is None else f" (prefill logits within {self.max_abs_diff:.3e})"
            lines.append(f"  greedy tokens {'identical to' if self.tokens_equal else 'DIFFER from'} the unsharded "
                         f"model's{logits}")
        if self.param_bytes_per_rank:
            per = self.param_bytes_per_rank
            lines.append(f"  parameter bytes per rank: {', '.join(f'{b:,}' for b in per)} of {self.param_bytes_total:,} "
                         f"total ({per[0] / max(1, self.param_bytes_total):.3f} of the model per rank)")
        for key, extra, factor in self.replicated[:6]:
            lines.append(f"    replicated ×{factor}: {key} (+{extra:,.0f} B per rank)")
        if self.bytes_rows:
            from .runtime.accounting import format_comparison

            same = all(p == m for _, _, p, m in self.bytes_rows)
            lines.append(f"  collective bytes, predicted vs measured per layer: {'all equal' if same else 'DIFFERENT'}")
            lines += ["    " + l for l in format_comparison(self.bytes_rows).splitlines()]
        return "\n".join(lines)


def max_abs_diff(got: Any, want: Any) -> float:
    g, _ = tree_flatten(got)
    w, _ = tree_flatten(want)
    g = [t for t in g if isinstance(t, torch.Tensor)]
    w = [t for t in w if isinstance(t, torch.Tensor)]
    if len(g) != len(w):
        raise ShardwiseError(f"the sharded program returned {len(g)} tensors, the model {len(w)}")
    return max((float((a.float() - b.float()).abs().max()) for a, b in zip(g, w) if a.numel()), default=0.0)


def verify(
    model: nn.Module | str,
    args: tuple | None = None,
    kwargs: dict | None = None,
    *,
    mesh: Mesh | str,
    layouts: str | dict | None = None,
    atol: float = 1e-5,
    batch: int = 8,
    seq: int = 16,
    nproc: int | None = None,
    phase: str = "prefill",
    tokens: int = 16,
    bytes: bool = False,
) -> VerifyReport:
    """Plan, run every rank, and compare with the unsharded model.

    prefill: the outputs of `model(*args, **kwargs)` (max abs difference); decode: `tokens` greedy
    tokens generated with sharded prefill and decode steps (must be identical). `bytes=True` also
    compares the collective bytes each layer executed with the plan's prediction. Ranks are simulated
    in this process, or, with `nproc`, real torch.distributed processes launched with torchrun
    (`model` must then be a preset name, so each worker can rebuild it on the meta device).
    """
    mesh = Mesh.parse(mesh)
    if phase not in ("prefill", "decode"):
        raise ShardwiseError(f"unknown phase {phase!r}: use 'prefill' or 'decode'")
    if nproc is not None:
        return _verify_real(model, args, kwargs, mesh=mesh, layouts=layouts, atol=atol, batch=batch, seq=seq,
                            nproc=nproc, phase=phase, tokens=tokens, record=bytes)
    from .runtime.accounting import compare, compare_generation
    from .runtime.generate import generate, reference_generate

    model, args, kwargs, name = _model_and_inputs(model, args, kwargs, batch, seq)
    p = plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    trace = Trace()
    with torch.no_grad():
        want = model(*args, **kwargs)
        got = p.program.simulate(args, kwargs, trace=trace)
    report = VerifyReport(name, str(mesh), p.settings["layouts"], max_abs_diff(got, want), atol, "simulated",
                          [_held(p, r) for r in range(mesh.size)], _model_bytes(model), p.memory.get("replicated", []),
                          phase=phase)
    if phase == "prefill" and bytes:
        report.bytes_rows = compare(p, trace.collectives, p.program.gm)
    if phase == "decode":
        ids = args[0]
        gen = generate(model, ids, tokens, mesh=mesh, layouts=layouts, simulate=True, details=True)
        report.tokens_equal = torch.equal(gen.tokens, reference_generate(model, ids, tokens))
        if bytes:
            report.bytes_rows = compare_generation(gen, tokens)
    return report


def _held(p: Plan, rank: int) -> int:
    return sum(t.numel() * t.element_size() for t in p.program.emit(rank, group_name=sim_group_name).state_dict().values())


def _model_bytes(model: nn.Module) -> int:
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _verify_real(model, args, kwargs, *, mesh: Mesh, layouts, atol, batch, seq, nproc, phase, tokens,
                 record) -> VerifyReport:
    from .errors import MeshError
    from .runtime.generate import reference_generate
    from .runtime.launch import run_real

    if not isinstance(model, str):
        raise ShardwiseError("verify(..., nproc=N) launches fresh processes: pass a preset name as the model")
    if nproc != mesh.size:
        raise MeshError(f"mesh {mesh} has {mesh.size} chips but --nproc is {nproc}: they must be equal")
    name = model
    model, args, kwargs, _ = _model_and_inputs(model, args, kwargs, batch, seq)
    p = plan(model, args, kwargs, mesh=mesh, layouts=layouts)
    state = p.program.gm.meta["sw_state"]
    run = run_real(model=name, mesh=str(mesh), layouts=layouts, args=args, kwargs=kwargs, state=state, nproc=nproc,
                   phase=phase, extra={"tokens": tokens, "record": record})
    report = VerifyReport(name, str(mesh), p.settings["layouts"], None, atol, run.backend, run.param_bytes,
                          _model_bytes(model), p.memory.get("replicated", []), phase=phase,
                          bytes_rows=run.bytes_rows)
    with torch.no_grad():
        if phase == "prefill":
            report.max_abs_diff = max_abs_diff(run.output, model(*args, **kwargs))
        else:
            report.tokens_equal = torch.equal(run.output, reference_generate(model, args[0], tokens))
    return report
