"""A torch.compile backend that shards what dynamo captures.

    # torchrun --nproc_per_node 4 script.py
    shardwise.init()                                   # gloo on CPU, NCCL on GPUs
    model = torch.compile(model, backend=shardwise.backend(mesh="1x1x4", layouts="ffn=ws1d"))
    logits = model(ids)                                # every rank runs its own shard of the program

Dynamo hands the backend a torch-level graph whose inputs are the user's tensors *and* the model's
parameters and buffers (and, for a graph with dynamic shapes, the sizes as SymInts). On the graph's first
call with a given input shape, the backend lowers it into the same ATen IR as `shardwise.plan`
(torch.export of the dynamo graph for that call's concrete inputs, module paths preserved), treats the
parameter and buffer inputs as weights, plans, and emits this rank's program.

- Weights are read on every call. The program takes its weight shards as inputs: each call passes it
  this rank's slices (views, not copies) of the very tensors dynamo passes in, so weights changed after
  compilation (in place, through `.data`, by `load_state_dict`, or replaced) are the ones used.
- Shapes are static per plan. Dynamo compiles a graph for one shape, and when called with another,
  recompiles it with symbolic sizes (automatic dynamic shapes; also `dynamic=True` and `mark_dynamic`).
  Such a graph is planned again for every concrete input shape it is called with (the plans are kept),
  since a plan (the layouts, the collectives' sizes) is made for one shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_unflatten

from .errors import ShardwiseError
from .ir.layout import Layout
from .ir.mesh import Mesh
from .ir.meta import IO_LAYOUTS, LAYOUT, SIGNATURE, STATE
from .ir.plan import Plan
from .passes.capture import capture
from .passes.graph_utils import signature
from .planning.planner import plan_graph
from .planning.program import emit_rank, prepare
from .runtime.distributed import check_world, mesh_groups
from .runtime.lower import shard_tensor
from .runtime.weights import resolve, shard_index
from .strategies.request import parse_layouts


def backend(*, mesh: Mesh | str, layouts: str | dict | None = None, hardware: str = "tpu-v4",
            phase: str = "prefill", inductor: bool = False, on_plan: Callable | None = None) -> Callable:
    """The backend function for `torch.compile(model, backend=...)`; requires torch.distributed with
    world size = mesh size. `inductor=True` compiles each rank's program with inductor; `on_plan(plan)`
    is called with every plan made (one per graph and input shape; for inspection and tests).

    Each call returns a new, independent backend (call it as often as you like)."""
    settings = _Settings(Mesh.parse(mesh), parse_layouts(layouts), hardware, phase, inductor, on_plan)

    def compile_fn(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        return ShardedGraph(gm, settings)

    return compile_fn


@dataclass(frozen=True)
class _Settings:
    mesh: Mesh
    request: dict[str, str]
    hardware: str
    phase: str
    inductor: bool
    on_plan: Callable | None


class ShardedGraph:
    """What the backend returns for one dynamo graph: this rank's sharded program for each input shape
    the graph is called with, planned on its first call with that shape.

    Planning at the first call rather than in the backend call itself lets a ShardwiseError (no process
    group, no plan fits, ...) reach the caller as it is, not wrapped by dynamo.
    """

    def __init__(self, gm: fx.GraphModule, settings: _Settings):
        self.gm, self.settings = gm, settings
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.weights: dict[int, str] = {i: key for i, n in enumerate(placeholders) if (key := _weight_key(n))}
        self.buffers = {i for i, n in enumerate(placeholders) if i in self.weights and "._buffers[" in _source(n)}
        self.user = [i for i in range(len(placeholders)) if i not in self.weights]
        self.programs: dict[tuple, RankProgram] = {}

    def __call__(self, *args):
        key = tuple((tuple(args[i].shape), args[i].dtype) if isinstance(args[i], torch.Tensor) else args[i]
                    for i in self.user)
        program = self.programs.get(key)
        if program is None:
            program = self.programs[key] = self._build(args)
        return program(args)

    def _build(self, args: tuple) -> RankProgram:
        """Capture, plan and emit this rank's program for the concrete inputs `args`."""
        import torch.distributed as dist

        s = self.settings
        check_world(s.mesh)
        captured, inputs_at = self._capture(args)
        plan = plan_graph(captured, [s.mesh], s.request, model=type(self.gm).__name__, hardware=s.hardware,
                          phase=s.phase)
        if s.on_plan is not None:
            s.on_plan(plan)
        weights_at = {key: i for i, key in self.weights.items()}
        return RankProgram(plan, s.mesh, dist.get_rank(), weights_at, inputs_at, inductor=s.inductor)

    def _capture(self, args: tuple) -> tuple[fx.GraphModule, dict[str, int]]:
        """The dynamo graph in ATen IR for these inputs (at run time dynamic sizes are plain ints), its
        parameters and buffers made weights; and the position in dynamo's inputs of each user input of
        the captured graph (by placeholder name)."""
        with torch.fx.traceback.preserve_node_meta():
            captured = capture(self.gm, args, {})
        sig = signature(captured)
        for i, name in enumerate(sig.inputs):
            if i in self.weights:
                key = self.weights[i]
                sig.params[name] = key
                captured.meta[STATE][key] = args[i].detach()
                if i in self.buffers:
                    sig.buffers.add(key)
        inputs_at = {name: i for i, name in enumerate(sig.inputs) if i not in self.weights}
        sig.inputs = list(inputs_at)
        return prepare(captured), inputs_at


class RankProgram:
    """This rank's program for one input shape, fed on every call from dynamo's inputs: the user's
    (sharded where the plan splits them) and this rank's slices of the current weights.

    `weights_at` / `inputs_at`: the position in dynamo's inputs of each weight (by state key) and of
    each user input (by the captured graph's placeholder name).
    """

    def __init__(self, plan: Plan, mesh: Mesh, rank: int, weights_at: dict[str, int], inputs_at: dict[str, int], *,
                 inductor: bool):
        gm = plan.program.gm
        sig = signature(gm)
        io = gm.meta.get(IO_LAYOUTS, {})
        split = [k for k, layout in io.items() if k.startswith("output:") and _split(layout)]
        if split:
            raise ShardwiseError(
                f"the plan leaves outputs {', '.join(k.split(':')[1] for k in split)} split over the ranks (a KV "
                f"cache kept sharded), but a torch.compile graph must return whole outputs: compile the prefill "
                f"step (phase='prefill', no cache inputs), or use shardwise.generate for decoding")
        self.plan, self.mesh, self.rank = plan, mesh, rank
        self.out_spec = sig.out_spec
        # one feed per program input, in placeholder order: (dynamo position, weight slices or None, input layout)
        self.feeds: list[tuple[int, tuple[slice, ...] | None, Layout | None]] = []
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.name in sig.params:
                shape = tuple(node.meta["val"].shape)
                layout = node.meta.get(LAYOUT) or Layout.replicated(len(shape))
                base, index = resolve(sig.params[node.name], shard_index(shape, layout, mesh, rank))
                self.feeds.append((weights_at[base], index, None))
            else:
                layout = io.get(node.name)
                self.feeds.append((inputs_at[node.name], None, layout if layout is not None and _split(layout) else None))
        self.program = emit_rank(_weights_as_inputs(gm), mesh, rank, group_name=mesh_groups(mesh))
        self.runner = torch.compile(self.program, backend="inductor") if inductor else self.program

    def __call__(self, args: tuple):
        flat = []
        for pos, index, layout in self.feeds:
            x = args[pos]
            if index is not None:
                x = x.detach()[index]  # a view: what the weight holds now, no copy
            elif layout is not None:
                x = shard_tensor(x, layout, self.mesh, self.rank)
            flat.append(x)
        return tree_unflatten(list(self.runner(*flat)), self.out_spec)


def _weights_as_inputs(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the planned global graph whose weights are program inputs: emit then gives each a
    placeholder (fed this rank's slices on every call) rather than an attribute holding a copy."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, graph)
    sig = signature(gm)
    everything = [n.name for n in graph.nodes if n.op == "placeholder"]
    out.meta = {**gm.meta, SIGNATURE: replace(sig, params={}, inputs=everything, buffers=set())}
    return out


def _split(layout: Layout) -> bool:
    return any(layout.dims) or bool(layout.partial)


def _source(node: fx.Node) -> str:
    arg = node.meta.get("grapharg")
    if arg is None:
        return ""
    name = arg.source.name
    return name if isinstance(name, str) else name()


def _weight_key(node: fx.Node) -> str | None:
    """The state name of a dynamo input that is a parameter or buffer (None for user inputs and sizes)."""
    name = _source(node)
    if "._parameters[" not in name and "._buffers[" not in name:
        return None
    parts = re.findall(r"\[['\"]([^'\"]+)['\"]\]", name)
    return ".".join(parts) or name
