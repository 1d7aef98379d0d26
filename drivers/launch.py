"""Real ranks on this machine: `torchrun` on loopback, gloo on CPU (NCCL when every rank has a GPU).

The parent writes a job (model preset, mesh, layouts, the inputs, the weights as safetensors) and
launches N workers. Each worker captures the model *on the meta device*, plans it exactly as the parent
did, emits its own program reading only its shards from the file, runs it on real process groups and
reports its output and the bytes it holds; rank 0 gathers the reports.

    python -m shardwise.drivers.launch JOB.json      (what each worker runs, under torchrun)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ShardwiseError
from ..runtime.distributed import free_port


@dataclass
class RealRun:
    output: Any  # rank 0's output (outputs are replicated)
    param_bytes: list[int]  # per rank, what its program holds
    seconds: list[float]  # per rank, wall time of the sharded step (after one warm-up)
    backend: str
    log: str
    bytes_rows: list = field(default_factory=list)  # (layer, kind, predicted, measured) on rank 0


def run_real(*, model: str, mesh: str, layouts: str | dict | None, args: tuple, kwargs: dict, state: dict,
             nproc: int, phase: str = "prefill", timeout: float = 600, extra: dict | None = None) -> RealRun:
    """Launch `nproc` workers with torchrun and return what rank 0 gathered."""
    from ..runtime.weights import save_state

    with tempfile.TemporaryDirectory(prefix="shardwise-") as tmp:
        tmp = Path(tmp)
        save_state(state, str(tmp / "weights.safetensors"))
        torch.save({"args": args, "kwargs": kwargs}, tmp / "inputs.pt")
        job = {"model": model, "mesh": mesh, "layouts": layouts, "phase": phase, "weights": str(tmp / "weights.safetensors"),
               "inputs": str(tmp / "inputs.pt"), "output": str(tmp / "out.pt"), **(extra or {})}
        (tmp / "job.json").write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "shardwise.drivers.launch", str(tmp / "job.json")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or not (tmp / "out.pt").exists():
            tail = "\n".join(log.strip().splitlines()[-25:])
            raise ShardwiseError(f"the {nproc} real ranks failed (exit {proc.returncode}):\n{tail}")
        res = torch.load(tmp / "out.pt", weights_only=False)
    return RealRun(res["output"], res["param_bytes"], res["seconds"], res["backend"], log, res.get("bytes_rows", []))


def _worker(job_path: str) -> None:
    import torch.distributed as dist

    from ..models import presets
    from ..planning.planner import plan as make_plan
    from ..planning.program import emit_rank
    from ..runtime.distributed import init
    from ..runtime.simulate import Trace, run_recorded
    from ..runtime.weights import SafetensorsSource
    from .accounting import compare, compare_generation
    from .generate import generate

    job = json.loads(Path(job_path).read_text())
    rank = init()
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    inputs = torch.load(job["inputs"], weights_only=False)

    def on_device(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    args = tuple(on_device(a) for a in inputs["args"])
    kwargs = {k: on_device(v) for k, v in inputs["kwargs"].items()}
    meta = presets.build_model(job["model"], device="meta")  # this rank never holds the whole model
    weights = SafetensorsSource(job["weights"])
    result: dict = {"backend": dist.get_backend()}
    with torch.no_grad():
        if job["phase"] == "decode":
            gen = generate(meta, args[0], job["tokens"], mesh=job["mesh"], layouts=job["layouts"], weights=weights,
                           record=job.get("record", False), details=True)
            result["output"] = gen.tokens.cpu()
            if job.get("record"):
                result["bytes_rows"] = compare_generation(gen, job["tokens"])
            held = sum(t.numel() * t.element_size() for t in
                       emit_rank(gen.decode.program.gm, gen.decode.mesh, rank, group_name=_no_groups,
                                weights=weights, device=device).state_dict().values())
            seconds = 0.0
        else:
            def to_meta(t):
                return t.to("meta") if isinstance(t, torch.Tensor) else t

            plan = make_plan(meta, tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()},
                            mesh=job["mesh"], layouts=job["layouts"], phase=job["phase"])
            program = plan.emit(rank, weights=weights, device=device)
            flat = plan.program.flat_inputs(args, kwargs)
            trace = Trace()
            out = run_recorded(program.program, flat, trace) if job.get("record") else program(*args, **kwargs)
            if job.get("record"):
                out = torch.utils._pytree.tree_unflatten(list(out), plan.program.sig.out_spec)
                result["bytes_rows"] = compare(plan, trace.collectives, plan.program.gm)
            dist.barrier()
            t0 = time.perf_counter()
            program(*args, **kwargs)
            seconds = time.perf_counter() - t0
            held = sum(t.numel() * t.element_size() for t in program.state_dict().values())
            result["output"] = torch.utils._pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (held, seconds))
    if rank == 0:
        result.update(param_bytes=[r[0] for r in reports], seconds=[r[1] for r in reports])
        torch.save(result, job["output"])
    dist.barrier()
    dist.destroy_process_group()


def _no_groups(atoms):  # emitting only to count a program's bytes: its collectives never run
    return "unused"


if __name__ == "__main__":
    _worker(sys.argv[1])
