"""What a plan is asked for: meshes, hardware, precision, objective, phase, and what the user forced."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.hardware import Hardware
from ..ir.kinds import AttentionMode, LayerKind, Objective, Phase
from ..ir.mesh import Mesh
from ..strategies.cost import Precision
from ..strategies.family import Member, all_members, parse_ffn


@dataclass
class Question:
    meshes: list[Mesh]
    hw: Hardware
    precision: Precision
    objective: Objective = Objective.LATENCY
    overlap: bool = False
    collective_matmul: bool = False  # the program loops collectives with their matmuls (passes/collective_matmul)
    request: dict[str, str] = field(default_factory=dict)  # layouts forced by layer kind
    phase: Phase = Phase.PREFILL
    model: str = ""
    context: int | None = None  # decode: the KV-cache length planned for
    notes: list[str] = field(default_factory=list)  # what the plan should say about how it was made

    @property
    def members(self) -> list[Member]:
        """The family members to consider for the blocks (the forced one, else all)."""
        return [parse_ffn(self.request[LayerKind.FFN])] if LayerKind.FFN in self.request else all_members()

    @property
    def attention(self) -> tuple[AttentionMode, ...]:
        if LayerKind.ATTENTION in self.request:
            return (AttentionMode(self.request[LayerKind.ATTENTION]),)
        return tuple(AttentionMode)

    @property
    def forced(self) -> dict[str, str]:
        """Layouts forced for the layers outside the blocks (embedding, head), the experts' split and a latent
        attention's low-rank projections'."""
        return {k: v for k, v in self.request.items()
                if k in (LayerKind.EMBEDDING, LayerKind.HEAD, LayerKind.EXPERTS, "latent")}
