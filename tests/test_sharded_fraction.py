"""A plan that shards nothing says so: the sharded fraction of the parameter bytes and of the matmul FLOPs
in the summary, the JSON, the HTML report and verify's text; a block's matmul left unsharded is a
NotShardedWarning naming it, and a ShardwiseError with strict=True; experts reported as replicated."""

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shardwise
from shardwise.errors import ShardwiseError
from shardwise.ir.meta import LAYOUT
from shardwise.ir.plan import NotShardedWarning, Plan
from shardwise.planning.costing import op_flops
from shardwise.planning.sharding import check_sharded
from shardwise.report.html import render_html

aten = torch.ops.aten


# ------------------------------------------------------------------------------------ small models
class Attention(nn.Module):
    """Causal attention with `kv` KV heads; with `gate`, an output gate o(attn · σ(gate(x))) (Qwen3-Next)."""

    def __init__(self, E: int, H: int, kv: int, gate: bool = False):
        super().__init__()
        self.H, self.K, self.D = H, kv, E // H
        self.q = nn.Linear(E, E, bias=False)
        self.k = nn.Linear(E, kv * self.D, bias=False)
        self.v = nn.Linear(E, kv * self.D, bias=False)
        self.gate = nn.Linear(E, E, bias=False) if gate else None
        self.o = nn.Linear(E, E, bias=False)

    def forward(self, x):
        B, L, E = x.shape
        q = self.q(x).view(B, L, self.H, self.D).transpose(1, 2)
        k, v = (p(x).view(B, L, self.K, self.D).transpose(1, 2).repeat_interleave(self.H // self.K, dim=1)
                for p in (self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, E)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return self.o(y)


class Block(nn.Module):
    """Attention and a GELU feed-forward; with `mixer`, one more projection between them that is part of
    neither (find_layers leaves it to propagation: under a replicated residual it runs whole)."""

    def __init__(self, E: int, H: int, kv: int, *, gate: bool, mixer: bool):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(E), nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = Attention(E, H, kv, gate)
        self.mixer = nn.Linear(E, E, bias=False) if mixer else None
        self.up, self.down = nn.Linear(E, 4 * E, bias=False), nn.Linear(4 * E, E, bias=False)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        if self.mixer is not None:
            x = x + self.mixer(self.n2(x))
        return x + self.down(F.gelu(self.up(self.n3(x))))


class Decoder(nn.Module):
    def __init__(self, *, V=64, E=32, H=4, kv=4, n=2, gate=False, mixer=False):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.layers = nn.ModuleList(Block(E, H, kv, gate=gate, mixer=mixer) for _ in range(n))
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, V, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.layers:
            x = b(x)
        return self.head(self.norm(x))


IDS = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
MIXER = {"mesh": "1x1x4", "layouts": "ffn=ws1d_ar"}  # the all-reduce 1D layout keeps the residual whole


def _model(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(**kw).eval()


# ------------------------------------------------------------------------------------ independent counts
def split_param_bytes(gm, mesh) -> tuple[int, int]:
    """(sharded, total) parameter bytes of a planned program, from each weight placeholder's layout."""
    sig = gm.meta["sw_signature"]
    sharded = total = 0
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name in sig.params and sig.params[n.name] not in sig.buffers:
            nbytes = n.meta["val"].numel() * n.meta["val"].element_size()
            total += nbytes
            sharded += nbytes if mesh.group_size(n.meta[LAYOUT].used) > 1 else 0
    return sharded, total


def split_flops(gm, mesh) -> tuple[float, float]:
    """(split, total) FLOPs of the projections and attention cores of a planned program."""
    split = total = 0.0
    for n in gm.graph.nodes:
        if n.target is aten.linear.default:
            whole = 2.0 * n.meta["val"].numel() * n.args[0].meta["val"].shape[-1]
        elif n.target is aten.scaled_dot_product_attention.default:
            B, H, L, D = n.args[0].meta["val"].shape
            whole = 4.0 * B * H * L * n.args[1].meta["val"].shape[2] * D
        else:
            continue
        total += whole
        split += whole if op_flops(n, mesh) < whole else 0.0
    return split, total


# ------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def llama():
    return shardwise.plan("llama-tiny", mesh="1x1x4")


def test_preset_reports_exact_sharded_fractions(llama):
    """Would catch: a fraction not scaled from the prototype's one block to every block, a replicated
    weight counted as split (or the reverse), FLOPs of the wrong ops, and a report that omits them."""
    s = llama.sharding
    assert s.chips == 4 and s.param_fraction >= 0.9 and s.flops_fraction >= 0.9
    gm = llama.program.gm  # the whole model, captured and planned as the prototype's choice says
    sharded, total = split_param_bytes(gm, llama.mesh)
    assert (s.sharded_param_bytes, s.param_bytes) == (sharded, total)
    assert (s.sharded_flops, s.flops) == pytest.approx(split_flops(gm, llama.mesh), rel=1e-12)
    assert s.unsharded == [] and s.experts == []
    replicated = sum(r.bytes for r in s.replicated)
    assert replicated == total - sharded
    assert all("norm" in r.name for r in s.replicated)  # only the norms' scales stay whole
    assert any(r.name.startswith("model.layers.[0-1].") for r in s.replicated)  # blocks named as a range
    line = next(l for l in llama.summary().splitlines() if l.startswith("sharded: "))
    assert f"{s.param_fraction * 100:.1f}% of parameter bytes" in line and "% of matmul FLOPs" in line
    assert "replicated: model.layers.[0-1]." in line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_sharded(llama, strict=True) is llama  # nothing to warn of


def test_json_keeps_the_fractions_and_old_files_still_load(llama):
    text = llama.to_json()
    back = Plan.from_json(text)
    assert back.sharding == llama.sharding and back.to_json() == text
    assert back.summary() == llama.summary()
    old = json.loads(text)
    del old["sharding"]  # a format-2 file written before the field existed
    older = Plan.from_json(json.dumps(old))
    assert older.sharding is None and "sharded: " not in older.summary()
    assert "What is sharded" not in render_html(older)
    bad = json.loads(text)
    bad["sharding"]["unknown"] = 1
    with pytest.raises(ShardwiseError, match="sharding.unknown"):
        Plan.from_json(json.dumps(bad))


def test_html_shows_the_fractions(llama):
    page = render_html(llama)
    assert "What is sharded" in page and f"{llama.sharding.param_fraction * 100:.1f}%" in page
    assert "sharded: parameters · matmul FLOPs" in page and "class='warn'" not in page


@pytest.fixture(scope="module")
def mixer_plan():
    with pytest.warns(NotShardedWarning, match="layers.0.mixer") as w:  # plan() itself warns
        p = shardwise.plan(_model(mixer=True), (IDS,), **MIXER)
    assert w[0].filename == __file__  # points at the caller, not at shardwise
    return p


def test_unsharded_block_matmul_warns_then_strict_raises(mixer_plan):
    """Would catch: a block's extra projection run whole on every chip and reported as fine."""
    p = mixer_plan
    s = p.sharding
    assert [(u.module, u.weight) for u in s.unsharded] == [("layers.0.mixer", "layers.0.mixer.weight"),
                                                          ("layers.1.mixer", "layers.1.mixer.weight")]
    assert all("every chip computes it whole" in u.why and "holds its weight whole" in u.why for u in s.unsharded)
    sharded, total = split_param_bytes(p.program.gm, p.mesh)
    assert (s.sharded_param_bytes, s.param_bytes) == (sharded, total) and s.param_fraction < 0.95
    assert {"layers.0.mixer.weight", "layers.1.mixer.weight"} <= {r.name for r in s.replicated}
    assert "matmuls of the blocks not sharded:" in p.summary() and "layers.1.mixer: aten.linear" in p.summary()
    with pytest.raises(ShardwiseError, match=r"2 matmuls inside the blocks are not sharded") as e:
        check_sharded(p, strict=True)
    assert "layers.0.mixer" in str(e.value) and "Expected every matmul" in str(e.value)
    assert "strict=False" in str(e.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sharded(p)  # once per plan: plan() warned already
    page = render_html(p)
    assert "class='warn'" in page and "layers.0.mixer" in page


def test_plan_warns_and_strict_raises():
    m = _model(mixer=True)
    with pytest.warns(NotShardedWarning, match="layers.0.mixer"):
        shardwise.plan(m, (IDS,), **MIXER)
    with pytest.raises(ShardwiseError, match="layers.0.mixer"):
        shardwise.plan(m, (IDS,), **MIXER, strict=True)


def test_verify_states_the_fractions_and_takes_strict():
    m = _model(mixer=True)
    with pytest.raises(ShardwiseError, match="layers.0.mixer"):
        shardwise.verify(m, (IDS,), strict=True, **MIXER)
    with pytest.warns(NotShardedWarning) as w:
        report = shardwise.verify(m, (IDS,), **MIXER)
    assert report.ok and w[0].filename == __file__
    text = str(report)
    assert f"sharded: {report.sharding.param_fraction * 100:.1f}% of parameter bytes" in text
    assert "matmuls of the blocks not sharded:" in text and "layers.1.mixer" in text


def test_attention_output_gate_is_split_like_q():
    """Would catch: an attention output gate split like the KV heads (with one KV head: not at all)."""
    m = _model(kv=1, gate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotShardedWarning)
        report = shardwise.verify(m, (IDS,), mesh="1x1x4", layouts="attn=heads", strict=True)
    assert report.ok and report.sharding.unsharded == []
    p = shardwise.plan(m, (IDS,), mesh="1x1x4", layouts="attn=heads")
    gate = p.layer("layers.0.attn").weights["gate"]
    assert gate["in_use"] == p.layer("layers.0.attn").weights["q"]["in_use"] == "(HD)_z E"
    assert "layers.0.attn.gate.weight" not in {r.name for r in p.sharding.replicated}


def test_experts_reported_as_replicated():
    """Would catch: a mixture of experts whose experts run whole reported as a sharded model. Mixtral with
    transformers' `batched_mm` experts picks each routed row's expert weights by index (`W[ids]`, then a
    `bmm` per row), a form canonicalize does not fuse, so its experts stay replicated (its default grouped
    matmuls are split: tests/test_experts.py; gpt-oss's and Llama 4's: tests/test_expert_forms.py)."""
    pytest.importorskip("transformers")
    from shardwise.models.presets import build_hf

    m = build_hf("mixtral")
    m.set_experts_implementation("batched_mm")
    p = shardwise.plan(m, (IDS,), {"use_cache": False}, mesh="1x1x4")
    s = p.sharding
    assert s.experts == ["model.layers.0.mlp", "model.layers.1.mlp"] and s.experts_per_block == 4
    expert_bytes = sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if ".mlp." in k)
    assert s.expert_param_bytes == expert_bytes
    note = next(n for n in p.notes if n.startswith("experts run replicated"))
    assert f"(4 experts per block: {expert_bytes / s.param_bytes * 100:.1f}% of the parameters)" in note
    assert s.param_fraction < 0.5 and s.flops_fraction < 0.5  # the experts are most of the model
    with pytest.raises(ShardwiseError, match="mixture-of-experts experts"):
        check_sharded(p, strict=True)


def test_strict_must_be_a_bool():
    m = _model(mixer=True)
    with pytest.raises(ShardwiseError, match=r"strict='yes': expected True"):
        shardwise.plan(m, (IDS,), **MIXER, strict="yes")
