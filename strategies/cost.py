"""The analytic cost model: compute, memory traffic and communication per layer and per chip.

The formulas live here; reading a layer's FLOPs and bytes off a propagated graph is planning/costing.py.

For one layer under one layout, on a `Hardware` profile (PAPER.md, DESIGN.md):
  compute  = FLOPs per chip / (peak · flops_efficiency) + calls · call_overhead
             (a matmul's FLOPs at the FLOP/s measured for its local shape instead, where the profile
             has them: `Hardware.matmul_shapes`, cpu-local)
             FLOPs from the *local* shapes of the layer's matmuls (2·M·N·K) and attention cores
             (4·B·H·Lq·Lk·D), so replicated work (heads that do not divide) is charged where it runs;
             `calls`: the matmul calls whose number a layout changes (a mixture's experts run one matmul
             per touched expert and projection: expert parallel runs fewer per chip than expert-sliced)
  memory   = (weight bytes read + KV-cache bytes read) per chip / (HBM bandwidth · hbm_efficiency)
             weights as used by the matmul (a weight-gathered layout reads its gathered copy)
  comm     = Σ over the layer's collectives of
             (collective_latency + hop_latency · (g − 1) + wire bytes / bandwidth of its axes)
             a ring over g chips takes g − 1 steps (the α-β model of PAPER.md's (g−1)/g accounting);
             the collectives are exactly those insert_collectives puts on the graph
             (`plan_conversions`): one source of truth. Siblings fused into one collective
             (passes/fuse_collectives.py) pay the fixed terms (latency, ring steps) once: every member
             after the first is `Comm(fused=True)` and adds only its wire bytes / bandwidth, every member
             at the bandwidth of the line for the stacked tensor's size (`Comm.sized`); an uneven
             all-to-all (a mixture's dispatch) moves the busiest chip's rows: its bytes term × `load`
             + a wait for the group's ranks to meet, where the profile measured one (`Hardware.sync_waits`,
             cpu-local): each collective (a fusion once) after busy / (the layer's collectives) of compute,
             the wait measured after that much compute, added to the collective's own time
  time     = busy + weight comm − hidden + activation comm               (hw.weight_prefetch)
             busy = max(compute, memory), hidden = hw.comm_overlap · min(weight comm, busy)
             weights do not depend on the data, so a weight-gathered layout's weight all-gathers are
             issued ahead of use (passes/schedule.py; the paper's system does too) and overlap compute;
             `comm_overlap` is the fraction of that overlap the hardware really gets: 1 on the TPU and
             GPU profiles (assumed; then time = max(compute, memory, weight comm) + activation comm, as
             the TPU v4 fit assumes), measured by `calibrate` for cpu-local (gloo's thread competes with
             the ranks for the cores). Activation collectives sit on the critical path. Without prefetch
             all comm adds up.
             A looped collective matmul (`Comm(looped=True)`, plan(..., collective_matmul=True);
             passes/collective_matmul.py) takes an activation collective off the critical path: its g − 1
             ring steps (each a collective: g − 1 fixed latencies, the same wire bytes) run beside the
             partial matmuls, so comm_overlap · min(looped comm, busy left after weight gathers) is hidden.
             A parallel block's attention (x + attn(h) + ffn(h); `LayerCost.branches`): its activation
             collectives that the feed-forward branch neither reads nor feeds (not h's gather, the norm's
             statistics, nor the reduce-scatter of attn + ffn: those it shares) have the branch run while
             they are in flight (passes/schedule.py hoists it before their waits), so branch_overlap ·
             min(those collectives, the branch's spare busy time) is hidden, priced on the attention
             (they are its collectives; the feed-forward's own time is unchanged) and returned as
             "beside". Spare: its busy time less what already hides its own prefetched weight gathers
             and ring steps. Only where the branch gathers no weights: the schedule never waits a gather
             early to run it, and its gathers queue behind the attention's on their group. (The schedule
             runs the whole branch before the first of those collectives' waits: when the branch
             outlasts that one, the ones after it are priced hidden but run bare.) `branch_overlap` is
             the profile's (hw.branch_overlap; None: comm_overlap); 0 on TPU v4, whose fit priced none.
             With `overlap`, all communication overlaps: max(compute, memory, comm).
  copy     = relayout bytes / (HBM bandwidth · hbm_efficiency), added to time   (hw.relayout_copies)
             a collective over a dim other than the first needs a local copy (runtime/lower.py): an
             all-gather merges its blocks into the dim (one copy of its output), a reduce-scatter moves
             them to the front (one of its input), an all-to-all moves them before and merges them after
             (two or three of its input); a read and a write each. Serial with the rank's compute, so
             not hidden under it. A looped collective matmul's ring steps are not priced so. A fused
             collective's members are stacked first: one more copy of each member's input.
  elementwise = activation bytes streamed by pointwise ops, cats and reductions per chip
             / hw.elementwise_bandwidth, added to time (None: not priced)
             the work a layout replicates or splits beyond its matmuls: a layout that leaves the
             feed-forward's hidden activation whole on every chip runs its silu and product whole on
             every chip. Serial with the matmuls on a CPU rank (eager ops, one thread); fused into the
             matmuls' epilogues by XLA and the GPU compilers, so the TPU fit and the GPU profiles price none.
Byte counts use the planned precisions (bf16 or int8 weights, bf16 activations and KV cache), not the
dtype the model was captured in. Memory per chip (weights at rest + KV cache) must fit in HBM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ShardwiseError
from ..ir.collective import Collective
from ..ir.hardware import Hardware

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of weights, activations and KV cache; None: as the model was captured."""

    weights: str | None = None
    activations: str | None = None
    kv: str | None = None

    def __post_init__(self) -> None:
        for k in (self.weights, self.activations, self.kv):
            if k is not None and k not in DTYPE_BYTES:
                raise ShardwiseError(f"unknown dtype {k!r}: use one of {', '.join(DTYPE_BYTES)}")

    def nbytes(self, kind: str, captured: int) -> int:
        """Bytes per element of `kind`, or `captured` (the tensor's own element size) when unset."""
        name = getattr(self, kind)
        return captured if name is None else DTYPE_BYTES[name]


@dataclass(frozen=True, init=False)
class Comm:
    step: Collective
    itemsize: int  # bytes per element in the planned precision
    weight: bool = False  # moves a weight (prefetchable), not an activation
    fused: bool = False  # runs inside the collective of the Comm before it (fused): no fixed latency of its own
    load: float = 1.0  # the busiest chip's bytes over the charged ones (an uneven all-to-all: load imbalance)
    looped: bool = False  # run as a looped collective matmul: g − 1 ring steps, each beside a partial matmul
    pieces: int = 1  # run as this many collectives (a large merging all-gather: passes/gather_pieces.py)
    # wire bytes of the collective this one runs inside (a fusion's stacked tensor): the size whose line
    # prices it (Hardware.collective_fit); 0: its own
    sized: float = 0.0

    def __init__(self, step: Collective, itemsize: int, weight: bool = False, fused: bool = False, load: float = 1.0,
                 looped: bool = False, pieces: int = 1, sized: float = 0.0) -> None:
        # the fields written straight into the dict (a frozen dataclass's own __init__ sets each through
        # object.__setattr__): the planner makes one per collective of every candidate it costs
        d = self.__dict__
        d["step"], d["itemsize"], d["weight"] = step, itemsize, weight
        d["fused"], d["load"], d["looped"], d["pieces"], d["sized"] = fused, load, looped, pieces, sized

    def time(self, hw: Hardware) -> float:
        if self.looped:  # every ring step is a collective of its own: g − 1 fixed latencies, the same wire bytes
            steps = self.step.group_size - 1
            bytes_term = collective_time(self.step, self.itemsize, hw, fixed=False)
            # a ring step is an all-to-all of a (g − 1)-th of the bytes
            fit = hw.collective_fit("all_to_all", self.step.group_size, self._wire() / max(steps, 1))
            return steps * (fit[0] if fit else hw.collective_latency + hw.hop_latency) + bytes_term
        # pieces: each pays the fixed terms, priced at its own size; the bytes are the whole tensor's once
        return collective_time(self.step, self.itemsize, hw, fixed=not self.fused, load=self.load,
                               pieces=self.pieces, sized=self.sized)

    def _wire(self) -> float:
        """Wire bytes per chip in the planned precision."""
        return self.step.wire_bytes / self.step.itemsize * self.itemsize


@dataclass
class LayerCost:
    flops: float = 0.0  # per chip
    weight_bytes: float = 0.0  # HBM bytes of weights read per chip
    kv_bytes: float = 0.0  # HBM bytes of KV cache read per chip
    comm: list[Comm] = field(default_factory=list)
    calls: float = 0.0  # matmul calls per chip whose count depends on the layout (experts' loops)
    copy_bytes: float = 0.0  # bytes read + written per chip by local copies around collectives (relayouts)
    branches: list[Branch] = field(default_factory=list)  # a parallel block's attention: its feed-forward beside it
    act_bytes: float = 0.0  # activation bytes per chip streamed by pointwise ops, cats and reductions
    # the matmuls among `flops`, by local shape: (FLOPs, m, k, n) each; priced at hw.matmul_flops(m, k, n)
    gemms: list[tuple[float, int, int, int]] = field(default_factory=list)

    def comm_bytes(self) -> float:
        return sum((c.step.bytes / c.step.itemsize * c.itemsize for c in self.comm if c.step.communicates), 0.0)

    def _busy(self, hw: Hardware) -> tuple[float, float]:
        """compute, memory (seconds)."""
        compute = self.flops / (hw.peak_flops * hw.flops_efficiency) + self.calls * hw.call_overhead
        if hw.matmul_shapes and self.gemms:  # measured by shape: those FLOPs at their own FLOP/s
            compute += sum((f / hw.matmul_flops(m, k, n) - f / (hw.peak_flops * hw.flops_efficiency)
                            for f, m, k, n in self.gemms), 0.0)
        return compute, (self.weight_bytes + self.kv_bytes) / (hw.hbm_bandwidth * hw.hbm_efficiency)

    def _terms(self, hw: Hardware) -> tuple[float, float, float, float, float]:
        """compute, memory, weight comm, activation comm, looped comm (seconds)."""
        compute, memory = self._busy(hw)
        timed = self.priced(hw, max(compute, memory))
        weight = sum((t for c, t in timed if c.weight and c.step.communicates), 0.0)
        act = sum((t for c, t in timed if not c.weight and c.step.communicates), 0.0)
        looped = sum((t for c, t in timed if c.looped), 0.0)  # activation comm beside partial matmuls
        return compute, memory, weight, act, looped

    def priced(self, hw: Hardware, busy: float | None = None) -> list[tuple[Comm, float]]:
        """(collective, seconds) for each of `comm`: its own time, plus, where the profile measured how long
        ranks take to meet (`Hardware.sync_waits`), the wait after busy / (the layer's collectives that
        communicate, a fusion once) of compute. `busy`: max(compute, memory), computed when not given."""
        timed = [(c, c.time(hw)) for c in self.comm]
        if not hw.sync_waits:
            return timed
        meets = [i for i, (c, _) in enumerate(timed) if c.step.communicates and not c.fused]
        if meets:
            gap = (max(self._busy(hw)) if busy is None else busy) / len(meets)
            for i in meets:
                c, t = timed[i]
                timed[i] = (c, t + hw.sync_wait(c.step.group_size, gap))
        return timed

    def spare(self, hw: Hardware) -> float:
        """Busy seconds (max(compute, memory)) not already spent hiding this layer's own collectives, as
        `times` spends them: prefetched weight gathers first, then looped ring steps."""
        compute, memory, weight, _, looped = self._terms(hw)
        busy = max(compute, memory)
        used = min(weight, busy) if hw.weight_prefetch else 0.0
        return busy - used - min(looped, busy - used)

    def beside(self, hw: Hardware) -> float:
        """Seconds of this layer's collectives hidden beside its parallel feed-forward (`branches`)."""
        overlap = hw.comm_overlap if hw.branch_overlap is None else hw.branch_overlap
        return sum((overlap * b.hidden(hw) for b in self.branches), 0.0) if overlap else 0.0

    def times(self, hw: Hardware, *, overlap: bool = False) -> dict[str, float]:
        compute, memory, weight, act, looped = self._terms(hw)
        busy = max(compute, memory)
        copy = self.copy_bytes / (hw.hbm_bandwidth * hw.hbm_efficiency) if hw.relayout_copies else 0.0
        if overlap:
            time = max(compute, memory, weight + act)
        elif hw.weight_prefetch:
            if hw.comm_overlap >= 1.0 and not looped:  # busy + weight − min(weight, busy), without rounding
                time = max(busy, weight) + act
            else:
                time = busy + weight - hw.comm_overlap * min(weight, busy) + act
                if looped:  # what compute is left beside the weight gathers hides the ring steps
                    time -= hw.comm_overlap * min(looped, busy - min(weight, busy))
        else:
            time = busy + weight + act
            if looped:
                time -= hw.comm_overlap * min(looped, busy)
        beside = 0.0 if overlap else self.beside(hw)  # (with `overlap` every collective is hidden already)
        pointwise = self.act_bytes / hw.elementwise_bandwidth if hw.elementwise_bandwidth else 0.0
        return {"compute": compute, "memory": memory, "comm": weight + act, "copy": copy, "beside": beside,
                "elementwise": pointwise, "time": time - beside + copy + pointwise}

    def add(self, other: "LayerCost") -> "LayerCost":
        return LayerCost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                         self.kv_bytes + other.kv_bytes, self.comm + other.comm, self.calls + other.calls,
                         self.copy_bytes + other.copy_bytes, self.branches + other.branches,
                         self.act_bytes + other.act_bytes, self.gemms + other.gemms)


@dataclass(frozen=True)
class Branch:
    """A parallel block's feed-forward (`ffn`, the layer named `layer`) beside its attention: `comm` are the
    attention's activation collectives (of its own `LayerCost.comm`, none looped) that the feed-forward
    neither reads nor feeds, so it computes while they are in flight."""

    comm: tuple[Comm, ...]
    ffn: LayerCost
    layer: str = ""

    def hidden(self, hw: Hardware) -> float:
        """Seconds of `comm` the feed-forward's spare busy time covers (before `branch_overlap`)."""
        return min(sum((c.time(hw) for c in self.comm if c.step.communicates), 0.0), self.ffn.spare(hw))


def collective_time(c: Collective, itemsize: int, hw: Hardware, *, fixed: bool = True, load: float = 1.0,
                    pieces: int = 1, sized: float = 0.0) -> float:
    """latency + ring steps · hop latency + load · wire bytes / bandwidth (an all-reduce is two rings), or,
    where the profile measured this kind over this many chips (`Hardware.collectives`), the latency +
    load · wire bytes / bandwidth of its line for this many wire bytes;
    `fixed=False`: only the bytes (a member fused into a collective that pays the fixed terms); `load`: the
    busiest chip's bytes over the charged ones (an uneven all-to-all); `pieces`: run as this many
    collectives of equal parts (passes/gather_pieces.py), each paying the fixed terms, priced by the line
    for a part's size; `sized`: the wire bytes of the collective it runs inside (a fused member: the stacked
    tensor's), priced by that size's line."""
    wire = c.wire_bytes / c.itemsize * itemsize
    fit = hw.collective_fit(c.kind, c.group_size, sized or wire / pieces)
    if fit is not None:  # measured for this kind and group size (calibrate): its own latency and bandwidth
        return (pieces * fit[0] if fixed else 0.0) + load * wire / fit[1]
    rings = 2 if c.kind == "all_reduce" else 1
    latency = hw.collective_latency + rings * (c.group_size - 1) * hw.hop_latency if fixed else 0.0
    return pieces * latency + load * wire / hw.collective_bandwidth(c.axes)
