"""cpu_linear: a rank program's linears multiplied by the CPU kernel of runtime/kernels.py.

Every `aten.linear` of a rank program becomes a call of `kernels.linear` with the same arguments: oneDNN's
inner product where the input and weight are float32 CPU tensors and the product is large enough to gain
(`kernels.ONEDNN_MIN_MACS`), decided at each call from the tensors themselves (a rank program's nodes carry
no types, and a gathered weight is only known when it arrives); `F.linear` anywhere else. The weights are
untouched. Matmuls of other forms (GPT-2's Conv1D `addmm`, `mm`, a mixture's grouped experts, int8
linears) are left as they are.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime import kernels
from .pipeline import graph_pass

aten = torch.ops.aten


@graph_pass()
def cpu_linear(gm: fx.GraphModule) -> fx.GraphModule:
    """Route every `aten.linear` of a rank program through `kernels.linear` (module doc)."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.linear.default:
            args = tuple(n.args) + ((n.kwargs["bias"],) if "bias" in n.kwargs and len(n.args) == 2 else ())
            n.target, n.args, n.kwargs = kernels.linear, args, {}
            changed = True
    if changed:
        gm.recompile()
    return gm
