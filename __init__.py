"""shardwise: a sharding-aware compiler pass for PyTorch transformer inference.

Capture a model with torch.export, assign each layer a layout of the Pope et al. (2022) family,
make every collective an explicit graph node, and emit the per-rank program for torch.distributed.
"""

from . import models
from .api import Generation, Program, ShardedModule, VerifyReport, generate, plan, simulate, verify
from .compile_backend import backend
from .errors import CaptureError, LayoutError, MeshError, PlanError, ShardwiseError
from .ir.collective import Collective
from .ir.hardware import Hardware, get_hardware
from .ir.layout import Layout
from .ir.mesh import Mesh
from .ir.plan import Plan
from .runtime.distributed import init

__all__ = [
    "CaptureError", "Collective", "Hardware", "Layout", "LayoutError", "Mesh", "MeshError", "Plan", "PlanError",
    "Program", "ShardedModule", "ShardwiseError", "VerifyReport", "get_hardware", "init", "models", "plan",
    "simulate", "verify", "backend", "generate", "Generation",
]
