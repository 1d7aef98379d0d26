"""Real process groups for a mesh: a DeviceMesh with one dim per atom, flattened for atom sets.

All ranks must ask for groups in the same order (DeviceMesh creates them collectively); emitting the
same plan on every rank does exactly that.
"""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import MeshError
from ..ir.mesh import Mesh

_CACHE: dict[tuple, "MeshGroups"] = {}


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


def init(backend: str | None = None) -> int:
    """Initialize torch.distributed from torchrun's environment (gloo on CPU, NCCL on GPUs); returns the rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise MeshError("shardwise.init() expects torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
