"""Data parallelism with FSDP2 (`fully_shard`): ZeRO-3 style sharding over dp_shard, replicated over
dp_replicate (HSDP), parameters cast for compute and gradients reduced in fp32 (Llama 3, section 3.3.2)."""

from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.mesh import Mesh


def apply_fsdp(model: nn.Module, mesh: Mesh, param_dtype: Optional[torch.dtype],
               reshard_after_forward: bool) -> None:
    """One FSDP unit per transformer block and one at the root (embedding, final norm, output head), sharded
    over dp_shard x cp (context-parallel ranks hold the same parameters and sum their gradients).

    Gradients are reduced in fp32 whatever the compute dtype. FSDP averages them over the dp x cp ranks; the
    training step multiplies its loss by that size (`Parallelized.loss_scale`) to turn that into the sum its
    global token normalization needs (gloo has no pre-multiplied sum, so the divide factor stays FSDP's). The root keeps its parameters after
    forward (they are needed first in backward anyway).
    """
    dp_mesh = mesh.fsdp_mesh  # dp_shard x cp, with dp_replicate in front for HSDP
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
