"""Mixture-of-experts experts as a layer kind, split expert-sliced or expert-parallel (issue 10, first slice).

Tiny Mixtral, Qwen3-MoE and OLMoE (transformers 5 exports their experts as `grouped_mm_fallback` over
stacked [experts, ·, ·] weights, gate and up fused in one) on simulated ranks, meshes 1x1x4 and 2x2x1:

  recognised  find_layers makes one `experts` layer per block (router, X experts, E, F, top-k; gate, up
              and down weights, the fused gate_up unfused by canonicalize), no mixture left replicated
  numbers     prefill logits equal the unsharded model's within atol 1e-5 in float32: the routing runs
              replicated on every rank, bit for bit the unsharded one (the router's matmul reads its
              input gathered whole), so the same experts are picked; only the down projection's sum over
              F is reordered (4 partial sums added by the reduction), a few ulps of logits of size ~1,
              measured ≤ 3e-7; a wrong shard or a flipped routing is off by far more than 1e-5
  tokens      8 greedy tokens through prefill + decode equal the unsharded greedy loop's
  held        every rank program holds exactly 1/n of each expert weight's bytes (its state_dict)

for the expert-sliced layout (each expert's F split over every chip: the default) and, on Mixtral and
Qwen3-MoE, expert parallel (`experts=parallel`: each rank holds 4 / n experts, and on 2x2x2 experts over
x·y combined with F over z); OLMoE's experts have Qwen3-MoE's form, so it is checked sliced only.
"""

import math

import pytest
import torch

from shardwise import api
from shardwise.drivers.generate import reference_generate
from shardwise.ir.meta import LAYERS, UNKNOWN
from shardwise.models.presets import build_hf
from shardwise.runtime.simulate import sim_group_name

ATOL = 1e-5
MESHES = ("1x1x4", "2x2x1")
ARCHS = ("mixtral", "qwen3_moe", "olmoe")


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return build_hf(request.param)


def _ids():
    return torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


def _expert_keys(model) -> dict[str, int]:
    """State keys of the stacked expert weights (3-D, under an `experts` module) → their bytes."""
    return {k: t.numel() * t.element_size() for k, t in model.state_dict().items() if ".experts." in k and t.ndim == 3}


@pytest.mark.parametrize("mesh", MESHES)
def test_experts_sliced_equal_unsharded(model, mesh):
    _check(model, mesh, None)


@pytest.mark.parametrize("arch,mesh", [("mixtral", "1x1x4"), ("mixtral", "2x2x1"), ("qwen3_moe", "1x1x4"),
                                       ("qwen3_moe", "2x2x1"), ("mixtral", "2x2x2")])
def test_experts_parallel_equal_unsharded(arch, mesh):
    plan = _check(_built(arch), mesh, "experts=parallel")
    layer = next(l for l in plan.layers if l.kind == "experts")
    assert layer.choice.endswith(":parallel")
    want = "X_xy F_z E" if mesh == "2x2x2" else ("X_z FE" if mesh == "1x1x4" else "X_xy FE")
    assert layer.weights["w_gate"]["at_rest"] == want, layer.weights


_BUILT: dict = {}


def _built(arch):
    if arch not in _BUILT:
        _BUILT[arch] = build_hf(arch)
    return _BUILT[arch]


def _check(model, mesh, layouts):
    ids = _ids()
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh=mesh, layouts=layouts)
    gm = plan.program.gm
    layers = gm.meta[LAYERS]
    experts = layers.by_kind("experts")
    assert len(experts) == 2 and not layers.experts, "every mixture is an experts layer, none left replicated"
    for block, layer in zip(layers.blocks, experts):
        assert block.experts is layer and layer.block == block.index
        assert set(layer.params) == {"w_gate", "w_in", "w_out"} and layer.info["gated"] and layer.info["fused"]
        assert layer.dims["X"] == 4 and layer.dims["k"] == 2 and layer.dims["E"] == 64
    assert not [u for u in plan.sharding.unsharded if "experts" in u.module]
    assert not plan.sharding.experts  # nothing reported as experts run replicated
    unknown = {u.target for u in gm.meta[UNKNOWN]}
    assert not unknown & {"aten.topk.default", "aten.sort.default", "aten.histc.default", "aten.index_put_.default"}

    ranks = [plan.program.emit(r, group_name=sim_group_name) for r in range(plan.mesh.size)]
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}, programs=[r.program for r in ranks]).logits
        want = model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= ATOL

    full = sum(_expert_keys(model).values())
    for r in ranks:
        held = sum(t.numel() * t.element_size() for k, t in r.program.state_dict().items() if "experts" in k)
        assert held * plan.mesh.size == full, (held, full)

    tokens = api.generate(model, ids, 8, mesh=mesh, layouts=layouts, simulate=True)
    assert torch.equal(tokens, reference_generate(model, ids, 8))
    return plan


def test_parallel_experts_need_the_fused_form_and_the_request_is_checked():
    from shardwise.errors import ShardwiseError

    with pytest.raises(ShardwiseError, match="unknown experts layout 'wide'"):
        api.plan(_built("qwen3_moe"), (_ids(),), {"use_cache": False}, mesh="1x1x4", layouts="experts=wide")


def test_forced_2d_layout_splits_experts_too():
    """ffn=ws2d names the block's member; the experts of a block without a dense feed-forward follow it."""
    model = build_hf("qwen3_moe")
    ids = _ids()
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh="2x2x1", layouts="ffn=ws2d")
    assert "ws2d" in plan.chosen
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}).logits
        want = model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= ATOL
    notes = [n for l in plan.layers if l.kind == "experts" for n in l.notes]
    assert any("experts sliced" in n for n in notes), notes


def test_weight_bytes_count_the_experts_a_step_touches():
    """Uniform routing: B·L tokens, each to k of X experts, touch X·(1 − (1 − k/X)^(B·L)) distinct experts;
    a decode step of 2 tokens (k = 2 of 4) reads 3/4 of the expert bytes a long prefill reads."""
    from shardwise.planning.costing import touched_fraction

    share = touched_fraction({"X": 4, "k": 2})
    assert share(2 * 2) == pytest.approx(0.75) and share(16 * 2) == pytest.approx(1 - 0.5**16)
    assert touched_fraction({"X": 4})(8) == 1.0  # top-k unknown: every expert
    model = _built("mixtral")
    cost = {}
    for phase, L in (("prefill", 8), ("decode", 1)):
        ids = torch.randint(0, 256, (2, L), generator=torch.Generator().manual_seed(0))
        plan = api.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4")
        cost[phase] = plan.layer("model.layers.0.mlp").cost["weight_bytes"]
    router = 4 * 64 * 4
    assert (cost["decode"] - router) == pytest.approx(0.75 * (cost["prefill"] - router) / (1 - 0.5**16))


def test_expert_load_under_uniform_routing():
    """The busiest of g expert groups gets R/g + √(2·(R/g)·ln g) of R routed rows (at least ⌈R/g⌉);
    expert-sliced (g = 1) is balanced and reads the touched share of every expert's slice."""
    from shardwise.planning.costing import expert_load

    sliced = expert_load({"X": 8, "k": 2}, 64, 1)
    assert (sliced.rows, sliced.imbalance) == (64, 1.0)
    assert sliced.touched == pytest.approx(8 * (1 - (6 / 8) ** 32))
    par = expert_load({"X": 8, "k": 2}, 64, 4)
    assert par.rows == pytest.approx(16 + (2 * 16 * math.log(4)) ** 0.5)
    assert par.imbalance == pytest.approx(par.rows / 16) and 1 < par.imbalance < 2
    assert par.touched == pytest.approx(2 * (1 - 0.5**par.rows))
    assert expert_load({"X": 8, "k": 2}, 1, 8).rows == 1  # one row: the busiest group has it, whole


@pytest.mark.parametrize("hardware,want", [("h100", "parallel"), ("tpu-v4", "sliced")])
def test_planner_chooses_the_expert_layout_by_cost(hardware, want):
    """Both expert layouts are candidates, costed and explained; the cheaper is chosen. On h100 a matmul
    call costs 5 µs: expert-sliced runs all 4 experts (12 calls) on every chip, expert parallel its 1 (3
    calls), which outweighs the busiest chip's extra rows. TPU v4 charges no call overhead (its profile
    was fitted without one): then the balanced sliced layout wins over parallel's ×1.6 busiest chip."""
    ids = _ids()
    plan = api.plan(_built("mixtral"), (ids,), {"use_cache": False}, mesh="1x1x4", hardware=hardware)
    assert plan.main.experts == want
    layer = plan.layer("model.layers.0.mlp")
    assert layer.choice.endswith(":parallel") == (want == "parallel")
    assert any("busiest chip" in n for n in layer.notes), layer.notes
    lines = [l for l in plan.explain if "+experts-" in l]
    chosen = [l for l in lines if l.endswith("chosen")]
    assert len(chosen) == 1 and f"+experts-{want}" in chosen[0]
    other = "sliced" if want == "parallel" else "parallel"
    rival = next(l for l in lines if f"{plan.main.member}+heads+experts-{other}" in l)
    assert "+" in rival.split("ms")[1], rival  # lost, by a positive margin that names its reason


def test_forced_expert_layout_is_the_only_candidate():
    plan = api.plan(_built("mixtral"), (_ids(),), {"use_cache": False}, mesh="1x1x4", hardware="h100",
                    layouts="experts=sliced")
    assert plan.main.experts == "sliced"
    assert not [l for l in plan.explain if "+experts-parallel" in l]


def test_replicated_experts_are_the_unsharded_baseline():
    """`experts=replicated` (requested only: the baseline the expert layouts are measured against): every rank
    holds every expert whole and runs every routed row; the numbers are the unsharded model's and no
    collective is spent on the experts."""
    model, ids = _built("mixtral"), _ids()
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4", layouts="experts=replicated")
    layer = plan.layer("model.layers.0.mlp")
    assert layer.choice.endswith(":replicated") and layer.weights["w_out"]["at_rest"] == "XEF"
    assert not layer.collectives and plan.main.experts == "replicated"
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}).logits
        want = model(ids, use_cache=False).logits
    assert (got - want).abs().max().item() <= ATOL
    full = sum(_expert_keys(model).values())
    held = sum(t.numel() * t.element_size() for k, t in plan.program.emit(1, group_name=sim_group_name).state_dict().items()
               if "experts" in k and t.ndim == 3)
    assert held == full


def test_experts_that_do_not_divide_are_refused_with_the_reason():
    """3 experts on 4 chips: experts=parallel is refused, saying why and what to do; by cost the planner
    lists the refusal and takes expert-sliced (F = 256 divides)."""
    from shardwise.errors import ShardwiseError

    model, ids = build_hf("mixtral", num_local_experts=3), _ids()
    with pytest.raises(ShardwiseError, match=r"its 3 experts do not split over .* use experts=sliced"):
        api.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4", layouts="experts=parallel")
    plan = api.plan(model, (ids,), {"use_cache": False}, mesh="1x1x4", hardware="h100")
    assert plan.main.experts == "sliced"
    assert any("+experts-parallel" in l and "refused" in l and "3 experts do not split" in l for l in plan.explain)
    with torch.no_grad():
        got = plan.program.simulate((ids,), {"use_cache": False}).logits
    assert (got - model(ids, use_cache=False).logits).abs().max().item() <= ATOL


def test_a_checkpoint_whose_blocks_differ_is_planned_as_its_common_block(tmp_path):
    """DeepSeek-V3 with one dense block then two mixtures, planned from its checkpoint directory on the meta
    device: the prototype is a mixture block (the common kind), run as layer 0; the plan says the dense
    block is costed as it; the router's score bias (a buffer in the files) is a weight read from them."""
    import shardwise

    build_hf("deepseek_v3", num_hidden_layers=3).save_pretrained(tmp_path)
    plan = shardwise.plan(str(tmp_path), chips=4, phase="decode", batch=4, seq=1, context=16, hardware="h100")
    assert any(n.startswith("blocks differ: planned as block 1's kind (2 of 3 blocks); blocks 0 ") for n in plan.notes)
    experts = [l for l in plan.layers if l.kind == "experts"]
    assert len(experts) == 1 and experts[0].count == 3


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_a_checkpoint_storing_experts_one_by_one_is_read_in_slices(tmp_path, arch):
    """save_pretrained writes each expert on its own (Mixtral: block_sparse_moe.experts.{i}.w1/w3/w2; DeepSeek:
    mlp.experts.{i}.gate_proj/up_proj/down_proj), as published checkpoints are; transformers stacks them
    when it loads. A rank reads only its experts' pieces (its rows of each) and gets the unsharded numbers."""
    import shardwise

    build_hf(arch).save_pretrained(tmp_path)
    for layouts in ("experts=sliced", "experts=parallel"):
        report = shardwise.verify(str(tmp_path), mesh="1x1x4", batch=2, seq=8, layouts=layouts)
        assert report.ok and report.max_abs_diff <= ATOL, str(report)
        assert len(set(report.bytes_read)) == 1 and report.bytes_read[0] < 0.3 * report.checkpoint_bytes


@pytest.mark.parametrize("layouts", ["experts=parallel", "latent=split"])
def test_a_split_forced_for_layers_the_model_lacks_is_refused(layouts):
    """A dense model asked for an experts or latent split: a ShardwiseError naming the request, not a plan
    that silently ignores it."""
    from shardwise.errors import ShardwiseError

    with pytest.raises(ShardwiseError, match=f"layouts asks {layouts}, but the model has no"):
        api.plan(build_hf("llama"), (_ids(),), {"use_cache": False}, mesh="1x1x4", layouts=layouts)


def test_all_to_all_dispatch_is_refused_where_it_cannot_run():
    """experts=a2a needs the tokens split over chips (a member with batch axes), experts that divide those
    chips, and the mixture in the form that runs over a subset of the tokens: each refusal says so."""
    from shardwise.errors import ShardwiseError

    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ShardwiseError, match="splits no chips over the batch.*nothing to dispatch"):
        api.plan(_built("mixtral"), (ids,), {"use_cache": False}, mesh="1x1x4", layouts="ffn=ws1d,experts=a2a")
    with pytest.raises(ShardwiseError, match=r"its 3 experts do not split over the 2 chips wg_x splits the batch"):
        api.plan(build_hf("mixtral", num_local_experts=3), (ids,), {"use_cache": False}, mesh="2x2x1",
                 layouts="ffn=wg_x,experts=a2a")
    plan = api.plan(_built("mixtral"), (ids,), {"use_cache": False}, mesh="1x1x4", hardware="h100")
    assert any("+experts-a2a" in l for l in plan.explain)  # a candidate wherever some member splits the batch



def test_dispatch_all_to_alls_are_priced_at_the_busiest_chip():
    """An all-to-all dispatch is uneven: the busiest chip receives R/g + √(2·R/g·ln g) of the R routed rows
    (and sends as many back), so its all-to-alls pay their bytes term × that over the mean (the fixed
    latency once); its bytes stay the rows each chip owns. The counts' all-gather is even."""
    from shardwise.ir.hardware import get_hardware
    from shardwise.ir.mesh import Mesh
    from shardwise.planning.costing import expert_load
    from shardwise.strategies.cost import Comm, collective_time
    from shardwise.strategies.redistribute import dispatch

    mesh, hw = Mesh.parse("1x1x4"), get_hardware("h100")
    counts, move, back = dispatch(("z0", "z1"), 8, 2, 64, 4, mesh, 4)
    assert (counts.kind, move.kind, back.kind) == ("all_gather", "all_to_all", "all_to_all")
    assert move.bytes == 8 * 2 * 64 * 4 and counts.bytes == 4 * 4 * 8
    load = expert_load({"X": 4, "k": 2}, 32, 4).imbalance
    fixed = collective_time(move, 4, hw) - collective_time(move, 4, hw, fixed=False)
    assert Comm(move, 4, load=load).time(hw) == pytest.approx(fixed + load * collective_time(move, 4, hw, fixed=False))
    assert load > 1.2

    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    plan = api.plan(_built("mixtral"), (ids,), {"use_cache": False}, mesh="1x1x4", hardware="h100",
                    layouts="ffn=wg_xyz,experts=a2a")
    row = plan.layer("model.layers.0.mlp")
    moves = [c for c in row.collectives if c.kind == "all_to_all"]
    assert len(moves) == 2 and {c.bytes for c in moves} == {8 * 2 * 64 * 4}  # 8 tokens per chip, k = 2, E = 64
