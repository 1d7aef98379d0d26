"""Hugging Face checkpoint directories (issue 9, item 4): plan, verify and generate from what
`save_pretrained` writes, each rank reading only its slices of the files.

The checkpoints are made here: a tiny Llama (E 64, F 128, 2 layers, 4 heads, 2 KV heads, vocabulary
128) with random weights, saved as one file (with a tokenizer), as 20 KB shards with an index, in
bfloat16, and a second one with tied embeddings (save_pretrained writes `model.embed_tokens.weight`
only). The unsharded reference is `AutoModelForCausalLM.from_pretrained(dir)`.

Tolerances: float32 logits within 1e-5 (sharding only reorders sums: a few float32 ulps; greedy tokens
identical). bfloat16 logits within 8 · 2^-8 · max(1, max |logit|): each sharded reduction rounds every
rank's partial sum to bfloat16 before adding them (about 2 extra roundings of u = 2^-8 per reduction,
≤ 5 reductions here), as tests/test_fuzz.py argues and measures; a lost shard is off by O(0.1-1).

Bytes: each rank reads exactly the bytes of the shards it holds (its share of every weight under the
plan's layouts: 1/4 of the big matrices, plus what is replicated), about 0.275 of the checkpoint here,
never the whole of it.
"""

import json
import math

import pytest
import torch

import shardwise
from shardwise import cli
from shardwise.errors import ShardwiseError
from shardwise.ir.meta import LAYOUT, SIGNATURE
from shardwise.models.checkpoint import Checkpoint, is_checkpoint, missing
from shardwise.models.steps import Step, empty_cache, step_inputs
from shardwise.runtime.weights import CheckpointSource

MESH = "1x1x4"
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "initializer_range": 0.1,
         "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}
SENTENCES = ["the quick brown fox jumps over the lazy dog", "a sharded model reads only its slices of the checkpoint",
             "hello world from four ranks"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=128, special_tokens=["[UNK]"]))
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SIZES)).eval()
    model.save_pretrained(root / "fp32")
    _tokenizer().save_pretrained(root / "fp32")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.to(torch.float16).save_pretrained(root / "fp16")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    torch.manual_seed(1)
    tied = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SIZES, tie_word_embeddings=True)).eval()
    tied.save_pretrained(root / "tied")
    return {name: root / name for name in ("fp32", "sharded", "fp16", "bf16", "tied")}


def _reference(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _atol(want: torch.Tensor) -> float:
    """float32: 1e-5 (sums reordered over 4 ranks move logits by ~1e-6); bf16/fp16: 8 units of rounding of the
    logits' magnitude (each split sum rounds every rank's partial before adding them)."""
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(want.dtype)
    return 1e-5 if unit is None else 8 * unit * max(1.0, float(want.float().abs().max()))


def _shard_bytes(program, mesh) -> int:
    """What one rank holds of the weights stored in the files (buffers aside), from the plan's layouts."""
    sig = program.gm.meta[SIGNATURE]
    total = 0
    for node in program.gm.graph.nodes:
        if node.op == "placeholder" and node.name in sig.params and sig.params[node.name] not in sig.buffers:
            val = node.meta["val"]
            local = node.meta[LAYOUT].local_shape(tuple(val.shape), mesh)
            total += math.prod(local) * val.element_size()
    return total


def test_a_checkpoint_directory_is_read_from_its_headers_and_built_on_meta(ckpts, tmp_path):
    from safetensors import safe_open

    for name, path in ckpts.items():
        assert is_checkpoint(path) and is_checkpoint(str(path)) and missing(path) is None, name
    assert not is_checkpoint(tmp_path) and "no config.json" in missing(tmp_path)
    sharded = Checkpoint.open(ckpts["sharded"])
    assert len(set(sharded.files.values())) > 2  # shards, found through the index's weight_map
    index = json.loads((ckpts["sharded"] / "model.safetensors.index.json").read_text())
    assert set(sharded.files) == set(index["weight_map"])
    with safe_open(str(ckpts["fp32"] / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118
    assert sharded.nbytes == Checkpoint.open(ckpts["fp32"]).nbytes == stored
    assert Checkpoint.open(ckpts["bf16"]).nbytes == stored // 2
    assert "lm_head.weight" not in Checkpoint.open(ckpts["tied"]).files  # written once, as the embedding

    ref = _reference(ckpts["bf16"])
    ckpt = Checkpoint.open(ckpts["bf16"])
    meta = ckpt.build_meta()
    assert ckpt.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert {p.dtype for p in meta.parameters()} == {torch.bfloat16}
    buffers = dict(meta.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())  # computed, not in the files
    for key, b in ref.named_buffers():
        assert torch.equal(buffers[key], b), key
    assert ckpt.tokenizer() is None and Checkpoint.open(ckpts["fp32"]).tokenizer() is not None


@pytest.mark.parametrize("name, how", [("fp32", "prototype"), ("bf16", "prototype"), ("fp16", "args"), ("sharded", "args"),
                                       ("tied", "args")])
def test_a_plan_from_a_checkpoint_gives_the_unsharded_models_numbers(ckpts, name, how):
    """plan("dir", mesh=...) on simulated ranks = from_pretrained(dir); each rank reads only its shards."""
    path = ckpts[name]
    ref = _reference(path)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    if how == "prototype":  # no example inputs: the step of one block planned, the whole step emitted
        p = shardwise.plan(str(path), mesh=MESH, batch=2, seq=8)
        args, kwargs = step_inputs(ref, ids, 0, empty_cache(ref, 2, 8)), {}
        step = Step(ref, last_only=True)
        with torch.no_grad():
            want, got = step(*args), p.program.simulate(args)
        pairs = [(got[0], want[0])] + list(zip(got[1] + got[2], want[1] + want[2]))  # logits, then the KV cache
    else:  # the model's own call, captured whole on the meta device
        args, kwargs = (ids,), {"use_cache": False}
        p = shardwise.plan(path, args, kwargs, mesh=MESH)
        with torch.no_grad():
            want, got = ref(*args, **kwargs), p.program.simulate(args, kwargs)
        pairs = [(got["logits"], want.logits)]
    assert p.model == name
    for g, w in pairs:
        assert g.dtype == w.dtype == ref.dtype
        assert (g.float() - w.float()).abs().max() <= _atol(w)
    if ref.dtype == torch.float32:
        assert torch.equal(got[0].argmax(-1) if how == "prototype" else got["logits"].argmax(-1),
                           want[0].argmax(-1) if how == "prototype" else want.logits.argmax(-1))

    program, total = p.program, Checkpoint.open(path).nbytes
    expected = _shard_bytes(program, program.mesh)
    assert [program.bytes_read[r] for r in range(4)] == [expected] * 4
    assert 0.25 < expected / total < 0.3, (expected, total)  # 1/4 of the big weights, plus replicated pieces


def test_generate_from_a_checkpoint_gives_the_unsharded_models_tokens(ckpts):
    """Tied embeddings: the graph reads lm_head.weight, which the files hold as model.embed_tokens.weight."""
    from shardwise.drivers.generate import reference_generate

    ckpt = Checkpoint.open(ckpts["tied"])
    source = CheckpointSource(ckpt)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens = shardwise.generate(source.model, ids, 6, mesh=MESH, simulate=True, weights=source)
    assert torch.equal(tokens, reference_generate(_reference(ckpts["tied"]), ids, 6))
    assert source.bytes_distinct < ckpt.nbytes * 4 * 0.3  # 4 simulated ranks, each its shards


def test_every_mismatch_is_a_clear_error(ckpts):
    from safetensors import safe_open

    source = CheckpointSource(ckpts["sharded"])
    key = "model.layers.0.mlp.up_proj.weight"
    source.check(key, (128, 64), torch.float32)
    with pytest.raises(ShardwiseError, match=r"has shape \[128, 64\], but the graph expects a \[64, 64\]"):
        source.check(key, (64, 64), torch.float32)
    with pytest.raises(ShardwiseError, match="is float32, but the graph expects bfloat16"):
        source.check(key, (128, 64), torch.bfloat16)
    with pytest.raises(ShardwiseError, match=r"'model.layers.7.mlp.up_proj.weight' is missing from the checkpoint"):
        source.check("model.layers.7.mlp.up_proj.weight", (128, 64), torch.float32)
    with pytest.raises(ShardwiseError, match="does not reach that far"):
        source.check(f"{key}[0:100+64]", (64, 64), torch.float32)

    file = source.checkpoint.files[key]
    with safe_open(str(file), "pt") as f:
        whole = f.get_tensor(key)
    derived = f"{key}[0:64+32]"  # rows 64..95, as canonicalize names a slice of a fused weight
    source.check(derived, (32, 64), torch.float32)
    got = source.read(derived, (slice(8, 16), slice(0, 64)))
    assert torch.equal(got, whole[72:80]) and source.bytes_read == 8 * 64 * 4

    inv_freq = dict(_reference(ckpts["sharded"]).named_buffers())["model.rotary_emb.inv_freq"]
    source.check("model.rotary_emb.inv_freq", tuple(inv_freq.shape), inv_freq.dtype)  # not in the files
    assert torch.equal(source.read("model.rotary_emb.inv_freq", (slice(0, 8),)), inv_freq)
    assert source.bytes_read == 8 * 64 * 4  # a buffer is not read from the files

    tied = CheckpointSource(ckpts["tied"])
    tied.check("lm_head.weight", (128, 64), torch.float32)
    with safe_open(str(ckpts["tied"] / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(tied.read("lm_head.weight", (slice(32, 64), slice(0, 64))), embed[32:64])


def test_a_path_that_is_not_a_checkpoint_says_what_is_missing(tmp_path, ckpts):
    with pytest.raises(ShardwiseError, match="no file or directory"):
        shardwise.plan(str(tmp_path / "absent"), mesh=MESH)
    (tmp_path / "config.json").write_text((ckpts["fp32"] / "config.json").read_text())
    with pytest.raises(ShardwiseError, match=r"has no safetensors weights \(model.safetensors"):
        shardwise.plan(tmp_path, mesh=MESH)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.safetensors").write_bytes((ckpts["fp32"] / "model.safetensors").read_bytes())
    with pytest.raises(ShardwiseError, match="has no config.json"):
        shardwise.plan(str(tmp_path), mesh=MESH)
    with pytest.raises(ShardwiseError, match="unknown model 'llama-tinyy': neither a preset"):
        shardwise.plan("llama-tinyy", mesh=MESH)


def test_the_cli_inspects_and_verifies_a_checkpoint(ckpts, capsys):
    assert cli.main(["inspect", str(ckpts["sharded"]), "--mesh", MESH, "--batch", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sharded ") and "mesh=1x1x4" in out
    assert cli.main(["verify", str(ckpts["bf16"]), "--mesh", MESH, "--batch", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: bf16 on mesh 1x1x4 (simulated ranks)"), out
    assert out.count("(0.275 of the checkpoint)") == 4, out


def test_verify_takes_a_checkpoint_directory(ckpts):
    """shardwise.verify("dir", ...): the ranks read from the files, compared with from_pretrained; decode too."""
    report = shardwise.verify(str(ckpts["sharded"]), mesh=MESH, batch=2, seq=8)
    assert report.ok and report.max_abs_diff <= 1e-5 and report.atol == 1e-5
    assert len(report.bytes_read) == 4 and len(set(report.bytes_read)) == 1
    assert report.checkpoint_bytes == Checkpoint.open(ckpts["sharded"]).nbytes
    assert 0.25 < report.bytes_read[0] / report.checkpoint_bytes < 0.3
    assert "checkpoint bytes read per rank" in str(report) and report.sharding.param_fraction > 0.9
    decode = shardwise.verify(str(ckpts["tied"]), mesh="2x2x1", batch=2, seq=4, phase="decode", tokens=3)
    assert decode.ok and decode.tokens_equal is True
    with pytest.raises(ShardwiseError, match="not available for a checkpoint directory"):
        shardwise.verify(str(ckpts["fp32"]), mesh=MESH, bytes=True)


def test_the_cli_refuses_a_prompt_without_a_tokenizer(ckpts, capsys):
    assert cli.main(["generate", str(ckpts["sharded"]), "--mesh", MESH, "--prompt", "hello world"]) == 2
    err = capsys.readouterr().err
    assert "--prompt needs a tokenizer" in err and "--ids 1,2,3" in err
    assert cli.main(["generate", str(ckpts["sharded"]), "--mesh", MESH, "--ids", "1,2,300"]) == 2
    assert "token id 300 is outside the vocabulary of sharded (ids 0..127)" in capsys.readouterr().err
    assert cli.main(["generate", str(ckpts["sharded"]), "--mesh", "1x1x4", "--nproc", "2", "--ids", "1,2"]) == 2
    assert "--nproc is 2: they must be equal" in capsys.readouterr().err


def test_generate_on_4_real_ranks_reads_only_its_slices_of_the_checkpoint(ckpts, capsys):
    """`shardwise generate DIR --nproc 4 --prompt TEXT`: 4 gloo ranks, each building the model on meta from
    config.json and reading its slices from the checkpoint's own file; the text decoded by its tokenizer."""
    code = cli.main(["generate", str(ckpts["fp32"]), "--mesh", MESH, "--nproc", "4", "--prompt", "the quick brown fox",
                     "--tokens", "4", "--check", "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 real gloo ranks" in out and "greedy tokens identical to the unsharded model's" in out
    assert "text 0: the quick brown fox" in out
    total = Checkpoint.open(ckpts["fp32"]).nbytes
    rows = [line for line in out.splitlines() if line.strip().startswith("rank ")]
    assert len(rows) == 4 and all("(0.275 of the checkpoint" in r for r in rows), out
    assert f"of {total:,} B in the checkpoint" in out
