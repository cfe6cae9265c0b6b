"""The parallel layout: degrees of the five mesh axes, checked against the world and the model, and the mesh.

Axes, outermost to innermost: dp_replicate, dp_shard, pp, cp, tp. tp is innermost so tensor-parallel peers are
neighbouring ranks (one NVLink domain), as Llama 3 orders them [TP, CP, PP, DP] from inner to outer (section
3.3.2). The mesh is built once and passed explicitly; nothing here keeps a process group in a global.
"""

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("dp_replicate", "dp_shard", "pp", "cp", "tp")


class LayoutError(ValueError):
    """An impossible layout; `key` names the config key to change (the engine turns it into a ConfigError)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.pp * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches a step is split into."""
        return self.dp_replicate * self.dp_shard


def check_layout(dims: ParallelDims, world_size: int, n_heads: int, n_kv_heads: int, ffn_dim: int) -> None:
    """Raise LayoutError (one line, naming the key) for a layout that cannot run; cheap, before any group."""
    if dims.world_size != world_size:
        raise LayoutError("parallel", f"dp_replicate*dp_shard*pp*cp*tp = {dims.world_size} but the world size "
                                      f"is {world_size}")
    if dims.pp > 1 or dims.cp > 1:
        raise LayoutError("parallel.pp" if dims.pp > 1 else "parallel.cp",
                          "pipeline and context parallelism are not available yet; use 1")
    tp = dims.tp
    if n_heads % tp:
        raise LayoutError("parallel.tp", f"tp={tp} does not divide model.n_heads={n_heads}")
    if n_kv_heads % tp and tp % n_kv_heads:
        raise LayoutError("parallel.tp", f"tp={tp} neither divides model.n_kv_heads={n_kv_heads} nor is a multiple "
                                         f"of it (KV heads are split across tp, or each shared by tp/n_kv ranks)")
    if ffn_dim % tp:
        raise LayoutError("parallel.tp", f"tp={tp} does not divide model.ffn_dim={ffn_dim}")


@dataclass
class Mesh:
    """The device mesh with its axes by name, and the flattened data-parallel mesh (dp_replicate x dp_shard)."""

    dims: ParallelDims
    device_mesh: DeviceMesh
    dp_mesh: DeviceMesh  # 1-D, all ranks holding different data (loss token counts are summed over it)

    def group(self, axis: str) -> Optional[dist.ProcessGroup]:
        return self.device_mesh.get_group(axis)

    def rank(self, axis: str) -> int:
        return self.device_mesh.get_local_rank(axis)

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.device_mesh.get_group("tp")


def build_mesh(dims: ParallelDims, device_type: str) -> Mesh:
    shape = tuple(getattr(dims, axis) for axis in AXES)
    device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
    dp_mesh = device_mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return Mesh(dims, device_mesh, dp_mesh)
