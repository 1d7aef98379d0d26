"""The planner: one layout per layer, minimizing step latency or chip-seconds per token.

The problem. Blocks b = 0 … N−1 each choose a family member m_b (roles of the mesh axes) and an
attention mode a_b (heads or batch). The embedding writes block 0's residual layout, the head reads
block N−1's, and consecutive blocks pay for redistributing the residual stream between their layouts:

    minimize  emb(m_0) + Σ_b block(m_b, a_b) + Σ_b trans(m_b → m_{b+1}) + head(m_{N−1}) + output
    subject to  weights + KV cache per chip ≤ HBM          (`_evaluate`, `_memory`)

Each term comes from the real passes, not a formula (`_evaluate`): the candidate is assigned to a
*prototype* graph holding one block of the model (captured once: identical blocks are solved once),
propagated, and its conversions (`plan_conversions`, what insert_collectives would insert) are costed
by `strategies/cost.py`. `trans` is `redistribute` between the two residual layouts. The chain is a
shortest path through a layered DAG (blocks × candidates), solved by dynamic programming (`_chain`).

When only a chip count is given, every factorization X·Y·Z = n is tried (`factorizations`); candidates
that put the same atoms in the same roles on a mesh are costed once.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from functools import lru_cache
from itertools import product

import torch.fx as fx

from ..errors import LayoutError, PlanError
from ..ir.hardware import Hardware
from ..ir.kinds import LayerKind
from ..ir.mesh import Mesh
from ..ir.meta import ATTENTION, LAYERS
from ..passes.attribute import OUTPUT
from ..passes.find_layers import Layers
from ..passes.graph_utils import fixed_structure
from ..strategies.cost import Comm, LayerCost, Precision
from ..strategies.family import ATTENTION_MODES, Member, all_members, residual
from ..strategies.redistribute import redistribute
from .apply import apply, choices_for
from .candidate import Candidate, Choice
from .costing import layer_costs, memory_per_chip
from .question import Question


def factorizations(n: int) -> list[tuple[int, int, int]]:
    return [(x, y, n // (x * y)) for x in range(1, n + 1) if n % x == 0 for y in range(1, n // x + 1)
            if (n // x) % y == 0]


def evaluate(proto: fx.GraphModule, mesh: Mesh, member: Member, attention: str, *, hw: Hardware,
             precision: Precision, n_blocks: int, overlap: bool, forced: dict[str, str],
             experts: str = "", latent: str = "", loop: bool = False) -> Candidate:
    """Cost one candidate on the prototype graph (one block), scaled to n_blocks for memory."""
    cand = Candidate(member, attention, mesh, experts=experts, latent=latent)
    layers: Layers = proto.meta[LAYERS]
    try:  # the chosen candidate is propagated again, checked, by record()
        conversions = apply(proto, mesh, choices_for(layers, [cand], forced), check=False)
    except LayoutError as e:
        cand.refused = f"does not divide: {e}"
        return cand
    cores = [n.meta[ATTENTION] for n in proto.graph.nodes if ATTENTION in n.meta]
    if cores:
        split = [w for w, atoms in (("heads", cores[0].heads), ("batch", cores[0].batch)) if atoms]
        cand.core = "+".join(split) or "replicated"
    per_layer = layer_costs(proto, mesh, conversions, precision, loop=loop)
    kinds = {l.name: l.kind for l in layers.layers}
    for name, cost in per_layer.items():
        kind = kinds.get(name, OUTPUT)
        cand.parts[kind] = cand.parts.get(kind, LayerCost()).add(cost)
    cand.times = {k: v.times(hw, overlap=overlap) for k, v in cand.parts.items()}
    cand.memory = memory_per_chip(proto, mesh, precision, n_blocks)
    if cand.memory["total"] > hw.hbm_bytes:
        gib = 1024**3
        cand.refused = (f"exceeds HBM: needs {cand.memory['total'] / gib:.1f} GiB per chip "
                        f"(weights {cand.memory['weights'] / gib:.1f} + KV cache {cand.memory['kv_cache'] / gib:.1f}) "
                        f"of {hw.hbm_bytes / gib:.1f} GiB")
    return cand


def transition(a: Member, b: Member, mesh: Mesh, shape: tuple[int, ...], hw: Hardware,
               precision: Precision, itemsize: int = 2) -> float:
    """Seconds to move the residual stream from a's layout to b's (0 when they are the same member)."""
    if a == b:
        return 0.0
    item = precision.nbytes("activations", itemsize)
    steps = transition_steps(a, b, mesh, tuple(shape), item)
    if steps is None:
        return float("inf")
    return LayerCost(comm=[Comm(s, item) for s in steps]).times(hw)["comm"]


@lru_cache(maxsize=65536)
def transition_steps(a: Member, b: Member, mesh: Mesh, shape: tuple[int, ...], itemsize: int):
    src, dst = residual(a, mesh, len(shape)), residual(b, mesh, len(shape))
    try:
        return tuple(redistribute(src, dst, shape, mesh, itemsize=itemsize))
    except LayoutError:
        return None


def plan_mesh(proto: fx.GraphModule, mesh: Mesh, *, hw: Hardware, precision: Precision, n_blocks: int,
              overlap: bool = False, loop: bool = False, members: list[Member] | None = None,
              attention: tuple[str, ...] = ATTENTION_MODES, forced: dict[str, str] | None = None,
              cache: dict | None = None) -> Choice:
    """The best chain of candidates on one mesh."""
    with fixed_structure(proto):  # only layouts change while candidates are costed
        return _plan_mesh(proto, mesh, hw=hw, precision=precision, n_blocks=n_blocks, overlap=overlap, loop=loop,
                          members=members, attention=attention, forced=forced, cache=cache)


def _plan_mesh(proto: fx.GraphModule, mesh: Mesh, *, hw: Hardware, precision: Precision, n_blocks: int,
               overlap: bool, loop: bool, members: list[Member] | None, attention: tuple[str, ...],
               forced: dict[str, str] | None, cache: dict | None) -> Choice:
    forced = forced or {}
    members = members or all_members()
    cands: list[Candidate] = []
    seen: set = set()
    splits = list(product(experts_modes(proto, forced), latent_modes(proto, forced)))
    for m in members:
        for a in attention:
            for x, lat in splits:
                if x == "a2a" and not m.effective(mesh).batch and "experts" not in forced:
                    continue  # no tokens split over chips: nothing to dispatch (assign_layouts would refuse)
                key = (m.key(mesh), a, x, lat)
                if key in seen:
                    continue
                seen.add(key)
                ck = (_canonical(m, mesh, hw), a, x, lat)
                if cache is not None and ck in cache:
                    c = cache[ck]
                    cands.append(Candidate(m, a, mesh, c.refused, c.parts, c.times, c.memory, c.core, x, lat))
                    continue
                c = evaluate(proto, mesh, m, a, hw=hw, precision=precision, n_blocks=n_blocks, overlap=overlap,
                             forced=forced, experts=x, latent=lat, loop=loop)
                if cache is not None:
                    cache[ck] = c
                cands.append(c)
    ok = [c for c in cands if c.refused is None]
    if not ok:
        raise PlanError(_no_plan_message(cands, mesh))
    layers: Layers = proto.meta[LAYERS]
    shape = (layers.dims.get("B", 1), layers.dims.get("L", 1), layers.dims.get("E", 1))
    blocks, total, trans = _chain(ok, n_blocks, mesh, shape, hw, precision, residual_itemsize(proto), cache=cache)
    return Choice(mesh, blocks, total, cands, trans)


def experts_modes(proto: fx.GraphModule, forced: dict[str, str]) -> tuple[str, ...]:
    """How the experts of the prototype's mixtures may split: what was forced, else sliced and parallel where
    every mixture is in the form that splits by expert (canonicalize's fused experts), and all-to-all
    dispatch too where every one is a moe_ffn over its tokens; else sliced; ("",) without experts layers."""
    experts = proto.meta[LAYERS].by_kind("experts")
    if not experts:
        return ("",)
    if "experts" in forced:
        return (forced["experts"],)
    if not all(l.info.get("fused") for l in experts):
        return ("sliced",)
    return ("sliced", "parallel", "a2a") if all(l.info.get("dispatch") for l in experts) else ("sliced", "parallel")


def _check_forced(proto: fx.GraphModule, forced: dict[str, str]) -> None:
    """A split forced for layers the model does not have is a mistake to say, not a request to ignore."""
    layers: Layers = proto.meta[LAYERS]
    if "experts" in forced and not layers.by_kind("experts"):
        raise LayoutError(f"layouts asks experts={forced['experts']}, but the model has no mixture-of-experts layer "
                          f"shardwise splits (none found{', replicated: ' + ', '.join(layers.experts) if layers.experts else ''}); "
                          f"drop experts=...")
    if "latent" in forced and not any(l.info.get("latent") for l in layers.by_kind("attention")):
        raise LayoutError(f"layouts asks latent={forced['latent']}, but the model has no multi-head latent attention "
                          f"(low-rank q/kv projections before the heads); drop latent=...")


def latent_modes(proto: fx.GraphModule, forced: dict[str, str]) -> tuple[str, ...]:
    """How multi-head latent attention's low-rank projections may split: what was forced, else both ways;
    ("",) for a model without them."""
    if not any(l.info.get("latent") for l in proto.meta[LAYERS].by_kind("attention")):
        return ("",)
    return (forced["latent"],) if "latent" in forced else ("replicated", "split")


def _canonical(m: Member, mesh: Mesh, hw: Hardware) -> tuple:
    """Candidates equal up to renaming atoms cost the same. Every algorithm here uses atom names only as
    labels: what matters is mesh order, sizes, roles and, when links per axis limit bandwidth, which
    atoms share an axis. So the key is the sequence, in mesh order, of (atom size, role[, axis ordinal])."""
    b, e, f = m.atoms(mesh)
    role = {**dict.fromkeys(b, "b"), **dict.fromkeys(e, "e"), **dict.fromkeys(f, "f")}
    if hw.axis_bandwidth is None:
        return m.replicated_residual, tuple((a.size, role.get(a.name)) for a in mesh.atoms)
    present = [ax for ax, size in zip("xyz", mesh.shape) if size > 1]
    return m.replicated_residual, tuple((a.size, role.get(a.name), present.index(a.axis)) for a in mesh.atoms)


def residual_itemsize(proto: fx.GraphModule) -> int:
    layers: Layers = proto.meta[LAYERS]
    if not layers.blocks:
        return 2
    node = next(n for n in proto.graph.nodes if n.name == layers.blocks[0].input)
    return node.meta["val"].element_size()


def _chain(ok: list[Candidate], n: int, mesh: Mesh, shape, hw, precision,
           itemsize: int = 2, cache: dict | None = None) -> tuple[list[Candidate], float, list[float]]:
    """Dynamic programming over the blocks (a shortest path through blocks × candidates):
    best[i][c] = cheapest way to end block i with candidate c; one vectorized step per block.
    `cache`: the search's, where transitions are remembered across meshes (`_transition`)."""
    import numpy as np

    S = len(ok)
    block = np.array([c.block_time() for c in ok])
    emb = np.array([c.times.get("embedding", {}).get("time", 0.0) for c in ok])
    tail = np.array([c.times.get("head", {}).get("time", 0.0) + c.times.get(OUTPUT, {}).get("time", 0.0) for c in ok])
    # every chain costs at least n · (cheapest block) + cheapest embedding + cheapest tail (transitions ≥ 0):
    # when the best uniform chain reaches that bound, it is optimal and no transition needs computing
    uniform = emb + n * block + tail
    j = int(uniform.argmin())
    if uniform[j] <= n * block.min() + emb.min() + tail.min() + 1e-12:
        return [ok[j]] * n, float(uniform[j]), [0.0] * (n - 1)
    # a candidate that costs more than the best uniform chain even with every other block at the cheapest
    # block and no transitions is on no optimal chain: it is left out (with a margin far above rounding,
    # so that the chain kept, its total and every tie are exactly those of the full recursion: a dropped
    # candidate is never an argmin on the optimal path, and the rest keep their order)
    bound = emb.min() + tail.min() + (n - 1) * block.min() + block
    kept = [i for i in range(S) if not bound[i] > uniform[j] * (1 + 1e-9)]
    return _chain_dp([ok[i] for i in kept], n, mesh, shape, hw, precision, itemsize, block[kept], emb[kept],
                     tail[kept], cache)


def _chain_dp(ok: list[Candidate], n: int, mesh: Mesh, shape, hw, precision, itemsize: int, block, emb,
              tail, cache: dict | None = None) -> tuple[list[Candidate], float, list[float]]:
    import numpy as np

    # a transition depends only on the two residual layouts, of which there are far fewer than candidates
    res = [residual(c.member, mesh, len(shape)) for c in ok]
    kinds = list(dict.fromkeys(res))
    rep = {r: next(c.member for c, rc in zip(ok, res) if rc == r) for r in kinds}
    t = {(a, b): _transition(rep[a], rep[b], mesh, shape, hw, precision, itemsize, cache) if a != b else 0.0
         for a in kinds for b in kinds}
    trans = np.array([[t[(ra, rb)] for rb in res] for ra in res])
    best = emb + block
    back = []
    for _ in range(1, n):
        through = best[:, None] + trans  # [from, to]
        back.append(through.argmin(axis=0))
        best = through.min(axis=0) + block  # (the values at the argmins)
    last = best + tail
    j = int(last.argmin())
    path = [j]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    path.reverse()
    chosen = [ok[i] for i in path]
    return chosen, float(last[j]), [float(trans[a, b]) for a, b in zip(path, path[1:])]


def _transition(a: Member, b: Member, mesh: Mesh, shape, hw: Hardware, precision: Precision, itemsize: int,
                cache: dict | None) -> float:
    """`transition`, remembered in the search's cache under the two members' `_canonical` keys: what
    redistribute and the cost model do with the two residual layouts uses atom names only as labels
    (the argument of `_canonical`), so meshes whose atoms line up alike share their transitions. Every
    mesh of the search meets each pair of its residual layouts again."""
    if cache is None:
        return transition(a, b, mesh, shape, hw, precision, itemsize)
    key = ("transition", _canonical(a, mesh, hw), _canonical(b, mesh, hw), tuple(shape), itemsize)
    if key not in cache:
        cache[key] = transition(a, b, mesh, shape, hw, precision, itemsize)
    return cache[key]


def _no_plan_message(cands: list[Candidate], mesh: Mesh) -> str:
    reasons = sorted({c.refused for c in cands if c.refused})
    memory = any(c.refused.startswith("exceeds HBM") for c in cands if c.refused)
    if memory:
        head = f"no layout fits on mesh {mesh}: every candidate exceeds HBM or does not divide the model"
        hint = "more chips, int8 weights (--weights int8), a smaller batch or context"
    else:
        head = f"no layout divides the model on mesh {mesh}"
        hint = "a mesh whose axes divide the model's dims (d_model, d_ff, batch), or --chips N to search meshes"
    return head + ":\n  " + "\n  ".join(reasons[:6]) + f"\nWhat to try: {hint}"


def search(proto: fx.GraphModule, meshes: list[Mesh], *, objective: str = "latency",
           **kw) -> tuple[Choice, list[tuple[Mesh, Choice | str]]]:
    """The best plan over several meshes by `objective` (latency: seconds per step; cost: chip-seconds
    per step, which only differs from latency when meshes of different chip counts compete); also
    every mesh's result (or why it had none)."""
    with fixed_structure(proto):  # one set of the graph's structural facts for every mesh and the head's split
        return _search(proto, meshes, objective=objective, **kw)


def _search(proto: fx.GraphModule, meshes: list[Mesh], *, objective: str,
            **kw) -> tuple[Choice, list[tuple[Mesh, Choice | str]]]:
    cache: dict = {}
    results: list[tuple[Mesh, Choice | str]] = []
    # the search makes hundreds of thousands of small objects: while it runs, the cyclic collector leaves
    # what existed before (everything torch holds) out of its walks, which cost more than the search itself
    freeze = gc.get_freeze_count() == 0  # (unless the caller froze some already: theirs to thaw)
    if freeze:
        gc.freeze()
    try:
        for mesh in meshes:
            try:
                results.append((mesh, plan_mesh(proto, mesh, cache=cache, **kw)))
            except PlanError as e:
                results.append((mesh, str(e)))
    finally:
        if freeze:
            gc.unfreeze()
    good = [r for _, r in results if isinstance(r, Choice)]
    if not good and len(results) == 1:
        raise PlanError(results[0][1])
    if not good:
        raise PlanError(f"no mesh of {meshes[0].size} chips has a valid plan:\n" + "\n".join(
            f"  {m}: {r.splitlines()[0]}" for m, r in results))
    if objective not in ("latency", "cost"):
        raise PlanError(f"unknown objective {objective!r}: use 'latency' or 'cost'")
    key = (lambda c: c.total) if objective == "latency" else (lambda c: c.total * c.mesh.size)
    return _head_by_cost(proto, min(good, key=key), **kw), results


def _head_by_cost(proto: fx.GraphModule, choice: Choice, *, hw: Hardware, precision: Precision, n_blocks: int,
                  overlap: bool = False, loop: bool = False, forced: dict[str, str] | None = None,
                  **_) -> Choice:
    """The head split over the vocabulary (logits gathered) or over d_model (logits summed), whichever costs
    less with the chosen mesh's last block, unless one was asked for: `auto` is only a rule (the vocabulary
    where it divides), and which collective is cheaper depends on the logits' size and on the hardware's
    collectives (gloo all-gathers and all-reduces are not priced alike). Two evaluations, on the chosen mesh
    only: a mesh that would win only through its head's split is not searched for.
    Splits that hold a whole weight on every chip (head=tokens, embed=replicated) are never chosen here,
    only when asked for: a program holds its shards, and what a whole copy costs (memory taken from the
    KV cache and the batch, a rank reading the whole table from the checkpoint) is not in the step's time."""
    forced = forced or {}
    if LayerKind.HEAD in forced or not proto.meta[LAYERS].by_kind(LayerKind.HEAD):
        return choice
    last = choice.blocks[-1]

    def tail(c: Candidate) -> float:
        return sum(c.times.get(k, {}).get("time", 0.0) for k in (LayerKind.HEAD, OUTPUT))

    best, mode = tail(last), None
    for split in ("vocab", "E"):
        try:
            alt = evaluate(proto, choice.mesh, last.member, last.attention, hw=hw, precision=precision,
                           n_blocks=n_blocks, overlap=overlap, forced={**forced, LayerKind.HEAD: split},
                           experts=last.experts, latent=last.latent, loop=loop)
        except LayoutError:
            continue
        if alt.refused is None and tail(alt) < best * (1 - 1e-9):
            best, mode = tail(alt), split
    if mode is None:
        return choice
    return replace(choice, total=choice.total - tail(last) + best, tables={LayerKind.HEAD: mode})


def meshes_for(chips: int) -> list[Mesh]:
    """Every X×Y×Z = chips, near-cubic first (ties are broken by this order)."""
    shapes = factorizations(chips)
    shapes.sort(key=lambda s: (max(s) / min(s), s))
    return [Mesh(s) for s in shapes]



def choose(proto: fx.GraphModule, q: Question, n_blocks: int) -> tuple[Choice, list[tuple[Mesh, Choice | str]]]:
    """The best plan for question `q` on the prototype (n_blocks identical blocks), and every mesh's result."""
    _check_forced(proto, q.forced)
    return search(proto, q.meshes, objective=q.objective, hw=q.hw, precision=q.precision, n_blocks=n_blocks,
                  overlap=q.overlap, loop=q.collective_matmul, members=q.members, attention=q.attention,
                  forced=q.forced)
