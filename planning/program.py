"""The planned global-view program: the graph every rank's program is emitted from.

    capture_program   capture → canonicalize → find_layers: the graph every plan of a model starts from
    Program           a planned graph (collectives inserted): emits rank programs, simulates all ranks
    ShardedModule     one rank's program behind the model's own call signature
    LazyProgram       a Program built on first use (planning needs one block; emitting, the whole model)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import InputError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import IO_LAYOUTS, STATE
from ..passes.canonicalize import canonicalize
from ..passes.capture import capture
from ..passes.collective_matmul import collective_matmul as collective_matmul_pass
from ..passes.cpu_linear import cpu_linear
from ..passes.emit import emit
from ..passes.find_layers import find_layers
from ..passes.gather_pieces import gather_pieces
from ..passes.graph_utils import signature
from ..passes.pipeline import Pass, run_pipeline
from ..passes.schedule import DEFAULT_PREFETCH_BYTES
from ..passes.schedule import schedule as schedule_pass
from ..runtime.lower import shard_tensor
from ..runtime.simulate import Trace, run_lockstep, sim_group_name
from ..runtime.weights import shard_index


def capture_program(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """capture, canonicalize and find_layers: the graph every plan of this model starts from."""
    return prepare(capture(model, args, kwargs))


def prepare(gm: fx.GraphModule) -> fx.GraphModule:
    return run_pipeline(gm, [Pass(canonicalize), Pass(find_layers)])


def emit_rank(gm: fx.GraphModule, mesh: Mesh, rank: int, *, schedule: bool = True,
              prefetch_bytes: int = DEFAULT_PREFETCH_BYTES, collective_matmul: bool = False, cpu_kernels: bool = True,
              **kw) -> fx.GraphModule:
    """Rank `rank`'s program of a planned graph, through the pipeline (`emit`'s keyword arguments), then
    scheduled for overlap (passes/schedule.py; `schedule=False`: each collective waited right away, as
    lowered; `prefetch_bytes`: gathered weight bytes allowed in flight ahead of use). `collective_matmul`:
    collectives feeding or fed by a matmul over its last dim become rings of partial matmuls first
    (passes/collective_matmul.py). `cpu_kernels`: its linears multiplied by runtime/kernels.py's (oneDNN on
    float32 CPU tensors; passes/cpu_linear.py); False keeps `aten.linear`."""
    passes = [Pass(emit, mesh, rank, **kw)]
    if collective_matmul:
        passes.append(Pass(collective_matmul_pass, mesh, rank))
    passes.append(Pass(gather_pieces))
    if schedule:
        passes.append(Pass(schedule_pass, prefetch_bytes=prefetch_bytes))
    if cpu_kernels:
        passes.append(Pass(cpu_linear))
    return run_pipeline(gm, passes)


class PlannedCall:
    """The call a program was planned for: its structure (positional arguments, keywords), each tensor's
    shape and dtype, each other value. A sharded program runs exactly that call; any other is refused
    with an InputError naming what was planned and what was given (never flattened into the planned
    one: a keyword not planned for would be dropped, another shape would fail deep inside torch)."""

    def __init__(self, gm: fx.GraphModule):
        sig = signature(gm)
        vals = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
        self.spec, self.names = sig.in_spec, list(sig.inputs)
        self.planned = [vals[n] for n in self.names]

    def flatten(self, args: tuple, kwargs: dict | None) -> list[Any]:
        """The flat inputs of `model(*args, **kwargs)`, checked against the planned call."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.spec:
            self._refuse("its arguments differ", leaves, spec)
        for name, got, want in zip(self.names, leaves, self.planned):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    self._refuse(f"{name} is a {type(got).__name__}, not a tensor", leaves, spec)
                if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                    self._refuse(f"{name} is {_tensor(got)}, planned {_tensor(want)}", leaves, spec)
            elif type(got) is not type(want) or got != want:
                self._refuse(f"{name} = {got!r}, planned {want!r}", leaves, spec)
        return leaves

    def describe(self, leaves: list | None = None, spec=None) -> str:
        leaves = self.planned if leaves is None else leaves
        spec = spec or self.spec
        names = self.names if spec == self.spec else None
        args, kwargs = tree_unflatten([_value(x) for x in leaves], spec)
        shown = [_show(a) for a in args]
        if names and len(names) >= len(shown):
            shown = [f"{n}: {a}" for n, a in zip(names, shown)]
        return "(" + ", ".join(shown + [f"{k}={_show(v)}" for k, v in kwargs.items()]) + ")"

    def _refuse(self, what: str, leaves: list, spec) -> None:
        raise InputError(
            f"this sharded program was planned for the call {self.describe()}, but was called with "
            f"{self.describe(leaves, spec)}: {what}. A sharded program runs only the call it was planned for: "
            f"plan again with these inputs (shardwise.plan(model, args, kwargs, ...)) to run them.")


def _tensor(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}[{', '.join(map(str, t.shape))}]"


def _show(x) -> str:
    """A described argument: a leaf's text, or a container of them (a list of ids, say), abridged."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_show(i) for i in x[:4]) + (", ..." if len(x) > 4 else "") + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in list(x.items())[:4]) + "}"
    return repr(x)


def _value(x) -> str:
    return _tensor(x) if isinstance(x, torch.Tensor) else repr(x)


class ShardedModule(nn.Module):
    """One rank's program behind the original call signature: same inputs, same outputs."""

    def __init__(self, program: fx.GraphModule, call: PlannedCall, out_spec, input_layouts: dict[int, Layout],
                 mesh: Mesh, rank: int):
        super().__init__()
        self.program = program
        self.call, self.out_spec = call, out_spec
        self.input_layouts, self.mesh, self.rank = input_layouts, mesh, rank

    def forward(self, *args, **kwargs):
        flat = self.call.flatten(args, kwargs)
        flat = [shard_tensor(x, self.input_layouts[i], self.mesh, self.rank) if i in self.input_layouts else x
                for i, x in enumerate(flat)]
        return tree_unflatten(list(self.program(*flat)), self.out_spec)


class Program:
    """The planned global-view graph: emits rank programs and runs all of them in one process.

    `weights`: where ranks read their shards by default (a source with `fresh()`, such as a
    CheckpointSource: the model was captured on the meta device); each rank emitted reads through a
    source of its own, and `bytes_read[rank]` is what it read. Without, the tensors captured with the
    model are sliced.

    `quantize`: the weight dtype the plan was made for (`Plan.settings.weights`, the planner's
    `weight_dtype`); "int8" emits rank programs holding projection weights as int8 with per-output-row
    scales and multiplying them as such (passes/emit.py, runtime/quantize.py); anything else (None,
    "bf16", ...) keeps the weights in the captured dtype. It may be set after construction.

    `schedule`: rank programs are reordered so collectives overlap compute (passes/schedule.py); False
    emits each collective waited right where it is lowered (to compare). `collective_matmul`: collectives
    over a matmul's contracted or produced last dim run as the paper's looped collective matmul
    (passes/collective_matmul.py). Both may be set after construction, and `emit(rank, ...)` overrides
    them for one rank program."""

    def __init__(self, gm: fx.GraphModule, mesh: Mesh, weights=None, quantize: str | None = None,
                 schedule: bool = True, collective_matmul: bool = False):
        self.gm, self.mesh = gm, mesh
        self.schedule = schedule
        self.collective_matmul = collective_matmul
        self.sig = signature(gm)
        self.call = PlannedCall(gm)
        self.weights = weights
        self.quantize = quantize
        self.bytes_read: dict[int, int] = {}
        self._scales: dict = {}  # per-row int8 scales, shared by the ranks emitted in this process

    def emit(self, rank: int, *, group_name: Callable | None = None, weights=None, device=None,
             schedule: bool | None = None, collective_matmul: bool | None = None,
             cpu_kernels: bool = True) -> ShardedModule:
        """Rank `rank`'s program; by default on the real process groups of the current world.
        `schedule`, `collective_matmul`: as the Program's (its own settings by default); `cpu_kernels`: as
        `emit_rank`'s."""
        for name, value, optional in (("schedule", schedule, True), ("collective_matmul", collective_matmul, True),
                                      ("cpu_kernels", cpu_kernels, False)):
            if not isinstance(value, bool) and not (optional and value is None):
                raise InputError(f"emit({name}={value!r}): expected True or False"
                                 + (" (or None: the program's own setting)" if optional else "")
                                 + f", got a {type(value).__name__}")
        if group_name is None:
            from ..runtime.distributed import mesh_groups

            group_name = mesh_groups(self.mesh)
        prog = self._emit(rank, group_name, weights, device, schedule, collective_matmul, cpu_kernels)
        return ShardedModule(prog, self.call, self.sig.out_spec, self.input_layouts(), self.mesh, rank)

    def _emit(self, rank: int, group_name, weights, device, schedule: bool | None = None,
              collective_matmul: bool | None = None, cpu_kernels: bool = True) -> fx.GraphModule:
        """Rank `rank`'s graph, its shards read from `weights`, else from the program's own source (counted)."""
        q = {"schedule": self.schedule if schedule is None else schedule,
             "collective_matmul": self.collective_matmul if collective_matmul is None else collective_matmul,
             "cpu_kernels": cpu_kernels}
        if self.quantize:  # scales shared across ranks only when read from the same in-memory tensors
            q |= {"quantize": self.quantize, "scales": self._scales if weights is None and self.weights is None else {}}
        if weights is not None or self.weights is None:
            return emit_rank(self.gm, self.mesh, rank, group_name=group_name, weights=weights, device=device, **q)
        source = self.weights.fresh()
        prog = emit_rank(self.gm, self.mesh, rank, group_name=group_name, weights=source, device=device or "cpu",
                         **q)
        self.bytes_read[rank] = source.bytes_read
        return prog

    @property
    def state(self) -> dict:
        """State key → tensor: the whole model's weights the rank programs are sliced from."""
        return self.gm.meta[STATE]

    def input_layouts(self) -> dict[int, Layout]:
        io = self.gm.meta.get(IO_LAYOUTS, {})
        return {i: io[name] for i, name in enumerate(self.sig.inputs) if name in io}

    def output_layouts(self) -> dict[int, Layout]:
        io = self.gm.meta.get(IO_LAYOUTS, {})
        return {int(k.split(":")[1]): v for k, v in io.items() if k.startswith("output:")}

    def flat_inputs(self, args: tuple, kwargs: dict | None) -> list[Any]:
        """The flat inputs of a call, refused unless it is the call the program was planned for."""
        return self.call.flatten(args, kwargs)

    def simulate(self, args: tuple, kwargs: dict | None = None, *, trace: Trace | None = None,
                 programs: list[fx.GraphModule] | None = None) -> Any:
        """Every rank's program run in this process on its shards of the call; the global outputs.
        `programs`: the rank programs, already emitted for simulated groups (else emitted here)."""
        flat = self.flat_inputs(args, kwargs)
        layouts = self.input_layouts()
        if programs is None:
            device = next((x.device for x in flat if isinstance(x, torch.Tensor)), None) if self.weights else None
            programs = [self._emit(r, sim_group_name, None, device) for r in range(self.mesh.size)]
        inputs = [
            [shard_tensor(x, layouts[i], self.mesh, r) if i in layouts else x for i, x in enumerate(flat)]
            for r in range(self.mesh.size)
        ]
        outs = run_lockstep(programs, inputs, self.mesh, trace=trace)
        return tree_unflatten(self.gather_outputs(outs), self.sig.out_spec)

    def gather_outputs(self, outs: list[list[Any]]) -> list[Any]:
        """Global outputs from every rank's: replicated ones must agree, split ones are reassembled."""
        split = self.output_layouts()
        return [unshard([o[j] for o in outs], split[j], self.mesh) if j in split else _agree([o[j] for o in outs], j)
                for j in range(len(outs[0]))]


def _agree(values: list, j: int):
    """A replicated output must be identical on every rank; a difference is a bug, never averaged away."""
    for r, v in enumerate(values[1:], 1):
        if isinstance(v, torch.Tensor) and not torch.equal(v, values[0]):
            raise RuntimeError(f"rank {r} returned a different output {j} from rank 0 for a replicated output")
    return values[0]


def unshard(pieces: list[torch.Tensor], layout: Layout, mesh: Mesh) -> torch.Tensor:
    """The global tensor from each rank's piece under `layout` (copies over replicated atoms must agree)."""
    shape = [p * mesh.group_size(d) for p, d in zip(pieces[0].shape, layout.dims)]
    out = torch.empty(shape, dtype=pieces[0].dtype, device=pieces[0].device)
    written = torch.zeros(shape, dtype=torch.bool)
    for r, piece in enumerate(pieces):
        idx = shard_index(shape, layout, mesh, r)
        if written[idx].any() and not torch.equal(out[idx], piece):
            raise RuntimeError(f"rank {r}'s piece of a split output disagrees with another rank holding it")
        out[idx] = piece
        written[idx] = True
    return out


class LazyProgram:
    """A Program built on first use: planning needs only one block; emit needs the whole model."""

    def __init__(self, build: Callable[[], Program]):
        self._build, self._program = build, None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._program is None:
            self._program = self._build()
        return getattr(self._program, name)
