"""shardwise: a sharding-aware compiler pass for PyTorch transformer inference.

Capture a model with torch.export, assign each layer a layout of the Pope et al. (2022) family,
make every collective an explicit graph node, and emit the per-rank program for torch.distributed.

The plain-data names (errors, Mesh, Layout, Plan, ...) are imported with the package; the entry points
that need torch (plan, verify, generate, backend, init, models) on first use, so that a command imports
only what it runs (`shardwise inspect` needs no drivers, `shardwise.Plan.from_json` no torch).
"""

from importlib import import_module

from .errors import CaptureError, LayoutError, MeshError, PlanError, ShardwiseError
from .ir.collective import Collective
from .ir.hardware import Hardware, get_hardware
from .ir.layout import Layout
from .ir.mesh import Mesh
from .ir.plan import Plan

_LAZY = {  # name → (module, attribute; None: the module itself)
    "models": (".models", None),
    "Generation": (".api", "Generation"), "Program": (".api", "Program"), "ShardedModule": (".api", "ShardedModule"),
    "VerifyReport": (".api", "VerifyReport"), "generate": (".api", "generate"), "plan": (".api", "plan"),
    "simulate": (".api", "simulate"), "verify": (".api", "verify"),
    "backend": (".compile_backend", "backend"),
    "init": (".runtime.distributed", "init"),
    "steady_heap": (".runtime.heap", "steady_heap"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = import_module(module, __name__)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CaptureError", "Collective", "Hardware", "Layout", "LayoutError", "Mesh", "MeshError", "Plan", "PlanError",
    "Program", "ShardedModule", "ShardwiseError", "VerifyReport", "get_hardware", "init", "models", "plan",
    "simulate", "verify", "backend", "generate", "Generation", "steady_heap",
]
