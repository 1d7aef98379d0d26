"""int8 weights for real (issue 12, item 3): rank programs hold projection weights as int8 with
per-output-row scales of the whole weight, and multiply them with torch's int8 weight kernel.

Reference: the DEQUANTIZED float model — the same model with each quantized weight W replaced by q · s
(q = round(W / s) in [-127, 127], s = absmax of W's output row / 127). Tolerance 1e-5 absolute on logits of
magnitude ≤ ~1 (float32, rtol 0), as in test_numerics: sharding reorders the sums inside matmuls and norms
(partials added over ≤ 4 ranks), and the kernel scales after the dot product ((x · q) · s rather than
x · (q · s)): one more rounding per output, ~1 ulp. Measured: ≤ 3e-7. Quantization itself moves these
logits by ~5e-3, so a weight left in float or a wrong scale is ≥ 100× outside the tolerance.

`shardwise.plan(..., weight_dtype="int8")` reaches the rank programs through `Program(..., quantize=...)`,
and generate's ranks through `emit_rank(..., quantize=program.quantize)`.
"""

import copy

import pytest
import torch

import shardwise
from shardwise.drivers.generate import generate
from shardwise.errors import InputError
from shardwise.models import example_inputs
from shardwise.passes.emit import dequantized_model, quantizable
from shardwise.planning.program import Program
from shardwise.runtime.quantize import int8_addmm, int8_linear, int8_mm, quantize_weight
from shardwise.runtime.simulate import Trace, sim_group_name

ATOL = 1e-5
MODELS = ["llama-tiny", "gpt2-tiny"]
MESHES = ["1x1x4", "2x2x1"]
LAYOUTS = ["ffn=ws1d,attn=heads", "ffn=ws2d,attn=batch", "ffn=ws1d_ar,attn=batch"]


def _logits(x):
    return x if isinstance(x, torch.Tensor) else x.logits


@pytest.mark.parametrize("layouts", LAYOUTS)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", MODELS)
def test_int8_program_equals_dequantized_model(tiny, name, mesh, layouts):
    model = tiny(name)
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh=mesh, layouts=layouts, weight_dtype="int8")
    ref, quantized = dequantized_model(model, plan.program.gm)
    # every block's projections (llama: q k v o gate up down × 2 + the head; GPT-2: c_attn c_proj c_fc
    # c_proj × 2, its head being tied to the embedding table stays float)
    assert len(quantized) == {"llama-tiny": 15, "gpt2-tiny": 8}[name]
    with torch.no_grad():
        got = _logits(shardwise.simulate(plan, args, kwargs))
        want = _logits(ref(*args, **kwargs))
        floating = _logits(model(*args, **kwargs))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - floating).abs().max() > 100 * ATOL  # the weights really were quantized
    prog = plan.program.emit(0, group_name=sim_group_name).program
    ints = [k for k, t in prog.state_dict().items() if t.dtype == torch.int8]
    assert len(ints) == len(quantizable(plan.program.gm))
    assert sum(n.target in (int8_linear, int8_addmm, int8_mm) for n in prog.graph.nodes) == len(ints)


def test_dequantized_model_refuses_a_model_the_plan_was_not_made_from(tiny):
    """Another architecture (a weight missing), or the same names in other shapes: InputError naming the weight,
    not a KeyError, and never a copy of the wrong model's weights quantized."""
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d,attn=heads", weight_dtype="int8")
    with pytest.raises(InputError, match=r"weight model\.layers\.\d+\..*does not have"):
        dequantized_model(tiny("gpt2-tiny"), plan.program.gm)
    other = copy.deepcopy(model)
    other.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.up_proj\.weight of shape .* holds as \(8, 8\)"):
        dequantized_model(other, plan.program.gm)


@pytest.mark.parametrize("layouts", ["ffn=wg_x,attn=heads", "ffn=wg_xy,attn=batch", "ffn=wg_xyz,attn=heads"])
def test_weight_gathered_layouts_gather_int8(tiny, layouts):
    """Weight-gathered projections are stored and gathered as int8 (1 byte per element moved), each rank
    holding the scales of the rows it multiplies after the gather (sibling weights stacked into one fused
    gather included)."""
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts=layouts, weight_dtype="int8")
    ref, quantized = dequantized_model(model, plan.program.gm)
    assert len(quantized) == 15
    gathered = [ph for ph, (_, _, fed) in quantizable(plan.program.gm).items() if fed != ph]
    assert gathered
    trace = Trace()
    with torch.no_grad():
        got = _logits(plan.program.simulate(args, kwargs, trace=trace))
        want = _logits(ref(*args, **kwargs))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    float_plan = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts=layouts)
    float_trace = Trace()
    with torch.no_grad():
        float_plan.program.simulate(args, kwargs, trace=float_trace)
    moved = sum(c.bytes for c in trace.collectives)
    assert moved < sum(c.bytes for c in float_trace.collectives)  # int8 weights gathered, not float32


def _quantized_bytes(program: Program, rank: int) -> tuple[int, int]:
    """(bytes of rank's quantized weights + scales, bytes of the same shards in the captured dtype)."""
    q = program.emit(rank, group_name=sim_group_name).program.state_dict()
    program.quantize = None
    f = program.emit(rank, group_name=sim_group_name).program.state_dict()
    program.quantize = "int8"
    names = [k for k, t in q.items() if t.dtype == torch.int8]
    int8 = sum(q[k].nbytes + q[k + "_scale"].nbytes for k in names)
    return int8, sum(f[k].nbytes for k in names)


@pytest.mark.parametrize("mesh", MESHES)
def test_rank_weight_bytes_are_a_quarter_of_float32(tiny, mesh):
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh=mesh, layouts="ffn=ws2d,attn=heads", weight_dtype="int8")
    for rank in range(plan.mesh.size):
        int8, fp32 = _quantized_bytes(plan.program, rank)
        # one byte per weight plus one fp32 scale per local output row (K ≥ 16 here: ≤ 1/16 extra)
        assert fp32 / 4 < int8 <= fp32 / 4 * (1 + 4 / 16)


def test_row_parallel_shards_use_the_global_scales(tiny):
    """o_proj and down_proj under ws1d split their input dim: each rank's scales are the whole rows'."""
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    plan = shardwise.plan(model, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d,attn=heads", weight_dtype="int8")
    state = dict(model.named_parameters())
    for key in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        q_full, s_full = quantize_weight(state[key])
        attr = "w_" + "".join(c if c.isalnum() else "_" for c in key)
        pieces = []
        for rank in range(4):
            prog = plan.program.emit(rank, group_name=sim_group_name).program
            q, s = getattr(prog, attr), getattr(prog, attr + "_scale")
            assert q.shape[1] == q_full.shape[1] // 4  # split along the input dim
            torch.testing.assert_close(s, s_full, atol=0, rtol=0)
            pieces.append(q)
        assert torch.equal(torch.cat(pieces, 1), q_full)


def test_other_weight_dtypes_keep_float_weights(tiny):
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    for dtype in (None, "bf16"):
        plan = shardwise.plan(model, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d,attn=heads", weight_dtype=dtype)
        prog = plan.program.emit(0, group_name=sim_group_name).program
        assert all(t.dtype == torch.float32 for t in prog.state_dict().values())


def test_int8_linear_kernel_and_fallback_agree():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q, s = quantize_weight(w)
    x, b = torch.randn(2, 5, 64), torch.randn(48)
    want = torch.nn.functional.linear(x, q.float() * s[:, None], b)
    torch.testing.assert_close(int8_linear(x, q, s, b), want, atol=1e-5, rtol=1e-5)  # float32: converted
    xb, qb, sb = x.bfloat16(), *quantize_weight(w.bfloat16())  # bf16: torch's int8-weight kernel
    wantb = torch.nn.functional.linear(xb.float(), qb.float() * sb.float()[:, None]) + b
    torch.testing.assert_close(int8_linear(xb, qb, sb, b), wantb, atol=0.05, rtol=0.02)  # bf16 output rounding
    xl = torch.randn(4, 8, 64).bfloat16()  # 32 rows: the int8 shard converted instead (faster past 16 rows)
    wantl = torch.nn.functional.linear(xl.float(), qb.float() * sb.float()[:, None])
    torch.testing.assert_close(int8_linear(xl, qb, sb).float(), wantl, atol=0.05, rtol=0.02)
    xt = x.transpose(0, 1)  # not contiguous
    torch.testing.assert_close(int8_linear(xt, q, s, b), want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    got = int8_linear(x.double(), q, s, b.double())  # no kernel for float64: dequantized on the fly
    torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=1e-5)
    zero = quantize_weight(torch.zeros(3, 8))  # an all-zero row: scale 1, no division by zero
    assert torch.equal(zero[0], torch.zeros(3, 8, dtype=torch.int8)) and torch.equal(zero[1], torch.ones(3))


@pytest.mark.parametrize("name", MODELS)
def test_int8_decode_gives_the_dequantized_models_tokens(tiny, name):
    model = tiny(name)
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(1))
    gen = generate(model, ids, 4, mesh="1x1x4", layouts="ffn=ws1d,attn=heads", simulate=True,
                   weight_dtype="int8", details=True)
    assert gen.decode.program.quantize == "int8" and gen.prefill.program.quantize == "int8"
    # each step timed (what bench_int8 reports): the prefill once, then every token after the first
    assert len(gen.step_s["prefill"]) == 1 and len(gen.step_s["decode"]) == 3
    assert all(s > 0 for s in gen.step_s["prefill"] + gen.step_s["decode"])
    ref, _ = dequantized_model(model, gen.decode.program.gm)
    want = generate(ref, ids, 4, mesh="1x1x4", layouts="ffn=ws1d,attn=heads", simulate=True, details=True)
    assert torch.equal(gen.tokens, want.tokens)
    floating = generate(model, ids, 4, mesh="1x1x4", layouts="ffn=ws1d,attn=heads", simulate=True, details=True)
    for got, exp, flt in zip(gen.logits, want.logits, floating.logits):
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0)
        assert (got - flt).abs().max() > 100 * ATOL  # decoded with int8 weights, not the float ones


def test_int8_shards_read_from_a_file_equal_those_from_memory(tiny, tmp_path):
    """Read slice by slice from a safetensors file: the same int8 shards and scales; a row-parallel shard's
    scales need its rows' other columns, read a shard at a time (counted in bytes_read)."""
    from shardwise.runtime.weights import SafetensorsSource, save_state

    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    # the head split over the vocabulary: column-parallel, read as its shard only (head=E would read its rows)
    plan = shardwise.plan(model, args, kwargs, mesh="1x1x4", layouts="ffn=ws1d,attn=heads,head=vocab",
                          weight_dtype="int8")
    path = str(tmp_path / "w.safetensors")
    save_state(plan.program.state, path)
    source = SafetensorsSource(path)
    from_file = plan.program.emit(1, group_name=sim_group_name, weights=source).program.state_dict()
    in_memory = plan.program.emit(1, group_name=sim_group_name).program.state_dict()
    assert from_file.keys() == in_memory.keys()
    assert all(torch.equal(from_file[k], in_memory[k]) for k in in_memory)
    shards = sum(t.numel() * 4 for k, t in in_memory.items() if not k.endswith("_scale"))  # float32 in the file
    # o_proj and down_proj (row-parallel: input dim split) read their whole rows once more, for the scales
    rows = sum(model.get_parameter(k).nbytes for k in model.state_dict()
               if k.endswith(("o_proj.weight", "down_proj.weight")))
    assert source.bytes_read == shards + rows


@pytest.mark.parametrize("layouts", ["ffn=wg_xy,attn=batch", "ffn=ws2d,attn=heads"])
def test_plan_predicts_the_bytes_an_int8_program_moves(tiny, layouts):
    """Would catch: int8 weights gathered at 1 byte per element while the plan still counts 4."""
    from shardwise.drivers.accounting import compare

    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 8, 16)
    rows = {}
    for dtype in ("int8", None):
        plan = shardwise.plan(model, args, kwargs, mesh="2x2x1", layouts=layouts, weight_dtype=dtype)
        trace = Trace()
        plan.program.simulate(args, kwargs, trace=trace)
        rows[dtype] = compare(plan, trace.collectives, plan.program.gm)
        assert all(p == m for _, _, p, m in rows[dtype]), [r for r in rows[dtype] if r[2] != r[3]]
    if layouts.startswith("ffn=wg"):  # the weight gathers move a quarter of float32's bytes
        assert sum(r[2] for r in rows["int8"]) < sum(r[2] for r in rows[None])
