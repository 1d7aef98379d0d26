"""All ranks of an SPMD program in one process, in lockstep.

Every rank's program has the same sequence of nodes (only constants and weight shards differ), so the
simulator runs node i on every rank before node i + 1. A `_c10d_functional` collective is computed
across the ranks of each group from their inputs, with the same semantics torch.distributed gives it
(group members ordered by their index over the group's atoms in mesh order). Deterministic and fast:
the numerics tests run every layout on every mesh this way; real ranks run the very same programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..ir.mesh import Mesh
from ..ir.meta import GLOBAL, LOOP, RAGGED
from .lower import COLLECTIVE_OPS, c10d

PREFIX = "shardwise-sim:"


def sim_group_name(atoms: tuple[str, ...]) -> str:
    return PREFIX + ",".join(atoms)


@dataclass
class Executed:
    """One collective as it ran: kind, group atoms, the bytes per chip it was charged, and the
    global-view node it lowers (to attribute it to a layer)."""

    node: str
    kind: str
    atoms: tuple[str, ...]
    bytes: int
    origin: str = ""


@dataclass
class Trace:
    collectives: list[Executed] = field(default_factory=list)


def run_lockstep(
    programs: Sequence[fx.GraphModule], inputs: Sequence[Sequence[Any]], mesh: Mesh, *, trace: Trace | None = None
) -> list[Any]:
    """Run rank r's `programs[r]` on `inputs[r]` (flat placeholders), all ranks together."""
    graphs = [list(p.graph.nodes) for p in programs]
    _check_spmd(graphs)
    envs: list[dict[fx.Node, Any]] = [{} for _ in programs]
    ph = 0
    results: list[Any] = [None] * len(programs)
    for i in range(len(graphs[0])):
        n0 = graphs[0][i]
        if n0.op == "placeholder":
            for r, gr in enumerate(graphs):
                envs[r][gr[i]] = inputs[r][ph]
            ph += 1
        elif n0.op == "get_attr":
            for r, gr in enumerate(graphs):
                envs[r][gr[i]] = getattr(programs[r], gr[i].target)
        elif n0.op == "call_function" and n0.target in COLLECTIVE_OPS:
            _collective(graphs, envs, i, mesh, trace)
        elif n0.op == "call_function":
            for r, gr in enumerate(graphs):
                node = gr[i]
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), envs[r].__getitem__)
                envs[r][node] = args[0] if node.target is c10d.wait_tensor.default else node.target(*args, **kwargs)
        elif n0.op == "output":
            for r, gr in enumerate(graphs):
                results[r] = fx.node.map_arg(gr[i].args[0], envs[r].__getitem__)
    return results


def _check_spmd(graphs: list[list[fx.Node]]) -> None:
    base = [(n.op, n.target) for n in graphs[0]]
    for r, gr in enumerate(graphs[1:], 1):
        if [(n.op, n.target) for n in gr] != base:
            raise RuntimeError(f"rank {r}'s program differs in structure from rank 0's: not an SPMD program")


def _collective(graphs, envs, i, mesh: Mesh, trace: Trace | None) -> None:
    n0 = graphs[0][i]
    kind = COLLECTIVE_OPS[n0.target]
    name = n0.args[-1]
    if not isinstance(name, str) or not name.startswith(PREFIX):
        raise RuntimeError(f"{n0.format_node()}: group {name!r} is not a simulated group; emit with sim_group_name")
    atoms = tuple(name[len(PREFIX) :].split(","))
    done: set[int] = set()
    for r in range(len(graphs)):
        if r in done:
            continue
        members = mesh.group(atoms, r)
        done.update(members)
        xs = [envs[m][graphs[m][i].args[0]] for m in members]
        splits = [fx.node.map_arg(graphs[m][i].args[2], envs[m].__getitem__) for m in members] \
            if kind == "all_to_all" else None
        outs = _compute(kind, xs, splits)
        if n0.target is c10d.all_reduce_.default:  # in place (passes/in_place.py): the sum lands in the input
            outs = [x.copy_(out) for x, out in zip(xs, outs)]
        for m, out in zip(members, outs):
            envs[m][graphs[m][i]] = out
    if trace is not None:
        x = envs[0][graphs[0][i] if n0.meta.get(RAGGED) else graphs[0][i].args[0]]
        kind, charged = charge(n0, kind, x, mesh.group_size(atoms))
        trace.collectives.append(Executed(n0.name, kind, atoms, charged, n0.meta.get(GLOBAL, "")))


def _compute(kind: str, xs: list[torch.Tensor], splits: list | None) -> list[torch.Tensor]:
    """Each member's result; `splits`: each member's input split sizes (all-to-all: the rows it sends to each)."""
    G = len(xs)
    if kind == "all_gather":
        out = torch.cat(xs, 0)
        return [out.clone() for _ in xs]
    if kind == "all_reduce":
        total = _sum(xs)
        return [total.clone() for _ in xs]
    if kind == "reduce_scatter":
        return [c.clone() for c in _sum(xs).chunk(G, 0)]
    if kind == "all_to_all":
        pieces = [x.split(list(s), 0) for x, s in zip(xs, splits)]
        return [torch.cat([pieces[src][dst] for src in range(G)], 0) for dst in range(G)]
    raise AssertionError(kind)


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return total


def charged_bytes(kind: str, x: torch.Tensor, group: int) -> int:
    """Bytes per chip of a collective on input `x`, in the paper's accounting (ir/collective.py)."""
    nbytes = x.numel() * x.element_size()
    return {"all_gather": nbytes * group, "reduce_scatter": nbytes, "all_reduce": 2 * nbytes, "all_to_all": nbytes}[kind]


def charge(n: fx.Node, kind: str, x: torch.Tensor, group: int) -> tuple[str, int]:
    """The kind and bytes a trace charges collective `n` run on `x`: a ring step of a looped collective
    matmul (`sw_loop`) is charged as a share of the collective its loop performs (g − 1 steps on blocks
    of the same size; the first step takes the remainder), so a loop and the collective it unrolls are
    charged the same in total."""
    loop = n.meta.get(LOOP)
    if loop is None:
        return kind, charged_bytes(kind, x, group)
    performs, g, first = loop
    total = charged_bytes(performs, x, g) if performs == "all_gather" else g * charged_bytes(performs, x, g)
    share = total // (g - 1)
    return performs, share + (total - share * (g - 1) if first else 0)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, trace: Trace):
        super().__init__(gm)
        self.trace = trace

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.op == "call_function" and n.target in COLLECTIVE_OPS:
            kind = COLLECTIVE_OPS[n.target]
            group = n.args[1] if kind == "all_gather" else 1  # all_gather_into_tensor(x, group_size, name)
            x = out if n.meta.get(RAGGED) else self.env[n.args[0]]
            kind, charged = charge(n, kind, x, group)
            self.trace.collectives.append(Executed(n.name, kind, (), charged, n.meta.get(GLOBAL, "")))
        return out


def run_recorded(program: fx.GraphModule, flat: list, trace: Trace):
    """Run one rank's program on real process groups, recording every collective it executes."""
    return _Recorder(program, trace).run(*flat)
