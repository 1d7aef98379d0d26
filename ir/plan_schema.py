"""Reading a Plan back from JSON: the format version, then the schema (pydantic validates the typed
dataclasses of ir/plan.py: enums, collective kinds, numbers), then the Plan's own checks (sizes ≥ 0,
layout names of the family). Nothing in the text is evaluated; whatever is wrong is a ShardwiseError.

pydantic is imported here on first use, not with the package: planning never reads a plan back, and the
import costs a tenth of a second of every command's start."""

from __future__ import annotations

import json
from functools import cache

from ..errors import ShardwiseError
from .mesh import Mesh


@cache
def _adapter(cls, parts: tuple[type, ...]):
    from pydantic import ConfigDict, TypeAdapter

    config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", strict=False)
    for dc in (*parts, cls):
        dc.__pydantic_config__ = config
    return TypeAdapter(cls)


def load(cls, text: str, *, version: int, parts: tuple[type, ...]):
    """An instance of the dataclass `cls` from JSON written at format `version`; `parts`: the dataclasses
    nested in it (each is validated with the same strictness: unknown fields are errors)."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ShardwiseError(f"not a plan: the text is not JSON ({e}); expected what Plan.to_json() writes") from None
    if not isinstance(d, dict):
        raise ShardwiseError(f"not a plan: the JSON is a {type(d).__name__}, expected an object from Plan.to_json()")
    found = d.pop("format", None)
    if found != version:
        raise ShardwiseError(f"plan format {found!r}: this shardwise reads format {version}; re-plan with "
                             f"shardwise.plan(...) and save it again with Plan.to_json()")
    mesh = d.get("mesh")
    if not isinstance(mesh, str):
        raise ShardwiseError(f"plan field 'mesh' = {mesh!r}: expected a mesh string such as '2x2x1'")
    d["mesh"] = Mesh.parse(mesh)
    if "program" in d:
        raise ShardwiseError("plan field 'program': a plan's program is never stored in JSON; remove the field")
    from pydantic import ValidationError

    try:
        return _adapter(cls, parts).validate_python(d)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (found {err.get('input')!r})"[:200]
                    for err in e.errors()]
        raise ShardwiseError(f"not a valid plan ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
                             + "\n  ".join(problems[:8])) from None
