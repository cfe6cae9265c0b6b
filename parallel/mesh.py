"""The parallel layout: degrees of the five mesh axes, checked against the world and the model, and the mesh.

Axes, outermost to innermost: dp_replicate, dp_shard, pp, cp, tp. tp is innermost so tensor-parallel peers are
neighbouring ranks (one NVLink domain), as Llama 3 orders them [TP, CP, PP, DP] from inner to outer (section
3.3.2). The mesh is built once and passed explicitly; nothing here keeps a process group in a global.
"""

from dataclasses import dataclass
from typing import Optional

import warnings

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


def check_layout(dims: ParallelDims, world_size: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                 seq_len: int = 0, sequence_parallel: bool = False) -> None:
    """Raise LayoutError (one line, naming the key) for a layout that cannot run; cheap, before any group.
    (The pipeline's own rules are in pipeline_parallel.check_pipeline.)"""
    if dims.world_size != world_size:
        raise LayoutError("parallel", f"dp_replicate*dp_shard*pp*cp*tp = {dims.world_size} but the world size "
                                      f"is {world_size}")
    tp = dims.tp
    if n_heads % tp:
        raise LayoutError("parallel.tp", f"tp={tp} does not divide model.n_heads={n_heads}")
    if n_kv_heads % tp and tp % n_kv_heads:
        raise LayoutError("parallel.tp", f"tp={tp} neither divides model.n_kv_heads={n_kv_heads} nor is a multiple "
                                         f"of it (KV heads are split across tp, or each shared by tp/n_kv ranks)")
    if ffn_dim % tp:
        raise LayoutError("parallel.tp", f"tp={tp} does not divide model.ffn_dim={ffn_dim}")
    if dims.cp > 1 and seq_len % (2 * dims.cp):
        raise LayoutError("parallel.cp", f"data.seq_len={seq_len} cannot be cut into 2*cp={2 * dims.cp} equal "
                                         f"chunks (zigzag load balancing)")
    if dims.tp > 1 and sequence_parallel and seq_len % (dims.cp * dims.tp):
        raise LayoutError("parallel.sequence_parallel", f"data.seq_len={seq_len} / cp={dims.cp} tokens per rank "
                                                        f"cannot be split over tp={dims.tp}")


@dataclass
class Mesh:
    """The device mesh with its axes by name, and the flattened data-parallel mesh (dp_replicate x dp_shard)."""

    dims: ParallelDims
    device_mesh: DeviceMesh
    dp_mesh: DeviceMesh  # 1-D: dp_replicate x dp_shard, the ranks that read different samples
    data_mesh: DeviceMesh  # 1-D: dp x cp, the ranks that hold different tokens (loss sums run over it)
    fsdp_mesh: Optional[DeviceMesh]  # dp_shard x cp (with dp_replicate in front for HSDP); None when 1 rank

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

    @property
    def data_ranks(self) -> int:
        """Ranks holding different tokens of a step: dp x cp."""
        return self.dims.dp * self.dims.cp


def build_mesh(dims: ParallelDims, device_type: str) -> Mesh:
    """The 5-D mesh and its flattened views. Parameters are replicated over cp (each rank sees other tokens of the
    same sequences), so FSDP shards them over dp_shard x cp and reduces their gradients there (as torchtitan)."""
    shape = tuple(getattr(dims, axis) for axis in AXES)
    device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
    dp_mesh = device_mesh["dp_replicate", "dp_shard"]._flatten("dp")
    data_mesh = device_mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    fsdp_mesh = None
    if dims.dp * dims.cp > 1:
        shard = device_mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        if dims.dp_replicate > 1:
            with warnings.catch_warnings():  # slicing a flattened dim from the root: the way HSDP x cp is built
                warnings.simplefilter("ignore")
                fsdp_mesh = device_mesh["dp_replicate", "dp_shard_cp"]
        else:
            fsdp_mesh = shard
    return Mesh(dims, device_mesh, dp_mesh, data_mesh, fsdp_mesh)
