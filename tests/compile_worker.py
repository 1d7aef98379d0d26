"""Run under torchrun (2 ranks) by test_real_ranks.py: compile llama-tiny with the shardwise backend.

One compiled model is called with three input shapes (dynamo recompiles with dynamic sizes after the
second; each shape gets its own plan) and after three kinds of weight change, and a second backend
compiles it again. Each step prints `RESULT <rank> <step> <diff> <moved> <plans>`: max |compiled - eager|,
max |eager - eager at the last call with the same inputs| (-1 the first time: how much the weights
changed the numbers), and the plans made so far. The first plan's weight bytes per chip and in all are
printed as `HELD <rank> <per chip> <total>`.
"""

import os
import sys

import torch
import torch.distributed as dist

import shardwise
from shardwise.models import build_model, example_inputs

rank = shardwise.init()
torch.set_num_threads(1)
model = build_model("llama-tiny")
plans = []
last: dict[tuple[int, int], torch.Tensor] = {}  # (batch, seq) → the eager logits of the last call


def step(name: str, compiled, batch: int = 4, seq: int = 16) -> None:
    """One call of the compiled model against eager, on the weights the model holds now."""
    args, kwargs = example_inputs(model, batch, seq)
    eager = model(*args, **kwargs).logits
    out = compiled(*args, **kwargs).logits
    before = last.get((batch, seq))
    moved = (eager - before).abs().max().item() if before is not None else -1.0
    last[(batch, seq)] = eager
    print(f"RESULT {rank} {name} {(out - eager).abs().max().item():.3e} {moved:.3e} {len(plans)}", flush=True)


with torch.no_grad():
    compiled = torch.compile(model, backend=shardwise.backend(mesh="1x1x2", on_plan=plans.append))
    step("first", compiled)
    print(f"HELD {rank} {int(plans[0].memory.weights_per_chip)} {int(plans[0].memory.weights_total)}", flush=True)
    step("second_shape", compiled, 2, 12)  # dynamo recompiles with symbolic sizes
    step("third_shape", compiled, 3, 10)  # the symbolic graph again, a new shape
    step("first_shape_again", compiled)
    for p in model.model.layers[0].mlp.parameters():
        p.data.mul_(2)  # in place, behind autograd's back (no version bump)
    step("data_mul", compiled)
    model.load_state_dict(build_model("llama-tiny", seed=1).state_dict())
    step("load_state_dict", compiled, 2, 12)
    model.lm_head.weight.data = model.lm_head.weight.detach().flip(0).clone()  # new storage, same parameter
    step("data_replaced", compiled)
    again = torch.compile(model, backend=shardwise.backend(mesh="1x1x2", layouts="ffn=ws1d", on_plan=plans.append))
    step("second_backend", again)
dist.destroy_process_group()
# end here, as drivers/launch.py's workers do: the interpreter's teardown of torch's C++ objects has aborted
# finished ranks under load ('terminate called without an active exception')
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
