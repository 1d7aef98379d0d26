"""The small vocabularies of shardwise, as enums: layer kinds, attention splits, phases, objectives.

They are `StrEnum`s, so a member prints as its value and equals it (`Phase.DECODE == "decode"`): the
command line, JSON plans and user code may pass plain strings, and `parse` turns them into members
with an error that lists the choices.
"""

from __future__ import annotations

from enum import StrEnum

from ..errors import ShardwiseError


class _Vocabulary(StrEnum):
    @classmethod
    def parse(cls, value: str | "_Vocabulary", what: str | None = None):
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ShardwiseError(f"unknown {what or cls.__name__.lower()} {value!r}: use one of {choices}") from None


class LayerKind(_Vocabulary):
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    FFN = "ffn"
    EXPERTS = "experts"  # a mixture of experts: router, top-k, grouped expert matmuls, combine
    HEAD = "head"
    OUTPUT = "output"  # what no layer owns (the final gather of the logits)
    TRANSITION = "transition"  # the residual redistributed between two runs of blocks


class AttentionMode(_Vocabulary):
    HEADS = "heads"  # heads split like F; KV cache split by KV heads
    BATCH = "batch"  # all-to-all into a batch split; KV cache split by batch


class Phase(_Vocabulary):
    PREFILL = "prefill"
    DECODE = "decode"


class Objective(_Vocabulary):
    LATENCY = "latency"  # seconds per step
    COST = "cost"  # chip-seconds per token
