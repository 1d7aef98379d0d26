"""`plan`: from a model (or a preset name, or a captured graph) and a question to a Plan with costs.

    with example inputs   the call is captured whole, its blocks costed in place, collectives inserted
    without               the model's step for the phase is built and one block of it captured (the
                          prototype); the search costs every candidate on it; the whole program is
                          captured only when a rank program is asked for (LazyProgram)

`model` may also be a Hugging Face checkpoint directory (config.json + safetensors, as save_pretrained
writes it): the model is built with its parameters on the meta device (models/checkpoint.py), planned
like a module, and its program's ranks read their shards from the checkpoint's files
(runtime/weights.CheckpointSource, the program's default weights).
"""

from __future__ import annotations

import os

import torch
from torch import fx, nn

from ..errors import ShardwiseError
from ..ir.hardware import get_hardware
from ..ir.kinds import LayerKind, Objective, Phase
from ..ir.mesh import Mesh
from ..ir.meta import LAYERS, PROTOTYPE_NOTE
from ..ir.plan import Plan
from ..models import presets
from ..models.checkpoint import Checkpoint, is_checkpoint, missing
from ..models.steps import Step, phase_inputs
from ..passes.capture import one_block
from ..passes.insert_collectives import insert_collectives
from ..passes.pipeline import run
from ..passes.storage import replicated_weights
from ..runtime.weights import CheckpointSource
from ..strategies.cost import Precision
from ..strategies.family import parse_ffn
from ..strategies.request import parse_layouts
from . import prototype_cache
from .apply import apply, choices_for
from .program import LazyProgram, Program, capture_program
from .question import Question
from .record import record
from .search import choose, meshes_for
from .sharding import check_sharded


def model_and_inputs(model, args, kwargs, batch: int, seq: int):
    """(a model with weights, args, kwargs, its name): a preset or checkpoint directory is built (a
    checkpoint loaded whole, as transformers loads it) and given example inputs when none are given."""
    check_model(model)
    if is_checkpoint(model):
        ckpt = Checkpoint.open(model)
        model = ckpt.load()
        if args is None:
            args, kwargs = presets.example_inputs(model, batch, seq)
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        return model, args, dict(kwargs or {}), ckpt.name
    if isinstance(model, str):
        name = model
        model = presets.build_model(name)
        if args is None:
            args, kwargs = presets.example_inputs(model, batch, seq)
        return model, tuple(args), dict(kwargs or {}), name
    if args is None:
        raise ShardwiseError("plan(model, args, ...): example inputs are needed to capture a model object")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    return model, args, dict(kwargs or {}), type(model).__name__


def check_model(model) -> None:
    if isinstance(model, nn.Module) or is_checkpoint(model) or (isinstance(model, str) and model in presets.PRESETS):
        return
    if isinstance(model, os.PathLike) or (isinstance(model, str) and (os.path.exists(model) or os.sep in model
                                                                       or model.startswith("."))):
        raise ShardwiseError(f"model={str(model)!r} is neither a preset nor a Hugging Face checkpoint directory: "
                             f"{missing(model)}. Expected a directory written by save_pretrained (config.json and "
                             f"model.safetensors, or model-0000X-of-0000N.safetensors with "
                             f"model.safetensors.index.json), or a preset name ({', '.join(presets.PRESETS)})")
    if isinstance(model, str):
        raise ShardwiseError(f"unknown model {model!r}: neither a preset ({', '.join(presets.PRESETS)}) nor a "
                             f"checkpoint directory (there is no directory {model!r}); give a preset name or the "
                             f"path of a directory written by save_pretrained")
    raise ShardwiseError(f"model={model!r}: expected a torch.nn.Module (with example inputs), a preset name "
                         f"({', '.join(presets.PRESETS)}) or a Hugging Face checkpoint directory")


def _meshes(mesh, chips, objective: Objective, request: dict[str, str], notes: list[str]) -> list[Mesh]:
    """The meshes to search: the one given, or every factorization of `chips` on which a forced
    feed-forward layout stays itself (the others are skipped, and `notes` says so)."""
    forced = parse_ffn(request[LayerKind.FFN]) if LayerKind.FFN in request else None
    if mesh is not None and chips is not None:
        raise ShardwiseError(f"mesh={mesh!r} and chips={chips!r}: give one — a mesh to plan on, or a chip count "
                             f"to search every mesh of")
    if mesh is not None:
        mesh = Mesh.parse(mesh)
        if forced is not None and forced.on(mesh) != request[LayerKind.FFN]:
            idle = forced.idle_roles(mesh)
            why = f": {', '.join(idle)} {'has' if len(idle) == 1 else 'have'} size 1" if idle else ""
            notes.append(f"{request[LayerKind.FFN]} acts as {forced.on(mesh)} on mesh {mesh}{why}")
        return [mesh]
    if chips is None:
        raise ShardwiseError("plan needs a mesh (mesh='2x2x1') or a chip count (chips=8) to search meshes over")
    if not isinstance(chips, int) or isinstance(chips, bool) or chips < 1:
        raise ShardwiseError(f"chips={chips!r}: expected a positive number of chips")
    if objective == Objective.COST:  # fewer chips may cost less per token: consider every divisor
        meshes = [m for n in range(1, chips + 1) if chips % n == 0 for m in meshes_for(n)]
    else:
        meshes = meshes_for(chips)
    if forced is None:
        return meshes
    kept = [m for m in meshes if not forced.idle_roles(m)]
    if not kept:
        raise ShardwiseError(f"layouts ffn={request[LayerKind.FFN]} on {chips} chips: every mesh leaves one of its "
                             f"roles without an axis larger than 1; give more chips or another layout")
    if len(kept) < len(meshes):
        skipped = ", ".join(str(m) for m in meshes if m not in kept)
        notes.append(f"ffn={request[LayerKind.FFN]} forced: meshes on which it would act as another layout were "
                     f"not searched ({skipped})")
    return kept


def plan(
    model: nn.Module | str,
    args: tuple | None = None,
    kwargs: dict | None = None,
    *,
    mesh: Mesh | str | None = None,
    chips: int | None = None,
    hardware: str = "tpu-v4",
    phase: str = "prefill",
    layouts: str | dict | None = None,
    batch: int = 8,
    seq: int = 16,
    context: int | None = None,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    objective: str = "latency",
    overlap: bool = False,
    collective_matmul: bool = False,
    strict: bool = False,
) -> Plan:
    """Plan `model` on `mesh` (or the best mesh of `chips`): a layout per layer, chosen by cost.

    With `args`, the call `model(*args, **kwargs)` is captured as is. Without, the model's step for
    `phase` is built (prefill: `seq` tokens into a KV cache of `context` positions; decode: one token at
    the end of a `context`-long cache, logits of the last token), and planned from one captured block.
    `layouts` forces layouts by layer kind ({"ffn": "ws2d", "attn": "batch"} or "ffn=ws2d,attn=batch");
    the rest is chosen by the cost model on `hardware` with `weight_dtype` weights ("bf16", "int8"; by
    default as captured) for the `objective` latency (seconds per step) or cost (chip-seconds per token).
    `model` may be a preset name (see shardwise.models.PRESETS), or the path of a Hugging Face checkpoint
    directory: planned on the meta device, in the checkpoint's dtype, its program reading each rank's
    shards from the checkpoint's files (`plan.program.bytes_read` says how many bytes each rank read).
    `collective_matmul`: a layout option, the paper's looped collective matmul: where an all-gather feeds
    matmuls over their contracted last dim, or a matmul feeds a reduce-scatter of its output's last dim,
    the program runs a ring of g − 1 steps beside partial matmuls (passes/collective_matmul.py), and the
    cost model prices the overlap with the profile's measured `comm_overlap`.
    """
    phase, objective = Phase.parse(phase, "phase"), Objective.parse(objective, "objective")
    if not isinstance(collective_matmul, bool):
        raise ShardwiseError(f"collective_matmul={collective_matmul!r}: expected True (loop collectives with "
                             f"their matmuls) or False")
    request, notes = parse_layouts(layouts), []
    q = Question(meshes=_meshes(mesh, chips, objective, request, notes), hw=get_hardware(hardware),
                 precision=Precision(weights=weight_dtype, kv=kv_dtype), objective=objective, overlap=overlap,
                 collective_matmul=collective_matmul, request=request, phase=phase, notes=notes)
    check_model(model)
    source = None
    if is_checkpoint(model):  # parameters on the meta device; the ranks read their shards from the files
        ckpt = Checkpoint.open(model)
        model = ckpt.build_meta()
        source = CheckpointSource(ckpt, model=model)
        if args is not None:  # captured on the meta device too
            args = _to_meta(tuple(args) if isinstance(args, (tuple, list)) else (args,))
            kwargs = _to_meta(dict(kwargs or {}))
    if args is not None:
        if source is None:
            model, args, kwargs, q.model = model_and_inputs(model, args, kwargs, batch, seq)
        else:
            q.model = source.checkpoint.name
        return check_sharded(_plan_full(capture_program(model, args, kwargs), q, weights=source), strict)
    q.context = context or seq  # the KV-cache length the step is built for (stated in the report)
    if phase == Phase.DECODE and context is None:
        notes.append(f"decode planned for a KV cache of {q.context} positions (no context given: seq = {seq}); "
                     f"pass context=N (--context N) for the length you serve")
    proto, n_blocks, q.model, build_full = prototype(model, phase, batch, seq, context)
    if proto.meta.get(PROTOTYPE_NOTE):
        notes.append(proto.meta[PROTOTYPE_NOTE])
    if source is not None:
        q.model = source.checkpoint.name
    choice, results = choose(proto, q, n_blocks)
    result = record(proto, choice, results, q, n_blocks)
    # the whole program is captured on first use (replicated weights: known once built)
    result.program = LazyProgram(lambda: full_program(build_full, choice, q, weights=source))
    return check_sharded(result, strict)


def _to_meta(x):
    return torch.utils._pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)


def _plan_full(gm: fx.GraphModule, q: Question, weights: CheckpointSource | None = None) -> Plan:
    """Plan a whole captured graph (its blocks costed in place), insert the collectives, keep the program."""
    choice, results = choose(gm, q, n_blocks=1)
    result = record(gm, choice, results, q, 1)
    run(gm, insert_collectives, choice.mesh)
    result.memory.replicated = replicated_weights(gm, choice.mesh)
    result.program = Program(gm, choice.mesh, weights, quantize=q.precision.weights,
                             collective_matmul=q.collective_matmul)
    return result


def prototype(model, phase: str, batch: int, seq: int, context: int | None):
    """(one-block step graph, number of blocks, name, builder of the full step model)."""
    if is_checkpoint(model):  # built with its parameters on the meta device
        ckpt = Checkpoint.open(model)
        proto, n_blocks, _, build_full = prototype(ckpt.build_meta(), phase, batch, seq, context)
        return proto, n_blocks, ckpt.name, build_full
    if isinstance(model, str):
        name = model
        full_layers = presets.get(name).config[presets._LAYERS_KEY[presets.get(name).family]]

        def capture() -> fx.GraphModule:
            small = presets.build_model(name, layers=1)
            return capture_program(Step(small, last_only=True),
                                   phase_inputs(small, phase, batch=batch, seq=seq, context=context), {})

        proto = prototype_cache.cached(presets.get(name), capture, phase=str(phase), batch=batch, seq=seq,
                                       context=context)
        return proto, full_layers, name, lambda: (presets.build_model(name), phase, batch, seq, context)
    with one_block(model) as kept:
        step = Step(model, last_only=True)
        proto = capture_program(step, phase_inputs(model, phase, batch=batch, seq=seq, context=context), {})
    proto.meta[PROTOTYPE_NOTE] = kept.note
    return proto, kept.blocks, type(model).__name__, lambda: (model, phase, batch, seq, context)


def full_program(build_full, choice, q, weights: CheckpointSource | None = None) -> Program:
    model, phase, batch, seq, context = build_full()
    gm = capture_program(Step(model, last_only=True), phase_inputs(model, phase, batch=batch, seq=seq,
                                                                   context=context), {})
    apply(gm, choice.mesh, choices_for(gm.meta[LAYERS], choice.blocks, choice.forced(q.forced)), insert=True)
    return Program(gm, choice.mesh, weights, quantize=q.precision.weights, collective_matmul=q.collective_matmul)


def plan_graph(gm: fx.GraphModule, meshes: list[Mesh], request: dict[str, str], *, model: str, hardware: str,
               phase: str, weight_dtype: str | None = None, objective: str = "latency") -> Plan:
    """Choose layouts for a captured and prepared graph (layouts not in `request` by cost), insert them."""
    q = Question(meshes=meshes, hw=get_hardware(hardware), precision=Precision(weights=weight_dtype),
                 objective=objective, request=request, phase=phase, model=model)
    return _plan_full(gm, q)
