"""Errors meant for the user: each says what was found, what was expected and what to do."""

from __future__ import annotations


class ShardwiseError(Exception):
    """Base class of every error shardwise raises on purpose (bad input, an unsupported model, ...)."""


class MeshError(ShardwiseError, ValueError):
    """A mesh string or mesh size that cannot be used."""


class CaptureError(ShardwiseError):
    """torch.export could not capture the model."""


class LayoutError(ShardwiseError, ValueError):
    """A requested layout cannot be applied to a tensor (does not divide, unknown name, ...)."""


class PlanError(ShardwiseError):
    """No plan satisfies the constraints (memory, divisibility, ...)."""


class InputError(ShardwiseError, ValueError):
    """A call of a sharded program that differs from the call it was planned for."""


class TokenIdError(InputError, IndexError):
    """Token ids outside the vocabulary (an IndexError, as the unsharded model's embedding raises)."""
