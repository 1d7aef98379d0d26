"""The sharded program keeps the model's contract: the call it was planned for runs exactly, any other
call is refused with an InputError naming what was planned and what was given; ids outside the
vocabulary raise as the unsharded model's embedding does; plans read from JSON are validated; what was
asked for is what is planned, or the plan says why not."""

import json

import pytest
import torch

import shardwise
from shardwise.errors import InputError, TokenIdError
from shardwise.models import RefConfig, RefDecoder, example_inputs
from shardwise.runtime.simulate import sim_group_name


@pytest.fixture(scope="module")
def llama_plan(tiny):
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 4, 8)
    return model, args, kwargs, shardwise.plan(model, args, kwargs, mesh="1x1x2", layouts="ffn=ws1d,embed=vocab")


def _other_calls(args, kwargs):
    ids = args[0]
    yield "a keyword not planned for", (ids,), {**kwargs, "attention_mask": torch.ones_like(ids)}, "attention_mask"
    yield "another batch", (ids[:2],), kwargs, "int64[2, 8]"
    yield "another length", (ids[:, :4],), kwargs, "int64[4, 4]"
    yield "float ids", (ids.float(),), kwargs, "float32[4, 8]"
    yield "1-D ids", (ids[0],), kwargs, "int64[8]"
    yield "a changed value", (ids,), {**kwargs, "use_cache": True}, "use_cache = True"
    yield "a missing keyword", (ids,), {}, "planned for the call"


@pytest.mark.parametrize("case", [c[0] for c in _other_calls((torch.zeros(4, 8, dtype=torch.long),), {})])
def test_a_call_not_planned_for_is_refused(llama_plan, case):
    model, args, kwargs, plan = llama_plan
    _, args2, kwargs2, named = next(c for c in _other_calls(args, kwargs) if c[0] == case)
    with pytest.raises(InputError, match="planned for the call") as e:
        shardwise.simulate(plan, args2, kwargs2)
    assert named in str(e.value) and "input_ids: int64[4, 8]" in str(e.value)
    program = plan.emit(0, group_name=sim_group_name)  # one rank's module refuses the same way
    with pytest.raises(InputError, match="plan again"):
        program(*args2, **kwargs2)


def test_the_planned_call_runs_exactly(llama_plan):
    model, args, kwargs, plan = llama_plan
    with torch.no_grad():
        torch.testing.assert_close(shardwise.simulate(plan, args, kwargs).logits, model(*args, **kwargs).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [256, 10_000, -1])
@pytest.mark.parametrize("embed", ["vocab", "E"])
def test_ids_out_of_range_raise_as_the_model_does(tiny, bad, embed):
    """The unsharded embedding raises IndexError; a vocab-split table would only see zeros without the check."""
    model = tiny("llama-tiny")
    args, kwargs = example_inputs(model, 4, 8)
    plan = shardwise.plan(model, args, kwargs, mesh="1x1x2", layouts=f"ffn=ws1d,embed={embed}")
    ids = args[0].clone()
    ids[1, 3] = bad
    with pytest.raises(IndexError):
        model(ids, **kwargs)
    with pytest.raises(IndexError) as e:
        shardwise.simulate(plan, (ids,), kwargs)
    if embed == "vocab":
        assert isinstance(e.value, TokenIdError) and "[0, 256)" in str(e.value)


def test_head_split_by_d_model_where_the_vocabulary_does_not_divide():
    """V = 250 does not split 4 ways but E = 64 does: the head is split over E, numbers exact."""
    torch.manual_seed(0)
    model = RefDecoder(RefConfig(vocab=250)).eval()
    ids = torch.randint(0, 250, (4, 8))
    plan = shardwise.plan(model, (ids,), mesh="1x1x4", layouts="ffn=ws1d")
    head = next(l for l in plan.layers if l.kind == "head")
    assert head.choice == "E"
    with torch.no_grad():
        torch.testing.assert_close(shardwise.simulate(plan, (ids,)), model(ids), atol=1e-5, rtol=0)


def test_a_head_neither_dim_divides_is_refused_with_the_alternatives():
    """A lone output projection (a head: outside every block, feeding the output), V = 250 and E = 60 on 8."""
    head = torch.nn.Linear(60, 250, bias=False)
    with pytest.raises(shardwise.ShardwiseError, match=r"neither the vocabulary V = 250 \(head=vocab\) nor d_model "
                                                       r"E = 60 \(head=E\)"):
        shardwise.plan(head, (torch.zeros(4, 8, 60),), mesh="1x1x8")


# ------------------------------------------------------------------------------------ plans from JSON
@pytest.fixture(scope="module")
def plan_json():
    return json.loads(shardwise.plan("llama-tiny", mesh="2x2x1", layouts="ffn=ws2d,attn=batch").to_json())


def _tampered(d):
    yield "truncated", json.dumps(d)[:200], "not JSON"
    yield "empty", "", "not JSON"
    yield "a list", "[]", "a list"
    yield "no version", json.dumps({k: v for k, v in d.items() if k != "format"}), "plan format None"
    yield "mesh", json.dumps({**d, "mesh": "2x2x0"}), "axis of size 0"
    yield "mesh type", json.dumps({**d, "mesh": 4}), "mesh"
    run = dict(d["runs"][0], member="ws9")
    yield "layout ws9", json.dumps({**d, "runs": [run]}), "ws9"
    layers = json.loads(json.dumps(d["layers"]))
    next(l for l in layers if l["collectives"])["collectives"][0]["kind"] = "teleport"
    yield "kind teleport", json.dumps({**d, "layers": layers}), "teleport"
    layers = json.loads(json.dumps(d["layers"]))
    next(l for l in layers if l["collectives"])["collectives"][0]["bytes"] = -5
    yield "negative bytes", json.dumps({**d, "layers": layers}), "-5"
    yield "wrong type", json.dumps({**d, "batch": "eight"}), "batch"
    yield "unknown field", json.dumps({**d, "exec": "import os"}), "exec"
    yield "layer kind", json.dumps({**d, "layers": [dict(d["layers"][0], kind="mlp")]}), "mlp"
    yield "mesh without the collectives' axes", json.dumps({**d, "mesh": "1x1x1"}), "do not belong to this mesh"
    ffn = next(i for i, l in enumerate(d["layers"]) if l["kind"] == "ffn")
    layers = json.loads(json.dumps(d["layers"]))
    layers[ffn]["choice"] = "ws9"
    yield "layer layout ws9", json.dumps({**d, "layers": layers}), "ws9"
    layers = json.loads(json.dumps(d["layers"]))
    layers[ffn]["dims"]["E"] = -64
    yield "negative dim", json.dumps({**d, "layers": layers}), "dim E = -64"
    layers = json.loads(json.dumps(d["layers"]))
    next(l for l in layers if l["collectives"])["collectives"][0]["group"] = "w"
    yield "group w", json.dumps({**d, "layers": layers}), "do not belong"
    yield "runs backwards", json.dumps({**d, "runs": [dict(d["runs"][0], first=1, last=0)]}), "comes before"
    yield "attention rows", json.dumps({**d, "runs": [dict(d["runs"][0], attention="rows")]}), "'rows'"
    yield "requested ws9", json.dumps({**d, "settings": dict(d["settings"], requested={"ffn": "ws9"})}), "ws9"


@pytest.mark.parametrize("case", ["truncated", "empty", "a list", "no version", "mesh", "mesh type", "layout ws9",
                                  "kind teleport", "negative bytes", "wrong type", "unknown field", "layer kind",
                                  "mesh without the collectives' axes", "layer layout ws9", "negative dim", "group w",
                                  "runs backwards", "attention rows", "requested ws9"])
def test_a_tampered_plan_is_refused(plan_json, case):
    _, text, named = next(t for t in _tampered(plan_json) if t[0] == case)
    with pytest.raises(shardwise.ShardwiseError) as e:
        shardwise.Plan.from_json(text)
    assert named in str(e.value)


# ------------------------------------------------------------------------------------ what was asked
def test_a_forced_layout_is_honoured_when_searching_meshes():
    """ffn=ws2d on 8 chips: meshes where ws2d would act as ws1d (an axis of size 1) are not searched."""
    plan = shardwise.plan("palm-62b", chips=8, layouts="ffn=ws2d", phase="prefill", batch=1, seq=128)
    assert plan.main.family == "2D WS" and plan.main.member == "ws2d"
    assert any("not searched" in n and "1x2x4" in n for n in plan.notes)


def test_a_layout_acting_as_another_on_the_mesh_is_said():
    plan = shardwise.plan("llama-tiny", mesh="2x2x1", layouts="ffn=wg_xyz")
    assert plan.main.member == "wg_xy"
    assert "wg_xyz acts as wg_xy on mesh 2x2x1" in plan.summary()


def test_decode_without_a_context_states_the_default():
    plan = shardwise.plan("llama-tiny", mesh="1x1x2", phase="decode", seq=16)
    assert plan.settings.context == 16
    assert any("no context given" in n for n in plan.notes) and "context 16" in plan.summary()


@pytest.mark.parametrize("kwargs, named", [
    (dict(mesh=4), "mesh=4"), (dict(mesh="1x1x2", batch=0), "batch=0"), (dict(mesh="1x1x2", seq=-1), "seq=-1"),
    (dict(mesh="1x1x2", phase="train"), "phase 'train'"), (dict(mesh="1x1x2", weight_dtype="fp7"), "fp7"),
    (dict(mesh="1x1x2", objective="speed"), "objective 'speed'"), (dict(chips=0), "chips=0"),
    (dict(mesh="1x1x2", seq=200), "at most 128 positions"),
    (dict(mesh="1x1x2", collective_matmul="yes"), "collective_matmul='yes'"),
])
def test_bad_arguments_are_clear_errors(kwargs, named):
    with pytest.raises(shardwise.ShardwiseError, match=named.replace("(", r"\(")):
        shardwise.plan("gpt2-tiny", **kwargs)


def test_empty_inputs_are_refused_with_the_right_hint():
    model = RefDecoder(RefConfig()).eval()
    with pytest.raises(shardwise.CaptureError, match="is empty"):
        shardwise.plan(model, (torch.zeros(0, 8, dtype=torch.long),), mesh="1x1x2")


@pytest.mark.parametrize("call, named", [
    (lambda: shardwise.plan("llama-tiny", mesh="1x1x2", layouts=5), "layouts=5"),
    (lambda: shardwise.plan("llama-tiny", mesh="1x1x2", layouts={"ffn": 3}), "both strings"),
    (lambda: shardwise.plan("llama-tiny", mesh="1x1x2", layouts="ffn=ws2d,ffn=ws1d"), "twice"),
    (lambda: shardwise.plan(None, mesh="1x1x2"), "model=None"),
    (lambda: shardwise.plan(42, (torch.zeros(1),), mesh="1x1x2"), "model=42"),
    (lambda: shardwise.plan("llama-tiny", mesh="1x1x2", chips=8), "give one"),
])
def test_bad_api_arguments_are_clear_errors(call, named):
    with pytest.raises(shardwise.ShardwiseError, match=named):
        call()


def test_ids_as_a_list_are_refused_with_the_call_described(llama_plan):
    model, args, kwargs, plan = llama_plan
    with pytest.raises(InputError, match=r"called with \(\[\["):
        shardwise.simulate(plan, (args[0].tolist(),), kwargs)


def test_generate_refuses_what_it_cannot_run(tiny):
    model = tiny("llama-tiny")
    (ids,), _ = example_inputs(model, 2, 4)
    with pytest.raises(shardwise.ShardwiseError, match="max_new_tokens=-1"):
        shardwise.generate(model, ids, -1, mesh="1x1x2", simulate=True)
    with pytest.raises(shardwise.ShardwiseError, match="meta device"):
        shardwise.generate(shardwise.models.build_model("palm-8b"), ids, 2, mesh="1x1x2", simulate=True)
