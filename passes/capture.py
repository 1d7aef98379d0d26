"""capture: nn.Module + example inputs → ATen export-IR GraphModule with weights lifted to placeholders.

Writes `gm.meta["sw_signature"]` (which placeholder is which weight or user input, the pytree specs of
the call) and `gm.meta["sw_state"]` (state key → tensor; meta tensors when the model is on meta).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import CaptureError
from ..ir.meta import SIGNATURE, STATE
from .graph_utils import Signature

_HINTS = (
    ("DynamicCache", "HF models: pass use_cache=False when capturing prefill"),
    ("past_key_values", "HF models: pass use_cache=False when capturing prefill"),
    ("data-dependent", "control flow or shapes depend on tensor values: make them static for the example inputs"),
    ("Dynamo", "strict capture failed: shardwise captures with strict=False; check the forward's Python"),
    ("missing", "the example inputs do not match forward()'s signature"),
    ("got an unexpected keyword", "the example inputs do not match forward()'s signature"),
    ("k not in range", ("pick at most as many entries with top-k as its dimension holds: in a mixture of experts, "
                        "set the experts per token (num_experts_per_tok, top_k) to at most the number of experts "
                        "(num_local_experts, num_experts); a router picking more experts than there are fails the "
                        "same way unsharded")),
)


def capture(model: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    """Export `model(*args, **kwargs)` with torch.export (non-strict) into one GraphModule."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture expects a torch.nn.Module, got {type(model).__name__}")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    empty = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor) and t.numel() == 0]
    if empty:
        raise CaptureError(f"an example input of {type(model).__name__} is empty (shape {empty[0]}): shardwise "
                           f"plans a program for inputs with at least one batch row and one token; give a batch "
                           f"and a sequence length ≥ 1")
    was_training = model.training
    model.eval()
    try:
        with _quiet_fake_tensor_log(), _without_stack_traces():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # torch.export raises many types; we turn every one into one clear message
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hints = [h for key, h in _HINTS if key in str(e)]
        hint = "; ".join(dict.fromkeys(hints)) or (
            "simplify the model's forward for tracing (no data-dependent Python control flow), or capture a "
            "smaller piece; see the torch.export docs on non-strict export"
        )
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first}\n"
            f"What to try: {hint}."
        ) from e
    finally:
        model.train(was_training)
    # a wrapper (models/steps.Step) names the submodule whose names to keep: `model.layers.0` → `layers.0`
    root = getattr(model, "shardwise_root", None)
    inner = getattr(model, root) if root else model
    return _from_exported(ep, type(inner).__name__, strip=f"{root}." if root else "")


@contextmanager
def _quiet_fake_tensor_log():
    """torch logs the traceback of an op that fails on fake tensors before raising it; the error is raised
    here as a CaptureError (chained to it), so that log would only print a torch stack trace twice."""
    import logging

    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


@contextmanager
def _without_stack_traces():
    """torch.export records the Python stack of every node it traces (`node.meta["stack_trace"]`), a third of
    the time of capturing a small model. shardwise reads module paths (`nn_module_stack`), never the stacks,
    so the capture skips them; a rank program's readable code then lacks the `# File:` comments."""
    import torch.fx.config as fx_config

    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


def _strip_names(ep: torch.export.ExportedProgram, strip: str) -> None:
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (path[len(strip):] if path.startswith(strip) else ("" if path == strip[:-1] else path), t)
                for k, (path, t) in stack.items()
            }


def _from_exported(ep: torch.export.ExportedProgram, name: str, strip: str = "") -> fx.GraphModule:
    sig = ep.graph_signature
    mutated = [o for o in sig.output_specs if o.kind.name not in ("USER_OUTPUT",)]
    if mutated:
        kinds = sorted({o.kind.name for o in mutated})
        raise CaptureError(
            f"{name} mutates state in forward ({', '.join(kinds)}); shardwise needs a functional step. "
            f"Return new tensors (e.g. the updated KV cache) instead of updating buffers or inputs in place."
        )
    params: dict[str, str] = {}
    inputs: list[str] = []
    buffers: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    if strip:
        _strip_names(ep, strip)
    for spec in sig.input_specs:
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            key = spec.target[len(strip):] if strip and spec.target.startswith(strip) else spec.target
            params[spec.arg.name] = key
            if kind != "PARAMETER":
                buffers.add(key)
            source = ep.state_dict if spec.target in ep.state_dict else ep.constants
            state[key] = source[spec.target].detach()
        elif kind == "USER_INPUT":
            inputs.append(spec.arg.name)
        else:
            raise CaptureError(f"{name}: unsupported graph input kind {kind} for {spec.arg.name}")
    gm = ep.graph_module
    gm.meta[SIGNATURE] = Signature(
        params=params, inputs=inputs, in_spec=ep.call_spec.in_spec, out_spec=ep.call_spec.out_spec, model=name,
        buffers=buffers,
    )
    gm.meta[STATE] = state
    return gm


# ------------------------------------------------------------------------------------ prototypes
def repeated_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """The model's stack of identical blocks: the longest ModuleList whose children share one type."""
    best = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(c) for c in child}) == 1:
                if best is None or len(child) > len(best[2]):
                    best = (parent, name, child)
    return best


@dataclass
class Prototype:
    """What `one_block` kept: the model's number of blocks, which one stands for them all, and, where the
    blocks differ in their parameters, how (the plan says so: the others are costed as this one)."""

    blocks: int
    index: int = 0
    note: str = ""


def _structure(block: nn.Module) -> tuple:
    return tuple(sorted((n, tuple(p.shape)) for n, p in block.named_parameters()))


@contextmanager
def one_block(model: nn.Module):
    """Within the block, the model has only one of its repeated blocks (a prototype to plan from).

    Yields a `Prototype`. Identical blocks cost the same under the same layout, so the planner captures
    and costs one and counts it N times; emit still works on the full model. Where the blocks differ in
    their parameters (DeepSeek-V3's dense first layers before its mixtures of experts), the prototype is
    the first block of the most common kind, run as layer 0 (its `layer_idx` set to 0 while captured,
    as a one-block model's cache has one layer), and the prototype's note says what is counted as it.
    """
    found = repeated_blocks(model)
    if found is None:
        yield Prototype(1)
        return
    parent, name, blocks = found
    kinds = [_structure(b) for b in blocks]
    common = max(dict.fromkeys(kinds), key=kinds.count)  # the most common kind; ties: the first to appear
    index = kinds.index(common)
    others = [i for i, k in enumerate(kinds) if k != common]
    note = ""
    if others:
        note = (f"blocks differ: planned as block {index}'s kind ({len(blocks) - len(others)} of {len(blocks)} "
                f"blocks); blocks {', '.join(map(str, others[:8]))}{' …' if len(others) > 8 else ''} have other "
                f"parameters and are costed as that kind (the program runs each block as it is)")
    cfg = getattr(model, "config", None)
    saved = {a: getattr(cfg, a) for a in ("num_hidden_layers", "n_layer") if cfg is not None and hasattr(cfg, a)}
    block = blocks[index]
    indices = [(m, m.layer_idx) for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    setattr(parent, name, nn.ModuleList([block]))
    for a in saved:
        setattr(cfg, a, 1)
    for m, _ in indices:
        m.layer_idx = 0
    try:
        yield Prototype(len(blocks), index, note)
    finally:
        setattr(parent, name, blocks)
        for a, v in saved.items():
            setattr(cfg, a, v)
        for m, i in indices:
            m.layer_idx = i
