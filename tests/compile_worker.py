"""Run under torchrun (2 ranks) by test_real_ranks.py: compile llama-tiny with the shardwise backend."""

import torch
import torch.distributed as dist

import shardwise
from shardwise.models import build_model, example_inputs

rank = shardwise.init()
torch.set_num_threads(1)
model = build_model("llama-tiny")
args, kwargs = example_inputs(model, 4, 16)
with torch.no_grad():
    eager = model(*args, **kwargs).logits
    plans = []
    compiled = torch.compile(model, backend=shardwise.backend(mesh="1x1x2", on_plan=plans.append))
    out = compiled(*args, **kwargs).logits
assert len(plans) == 1, f"expected one graph, got {len(plans)}"
held = plans[0].memory.weights_per_chip
total = plans[0].memory.weights_total
print(f"RESULT {rank} {(out - eager).abs().max().item():.3e} {int(held)} {int(total)}", flush=True)
dist.destroy_process_group()
