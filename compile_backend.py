"""A torch.compile backend that shards what dynamo captures.

    # torchrun --nproc_per_node 4 script.py
    shardwise.init()                                   # gloo on CPU, NCCL on GPUs
    model = torch.compile(model, backend=shardwise.backend(mesh="1x1x4", layouts="ffn=ws1d"))
    logits = model(ids)                                # every rank runs its own shard of the program

Dynamo hands the backend a torch-level graph whose inputs are the user's tensors *and* the model's
parameters and buffers. The backend lowers it into the same ATen IR as `shardwise.plan` (torch.export
of the dynamo graph, module paths preserved), treats the parameter and buffer inputs as weights, plans,
emits this rank's program holding only its shards (sliced once, at compile time), and returns a function
that ignores the full weights dynamo passes in and calls the program with the user's inputs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_unflatten

from .ir.mesh import Mesh
from .ir.meta import STATE
from .passes.capture import capture
from .passes.graph_utils import signature
from .planning.planner import plan_graph
from .planning.program import emit_rank, prepare
from .runtime.distributed import check_world, mesh_groups
from .strategies.request import parse_layouts


def _weight_source(node: fx.Node) -> str | None:
    """The state name of a dynamo input that is a parameter or buffer (None for user inputs)."""
    arg = node.meta.get("grapharg")
    if arg is None:
        return None
    name = arg.source.name if isinstance(getattr(arg.source, "name", None), str) else arg.source.name()
    if "._parameters[" not in name and "._buffers[" not in name:
        return None
    import re

    parts = re.findall(r"\[['\"]([^'\"]+)['\"]\]", name)
    return ".".join(parts) or name


def backend(*, mesh: Mesh | str, layouts: str | dict | None = None, hardware: str = "tpu-v4",
            phase: str = "prefill", inductor: bool = False, on_plan: Callable | None = None) -> Callable:
    """The backend function for `torch.compile(model, backend=...)`; requires torch.distributed with
    world size = mesh size. `inductor=True` compiles each rank's program with inductor; `on_plan(plan)`
    is called with every plan made (for inspection and tests)."""

    mesh = Mesh.parse(mesh)
    request = parse_layouts(layouts)

    def compile_fn(gm: fx.GraphModule, example_inputs: list[Any]):
        import torch.distributed as dist

        check_world(mesh)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        weights = {i: key for i, n in enumerate(placeholders) if (key := _weight_source(n))}
        with torch.fx.traceback.preserve_node_meta():
            captured = capture(gm, tuple(example_inputs), {})
        sig = signature(captured)
        for i, key in weights.items():
            name = sig.inputs[i]
            sig.params[name] = key
            captured.meta[STATE][key] = example_inputs[i].detach()
            if "._buffers[" in str(placeholders[i].meta["grapharg"].source):
                sig.buffers.add(key)
        sig.inputs = [n for i, n in enumerate(sig.inputs) if i not in weights]
        captured = prepare(captured)
        plan = plan_graph(captured, [mesh], request, model=type(gm).__name__, hardware=hardware, phase=phase)
        if on_plan is not None:
            on_plan(plan)
        program = emit_rank(plan.program.gm, mesh, dist.get_rank(), group_name=mesh_groups(mesh))
        runner = torch.compile(program, backend="inductor") if inductor else program
        user = [i for i in range(len(placeholders)) if i not in weights]
        out_spec = sig.out_spec

        def run(*args):
            return tree_unflatten(list(runner(*[args[i] for i in user])), out_spec)

        run.program = program  # the rank's program (holds only its shards)
        run.plan = plan
        return run

    return compile_fn
