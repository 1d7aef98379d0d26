"""What a user may force: `layouts="ffn=ws2d,attn=batch"` (or a dict) → {layer kind: layout name}.

The names are checked here (family members, attention splits, embedding and head splits); whether a
layout divides the model is checked when it is applied to a graph.
"""

from __future__ import annotations

from ..errors import LayoutError
from .family import ATTENTION_MODES, parse_ffn

KINDS = {"ffn": "ffn", "attn": "attention", "attention": "attention", "embed": "embedding",
         "embedding": "embedding", "head": "head", "experts": "experts", "latent": "latent"}
DEFAULTS = {"ffn": "ws1d", "attention": "heads", "embedding": "auto", "head": "auto"}  # auto: whatever divides
TABLE_MODES = ("auto", "E", "vocab")
EMBED_MODES = (*TABLE_MODES, "replicated")  # replicated: the whole table on every chip, looked up locally
HEAD_MODES = (*TABLE_MODES, "tokens")  # tokens: the rows split over every chip, the weight whole on each
EXPERT_MODES = ("sliced", "parallel", "a2a", "replicated")  # F split; the experts; the experts by all-to-all; nothing
LATENT_MODES = ("replicated", "split")  # multi-head latent attention's low-rank projections: whole, or over q's atoms


def parse_layouts(text: str | dict | None) -> dict[str, str]:
    """`"ffn=ws1d,attn=heads"` or a dict → {kind or layer name: layout}. Checks names, not sizes."""
    if text is None:
        return {}
    if not isinstance(text, (str, dict)):
        raise LayoutError(f"layouts={text!r}: expected a string such as 'ffn=ws2d,attn=batch' or a dict "
                          f"{{'ffn': 'ws2d', 'attn': 'batch'}}")
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise LayoutError(
                    f"malformed --layouts entry {part!r}: expected KIND=LAYOUT pairs joined by commas, "
                    f"e.g. 'ffn=ws2d,attn=batch' (kinds: ffn, attn, embed, head)"
                )
            k, v = (s.strip() for s in part.split("=", 1))
            items.append((k, v))
    out = {}
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str):
            raise LayoutError(f"layouts entry {k!r}: {v!r}: expected a layer kind and a layout name, both strings")
        if k not in KINDS:
            raise LayoutError(
                f"--layouts names {k!r}: expected a layer kind, one of ffn, attn, embed, head, experts, latent (e.g. 'ffn=ws2d,attn=batch')"
            )
        kind = KINDS[k]
        if kind == "ffn":
            parse_ffn(v)
        elif kind == "attention" and v not in ATTENTION_MODES:
            raise LayoutError(f"unknown attention layout {v!r}: use one of {', '.join(ATTENTION_MODES)}")
        elif kind == "experts" and v not in EXPERT_MODES:
            raise LayoutError(f"unknown experts layout {v!r}: use one of {', '.join(EXPERT_MODES)}")
        elif kind == "latent" and v not in LATENT_MODES:
            raise LayoutError(f"unknown latent layout {v!r}: use one of {', '.join(LATENT_MODES)}")
        elif kind == "embedding" and v not in EMBED_MODES:
            raise LayoutError(f"unknown {kind} layout {v!r}: use one of {', '.join(EMBED_MODES)}")
        elif kind == "head" and v not in HEAD_MODES:
            raise LayoutError(f"unknown {kind} layout {v!r}: use one of {', '.join(HEAD_MODES)}")
        if kind in out:
            raise LayoutError(f"layouts names the {kind} layout twice ({out[kind]!r} and {v!r}): give one")
        out[kind] = v
    return out
