"""in_place: an all-reduce whose input nothing else reads reduces that buffer in place (run by emit).

`_c10d_functional.all_reduce` is out of place: it clones its input, then reduces the clone. On a rank
program that is one full copy of the tensor per all-reduce (a Megatron block's two [tokens, E]
all-reduces, a head split over d_model's [tokens, vocab] logits: 64 MiB at 2048 tokens × 8192), paid
on the critical path. Where the input is a fresh buffer that no other op reads, the copy buys nothing:
this pass swaps the op for `all_reduce_`, which reduces that buffer and returns it.

Fresh and read by nothing else means: the all-reduce's input is reached from an op that allocates its
output (its schema's result aliases no input: mm, add, sum ...; not a placeholder, a weight, or an
op that writes an input), through view ops only (view, reshape, contiguous, permute: results that may
alias their input), every node on that chain having exactly one user — the next one on it. Then the
buffer reduced in place is not a program input, not a weight, not an output, and no op other than the
chain reads it, before or after. Anything else keeps the out-of-place op.

Numerics are unchanged: the same sum of the same tensors, in the same order, into another buffer.
"""

from __future__ import annotations

import torch.fx as fx

from ..runtime.lower import c10d

OUT_OF_PLACE = c10d.all_reduce.default
IN_PLACE = c10d.all_reduce_.default


def reduce_in_place(g: fx.Graph) -> int:
    """Swap every all-reduce of a fresh, otherwise unread buffer for the in-place op (see module doc);
    the number swapped. emit runs it on a rank program's graph before compiling it (a pass of its own
    would compile every rank program a second time)."""
    swapped = 0
    for n in g.nodes:
        if n.op == "call_function" and n.target is OUT_OF_PLACE and _private(n.args[0]):
            n.target = IN_PLACE
            swapped += 1
    return swapped


def _private(x: object) -> bool:
    """`x` is a fresh buffer, or a view of one, that only the chain leading to one collective reads."""
    while isinstance(x, fx.Node) and x.op == "call_function" and len(x.users) == 1:
        schema = getattr(x.target, "_schema", None)
        if schema is None or len(schema.returns) != 1 or any(
                a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            return False  # not an aten op with one result, or an op that writes an input
        alias = schema.returns[0].alias_info
        if alias is None:
            return True  # allocates its result: the buffer is new
        x = x.args[0]  # a view: the buffer is its input's; follow it
    return False
