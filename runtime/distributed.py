"""Real process groups for a mesh: a DeviceMesh with one dim per atom, flattened for atom sets.

All ranks must ask for groups in the same order (DeviceMesh creates them collectively); emitting the
same plan on every rank does exactly that.

`init` joins the default process group from torchrun's environment, with a timeout on every collective;
`loopback_store` is the rendezvous store a launcher on this machine hosts for its workers, listening on
127.0.0.1 only (torchrun's own store listens on every interface).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import MeshError, ShardwiseError
from ..ir.mesh import Mesh

_CACHE: dict[tuple, MeshGroups] = {}


class MeshGroups:
    """Group names for the atom sets of `mesh` over the current default process group."""

    def __init__(self, mesh: Mesh, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = mesh
        atoms = mesh.atoms
        self.device_mesh = (
            init_device_mesh(device_type, tuple(a.size for a in atoms), mesh_dim_names=tuple(a.name for a in atoms))
            if atoms else None
        )
        self._names: dict[tuple[str, ...], str] = {}

    def __call__(self, atoms: tuple[str, ...]) -> str:
        atoms = self.mesh.mesh_order(atoms)
        if atoms not in self._names:
            dm = self.device_mesh
            sub = dm[atoms[0]] if len(atoms) == 1 else dm[atoms]._flatten()
            self._names[atoms] = sub.get_group().group_name
        return self._names[atoms]


def check_world(mesh: Mesh) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise MeshError(
            "torch.distributed is not initialized: launch with `torchrun --nproc_per_node N ...` and call "
            "torch.distributed.init_process_group (shardwise.init() does both checks), or use shardwise.simulate"
        )
    world = dist.get_world_size()
    if world != mesh.size:
        raise MeshError(
            f"mesh {mesh} has {mesh.size} chips but torch.distributed has world size {world}: "
            f"launch {mesh.size} processes (torchrun --nproc_per_node {mesh.size}) or pick a mesh of {world} chips"
        )


def mesh_groups(mesh: Mesh, device_type: str | None = None) -> Callable[[tuple[str, ...]], str]:
    check_world(mesh)
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    key = (mesh.shape, device_type)
    if key not in _CACHE:
        _CACHE[key] = MeshGroups(mesh, device_type)
    return _CACHE[key]


def init(backend: str | None = None, timeout: float | None = None, *, steady_heap: bool = True) -> int:
    """Initialize torch.distributed from torchrun's environment (gloo on CPU, NCCL on GPUs); returns the rank.

    `timeout` (seconds) bounds how long the rendezvous and every collective of the process group wait
    for the other ranks before raising (None: torch's default, 10 minutes). `steady_heap`: on gloo (CPU)
    ranks, keep what a step frees for the next (runtime/heap.py: without it every step faults its
    activations' pages in again)."""
    if not isinstance(steady_heap, bool):
        raise ShardwiseError(f"shardwise.init(steady_heap={steady_heap!r}): expected True (keep what a step frees "
                             f"for the next, the default on gloo ranks) or False (the C library's own heap)")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise MeshError("shardwise.init() expects torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR)")
        if timeout is not None and not timeout > 0:
            raise ShardwiseError(f"shardwise.init(timeout={timeout!r}): the collective timeout must be a positive "
                                 f"number of seconds; pass one, or None for torch's default")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, **({} if timeout is None else {"timeout": timedelta(seconds=timeout)}))
    if steady_heap and dist.get_backend() == "gloo":
        from .heap import steady_heap as keep

        keep()
    return dist.get_rank()


LOOPBACK = "127.0.0.1"


def loopback_store(timeout: float) -> dist.TCPStore:
    """A rendezvous store server listening on 127.0.0.1 only, on a free port (`store.port`).

    The socket is bound here, to loopback, and handed to the store (`master_listen_fd`): a TCPStore
    given only a host name listens on every interface, and a port picked first and bound later could be
    taken in between. Workers join it as torchrun's workers join torchrun's store: MASTER_ADDR and
    MASTER_PORT name it and TORCHELASTIC_USE_AGENT_STORE=True makes every rank a client (see
    `loopback_env`). The store closes its socket when it is deleted."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    fd = sock.detach()  # the store owns the socket from here on (and closes it)
    # the libuv backend listens on a socket handed to it from torch 2.8 on (pytorch#150215); the older one always
    use_libuv = torch.__version__ >= (2, 8)
    try:
        return dist.TCPStore(LOOPBACK, port, None, True, timedelta(seconds=timeout), wait_for_workers=False,
                             master_listen_fd=fd, use_libuv=use_libuv)
    except BaseException:
        os.close(fd)
        raise


def loopback_env(store: dist.TCPStore, rank: int, world_size: int) -> dict[str, str]:
    """The environment of worker `rank` of `world_size` on this machine joining `store` (torchrun's
    variables), with gloo's and NCCL's own sockets on the loopback interface as well."""
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
           "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": LOOPBACK,
           "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    lo = loopback_interface()
    if lo is not None:
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (`lo` on Linux, `lo0` elsewhere), None if neither."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
