"""schedule: reorder a rank program so its collectives overlap compute (only the order changes).

emit lowers each collective as `_c10d_functional` op → `wait_tensor` right where the global view put it,
just before its first consumer, so nothing overlaps. This pass moves, on a rank program:
  start   a collective, with the local ops that only prepare its input (contiguous / movedim / view /
          reshape / permute / stack whose users are all in that preparation), as early as its inputs
          allow: right after the last of them is computed, but never more than one block before the
          block that reads its result (a program whose weights are inputs, as torch.compile's backend
          emits them, would otherwise gather every weight at its start);
          a *weight gather* (a collective whose inputs are derived only from get_attr: a weight-gathered
          layout's all-gather of a weight shard) no earlier than one block before the block that uses
          it (issued once the previous block's first op has run), and only while the gathered bytes
          started and not yet waited stay within `prefetch_bytes` (first needed, first issued: a gather
          that does not fit waits, and so do those after it); without block information (a graph
          captured without module paths), at most one weight gather is in flight ahead of its use;
  wait    `wait_tensor` just before the first op that reads the collective's result;
  hoist   before the wait of an *activation* collective, the ops of the same block segment that come later
          in the program and whose inputs are all computed (the ready frontier, in program order): they
          run while it is in flight. Waiting at first use overlaps only what the program happens to place
          before that use: in a parallel block (PaLM, GPT-J: x + attn(h) + ffn(h)) the feed-forward
          branch comes after the attention although it reads only h, so the attention's own collectives
          (a heads↔batch all-to-all, a reduce-scatter of q) ran bare; now the branch runs inside the first
          of them. In a serial block what follows the attention reads its output, so nothing of weight
          moves (at most views, RoPE tables and masks that read none of it).
          Hoisting stays inside the segment (a tensor it makes early lives at most to its block's end) and
          never pulls a wait or starts a collective outside the rules above (an op reading an unwaited
          result is not ready; collectives the hoisted ops feed start right after them if the rules
          allow). Left alone: an op the program places between a collective's start and its first use,
          until that collective starts (it overlaps that one already: a looped collective matmul's partial
          products, one per ring step, would otherwise pile up before the first step's wait); ops of
          weights alone (hoisted only as inputs of an op hoisted); the wait of a weight gather (prefetch
          overlaps it already; one issued at its use is one the budget held back, and compute before
          its wait would hold the gathered weight longer than asked); a wait while an earlier wait has
          no reader yet (it would then sit before ops its reader does not need). Random ops keep their
          order among themselves; an op writing in place ends the frontier; without block information
          nothing is hoisted.
At most one collective is in flight per process group: one does not start before the one before it
on its group is waited (two works of one gloo group in flight at once corrupted the heap of a rank:
`malloc(): unaligned tcache chunk detected`, seen in test_real_experts' all-to-all dispatch on real ranks
and once in bench_layouts; the cause is not found, and with this rule that test passed, which shows
only that it did not happen then). Collectives of different groups, and any collective with compute,
still overlap.
Every other op keeps its relative order (hoisted ops keep theirs among themselves). The decisions read
only the graph's structure and tensor sizes, which every rank shares, so every rank's program keeps the
same node order (SPMD: the lockstep simulator checks it, real ranks need it to issue collectives in the
same order on each group).

DEFAULT_PREFETCH_BYTES = 1 GiB of gathered weights in flight ahead of use. The one-block rule already
bounds prefetch to the next block's gathered weights; the byte cap only binds on big models (one block
of a 100B-parameter model gathered in bf16 is several GiB), where it keeps the extra memory a small,
fixed fraction of an accelerator's HBM (1 GiB of 32–141 GiB) while still covering the gathers of a
whole block of the models benchmarked here (RefDecoder E=1024, F=4096: 64 MiB a block in float32).

Reads `sw_rank_blocks` (emit). Numerics are unchanged: every op computes what it did, on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir.meta import RANK_BLOCKS
from ..runtime.lower import COLLECTIVE_OPS, c10d
from .pipeline import graph_pass

aten = torch.ops.aten
DEFAULT_PREFETCH_BYTES = 1 << 30
PREP_OPS = {aten.contiguous.default, aten.movedim.int, aten.view.default, aten.reshape.default,
            aten._unsafe_view.default, aten.permute.default, aten.stack.default}
WAIT = c10d.wait_tensor.default


@dataclass(eq=False)
class Start:
    """A collective and the ops preparing its input: moved together, as early as allowed."""

    op: fx.Node  # the collective
    wait: fx.Node  # its wait_tensor
    nodes: set[fx.Node]  # op and its preparation
    deps: set[fx.Node]  # the inputs from outside `nodes`
    weight: bool = False  # derived only from get_attr
    nbytes: int = 0  # a weight gather's output bytes
    use_segment: int = 0  # the block segment of the first op reading its result
    started: bool = field(default=False)


@graph_pass(needs=(RANK_BLOCKS,))
def schedule(gm: fx.GraphModule, *, prefetch_bytes: int = DEFAULT_PREFETCH_BYTES) -> fx.GraphModule:
    """Reorder `gm`'s graph in place: collectives start early, waits sit before first use."""
    g = gm.graph
    order = list(g.nodes)
    index = {n: i for i, n in enumerate(order)}
    starts = _starts(gm, order)
    owner = {m: s for s in starts for m in s.nodes}
    wait_of = {s.wait: s for s in starts}
    # blocks begin and end where the ops that stay in place say (not the collectives moved aside)
    segment, blocks_known = _segments(order, gm.meta[RANK_BLOCKS], set(owner) | set(wait_of))
    for s in starts:
        s.use_segment = segment[min(s.wait.users, key=index.__getitem__)]

    out: list[fx.Node] = []
    emitted: set[fx.Node] = set()
    inflight: dict[Start, int] = {}  # weight gathers started, not yet waited → bytes
    on_group: dict[str, Start] = {}  # process group → the collective started on it and not yet waited
    # what may run before an activation collective's wait: the plain ops of a segment, in program order
    hoistable: dict[int, list[fx.Node]] = {}
    if blocks_known:  # without blocks, a segment is the whole program: hoisting would hold tensors for long
        for n in order:
            if n.op == "call_function" and n not in owner and n not in wait_of:
                hoistable.setdefault(segment[n], []).append(n)
    # an op the program places between a collective's start and the first op reading its result already
    # runs beside that collective: it is kept for it until it starts (a looped collective matmul's partial
    # products, one beside each ring step: hoisted to the first step's wait, they would leave the others bare)
    reserved: dict[fx.Node, list[Start]] = {}
    for s in starts:
        for m in order[index[s.op] + 1: index[min(s.wait.users, key=index.__getitem__)]]:
            reserved.setdefault(m, []).append(s)
    const = _constants(order)  # derived from weights alone: hoisted only as the input of an op hoisted
    here = [0]  # the segment of the op the main loop is placing
    open_waits: set[fx.Node] = set()  # moved waits emitted whose result no emitted op has read yet

    def place(m: fx.Node) -> None:
        out.append(m)
        emitted.add(m)
        if open_waits:
            open_waits.difference_update(m.all_input_nodes)

    def hoist() -> None:
        """Emit, before a wait, the ops of the current segment whose inputs are all computed (none waits on
        that collective): they run while it is in flight. Program order among them is kept, and each
        op's inputs precede it, so one pass reaches the whole ready frontier."""
        if open_waits:  # a wait already emitted would then sit before ops its reader does not need
            return
        ran = seeded_behind = False
        candidates = hoistable.get(here[0], ())
        eligible = {m for m in candidates if all(r.started for r in reserved.get(m, ()))}
        for m in candidates:
            if m in emitted:
                continue
            if _mutates(m):  # a later reader of what it writes does not name it as an input: go no further
                break
            seeded = _seeded(m)
            weights = None
            if m in eligible and m not in const:
                weights = _weight_inputs(m, emitted, const, eligible)
            if weights is None or (seeded and seeded_behind):
                # random ops keep their order among themselves: each draws what it drew before
                seeded_behind |= seeded
                continue
            for w in sorted(weights, key=index.__getitem__):
                place(w)
            place(m)
            ran = True
        if ran:  # its segment has begun: collectives those ops feed start now, by the usual rules
            current[0] = here[0]
            eager()

    def require(n: fx.Node) -> None:
        stack = [(n, False)]
        while stack:
            m, ready = stack.pop()
            if m in emitted:
                continue
            if not ready:
                stack.append((m, True))
                stack.extend((a, False) for a in reversed(m.all_input_nodes) if a not in emitted)
                continue
            s = owner.get(m)
            if s is not None and m is s.op and (busy := on_group.get(_group(m))) is not None:
                stack.append((m, True))  # one collective in flight per group: wait the one before first
                stack.append((busy.wait, False))
                continue
            if m in wait_of and not wait_of[m].weight:
                hoist()  # an activation collective: independent compute of the segment first
            place(m)
            if s is not None and m is s.op:
                s.started = True
                on_group[_group(m)] = s
                if s.weight:
                    inflight[s] = s.nbytes
            elif m in wait_of:
                open_waits.add(m)
                done = wait_of[m]
                inflight.pop(done, None)
                if on_group.get(_group(done.op)) is done:
                    del on_group[_group(done.op)]
                    # its group is free: the next collective on it starts now, before the op that reads
                    # this one's result (after that op, a weight gather of the next layer ran bare: with
                    # one collective in flight per group, a weight-gathered program never prefetched)
                    eager()

    pending = sorted(starts, key=lambda s: index[s.op])
    current = [0]

    def eager() -> None:
        progress = True
        while progress:
            progress = False
            weights_blocked = False
            for s in pending:
                if s.started or not s.deps <= emitted:
                    continue
                if blocks_known and s.use_segment - 1 > current[0]:
                    if s.weight:  # more than one block ahead
                        weights_blocked = True
                    continue
                if _group(s.op) in on_group:  # its group is busy: it starts once that one is waited
                    if s.weight:
                        weights_blocked = True
                    continue
                if s.weight:
                    if weights_blocked:
                        continue
                    held = sum(inflight.values())
                    if (not blocks_known and inflight) or held + s.nbytes > prefetch_bytes:
                        weights_blocked = True  # first needed, first issued
                        continue
                require(s.op)
                progress = True
            pending[:] = [s for s in pending if not s.started]

    for n in order:
        if n in emitted or n in owner or n in wait_of:
            continue
        here[0] = segment[n]
        require(n)  # pulls the waits (and any start not yet issued) it reads
        if n.op != "output":
            current[0] = segment[n]
            eager()
    if len(out) != len(order) or out[-1].op != "output":
        raise AssertionError(f"schedule lost nodes: {len(order)} in, {len(out)} out")
    if out[0] is not order[0]:
        order[0].prepend(out[0])
    for a, b in zip(out, out[1:]):
        a.append(b)
    g.lint()
    gm.recompile()
    return gm


def _segments(order: list[fx.Node], blocks: dict, moved: set[fx.Node]) -> tuple[dict[fx.Node, int], bool]:
    """A segment number per node: 0 before the first block's ops, one more at each change of block (ops
    of no block inside, such as lowered collectives' local steps, stay in the segment they sit in), and
    one more for what follows the last block's last op (the final norm, the head). Only ops not in
    `moved` (collectives, their preparation and waits) mark where blocks begin and end."""
    seg, cur, last, end = {}, 0, None, -1
    for i, n in enumerate(order):
        b = None if n in moved else blocks.get(n.name)
        if b is not None:
            end = i
            if b != last:
                cur, last = cur + 1, b
        seg[n] = cur
    for n in order[end + 1:]:
        seg[n] = cur + 1
    return seg, last is not None


def _starts(gm: fx.GraphModule, order: list[fx.Node]) -> list[Start]:
    const = _constants(order)
    out = []
    for n in order:
        if n.op != "call_function" or n.target not in COLLECTIVE_OPS:
            continue
        if len(n.users) != 1 or next(iter(n.users)).target is not WAIT:
            continue
        wait = next(iter(n.users))
        if not wait.users:
            continue
        nodes = {n}
        grow = [n.args[0]] if isinstance(n.args[0], fx.Node) else []
        while grow:
            x = grow.pop()
            if x.op != "call_function" or x.target not in PREP_OPS or not set(x.users) <= nodes:
                continue
            nodes.add(x)
            grow.extend(a for a in x.all_input_nodes if a not in nodes)
        deps = {a for m in nodes for a in m.all_input_nodes if a not in nodes}
        s = Start(n, wait, nodes, deps)
        if deps and deps <= const:
            s.weight = True
            group = n.args[1] if COLLECTIVE_OPS[n.target] == "all_gather" else 1
            s.nbytes = group * sum(_nbytes(gm, a) for a in _roots(deps))
        out.append(s)
    return out


def _constants(order: list[fx.Node]) -> set[fx.Node]:
    """The nodes computed from get_attr alone (weights and what is derived from them only)."""
    const: set[fx.Node] = set()
    for n in order:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes
                                  and all(a in const for a in n.all_input_nodes)):
            const.add(n)
    return const


def _weight_inputs(n: fx.Node, emitted: set[fx.Node], const: set[fx.Node],
                   eligible: set[fx.Node]) -> set[fx.Node] | None:
    """What must run before `n` when every input of it is computed but for ops deriving a weight that
    may be hoisted with it (a chunk of a weight a looped matmul reads); None if some input is not ready."""
    need: set[fx.Node] = set()
    grow = [a for a in n.all_input_nodes if a not in emitted]
    while grow:
        a = grow.pop()
        if a in need:
            continue
        if a not in const or a not in eligible:
            return None
        need.add(a)
        grow.extend(b for b in a.all_input_nodes if b not in emitted)
    return need


def _mutates(n: fx.Node) -> bool:
    """An op writing one of its inputs (the rank programs emit does not have them; a program given to
    the pass might): its readers are not all its users."""
    return isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable


def _seeded(n: fx.Node) -> bool:
    """An op that may draw from the random generator (dropout; attention, for its dropout_p)."""
    return isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags


def _group(op: fx.Node) -> str:
    """The process group a lowered collective runs on (its last argument)."""
    return op.args[-1]


def _roots(deps: set[fx.Node]) -> set[fx.Node]:
    seen, grow, roots = set(), list(deps), set()
    while grow:
        n = grow.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            roots.add(n)
        grow.extend(n.all_input_nodes)
    return roots


def _nbytes(gm: fx.GraphModule, n: fx.Node) -> int:
    t = gm
    for part in n.target.split("."):
        t = getattr(t, part)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
