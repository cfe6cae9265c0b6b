"""Data parallelism with FSDP2 (`fully_shard`): ZeRO-3 style sharding over dp_shard, replicated over
dp_replicate (HSDP), parameters cast for compute and gradients reduced in fp32 (Llama 3, section 3.3.2)."""

from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.mesh import Mesh


def apply_fsdp(model: nn.Module, mesh: Mesh, param_dtype: Optional[torch.dtype],
               reshard_after_forward: bool) -> None:
    """One FSDP unit per transformer block and one at the root (embedding, final norm, output head).

    Gradients are reduced in fp32 whatever the compute dtype. FSDP averages them over the dp ranks; the
    training step multiplies its loss by the dp size (`Parallelized.loss_scale`) to turn that into the sum its
    global token normalization needs (gloo has no pre-multiplied sum, so the divide factor stays FSDP's). The root keeps its parameters after
    forward (they are needed first in backward anyway).
    """
    if mesh.dims.dp_replicate > 1:
        dp_mesh = mesh.device_mesh["dp_replicate", "dp_shard"]  # HSDP: replicate x shard
    else:
        dp_mesh = mesh.device_mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
