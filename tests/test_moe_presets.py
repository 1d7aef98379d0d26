"""The mixture-of-experts presets at their published sizes, planned on the meta device.

DeepSeek-V3 decode on 64 H200 chips, checked against a hand computation (`test_deepseek_v3_decode_on_64_h200`):

    batch 256 sequences, one token each: T = 256 tokens, each routed to k = 8 of X = 256 experts
    routed experts of one block: 3 matrices (gate, up, down) × 256 × 7168 × 2048 × 2 B = 22.55 GB; the
      planner splits them expert parallel: 4 whole experts per chip, 352.3 MB per chip
    routed rows: T·k = 2048, 32 per chip on average; the busiest of the 64 chips (uniform routing):
      32 + √(2 · 32 · ln 64) = 48.3 rows, which touch 1 − (3/4)^48.3 ≈ 1 of its 4 experts
    HBM time of the experts row: 352.3 MB / (4.8 TB/s × 0.7 achievable) = 0.1048 ms,
      plus the router's weight, replicated and kept in float32 as the checkpoint loads it
      (256 × 7168 × 4 B = 7.3 MB: 0.0022 ms): 0.107 ms per block
    compute of the experts row: 2 FLOPs × 48.3 rows × 3 × 7168 × 2048 = 4.25 GFLOP on the busiest chip,
      plus the router's matmul, 2 × 256 × 7168 × 256 = 0.94 GFLOP, / (989 TFLOP/s × 0.75 achievable)
      = 7.0 µs, plus 4 experts × 3 matmuls × 5 µs (h200's assumed cost of a call) = 60 µs
    a step reads at least every chip's share of the weights it touches once, at full HBM bandwidth:
      latency ≥ (touched share of the weights) / 64 / 4.8 TB/s ≈ 1.41 TB / 64 / 4.8 TB/s = 4.6 ms
"""

import gc
import math
from pathlib import Path

import pytest
import torch

import shardwise
from shardwise.ir.hardware import get_hardware
from shardwise.ir.kinds import LayerKind
from shardwise.models import presets

MOE = ("mixtral-8x7b", "qwen3-235b-a22b", "gpt-oss-120b", "deepseek-v3")


@pytest.mark.parametrize("name,params,experts,top_k", [
    ("mixtral-8x7b", 46.70e9, 8, 2),  # the model cards' totals: 46.7B, 235B, 117B, 671B
    ("qwen3-235b-a22b", 235.1e9, 128, 8),
    ("gpt-oss-120b", 116.8e9, 128, 4),
    ("deepseek-v3", 671.0e9, 256, 8),
])
def test_published_sizes_on_the_meta_device(name, params, experts, top_k):
    model = presets.build_model(name)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=2e-3)
    assert model.config._experts_implementation == "grouped_mm"  # transformers 5's stacked experts
    stacked = [m for n, m in model.named_modules() if n.endswith(".experts")]
    assert stacked and all(p.shape[0] == experts for m in stacked for p in m.parameters())
    assert model.config.num_experts_per_tok == top_k


def test_deepseek_v3_prototype_is_a_moe_block_and_says_so():
    full, proto = presets.build_model("deepseek-v3"), presets.build_model("deepseek-v3", layers=1)
    assert not hasattr(full.model.layers[2].mlp, "experts") and hasattr(full.model.layers[3].mlp, "experts")
    assert hasattr(proto.model.layers[0].mlp, "experts")  # the repeated kind, not the first (dense) block
    assert "first 3 layers" in presets.get("deepseek-v3").assumes
    # the checkpoint's float32 router (transformers' _keep_in_fp32_modules_strict), the rest bf16
    assert proto.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert proto.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16


def test_deepseek_v3_decode_on_64_h200():
    """Expert weights split, memory within HBM, nothing materialised, and the module docstring's hand
    computation against the plan's experts row and step latency (one plan: it takes a few seconds)."""
    gc.collect()  # what earlier tests left in this worker is not this plan's
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size (VmHWM) restarts from now
    plan = shardwise.plan("deepseek-v3", chips=64, hardware="h200", phase="decode", batch=256, seq=1, context=2048)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
    experts = [l for l in plan.layers if l.kind == LayerKind.EXPERTS]
    assert experts and sum(l.count for l in experts) == 61
    for layer in experts:
        assert {"w_gate", "w_in", "w_out"} <= set(layer.weights)
        for role in ("w_gate", "w_in", "w_out"):
            assert "_" in layer.weights[role]["at_rest"], (role, layer.weights[role])  # a split dim: X_… or F_…
    assert not plan.sharding.experts  # no mixture run replicated
    assert not any("experts" in r.name and r.share > 0.01 for r in plan.sharding.replicated)
    assert plan.memory.weights_per_chip + plan.memory.kv_cache_per_chip <= get_hardware("h200").hbm_bytes
    # split 64 ways but for what the plan replicates by choice: each block's router (7.3 MB, float32) and,
    # with latent=replicated, its latent attention's low-rank projections (q_a, kv_a: 30 MB in bf16)
    assert plan.memory.weights_per_chip == pytest.approx(plan.memory.weights_total / 64 + plan.memory.replicated_per_chip,
                                                         rel=0.01)
    per_block = 256 * 7168 * 4 + (7168 * (1536 + 576) * 2 if plan.main.latent == "replicated" else 0)
    assert plan.memory.replicated_per_chip < 61 * per_block * 1.05
    # nothing was materialised: a DeepSeek-V3 MoE block alone is 23 GB in bf16. The peak is this plan's (the
    # process's lifetime peak, ru_maxrss, was another test's when a 7 GB coverage model ran in this worker first)
    assert peak < 8 * 1024**3, f"peak resident size while planning: {peak / 1024**3:.1f} GiB"

    hw = get_hardware("h200")
    row = max((l for l in plan.layers if l.kind == LayerKind.EXPERTS), key=lambda l: l.count)
    assert row.choice.endswith(":parallel") and plan.main.experts == "parallel"
    assert row.weights["w_gate"]["at_rest"] == "X_xyz FE"  # 4 whole experts per chip
    busiest = 32 + (2 * 32 * math.log(64)) ** 0.5
    expert_bytes = (1 - 0.75**busiest) * 3 * 4 * 7168 * 2048 * 2
    router_bytes = 256 * 7168 * 4
    hbm = hw.hbm_bandwidth * hw.hbm_efficiency
    assert row.cost["memory"] == pytest.approx((expert_bytes + router_bytes) / hbm, rel=0.03)
    flops = 2 * busiest * 3 * 7168 * 2048 + 2 * 256 * 7168 * 256
    calls = 4 * 3 * hw.call_overhead
    assert row.cost["compute"] == pytest.approx(flops / (hw.peak_flops * hw.flops_efficiency) + calls, rel=0.03)
    touched = 1 - (1 - 8 / 256) ** 256
    assert row.cost["time"] >= row.cost["memory"]
    floor = touched * plan.memory.weights_total / 64 / hw.hbm_bandwidth
    assert plan.totals.latency >= floor


def test_a_long_prefill_dispatches_tokens_by_all_to_all():
    """Mixtral 8x7B prefill of 512 × 2048 tokens on 64 H100s: moving each routed row to its expert's chip
    and back (experts=a2a, the tokens split over the batch chips) costs less than gathering every token
    on every chip, and the planner says so; decode of 256 tokens keeps expert parallel (few rows: the
    weight gathers of a batch-splitting member cost more than gathering the tokens). Each all-to-all is
    charged the rows its chip owns: tokens per chip × top-k × E × 2 bytes."""
    plan = shardwise.plan("mixtral-8x7b", chips=64, hardware="h100", phase="prefill", batch=512, seq=2048)
    assert plan.main.experts == "a2a"
    row = max((l for l in plan.layers if l.kind == LayerKind.EXPERTS), key=lambda l: l.count)
    assert row.choice.endswith(":a2a") and any("all-to-all dispatch" in n for n in row.notes), row.notes
    moves = [c for c in row.collectives if c.kind == "all_to_all"]
    assert len(moves) == 2
    group = math.prod(plan.mesh.shape["xyz".index(a)] for a in moves[0].group)
    assert {c.bytes for c in moves} == {512 * 2048 // group * 2 * 4096 * 2}
    assert any("+experts-a2a" in l and l.endswith("chosen") for l in plan.explain)
    decode = shardwise.plan("mixtral-8x7b", chips=8, hardware="h100", phase="decode", batch=256, seq=1, context=2048)
    assert decode.main.experts == "parallel"
    assert any("+experts-a2a" in l and "communication" in l for l in decode.explain)
