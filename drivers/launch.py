"""Real ranks on this machine: worker processes on loopback, gloo on CPU (NCCL when every rank has a GPU).

The parent writes a job (model preset, mesh, layouts, the inputs, the weights as safetensors) and
launches N workers. Each worker captures the model *on the meta device*, plans it exactly as the parent
did, emits its own program reading only its shards from the file, runs it on real process groups and
reports its output, the bytes it holds and the bytes it read; rank 0 gathers the reports.

A job may name a Hugging Face checkpoint directory instead (`run_real(checkpoint=DIR)`): nothing is
written by the parent then; each worker builds the model from the directory's config.json with its
parameters on the meta device (models/checkpoint.py) and reads only its slices from the checkpoint's
own safetensors files (runtime/weights.CheckpointSource).

    python -m shardwise.drivers.launch JOB.json      (a worker, with RANK and WORLD_SIZE set)

The launcher starts `_worker` with `python -c` instead: `-m` imports this module a second time, as
`__main__`, and runpy warns about it in every rank's log.

The parent does what torchrun would, on loopback only: it hosts the workers' rendezvous store,
listening on 127.0.0.1 (torchrun's listens on every interface), and puts gloo's and NCCL's sockets on
the loopback interface (`runtime.distributed.loopback_store`, `loopback_env`). Faults end cleanly:

- `timeout` seconds bound every wait: a worker's rendezvous and each of its collectives fail after that
  long, and a worker stopped (SIGSTOP, Ctrl-Z, a debugger) for that long fails the run;
- once a worker exits with an error or a signal, or stays stopped, the others get a moment (GRACE) to
  exit by themselves, then every worker's process group is killed: each worker runs in a session of
  its own, so whatever it started goes with it;
- the run raises a ShardwiseError naming each rank and what became of it, and the temporary folder is
  removed.

Inputs and outputs cross as plain data (tensors, numbers, strings, tuples, lists, dicts) that
`torch.load(..., weights_only=True)` reads back: no pickled objects run code in either process.

Fault injection, for tests: SHARDWISE_FAULT=RANK:POINT:SIGNAL (see `Fault`).
"""

from __future__ import annotations

import enum
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ShardwiseError

TEMP_PREFIX = "shardwise-ranks-"  # the run's temporary folder (job, weights, inputs, report, logs)
DEFAULT_TIMEOUT = 300.0  # seconds a rank may wait for the others, or stay stopped
GRACE = 0.5  # seconds the other workers get to exit by themselves once one has failed
POLL = 0.05  # seconds between looks at the workers
FAULT_ENV = "SHARDWISE_FAULT"


@dataclass
class RealRun:
    output: Any  # rank 0's output (outputs are replicated), as plain tensors, tuples, lists and dicts
    param_bytes: list[int]  # per rank, what its program holds
    seconds: list[float]  # per rank, wall time of the sharded step (after one warm-up)
    backend: str
    log: str  # every rank's output, rank by rank
    bytes_rows: list = field(default_factory=list)  # (layer, kind, predicted, measured) on rank 0
    bytes_read: list[int] = field(default_factory=list)  # per rank, bytes of weights it read from the files
    bytes_distinct: list[int] = field(default_factory=list)  # the same, a slice read twice counted once
    weights_bytes: int = 0  # the bytes of every tensor in the weights file(s): what reading all would read


def run_real(*, model: str, mesh: str, layouts: str | dict | None, args: tuple, kwargs: dict,
             state: dict | None = None, nproc: int, phase: str = "prefill", timeout: float | None = None,
             extra: dict | None = None, checkpoint: str | os.PathLike | None = None) -> RealRun:
    """Launch `nproc` workers on this machine and return what rank 0 gathered.

    The workers build preset `model` and read their shards from `state`, written to a safetensors file;
    or, with `checkpoint` (a Hugging Face checkpoint directory), build the model from it and read their
    shards from its files (`model` is then only its name). phase "decode": greedy generation of
    `extra["tokens"]` tokens after `args[0]` (prefill and decode steps; `extra` may force
    "prefill_layouts" and "decode_layouts"), its tokens the output.
    `timeout` (seconds, DEFAULT_TIMEOUT when None) bounds every wait of a worker for the others (the
    rendezvous, each collective) and how long a worker may stay stopped. A rank that fails ends the run
    with a ShardwiseError, every worker killed and the temporary folder removed."""
    from ..runtime.distributed import loopback_store
    from ..runtime.weights import save_state

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ShardwiseError(f"timeout={timeout!r}: expected a positive number of seconds (how long a rank may "
                             f"wait for the others); pass one, e.g. timeout={DEFAULT_TIMEOUT:g} (--timeout "
                             f"{DEFAULT_TIMEOUT:g})")
    Fault.from_env()  # a malformed fault is refused here, before any worker starts
    if checkpoint is not None:
        from ..models.checkpoint import Checkpoint

        checkpoint = str(Path(Checkpoint.open(checkpoint).path).resolve())  # refused here if it is not one
    elif state is None:
        raise ShardwiseError("run_real needs the weights: state= (a state dict, written for the workers) or "
                             "checkpoint= (a Hugging Face checkpoint directory the workers read)")
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        tmp = Path(tmp)
        if checkpoint is None:
            save_state(state, str(tmp / "weights.safetensors"))
        torch.save({"args": plain(tuple(args), "the inputs"), "kwargs": plain(dict(kwargs), "the inputs")},
                   tmp / "inputs.pt")
        job = {"model": model, "mesh": mesh, "layouts": layouts, "phase": phase,
               "weights": None if checkpoint else str(tmp / "weights.safetensors"), "checkpoint": checkpoint,
               "inputs": str(tmp / "inputs.pt"), "output": str(tmp / "out.pt"), "timeout": float(timeout),
               **(extra or {})}
        (tmp / "job.json").write_text(json.dumps(job))
        store = loopback_store(timeout)
        try:
            workers = Workers(nproc, tmp / "job.json", store)
            try:
                workers.watch(timeout)
            finally:
                workers.kill()
        finally:
            del store  # closes its socket
        log = workers.log()
        if not (tmp / "out.pt").exists():
            raise ShardwiseError(
                f"all {nproc} real ranks exited 0, but rank 0 wrote no report to {tmp / 'out.pt'}; expected its "
                f"output, bytes and timings there. This is a bug in shardwise's worker: please report it with "
                f"the log:\n{_tail(log, 25)}")
        res = torch.load(tmp / "out.pt", weights_only=True)
    return RealRun(res["output"], res["param_bytes"], res["seconds"], res["backend"], log, res.get("bytes_rows", []),
                   bytes_read=res.get("bytes_read", []), bytes_distinct=res.get("bytes_distinct", []),
                   weights_bytes=res.get("weights_bytes", 0))


# ------------------------------------------------------------------------------------ the workers
@dataclass
class Worker:
    """One rank's process and what the launcher has seen of it (times in seconds after the launch)."""

    rank: int
    proc: subprocess.Popen
    log: Path
    status: int | None = None  # its exit code, or -N when a signal N ended it (None: not ended)
    ended: float | None = None
    stopped: float | None = None  # since when it has been seen stopped (None: not stopped)
    killed: bool = False  # ended by the launcher after the run failed

    def describe(self, timeout: float) -> str:
        if self.killed and self.stopped is not None:
            return (f"stopped (SIGSTOP, Ctrl-Z or a debugger) from {self.stopped:.1f} s after the launch on: did "
                    f"not finish in {timeout:g} s; killed")
        if self.killed:
            return f"still running {self.ended:.1f} s after the launch, when another rank had failed; killed"
        if self.status < 0:
            return f"killed by {_signal_name(-self.status)} {self.ended:.1f} s after the launch (exit {self.status})"
        return f"exited with code {self.status} {self.ended:.1f} s after the launch"

    def lines(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Workers:
    """The `nproc` worker processes of one run, each in a session (and so a process group) of its own."""

    def __init__(self, nproc: int, job: Path, store) -> None:
        from ..runtime.distributed import loopback_env

        self.t0 = time.monotonic()
        self.workers: list[Worker] = []
        self.reaped = False
        cmd = [sys.executable, "-c", "import sys; from shardwise.drivers.launch import _worker; _worker(sys.argv[1])",
               str(job)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        try:
            for rank in range(nproc):
                log = job.parent / f"rank{rank}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(cmd, env={**env, **loopback_env(store, rank, nproc)},
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                self.workers.append(Worker(rank, proc, log))
        except BaseException:
            self.kill()
            raise

    def watch(self, timeout: float) -> None:
        """Return once every worker has exited 0. As soon as one exits otherwise, or has been stopped for
        `timeout` s, give the others GRACE s to exit by themselves, kill them all and raise a
        ShardwiseError saying what became of each rank."""
        while True:
            now = self._look()
            if all(w.status == 0 for w in self.workers):
                return
            if any(w.status not in (None, 0) or (w.stopped is not None and now - w.stopped >= timeout)
                   for w in self.workers):
                break
            time.sleep(POLL)
        deadline = time.monotonic() + GRACE
        while any(w.status is None for w in self.workers) and time.monotonic() < deadline:
            time.sleep(POLL)
            self._look()
        leftover = self.kill()
        raise ShardwiseError(self._failure(timeout, leftover))

    def _look(self) -> float:
        """Note which workers have ended (without reaping them: a worker's pid, and so its process group
        id, stays taken until `kill`) and which are stopped; returns the seconds since the launch."""
        now = time.monotonic() - self.t0
        for w in self.workers:
            if w.status is not None:
                continue
            w.status = _exit_status(w.proc.pid)
            if w.status is not None:
                w.ended, w.stopped = now, None
            elif _is_stopped(w.proc.pid):
                w.stopped = now if w.stopped is None else w.stopped
            else:
                w.stopped = None
        return now

    def kill(self) -> list[int]:
        """SIGKILL every worker's process group (a stopped process dies of it too), reap the workers,
        and return the pids of any process of their groups still alive 5 s later (none expected).
        Only once: a reaped worker's pid is free for another process to take."""
        if self.reaped:
            return []
        now = time.monotonic() - self.t0
        for w in self.workers:
            if w.status is None:
                w.killed, w.ended = True, now
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)  # the unreaped worker still holds its group's id
            except ProcessLookupError:  # the group has no process left
                pass
        for w in self.workers:
            w.proc.wait()
        self.reaped = True
        return _wait_gone({w.proc.pid for w in self.workers}, 5.0)

    def log(self) -> str:
        return "\n".join(f"--- rank {w.rank} ---\n{w.lines()}" for w in self.workers)

    def _failure(self, timeout: float, leftover: list[int]) -> str:
        """What was found (every rank), what was expected, what to do, and the failing ranks' last lines."""
        n = len(self.workers)
        stopped = [w for w in self.workers if w.stopped is not None]
        failed = sorted((w for w in self.workers if not w.killed and w.status not in (None, 0)),
                        key=lambda w: (w.ended, w.status >= 0))  # the first to fail; a signal before an error
        cause = stopped[0] if stopped else failed[0]
        if cause in stopped:
            what = (f"rank {cause.rank} was stopped (SIGSTOP, Ctrl-Z or a debugger) and did not finish in "
                    f"{timeout:g} s")
            todo = (f"do not leave a rank stopped for longer than the timeout (resume it with SIGCONT, or "
                    f"continue the debugger), or give the ranks more time: --timeout SECONDS (timeout=...), "
                    f"now {timeout:g} s")
        elif cause.status < 0:
            name = _signal_name(-cause.status)
            what = f"rank {cause.rank} was killed by {name}"
            todo = ("a rank killed by SIGKILL from outside was most often ended by the out-of-memory killer "
                    "(see `dmesg`): run fewer ranks, a smaller model or batch, or free memory, and run again"
                    if name == "SIGKILL" else
                    f"{name} came from outside or from a crash of rank {cause.rank}: read its last lines below, "
                    f"and run again")
        else:
            what = f"rank {cause.rank} exited with code {cause.status}"
            todo = (f"read rank {cause.rank}'s last lines below; if a rank timed out waiting for the others "
                    f"(a busy machine, a large model), give the ranks more time: --timeout SECONDS "
                    f"(timeout=...), now {timeout:g} s")
        lines = [f"the {n} real ranks failed: {what}."]
        lines += [f"  rank {w.rank}: {w.describe(timeout)}" for w in self.workers]
        lines.append(f"Expected every rank to finish and exit 0, no rank waiting for another longer than the "
                     f"timeout ({timeout:g} s).")
        lines.append(f"All {n} worker processes were killed and the temporary folder removed."
                     if not leftover else
                     f"The {n} workers were killed, but processes of their groups are still alive: pids "
                     f"{', '.join(map(str, leftover))}; end them (kill -9 PID).")
        lines.append(f"To do: {todo}.")
        for w in ([cause] + [w for w in failed if w is not cause])[:3]:
            text = w.lines().strip()
            if text:
                lines.append(f"rank {w.rank}'s last lines:\n{_tail(text, 15)}")
        return "\n".join(lines)


def _exit_status(pid: int) -> int | None:
    """The exit code of child `pid` (-N: ended by signal N), or None while it runs; it stays unreaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already: this process ignores SIGCHLD (subprocess, too, says 0 then)
        return 0
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of process `pid` from /proc, None if it is gone (or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (command) ": state, ppid, pgrp, ...
    return fields[0], int(fields[2])


def _is_stopped(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] in ("T", "t")  # stopped by a signal, or by a debugger


def _wait_gone(groups: set[int], seconds: float) -> list[int]:
    """Wait up to `seconds` for every process of `groups` to end; the pids still alive (zombies aside)."""
    deadline = time.monotonic() + seconds
    while True:
        pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()] if Path("/proc").is_dir() else []
        stats = {pid: _stat(pid) for pid in pids}
        alive = [pid for pid, stat in stats.items() if stat is not None and stat[1] in groups and stat[0] != "Z"]
        if not alive or time.monotonic() > deadline:
            return sorted(alive)
        time.sleep(POLL)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(text: str, n: int) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


# ------------------------------------------------------------------------------------ plain data
def plain(x: Any, what: str) -> Any:
    """`x` as plain data that torch.load(weights_only=True) reads back: tensors (on the CPU), None,
    bools, numbers, strings, and tuples, lists and dicts of them.

    A mapping (a Hugging Face ModelOutput: its fields, in order) becomes a dict, a named tuple a tuple, an
    enum its value, any other container torch's pytree knows a tuple of its leaves; so flattening the
    result gives the same tensors in the same order as flattening `x` (what `max_abs_diff` compares)."""
    from torch.utils._pytree import tree_flatten

    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if x is None or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, enum.Enum):
        return plain(x.value, what)
    if isinstance(x, Mapping):
        bad = [k for k in x if type(k) not in (str, int)]
        if bad:
            raise ShardwiseError(f"{what} hold a mapping with the key {bad[0]!r} ({type(bad[0]).__name__}); expected "
                                 f"string or integer keys, which cross between processes as plain data: use those")
        return {k: plain(v, what) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(plain(v, what) for v in x)
    if isinstance(x, list):
        return [plain(v, what) for v in x]
    for base in (bool, int, float, str):
        if isinstance(x, base):
            return base(x)
    leaves, spec = tree_flatten(x)
    if not spec.is_leaf():
        return tuple(plain(v, what) for v in leaves)
    raise ShardwiseError(f"{what} hold a {type(x).__module__}.{type(x).__qualname__}, which cannot cross between "
                         f"processes as plain data; expected tensors, numbers, strings, None, and tuples, lists or "
                         f"dicts of them: pass or return those")


# ------------------------------------------------------------------------------------ fault injection
@dataclass(frozen=True)
class Fault:
    """A fault injected for tests: the worker of rank `rank` sends itself `sig` at `point`.

    Set SHARDWISE_FAULT=RANK:POINT:SIGNAL in the launching process (the workers inherit it), e.g.
    `1:prefill:SIGSTOP`. Points:

      start    as the worker starts, before it joins the process group (the others wait in the rendezvous)
      prefill  as its first sharded step begins (the others are inside that step, waiting in its first
               collective); in a decode job, the prefill step
      decode   as its first decode step begins (phase="decode": a step whose first input is one token per
               sequence, after the prefill step)

    A step is seen as a call of the rank's program (an fx.GraphModule) on real tensors; recording runs
    (`bytes=True`) run the first step through an interpreter, so use this without them.
    """

    rank: int
    point: str
    sig: signal.Signals

    POINTS = ("start", "prefill", "decode")

    @classmethod
    def from_env(cls) -> Fault | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        parts = spec.split(":")
        try:
            rank, point, name = int(parts[0]), parts[1], parts[2].upper()
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
            if len(parts) != 3 or point not in cls.POINTS or rank < 0:
                raise ValueError(spec)
        except (ValueError, IndexError, KeyError):
            raise ShardwiseError(f"{FAULT_ENV}={spec!r}: expected RANK:POINT:SIGNAL with POINT one of "
                                 f"{', '.join(cls.POINTS)} and SIGNAL a signal name, e.g. 1:prefill:SIGSTOP; "
                                 f"fix or unset {FAULT_ENV}") from None
        return cls(rank, point, sig)

    def arm(self, rank: int) -> None:
        """In the worker of rank `rank`: fire now (start), or when the step named by `point` begins."""
        if rank != self.rank:
            return
        if self.point == "start":
            self.fire()
            return
        from torch import fx

        steps = 0

        def before_step(module, args):
            nonlocal steps
            if not isinstance(module, fx.GraphModule) or not _real_call(args):
                return
            steps += 1
            if self.point == "prefill" or (steps > 1 and _one_token(args)):
                hook.remove()
                self.fire()

        hook = torch.nn.modules.module.register_module_forward_pre_hook(before_step)

    def fire(self) -> None:
        print(f"shardwise: fault injection ({FAULT_ENV}): rank {self.rank} sends itself {self.sig.name} at "
              f"{self.point}", flush=True)
        os.kill(os.getpid(), self.sig)


def _real_call(args: tuple) -> bool:
    """Called on real tensors (not the meta or fake tensors of capturing and planning)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(type(t) is torch.Tensor and t.device.type != "meta" for t in tensors)


def _one_token(args: tuple) -> bool:
    """A decode step's call: its first input is one token id per sequence, [B, 1]."""
    ids = args[0] if args else None
    return (isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.ndim == 2
            and ids.shape[1] == 1)


# ------------------------------------------------------------------------------------ a worker
def _worker(job_path: str) -> None:
    import torch.distributed as dist

    from ..models import presets
    from ..models.checkpoint import Checkpoint
    from ..planning.planner import plan as make_plan
    from ..planning.program import emit_rank
    from ..runtime.distributed import init
    from ..runtime.simulate import Trace, run_recorded
    from ..runtime.weights import CheckpointSource, SafetensorsSource
    from .accounting import compare, compare_generation
    from .generate import generate

    job = json.loads(Path(job_path).read_text())
    fault = Fault.from_env()
    if fault is not None:
        fault.arm(int(os.environ["RANK"]))
    rank = init(timeout=job["timeout"])
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    inputs = torch.load(job["inputs"], weights_only=True)

    def on_device(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    args = tuple(on_device(a) for a in inputs["args"])
    kwargs = {k: on_device(v) for k, v in inputs["kwargs"].items()}
    if job.get("checkpoint"):  # parameters on the meta device, buffers computed; shards read from its files
        ckpt = Checkpoint.open(job["checkpoint"])
        meta = ckpt.build_meta()
        weights = CheckpointSource(ckpt, model=meta)
        total = ckpt.nbytes
    else:
        meta = presets.build_model(job["model"], device="meta")  # this rank never holds the whole model
        weights = SafetensorsSource(job["weights"])
        total = os.path.getsize(job["weights"])
    result: dict = {"backend": dist.get_backend(), "weights_bytes": total}
    with torch.no_grad():
        if job["phase"] == "decode":
            gen = generate(meta, args[0], job["tokens"], mesh=job["mesh"], layouts=job["layouts"], weights=weights,
                           prefill_layouts=job.get("prefill_layouts"), decode_layouts=job.get("decode_layouts"),
                           record=job.get("record", False), details=True)
            result["output"] = gen.tokens.cpu()
            if job.get("record"):
                result["bytes_rows"] = plain(compare_generation(gen, job["tokens"]), "the bytes report")
            read = _read(weights)
            counter = weights.fresh() if hasattr(weights, "fresh") else weights  # counting held bytes reads again
            held = sum(t.numel() * t.element_size() for t in
                       emit_rank(gen.decode.program.gm, gen.decode.mesh, rank, group_name=_no_groups,
                                weights=counter, device=device).state_dict().values())
            seconds = 0.0
        else:
            def to_meta(t):
                return t.to("meta") if isinstance(t, torch.Tensor) else t

            plan = make_plan(meta, tuple(to_meta(a) for a in args), {k: to_meta(v) for k, v in kwargs.items()},
                            mesh=job["mesh"], layouts=job["layouts"], phase=job["phase"],
                            collective_matmul=job.get("collective_matmul", False))
            program = plan.emit(rank, weights=weights, device=device)
            read = _read(weights)
            flat = plan.program.flat_inputs(args, kwargs)
            trace = Trace()
            out = run_recorded(program.program, flat, trace) if job.get("record") else program(*args, **kwargs)
            if job.get("record"):
                out = torch.utils._pytree.tree_unflatten(list(out), plan.program.sig.out_spec)
                result["bytes_rows"] = plain(compare(plan, trace.collectives, plan.program.gm), "the bytes report")
            dist.barrier()
            t0 = time.perf_counter()
            program(*args, **kwargs)
            seconds = time.perf_counter() - t0
            if job.get("trace_dir"):  # one more step, profiled: this rank's measured timeline
                from .profile import profile_step

                profile_step(lambda: program(*args, **kwargs), Path(job["trace_dir"]) / f"rank{rank}.json",
                             rank=rank, warmup=0)
            held = sum(t.numel() * t.element_size() for t in program.state_dict().values())
            result["output"] = plain(out, "the model's outputs")  # a ModelOutput becomes a dict of its fields
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (held, seconds, *read))
    if rank == 0:
        result.update(param_bytes=[r[0] for r in reports], seconds=[r[1] for r in reports],
                      bytes_read=[r[2] for r in reports], bytes_distinct=[r[3] for r in reports])
        torch.save(result, job["output"])
    dist.barrier()
    dist.destroy_process_group()
    _exit_now()


def _exit_now() -> None:
    """End the worker here, as multiprocessing's children end: rank 0's report is written and every rank
    has passed the last barrier, so nothing is left to do. The interpreter's teardown would only destroy
    torch's C++ objects (gloo's threads, collective work still registered), which has aborted a finished
    rank with 'terminate called without an active exception' under heavy load."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _read(weights) -> tuple[int, int]:
    """(bytes read, bytes read counting each slice once) of a weight source so far."""
    n = getattr(weights, "bytes_read", 0)
    return n, getattr(weights, "bytes_distinct", n)


def _no_groups(atoms):  # emitting only to count a program's bytes: its collectives never run
    return "unused"


if __name__ == "__main__":
    _worker(sys.argv[1])
