"""The one place that spreads a plain model over the mesh, in a fixed order:

    1. pipeline parallelism (split into stages)          - not yet
    2. context parallelism (attention over cp shards)    - not yet
    3. tensor + sequence parallelism (parallel/tensor_parallel.py)
    4. FP8 linears (the engine passes its GEMM in)       - not yet
    5. activation checkpointing (full, or every n-th block)
    6. torch.compile                                     - not yet
    7. data parallelism: FSDP2 / HSDP (parallel/data_parallel.py)

TP must come before FSDP (FSDP shards the TP shards), activation checkpointing wraps the TP-sharded blocks, and
FSDP goes last so its units are the final blocks. `Parallelized` carries what the training step needs of the
layout: the loss over vocabulary shards, the dp reductions, gradient sync and the global gradient norm.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from parallel.data_parallel import apply_fsdp
from parallel.mesh import Mesh
from parallel.tensor_parallel import TPPlan, apply_tensor_parallel, tp_local, vocab_parallel_cross_entropy_sum


@dataclass
class ParallelizeOptions:
    sequence_parallel: bool = True
    activation_checkpointing: str = "none"  # none | full | selective (every `ac_every`-th block)
    ac_every: int = 2
    param_dtype: Optional[torch.dtype] = None  # FSDP compute dtype (None: keep fp32)
    reshard_after_forward: bool = True


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Recompute a block's activations in backward instead of storing them (keeps parameter names)."""
    for index, block in enumerate(model.layers.values()):
        if mode == "full" or (mode == "selective" and index % every == 0):
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Parallelized:
    """A model after parallelize(), with the layout-aware pieces of a training step."""

    def __init__(self, model: nn.Module, mesh: Optional[Mesh], tp_plan: Optional[TPPlan], fsdp: bool,
                 loss_sum: Callable):
        self.model, self.mesh, self.tp_plan, self.fsdp = model, mesh, tp_plan, fsdp
        self.loss_sum = loss_sum
        # FSDP averages gradients over dp; a loss already normalized by the global token count needs their sum
        self.loss_scale = float(mesh.dims.dp) if fsdp else 1.0

    def sum_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different data (identity on one process)."""
        if self.mesh is not None and self.mesh.dims.dp > 1:
            dist.all_reduce(value, group=self.mesh.dp_mesh.get_group())
        return value

    def set_gradient_sync(self, enabled: bool) -> None:
        """FSDP reduce-scatters only on the last micro-batch of a step; earlier ones accumulate locally."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(enabled)

    def finish_gradients(self) -> None:
        """Sum the gradients that tp ranks computed only in part: sequence-parallel norm weights (each saw one
        sequence chunk) over all of tp, and shared KV heads (each rank saw its own query heads) over the ranks
        sharing the head."""
        if self.tp_plan is None:
            return
        names = set(self.tp_plan.partial_grad_names)
        for name, param in self.model.named_parameters():
            if param.grad is None:
                continue
            info = self.tp_plan.shards.get(_fqn(name))
            if _fqn(name) in names:
                dist.all_reduce(_local(param.grad), group=self.tp_plan.group)
            elif info is not None and info.replicas > 1:
                self._sum_over_replicas(_local(param.grad), info.replicas)

    def _sum_over_replicas(self, grad: torch.Tensor, replicas: int) -> None:
        """Each rank puts its gradient in its KV head's slot of a [heads, ...] buffer; one all-reduce over tp sums
        every head's copies (KV weights are small under GQA, so the zero slots cost little)."""
        group = self.tp_plan.group
        head, heads = dist.get_rank(group) // replicas, dist.get_world_size(group) // replicas
        buffer = grad.new_zeros((heads, *grad.shape))
        buffer[head] = grad
        dist.all_reduce(buffer, group=group)
        grad.copy_(buffer[head])

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over every gradient of the model, counted once whatever the layout; clip to max_norm.

        Each distinct gradient element is counted on exactly one rank: TP-replicated parameters only on tp rank
        0, HSDP replicas only on dp_replicate rank 0; the squares are then summed over the world.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
        copies = self._tp_copies()
        tp_rank, replica = self.mesh.rank("tp"), self.mesh.rank("dp_replicate")
        squares = torch.zeros((), device=params[0].device, dtype=torch.float32)
        for p in params:
            if replica == 0 and tp_rank % copies.get(id(p), 1) == 0:
                squares += _local(p.grad).float().pow(2).sum()
        dist.all_reduce(squares)
        norm = squares.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                _local(p.grad).mul_(coef)
        return norm

    def _tp_copies(self) -> Dict[int, int]:
        """id(parameter) -> how many consecutive tp ranks hold the same values (all of tp for replicated ones)."""
        if self.tp_plan is None:
            return {}
        tp = dist.get_world_size(self.tp_plan.group)
        return {id(p): (self.tp_plan.shards[_fqn(n)].replicas if _fqn(n) in self.tp_plan.shards else tp)
                for n, p in self.model.named_parameters()}

    def full_shape(self, name: str, param: torch.Tensor) -> tuple:
        """The unsharded shape of a parameter (its tensor-parallel full shape; FSDP's DTensor shape is already
        unsharded over dp)."""
        info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
        return info.full_shape if info is not None else tuple(param.shape)

    def init_parameter(self, name: str, param: torch.Tensor, full: torch.Tensor) -> None:
        """Copy this rank's part of `full` into `param`: its tensor-parallel cut, then its FSDP shard."""
        info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
        local = tp_local(full, info, self.tp_plan.group) if info is not None else full
        if isinstance(param, DTensor):  # every rank holds the same value: cut locally, no communication
            local = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None).to_local()
        _local(param).copy_(local)

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Every parameter as its full, unsharded, unpadded tensor (a collective: call on every rank)."""
        full = {}
        for name, p in self.model.named_parameters():
            value = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            info = self.tp_plan.shards.get(_fqn(name)) if self.tp_plan is not None else None
            if info is not None and info.dim is not None:
                parts = [torch.empty_like(value) for _ in range(dist.get_world_size(self.tp_plan.group))]
                dist.all_gather(parts, value.contiguous(), group=self.tp_plan.group)
                value = torch.cat(parts[::info.replicas], dim=info.dim).narrow(info.dim, 0, info.full_size)
            full[_fqn(name)] = value.detach().clone()
        return full


def _fqn(name: str) -> str:
    """The model's own parameter name, without wrapper prefixes."""
    return name.replace("_checkpoint_wrapped_module.", "")


def parallelize(model: nn.Module, mesh: Optional[Mesh], options: ParallelizeOptions,
                reference_loss_sum: Callable) -> Parallelized:
    """Apply the dimensions of `mesh` to `model` in the fixed order above. The model may be on the meta device
    (then materialize with `to_empty` and initialize through `init_parameter`) or already initialized."""
    tp_plan, loss_sum = None, reference_loss_sum
    if mesh is not None and mesh.dims.tp > 1:
        tp_plan = apply_tensor_parallel(model, mesh.tp_group, options.sequence_parallel)
        loss_sum = partial(vocab_parallel_cross_entropy_sum, vocab_size=model.cfg.vocab_size,
                           group=mesh.tp_group)
    if options.activation_checkpointing != "none":
        apply_activation_checkpointing(model, options.activation_checkpointing, options.ac_every)
    fsdp = mesh is not None and mesh.dims.dp > 1
    if fsdp:
        apply_fsdp(model, mesh, options.param_dtype, options.reshard_after_forward)
    return Parallelized(model, mesh, tp_plan, fsdp, loss_sum)
