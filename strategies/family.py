"""The layout family of the paper, as data: every mesh axis plays one role — batch, E or F.

| name   | batch | E | F   | paper                 |
|--------|-------|---|-----|-----------------------|
| ws1d   |  –    | – | xyz | 1D weight-stationary  |
| ws2d   |  –    | x | yz  | 2D weight-stationary  |
| wg_x   |  x    | – | yz  | X-weight-gathered     |
| wg_xy  |  xy   | – | z   | XY-weight-gathered    |
| wg_xyz |  xyz  | – | –   | XYZ-weight-gathered   |

Any other assignment of axes to roles is a legal member too (named `b<axes>.e<axes>.f<axes>`), and so
is `ws1d_ar`: 1D weight-stationary with the residual stream *replicated* instead of split over E (the
Megatron arrangement): each block then ends in two all-reduces (attention and FFN outputs) and needs
no all-gather, and norms run locally — fewer, larger collectives, where per-collective latency rules.

With batch atoms b, E atoms e and F atoms f, a feed-forward layer computes
  residual   B_b L E_(e f)   →all-gather(f)→   B_b L E_e
  W_in       F_f E_e  (stored F_(f b) E_e; all-gathered over b before use when b is not empty)
             → B_b L F_f {Σe} →reduce-scatter(e)→ B_b L F_(f e) → activation →all-gather(e)→ B_b L F_f
  W_out      E_e F_f  → B_b L E_e {Σf} →reduce-scatter(f)→ B_b L E_(e f)
Attention uses the same roles with heads in F's place; KV heads split over the longest prefix of
F's atoms that divides K and are replicated over the rest. `attention="batch"` splits the attention
core over batch on all atoms instead (all-to-all in and out), the paper's layout for multiquery decode.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property, lru_cache

from ..errors import LayoutError
from ..ir.kinds import AttentionMode
from ..ir.layout import Layout
from ..ir.mesh import AXES, Mesh
from ..ir.plan import check_member_names_with
from .rules import AttentionSpec, WeightSpec, longest_dividing_prefix


@dataclass(frozen=True)
class Member:
    """One member of the family: the axes playing batch, E and F (and whether the residual between
    layers is replicated rather than split over E)."""

    batch: str
    e: str
    f: str
    replicated_residual: bool = False

    @cached_property  # (read in every layout's messages and names; a frozen member never changes it)
    def name(self) -> str:
        for n, member in NAMED.items():
            if member == self:
                return n
        return f"b{self.batch or '-'}.e{self.e or '-'}.f{self.f or '-'}" + ("_ar" if self.replicated_residual else "")

    def effective(self, mesh: Mesh) -> Member:
        """The member as it acts on `mesh`: axes of size 1 play no role."""
        return Member(*("".join(a for a in axes if mesh.shape["xyz".index(a)] > 1) for axes in (self.batch, self.e, self.f)),
                      self.replicated_residual)

    def idle_roles(self, mesh: Mesh) -> list[str]:
        """Roles the member gives axes that all have size 1 on `mesh` (ws2d's E on mesh 1x2x4): there the
        member acts as another one (ws1d)."""
        roles = (("batch", self.batch), ("E", self.e), ("F", self.f))
        return [f"{role} ({axes})" for role, axes in roles if axes and all(mesh.shape["xyz".index(a)] == 1 for a in axes)]

    def on(self, mesh: Mesh) -> str:
        """The name on a mesh: axes of size 1 play no role; a named member when the roles match one."""
        eff = self.effective(mesh)
        for n, member in NAMED.items():
            if member.key(mesh) == eff.key(mesh):
                return n
        return eff.name

    def atoms(self, mesh: Mesh) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return mesh.atoms_of(self.batch), mesh.atoms_of(self.e), mesh.atoms_of(self.f)

    def key(self, mesh: Mesh) -> tuple:
        """Members that put the same atoms in the same roles are the same layout on this mesh."""
        return self.atoms(mesh), self.replicated_residual

    @property
    def family(self) -> str:
        """The paper's name for the member on any mesh, by which roles have axes."""
        if self.batch and not self.e and not self.f:
            return "WG-XYZ"
        if self.batch:
            return "WG-X" if len(self.batch) == 1 else "WG-XY"
        if self.e and self.f:
            return "2D WS"
        return "1D WS (all-reduce)" if self.replicated_residual else "1D WS"

    def __str__(self) -> str:
        return self.name


NAMED: dict[str, Member] = {
    "ws1d": Member("", "", "xyz"),
    "ws2d": Member("", "x", "yz"),
    "wg_x": Member("x", "", "yz"),
    "wg_xy": Member("xy", "", "z"),
    "wg_xyz": Member("xyz", "", ""),
    "ws1d_ar": Member("", "", "xyz", replicated_residual=True),
}
ATTENTION_MODES = tuple(AttentionMode)  # heads, batch


def all_members() -> list[Member]:
    """Every assignment of the three axes to roles (27), named members first."""
    out = list(NAMED.values())
    for roles in itertools.product("bef", repeat=3):
        m = Member(*("".join(ax for ax, r in zip(AXES, roles) if r == want) for want in "bef"))
        if m not in out:
            out.append(m)
    return out


def parse_ffn(name: str) -> Member:
    if name in NAMED:
        return NAMED[name]
    replicated = name.endswith("_ar")
    roles = name[: -len("_ar")] if replicated else name
    parts = dict(p.split(None, 1) if " " in p else (p[:1], p[1:]) for p in roles.split("."))
    try:
        m = Member(*(parts[k].replace("-", "") for k in "bef"), replicated_residual=replicated)
    except (KeyError, ValueError):
        raise LayoutError(
            f"unknown feed-forward layout {name!r}: use one of {', '.join(NAMED)} or 'b<axes>.e<axes>.f<axes>' "
            f"(e.g. 'bx.ey.fz')"
        ) from None
    used = m.batch + m.e + m.f
    if sorted(used) != sorted(set(used)) or set(used) - set(AXES):
        raise LayoutError(f"layout {name!r}: each of x, y, z may play at most one role")
    return m


# ------------------------------------------------------------------------------------ layouts of a layer
# residual, weight_spec and attention_plan are pure functions of hashable arguments with immutable
# results, asked the same questions for every candidate the planner applies: remembered.
@lru_cache(maxsize=1 << 14)
def residual(member: Member, mesh: Mesh, ndim: int = 3) -> Layout:
    """The residual stream between layers: B_b L E_(e f), or B_b L E when it is replicated."""
    b, e, f = member.atoms(mesh)
    dims = [()] * ndim
    dims[0] = b
    dims[-1] = () if member.replicated_residual else e + f
    return Layout(tuple(dims))


@lru_cache(maxsize=1 << 14)
def weight_spec(out_atoms, in_atoms, batch, shape, rows_out: bool, mesh: Mesh) -> WeightSpec:
    """A projection weight split `out_atoms` × `in_atoms` in use; stored also split over `batch`.

    `shape` is the weight's stored shape ([out, in] when `rows_out`, else [in, out]).
    """
    o, i = (0, 1) if rows_out else (1, 0)
    in_use = Layout.sharded(2, o, out_atoms).with_dim(i, in_atoms)
    at_rest = in_use
    if batch:
        for d, atoms in ((o, out_atoms), (i, in_atoms)):
            cand = in_use.with_dim(d, atoms + batch)
            if cand.divides(shape, mesh):
                at_rest = cand
                break
    return WeightSpec(at_rest=at_rest, in_use=in_use)


def require_divides(what: str, size: int, atoms: tuple[str, ...], mesh: Mesh, layout: str) -> None:
    n = mesh.group_size(atoms)
    if size % n:
        raise LayoutError(
            f"{layout} splits {what} = {size} over {mesh.format_atoms(atoms)} = {n} chips, which does not divide "
            f"it; choose a mesh whose axes for that role divide {size}, or another layout"
        )


@dataclass(frozen=True)
class AttentionPlan:
    q: tuple[str, ...]  # atoms splitting query heads (projection out dim)
    kv: tuple[str, ...]  # atoms splitting KV heads (a prefix of q's)
    core: AttentionSpec
    replicated_over: tuple[str, ...]  # F atoms that heads could not use: attention repeats there


@lru_cache(maxsize=1 << 14)
def attention_plan(member: Member, mode: str, mesh: Mesh, *, B: int, H: int, K: int) -> AttentionPlan:
    if mode not in ATTENTION_MODES:
        raise LayoutError(f"unknown attention layout {mode!r}: use one of {', '.join(ATTENTION_MODES)}")
    b, e, f = member.atoms(mesh)
    q = longest_dividing_prefix(f, H, mesh)
    kv = longest_dividing_prefix(q, K, mesh)
    if mode == "heads":
        core = AttentionSpec(batch=b, heads=longest_dividing_prefix(f + e, H, mesh), mode=mode)
    else:
        rest = tuple(a for a in mesh.mesh_order(e + f))
        core = AttentionSpec(batch=b + longest_dividing_prefix(rest, B // max(1, mesh.group_size(b)), mesh),
                             heads=(), mode=mode)
    return AttentionPlan(q=q, kv=kv, core=core, replicated_over=tuple(a for a in f if a not in q))


def _check_member_name(name: str) -> None:
    parse_ffn(name)


check_member_names_with(_check_member_name)  # a plan read from JSON names only members of the family
