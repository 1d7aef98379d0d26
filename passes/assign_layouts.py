"""assign_layouts: write each layer's chosen layout onto the graph.

Input: `gm.meta["sw_layers"]` and one choice per layer (a feed-forward family member per block,
`heads`/`batch` per attention, `E`/`vocab` per embedding and head, `replicated` per
embedding, `tokens` per head). Output on the graph:
  `sw_weight`     on every planned weight placeholder: its layout at rest and in use
  `sw_anchor`     on every block's input: the residual layout of that block's member
  `sw_attention`  on every attention core: how its batch and heads are split
and `gm.meta["sw_assignment"]`: the choices and the notes (heads replicated, ...).
The cost-driven choice of those layouts lives in `planning/` (search.py); this pass only applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import LayoutError
from ..ir.layout import Layout
from ..ir.mesh import Mesh
from ..ir.meta import ANCHOR, ASSIGNMENT, ATTENTION, DISPATCH, IO_LAYOUTS, LAYERS, SIGNATURE, WEIGHT
from ..strategies.family import (
    Member,
    attention_plan,
    parse_ffn,
    require_divides,
    residual,
    weight_spec,
)
from ..strategies.request import DEFAULTS
from ..strategies.rules import WeightSpec, longest_dividing_prefix
from .find_layers import Layer, Layers, block_of
from .graph_utils import module_path, shape, signature, structure_fact
from .pipeline import graph_pass


@dataclass
class Assignment:
    choices: dict[str, str]  # layer name → layout name
    members: dict[int, Member]  # block index → family member (roles of its axes)
    notes: dict[str, list[str]] = field(default_factory=dict)  # layer name → remarks


@graph_pass(needs=(SIGNATURE, LAYERS), makes=(ASSIGNMENT, IO_LAYOUTS))
def assign_layouts(gm: fx.GraphModule, mesh: Mesh, choices: dict[str, str]) -> fx.GraphModule:
    layers: Layers = gm.meta[LAYERS]
    nodes = structure_fact(gm, "nodes by name", _by_name)
    members: dict[int, Member] = {}
    notes: dict[str, list[str]] = {}
    io = gm.meta.setdefault(IO_LAYOUTS, {})
    caches = structure_fact(gm, "cache inputs", _cache_inputs)
    for block in layers.blocks:
        owner = block.ffn or block.experts  # the layer whose choice names the block's member
        ffn_choice = choices.get(owner.name).partition(":")[0] if owner and choices.get(owner.name) else None
        member = parse_ffn(ffn_choice or DEFAULTS["ffn"])
        members[block.index] = member
        anchor = nodes[block.input]
        anchor.meta[ANCHOR] = _residual_for(anchor, member, mesh, block.name)
        if block.experts:
            mode = (choices.get(block.experts.name) or "").partition(":")[2] or "sliced"
            notes[block.experts.name] = _assign_experts(block.experts, member, mode, mesh, nodes)
        if block.ffn:
            _assign_ffn(block.ffn, member, mesh, nodes)
            if block.parallel and block.attention:
                notes[block.ffn.name] = ["parallel block: shares one input all-gather and one output "
                                         "reduce-scatter with attention (listed there)"]
        if block.attention:
            mode, _, latent = choices.get(block.attention.name, DEFAULTS["attention"]).partition(":")
            notes[block.attention.name] = _assign_attention(block.attention, member, mode, mesh, nodes)
            notes[block.attention.name] += _assign_latent(block.attention, member, mode, latent, mesh, nodes)
            for ph, outs in caches.get(block.name, []):
                cache_layout = _cache_layout(nodes[block.attention.core].meta[ATTENTION], member, mode, mesh,
                                             block.attention.dims, heads=shape(nodes[ph])[1])
                io[ph] = cache_layout
                io.update({f"output:{j}": cache_layout for j in outs})
    _gather_free_weights(gm, layers, members, mesh)
    first = members.get(0, parse_ffn(DEFAULTS["ffn"]))
    table_specs: dict[str, WeightSpec] = {}
    resolved = dict(choices)  # "auto" embeddings and heads: the split they got
    for layer in layers.by_kind("embedding"):
        mode = choices.get(layer.name, DEFAULTS["embedding"])
        if mode == "auto" and layer is not layers.by_kind("embedding")[0]:
            mode = "E"  # position tables are small and added to the token rows: keep them as the residual
        ph = nodes[layer.params["table"]]
        resolved[layer.name], ph.meta[WEIGHT] = _table_spec(layer, mode, first, mesh)
        table_specs[ph.name] = ph.meta[WEIGHT]
    last = members.get(len(layers.blocks) - 1, first)
    for layer in layers.by_kind("head"):
        mode = choices.get(layer.name, DEFAULTS["head"])
        proj = layer.projections["w"]
        ph = nodes[proj.weight]
        if ph.name in table_specs:  # tied to the embedding: one stored copy, used as the table is split
            notes[layer.name] = [f"weight tied to the embedding: uses its layout ({table_specs[ph.name].in_use})"]
            continue
        resolved[layer.name], ph.meta[WEIGHT] = _head_spec(layer, mode, last, mesh, shape(ph))
        if mode == "tokens":
            x = nodes[proj.input]
            x.meta[ANCHOR] = _token_rows(x, last, mesh, layer.name)
    gm.meta[ASSIGNMENT] = Assignment(resolved, members, notes)
    return gm


def _by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


# ------------------------------------------------------------------------------------ per layer
def _residual_for(node: fx.Node, member: Member, mesh: Mesh, where: str) -> Layout:
    s = shape(node)
    layout = residual(member, mesh, len(s))
    b, e, f = member.atoms(mesh)
    require_divides("the batch", s[0], b, mesh, f"{member} at {where}")
    require_divides("d_model (E)", s[-1], e + f, mesh, f"{member} at {where}")
    return layout


def _assign_ffn(layer: Layer, member: Member, mesh: Mesh, nodes: dict[str, fx.Node]) -> None:
    b, e, f = member.atoms(mesh)
    where = f"{member} for {layer.name}"
    require_divides("d_ff (F)", layer.dims["F"], f, mesh, where)
    require_divides("d_model (E)", layer.dims["E"], e, mesh, where)
    for role, p in layer.projections.items():
        out_atoms, in_atoms = (e, f) if role == "w_out" else (f, e)
        ph = nodes[p.weight]
        ph.meta[WEIGHT] = weight_spec(out_atoms, in_atoms, b, shape(ph), p.rows_out, mesh)


def _assign_experts(layer: Layer, member: Member, mode: str, mesh: Mesh, nodes: dict[str, fx.Node]) -> list[str]:
    """Expert-sliced: every expert's hidden dim F split over all the member's atoms (in mesh order), like a
    1D weight-stationary feed-forward per expert: gate/up [X, F, E] split on F, down [X, E, F] split on F.
    The tokens routed to the experts are gathered whole, the router replicated (its matmul, top-k and
    dispatch run identically on every rank: the unsharded model's routing, bit for bit), and the combine
    is a partial sum over those atoms, reduced into the residual's layout. Where F does not divide them
    all, F is split over the longest prefix that does and the experts repeat over the rest (noted).

    Expert parallel (`mode="parallel"`, canonicalize's fused experts_ffn only): the experts X split over the
    longest prefix of those atoms that divides X, each rank holding only its experts and running only
    their tokens (the rest of its output 0), and each expert's F over the atoms left (experts over x, F
    over y·z); the combine is the same partial sum over all of them.

    Replicated (`mode="replicated"`, only when requested: the baseline the others are measured against):
    every expert whole on every chip, each computing every routed row; no combine.

    Biases (gpt-oss) split with their weight: the gate and up biases [X, F] (or [X, 2F], interleaved) like
    F, the down bias [X, E] over X like the experts and over E by F's atoms, so every rank stores 1/n of
    it and each column of it is added by the one rank of a partial sum holding those columns (emit)."""
    b, e, f = member.atoms(mesh)
    every = mesh.mesh_order(b + e + f)
    experts: tuple[str, ...] = ()
    if mode in ("parallel", "a2a") and not layer.info.get("fused"):
        raise LayoutError(
            f"experts={mode} for {layer.name}: its experts are not in the form shardwise splits by expert (gate, "
            f"up, activation and down as grouped matmuls over the same routed tokens); use experts=sliced")
    if mode == "parallel":
        experts = longest_dividing_prefix(every, layer.dims["X"], mesh)
        if every and not experts:
            raise LayoutError(
                f"experts=parallel for {layer.name}: its {layer.dims['X']} experts do not split over "
                f"{mesh.format_atoms(every[:1])} = {mesh.group_size(every[:1])} chips, the first of the chips the "
                f"block splits over; use experts=sliced, or a mesh whose first axes divide {layer.dims['X']}")
    if mode == "a2a":
        experts = _dispatch_atoms(layer, member, b, mesh)
    core = nodes[layer.core] if layer.core else None
    if core is not None:
        if mode == "a2a":
            core.meta[DISPATCH] = experts
        else:
            core.meta.pop(DISPATCH, None)
    left = tuple(a for a in every if a not in experts)
    atoms = longest_dividing_prefix(left, layer.dims["F"], mesh) if mode != "replicated" else ()
    for role, ph_name in layer.params.items():
        ph = nodes[ph_name]
        split = atoms
        if role == "b_out":  # the down bias [X, E]: E over F's atoms, each column added by one of them (emit)
            split = longest_dividing_prefix(atoms, layer.dims["E"], mesh)
        layout = Layout.sharded(len(shape(ph)), layer.info["f_dims"][ph_name], split).with_dim(0, experts)
        ph.meta[WEIGHT] = WeightSpec(at_rest=layout, in_use=layout)
    router = nodes[layer.info["router"]]
    router.meta[WEIGHT] = WeightSpec(at_rest=Layout.replicated(2), in_use=Layout.replicated(2))
    notes = []
    if mode == "replicated":
        return [f"experts replicated (requested): every chip holds all {layer.dims['X']} experts whole and runs "
                f"every routed token through them; router and routing replicated"]
    if mode == "a2a":
        n = mesh.group_size(experts)
        notes.append(f"experts parallel, all-to-all dispatch: the {layer.dims['X']} experts split over "
                     f"{mesh.format_atoms(experts)} ({layer.dims['X'] // n} per rank) like the tokens; each rank "
                     f"routes its own tokens, sends each routed row to its expert's rank and gets the result back "
                     f"(two all-to-alls of its rows, one all-gather of the per-expert counts)")
    if mode == "parallel":
        notes.append(f"experts parallel: the {layer.dims['X']} experts split over "
                     f"{mesh.format_atoms(experts) if experts else 'nothing'} "
                     f"({layer.dims['X'] // mesh.group_size(experts)} per rank, each running only its tokens)")
    routing = ("router replicated, each rank routing its own tokens" if mode == "a2a"
               else "router and routing replicated")
    if mode not in ("parallel", "a2a") or atoms:
        notes.append(f"experts sliced: each of the {layer.dims['X']} experts' F = {layer.dims['F']} split over "
                     f"{mesh.format_atoms(atoms) if atoms else 'nothing'}; {routing}")
    else:
        notes.append(f"each expert whole on its rank; {routing}")
    if len(experts) + len(atoms) < len(every):
        rest = tuple(a for a in every if a not in atoms and a not in experts)
        notes.append(f"F = {layer.dims['F']} does not split over all of {mesh.format_atoms(every)}: experts "
                     f"repeated ×{mesh.group_size(rest)}")
    return notes


def _dispatch_atoms(layer: Layer, member: Member, b: tuple[str, ...], mesh: Mesh) -> tuple[str, ...]:
    """The chips an all-to-all dispatch runs over: the member's batch atoms `b`, over which the tokens are
    split; the experts split over exactly those."""
    if not layer.info.get("dispatch"):
        raise LayoutError(
            f"experts=a2a for {layer.name}: its routing and combine are not in the form shardwise runs over a "
            f"subset of the tokens (transformers' grouped experts forward); use experts=parallel or sliced")
    if not b:
        raise LayoutError(
            f"experts=a2a for {layer.name}: {member} splits no chips over the batch, so every rank holds every "
            f"token and there is nothing to dispatch; use a member with batch axes (wg_x, wg_xyz, ...) or "
            f"experts=parallel")
    atoms = mesh.mesh_order(b)
    if layer.dims["X"] % mesh.group_size(atoms):
        raise LayoutError(
            f"experts=a2a for {layer.name}: its {layer.dims['X']} experts do not split over the "
            f"{mesh.group_size(atoms)} chips {member} splits the batch over ({mesh.format_atoms(atoms)}); use "
            f"experts=parallel or sliced, or a batch split that divides {layer.dims['X']}")
    return atoms


def _assign_attention(layer: Layer, member: Member, mode: str, mesh: Mesh, nodes) -> list[str]:
    d = layer.dims
    B = shape(nodes[layer.core])[0]
    plan = attention_plan(member, mode, mesh, B=B, H=d["H"], K=d["K"])
    b, e, f = member.atoms(mesh)
    require_divides("d_model (E)", d["E"], e, mesh, f"{member} for {layer.name}")
    for role, p in layer.projections.items():
        ph = nodes[p.weight]
        if role == "o":
            spec = weight_spec(e, plan.q, b, shape(ph), p.rows_out, mesh)
        else:
            # an output gate (find_layers' "gate") has q's features and multiplies the heads q splits: split like q
            spec = weight_spec(plan.q if role in ("q", "gate") else plan.kv, e, b, shape(ph), p.rows_out, mesh)
        ph.meta[WEIGHT] = spec
    nodes[layer.core].meta[ATTENTION] = plan.core
    notes = []
    if plan.replicated_over:
        rep = mesh.group_size(plan.replicated_over)
        notes.append(f"{d['H']} heads do not split over all of {mesh.format_atoms(f)}: heads split over "
                     f"{mesh.format_atoms(plan.q) if plan.q else 'nothing'}, attention repeated ×{rep}")
    if plan.kv != plan.q:
        rep = mesh.group_size(plan.q) // mesh.group_size(plan.kv)
        notes.append(f"KV heads = {d['K']} do not divide {mesh.format_atoms(plan.q)} = {mesh.group_size(plan.q)}: "
                     f"KV heads split over {mesh.format_atoms(plan.kv) if plan.kv else 'nothing'} and "
                     f"replicated ×{rep}; attention='batch' splits the KV cache over batch instead")
    return notes


def _assign_latent(layer: Layer, member: Member, mode: str, latent: str, mesh: Mesh, nodes) -> list[str]:
    """Multi-head latent attention's low-rank projections (find_layers' `latent`): left to propagate
    (`latent=""`: computed whole on every chip, the weight replicated), or with `latent="split"` their
    code's features split over the atoms that split q's heads, each chip computing its share; the code is
    normalized and read by every head, so propagate gathers it before its norm (communication the cost
    model weighs against replicated compute and weight reads)."""
    found = layer.info.get("latent", {})
    if not found:
        return []
    if latent not in ("", "split"):
        raise LayoutError(f"unknown latent layout {latent!r} for {layer.name}: use 'split', or nothing for replicated")
    named = ", ".join(sorted(latent_name(nodes[n], p.out_features) for n, p in found.items()))
    if not latent:
        return [f"latent projections replicated: {named}"]
    d = layer.dims
    plan = attention_plan(member, mode, mesh, B=shape(nodes[layer.core])[0], H=d["H"], K=d["K"])
    b, e, f = member.atoms(mesh)
    for p in found.values():
        require_divides("a latent code's features", p.out_features, plan.q, mesh, f"latent=split for {layer.name}")
        ph = nodes[p.weight]
        ph.meta[WEIGHT] = weight_spec(plan.q, e, b, shape(ph), p.rows_out, mesh)
    where = mesh.format_atoms(plan.q) if plan.q else "nothing"
    return [f"latent projections split over {where}: {named}"]


def latent_name(node: fx.Node, features: int) -> str:
    """A latent projection as a reader knows it: its module's name and the features it makes
    (`kv_a_proj_with_mqa (64)`: canonicalize splits kv_a into the code and the rotary key piece)."""
    return f"{module_path(node).rpartition('.')[2] or node.name} ({features})"


def _table_spec(layer: Layer, mode: str, member: Member, mesh: Mesh) -> tuple[str, WeightSpec]:
    """The embedding table's split (an "auto" mode resolved) and its weight spec."""
    b, e, f = member.atoms(mesh)
    V, E = layer.dims["V"], layer.dims["E"]
    if mode == "auto":
        # split E when no axis plays batch (the lookup lands in the residual layout, no communication);
        # else split the vocabulary over every chip, so the table is not replicated over batch axes
        mode = "vocab" if b and V % mesh.group_size(b + e + f) == 0 else "E"
    if mode == "replicated":  # no collective: every chip looks its rows up in its own copy
        whole = Layout.replicated(2)
        return mode, WeightSpec(at_rest=whole, in_use=whole)
    if mode == "vocab":
        atoms = mesh.mesh_order(b + e + f)
        require_divides("the vocabulary (V)", V, atoms, mesh, f"embed=vocab for {layer.name}")
        layout = Layout.sharded(2, 0, atoms)
        return mode, WeightSpec(at_rest=layout, in_use=layout)
    # split E like the residual; under a weight-gathered member also stored split over batch
    require_divides("d_model (E)", E, e + f, mesh, f"embed=E for {layer.name}")
    return mode, weight_spec((), e + f, b, (V, E), True, mesh)


def _head_spec(layer: Layer, mode: str, member: Member, mesh: Mesh, wshape) -> tuple[str, WeightSpec]:
    """The head's split (an "auto" mode resolved) and its weight spec."""
    b, e, f = member.atoms(mesh)
    p = layer.projections["w"]
    if mode == "auto":  # the vocabulary where it divides (logits split, no reduction), else d_model
        V, E, n = layer.dims["V"], layer.dims["E"], mesh.group_size(e + f)
        mode = "vocab" if V % n == 0 else "E" if E % n == 0 else None
        if mode is None:
            raise LayoutError(
                f"{member} for {layer.name} splits the head over {mesh.format_atoms(e + f)} = {n} chips, which "
                f"divides neither the vocabulary V = {V} (head=vocab) nor d_model E = {E} (head=E); choose a "
                f"mesh whose F and E axes divide one of them, or another layout")
    if mode == "tokens":  # every chip its own rows of the input with the whole weight (_token_rows)
        whole = Layout.replicated(2)
        return mode, WeightSpec(at_rest=whole, in_use=whole)
    if mode == "vocab":
        require_divides("the vocabulary (V)", layer.dims["V"], e + f, mesh, f"head=vocab for {layer.name}")
        return mode, weight_spec(e + f, (), b, wshape, p.rows_out, mesh)
    require_divides("d_model (E)", layer.dims["E"], e + f, mesh, f"head=E for {layer.name}")
    return mode, weight_spec((), e + f, b, wshape, p.rows_out, mesh)


def _token_rows(x: fx.Node, member: Member, mesh: Mesh, where: str) -> Layout:
    """head=tokens: the head's input split by rows over every chip the member uses, its batch (dim 0)
    where that divides, else its sequence (dim 1). Each chip multiplies its rows by the whole weight: the
    logits come out split by rows, so making them whole is an all-gather over dim 0 (or 1) that needs no
    copy to merge, and nothing is summed. Reached from the residual by a slice where that is replicated."""
    b, e, f = member.atoms(mesh)
    atoms = mesh.mesh_order(b + e + f)
    s = shape(x)
    for d in range(min(2, len(s) - 1)):
        if s[d] % mesh.group_size(atoms) == 0:
            return Layout.sharded(len(s), d, atoms)
    require_divides("the head's rows (batch or sequence)", s[0], atoms, mesh, f"head=tokens for {where}")
    raise AssertionError("require_divides refuses what does not divide")


# ------------------------------------------------------------------------------------ KV caches
def _cache_inputs(gm: fx.GraphModule) -> dict[str, list[tuple[str, list[int]]]]:
    """Per block, the program inputs it updates with `index_copy` (its KV caches) and the outputs
    that return them: the state a step carries, kept split on every rank between steps."""
    import torch

    sig = signature(gm)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = list(out_node.args[0])
    found: dict[str, list[tuple[str, list[int]]]] = {}
    for ph in gm.graph.nodes:
        if ph.op != "placeholder" or ph.name in sig.params:
            continue
        for u in ph.users:
            if u.target is torch.ops.aten.index_copy.default and u.args[0] is ph and (b := block_of(u)):
                outs = [j for j, o in enumerate(outputs) if o is u]
                found.setdefault(b, []).append((ph.name, outs))
    return found


def _cache_layout(core, member: Member, mode: str, mesh: Mesh, dims: dict, heads: int) -> Layout:
    """[B, K, S, D]: split by KV heads like the attention's K/V projections, or by batch like its core.
    A cache of fewer heads than the core reads (`heads`: multi-head latent attention keeps one latent
    code per position, expanded to the heads by kv_b_proj at every step) splits as far as its heads
    divide, and is whole over the rest of the heads' chips, as an MQA cache is."""
    b, e, f = member.atoms(mesh)
    if mode == "batch":
        return Layout((core.batch, (), (), ()))
    from ..strategies.rules import longest_dividing_prefix

    q = longest_dividing_prefix(f, dims["H"], mesh)
    return Layout((b, longest_dividing_prefix(q, min(dims["K"], heads), mesh), (), ()))


def _gather_free_weights(gm: fx.GraphModule, layers: Layers, members: dict[int, Member], mesh: Mesh) -> None:
    """Weights no layout plans (norms, biases) follow their block's member: under a weight-gathered
    member they are stored split over its batch atoms too (propagate adopts, then splits them)."""
    from ..ir.meta import GATHER

    index = {b.name: b.index for b in layers.blocks}
    last = members.get(len(layers.blocks) - 1)
    for n, block in structure_fact(gm, "parameters by block", _parameters):
        n.meta.pop(GATHER, None)
        if WEIGHT in n.meta or not n.users:
            continue
        member = members.get(index[block]) if block in index else last
        if member is not None and member.batch:
            n.meta[GATHER] = member.atoms(mesh)[0]


def _parameters(gm: fx.GraphModule) -> list[tuple[fx.Node, str | None]]:
    """Every parameter placeholder (buffers aside) and the block of its first user (None: none)."""
    sig = signature(gm)
    return [(n, block_of(next(iter(n.users))) if n.users else None) for n in gm.graph.nodes
            if n.op == "placeholder" and n.name in sig.params and sig.params[n.name] not in sig.buffers]
