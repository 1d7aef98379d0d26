"""`shardwise.plan` for presets, many times over, with what repeats across calls computed once.

A sweep asks the planner hundreds of questions that share most of their work. `Engine.plan` takes
the same steps as `planning.planner.plan` for a preset without example inputs (capture one block of
the phase's step, search meshes × candidates, record the choice as a Plan) and keeps:

    prototypes   one captured block per (model, phase, batch, seq, context), for every chip count,
                 weight precision and objective asked about it
    candidates   each candidate's costs per (prototype, precision), shared by every mesh and chip count
                 where it puts atoms of the same sizes in the same roles (the planner's own cache key)
    meshes       each mesh's best chain of candidates (or why it has none): an objective of cost looks
                 at every divisor of the chips, so it reuses the latency answers of smaller counts

A mesh whose chips cannot hold the weights alone (weights ÷ chips > HBM) is answered without costing
its candidates: every one of them would be refused for memory. Otherwise the Plan is exactly the one
`shardwise.plan(model, mesh=..., phase=..., ...)` returns, its program built lazily on first use.

Two restrictions make the paper's own search space, for sweeps that reproduce its figures:
`meshes="paper"` uses PAPER.md's mesh for each chip count (8 → 2×2×2, ..., 256 → 4×8×8; the most
cubic one for other counts) instead of every factorization, and `members="paper"` the paper's named
layouts (1D/2D weight-stationary, X/XY/XYZ weight-gathered, 1D with an all-reduce) instead of every
assignment of roles to axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

from ..errors import PlanError, ShardwiseError
from ..ir.hardware import Hardware, get_hardware
from ..ir.kinds import Objective, Phase
from ..ir.mesh import Mesh
from ..ir.plan import Plan
from ..planning import planner
from ..planning.candidate import Choice
from ..planning.costing import param_count
from ..planning.program import LazyProgram
from ..planning.question import Question
from ..planning.record import record
from ..planning.search import meshes_for, plan_mesh
from ..strategies.cost import Precision
from ..strategies.family import NAMED, all_members

PAPER_MESHES = {8: (2, 2, 2), 16: (2, 4, 2), 32: (4, 2, 4), 64: (4, 4, 4), 128: (8, 4, 4), 256: (4, 8, 8)}
MeshSet = Literal["search", "paper"]
MemberSet = Literal["all", "paper"]


def paper_mesh(chips: int) -> Mesh:
    """PAPER.md's mesh for `chips`, or the most cubic factorization for a count it does not list."""
    return Mesh(PAPER_MESHES[chips]) if chips in PAPER_MESHES else meshes_for(chips)[0]


@dataclass
class Prototype:
    gm: fx.GraphModule  # one block of the phase's step, captured and prepared
    n_blocks: int  # how many blocks the whole model has
    name: str
    build_full: object  # what planning.planner builds the whole program from, on first use


class Engine:
    """Plans presets on one hardware profile, keeping prototypes, candidate costs and mesh answers."""

    def __init__(self, hardware: str | Hardware = "tpu-v4", *, overlap: bool = False):
        self.hw = get_hardware(hardware)
        self.overlap = overlap
        self._protos: dict[tuple, Prototype] = {}
        self._costed: dict[tuple, dict] = {}
        self._meshes: dict[tuple, Choice | str] = {}
        self.captures = 0  # prototypes captured so far (the expensive part a cache hit saves)

    # ------------------------------------------------------------------------------------ caches
    def prototype(self, model: str, phase: str, batch: int, seq: int, context: int | None) -> Prototype:
        """One captured block of `model`'s step for this phase and shape (captured once)."""
        key = (model, phase, batch, seq, context)
        if key not in self._protos:
            # the planner's own capture of a preset's prototype, so a plan made here is the one it makes
            gm, n_blocks, name, build_full = planner.prototype(model, phase, batch, seq, context)
            self._protos[key] = Prototype(gm, n_blocks, name, build_full)
            self.captures += 1
        return self._protos[key]

    def mesh_choice(self, key: tuple, proto: Prototype, mesh: Mesh, precision: Precision,
                    members: MemberSet) -> Choice | str:
        """The best chain of candidates on `mesh` (planning.search.plan_mesh), or why there is none."""
        mkey = (key, precision, members, mesh)
        if mkey in self._meshes:
            return self._meshes[mkey]
        weights = param_count(proto.gm, proto.n_blocks, precision)[1]
        if weights / mesh.size > self.hw.hbm_bytes:
            gib = 1024**3
            answer: Choice | str = (f"no layout fits on mesh {mesh}: the weights alone need {weights / mesh.size / gib:.1f} "
                                    f"GiB per chip of {self.hw.hbm_bytes / gib:.1f} GiB")
        else:
            cache = self._costed.setdefault((key, precision, members), {})
            chosen = list(NAMED.values()) if members == "paper" else all_members()
            try:
                answer = plan_mesh(proto.gm, mesh, hw=self.hw, precision=precision, n_blocks=proto.n_blocks,
                                   overlap=self.overlap, members=chosen, cache=cache)
            except PlanError as e:
                answer = str(e)
        self._meshes[mkey] = answer
        return answer

    def choice(self, model: str, *, phase: str, batch: int, seq: int, context: int | None, weights: str | None,
               mesh: Mesh | str, members: MemberSet = "all") -> Choice:
        """Every candidate of one mesh with its costs and the best chain (planning.candidate.Choice): what a
        figure of every layout at one operating point draws. PlanError when none is valid."""
        key = (model, str(Phase.parse(phase, "phase")), batch, seq, context)
        answer = self.mesh_choice(key, self.prototype(*key), Mesh.parse(mesh), Precision(weights=weights), members)
        if isinstance(answer, str):
            raise PlanError(answer)
        return answer

    # ------------------------------------------------------------------------------------ planning
    def meshes(self, *, mesh: Mesh | str | None, chips: int | None, objective: Objective,
               meshes: MeshSet) -> list[Mesh]:
        """The meshes a question searches: the one given, or those of `chips` (of every divisor of it
        for an objective of cost, which may use fewer chips), all factorizations or the paper's one."""
        if mesh is not None:
            return [Mesh.parse(mesh)]
        if not isinstance(chips, int) or isinstance(chips, bool) or chips < 1:
            raise ShardwiseError(f"chips={chips!r}: expected a positive number of chips (or give mesh='XxYxZ')")
        if meshes not in ("search", "paper"):
            raise ShardwiseError(f"meshes={meshes!r}: expected 'search' (every X·Y·Z = chips) or 'paper' "
                                 f"(PAPER.md's mesh for each chip count)")
        counts = [n for n in range(1, chips + 1) if chips % n == 0] if objective == Objective.COST else [chips]
        return [m for n in counts for m in ([paper_mesh(n)] if meshes == "paper" else meshes_for(n))]

    def plan(self, model: str, *, phase: str = "prefill", batch: int = 8, seq: int = 16, context: int | None = None,
             weights: str | None = None, mesh: Mesh | str | None = None, chips: int | None = None,
             objective: str = "latency", meshes: MeshSet = "search", members: MemberSet = "all") -> Plan:
        """The Plan `shardwise.plan(model, mesh=/chips=, phase=, batch=, seq=, context=, weight_dtype=weights,
        objective=)` makes, for a preset `model`; PlanError when no mesh has a plan."""
        phase, objective = Phase.parse(phase, "phase"), Objective.parse(objective, "objective")
        if members not in ("all", "paper"):
            raise ShardwiseError(f"members={members!r}: expected 'all' (every assignment of roles to axes) or "
                                 f"'paper' (the paper's named layouts)")
        searched = self.meshes(mesh=mesh, chips=chips, objective=objective, meshes=meshes)
        precision = Precision(weights=weights)
        key = (model, phase, batch, seq, context)
        proto = self.prototype(*key)
        results = [(m, self.mesh_choice(key, proto, m, precision, members)) for m in searched]
        good = [r for _, r in results if isinstance(r, Choice)]
        if not good:
            raise PlanError(results[0][1] if len(results) == 1 else
                            f"no mesh of {searched[-1].size} chips has a valid plan:\n" +
                            "\n".join(f"  {m}: {r.splitlines()[0]}" for m, r in results))
        size = (lambda c: c.total) if objective == Objective.LATENCY else (lambda c: c.total * c.mesh.size)
        choice = min(good, key=size)
        q = Question(meshes=searched, hw=self.hw, precision=precision, objective=objective, overlap=self.overlap,
                     phase=phase, model=proto.name, context=context or seq)
        result = record(proto.gm, choice, results, q, proto.n_blocks)
        result.program = LazyProgram(lambda: planner.full_program(proto.build_full, choice, q))
        return result
