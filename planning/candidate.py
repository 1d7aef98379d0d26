"""A candidate (a family member and an attention split on a mesh, with its costs) and a choice (a
candidate per block on one mesh): what the search produces and the recorder reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.mesh import Mesh
from ..ir.plan import BlockRun
from ..strategies.cost import LayerCost
from ..strategies.family import Member


@dataclass
class Candidate:
    member: Member
    attention: str
    mesh: Mesh
    refused: str | None = None
    parts: dict[str, LayerCost] = field(default_factory=dict)  # embedding / attention / ffn / head / output
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)  # per chip, whole model
    core: str = ""  # how the attention core is really split: "heads", "batch" or "heads+batch"
    experts: str = ""  # how a mixture's experts split under the member: "sliced", "parallel", "a2a" ("" if none)
    latent: str = ""  # multi-head latent attention's low-rank projections: "replicated", "split" ("" if none)

    @property
    def name(self) -> str:
        return (f"{self.member.on(self.mesh)}+{self.attention}" + (f"+experts-{self.experts}" if self.experts else "")
                + (f"+latent-{self.latent}" if self.latent else ""))

    def same_layout(self, other: "Candidate") -> bool:
        return (self.member, self.attention, self.experts, self.latent) == (
            other.member, other.attention, other.experts, other.latent)

    def run(self, first: int, last: int) -> BlockRun:
        """The plan's record of blocks first..last laid out as this candidate."""
        return BlockRun(first=first, last=last, member=self.member.on(self.mesh), attention=self.core,
                        family=self.member.effective(self.mesh).family, experts=self.experts,
                        latent=self.latent)

    def block_time(self) -> float:
        return sum(self.times[k]["time"] for k in ("attention", "ffn", "experts") if k in self.times)


@dataclass
class Choice:
    """The planner's answer for one mesh: a candidate per block, the total and its parts."""

    mesh: Mesh
    blocks: list[Candidate]
    total: float  # seconds per step
    candidates: list[Candidate]
    transitions: list[float]  # seconds, between consecutive blocks
    tables: dict[str, str] = field(default_factory=dict)  # the head's split chosen by cost ({"head": "E"})

    def forced(self, forced: dict[str, str]) -> dict[str, str]:
        """The layouts forced outside the blocks as this choice applies them: what was asked, and what the
        search chose by cost for the rest (the head's split)."""
        return {**forced, **self.tables}

    @property
    def first(self) -> Candidate:
        return self.blocks[0]
