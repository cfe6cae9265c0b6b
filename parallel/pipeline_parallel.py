"""Pipeline parallelism on torch.distributed.pipelining: stage splitting, stage placement, schedules.

The model is cut into pp * virtual contiguous stages. Each stage is the same Transformer class holding a slice of
the layers (ModuleDict keys keep global layer indices, so parameter names do not change): the first also holds
the embedding, the last the final norm and the output head (`None` elsewhere). Splitting balances a cost in
layers where the embedding and the head weigh `embedding_cost` and `head_cost` layers, so by default the first
and last stages hold one layer fewer (Llama 3, section 3.3.2). Stages sit on pp ranks in a loop (stage s on rank
s mod pp: 1F1B, interleaved) or in a V (rank r holds stages r and 2*pp-1-r: ZB-V, DualPipe-V).

Schedules (Narayanan et al. 2021 for 1F1B and interleaving; Qi et al. 2023 for zero bubble) come from torch; this
file checks their microbatch rules up front with one-line errors, gives them a loss that sums token losses over
the step (scale_grads off: our loss is already normalized by the step's token count), and reduces the loss,
which exists only on the last stage, over pp so every rank reports it. Forward-only passes (validation) use a
plain stage-by-stage send/recv chain, which works for any number of microbatches.
"""

import contextlib
import copy
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining

from parallel.mesh import LayoutError

LOOP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
SINGLE_STAGE = ("GPipe", "1F1B")
_CLASSES = {"GPipe": "ScheduleGPipe", "1F1B": "Schedule1F1B", "Interleaved1F1B": "ScheduleInterleaved1F1B",
            "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble", "ZBVZeroBubble": "ScheduleZBVZeroBubble",
            "DualPipeV": "ScheduleDualPipeV"}


def split_layers(n_layers: int, n_stages: int, embedding_cost: float, head_cost: float,
                 explicit: List[int] = ()) -> List[List[int]]:
    """Layer indices of each stage. Explicit counts are taken as given; otherwise stage boundaries are placed
    where the cumulative cost (embedding + layers so far) crosses multiples of total / n_stages.

    Llama 3 405B: 126 layers on 16 stages with embedding and head costing one layer each -> 7, 8 x 14, 7.
    """
    if explicit:
        counts = list(explicit)
    else:
        total = n_layers + embedding_cost + head_cost
        bounds = [0]
        for stage in range(1, n_stages):
            ideal = int(stage * total / n_stages - embedding_cost + 0.5)
            bounds.append(min(max(ideal, bounds[-1] + 1), n_layers - (n_stages - stage)))
        bounds.append(n_layers)
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [list(range(start, start + count)) for start, count in zip(starts, counts)]


def stage_to_rank(n_stages: int, pp: int, schedule: str) -> List[int]:
    """The pp rank of every stage: looped (s mod pp), or V-shaped (down the ranks, then back up)."""
    if schedule in V_SCHEDULES:
        return [s if s < pp else 2 * pp - 1 - s for s in range(n_stages)]
    return [s % pp for s in range(n_stages)]


def check_pipeline(pp: int, virtual: int, schedule: str, n_layers: int, n_microbatches: int,
                   explicit: List[int]) -> None:
    """LayoutError (one line naming the key) for a pipeline that the schedule or the model cannot run."""
    n_stages = pp * virtual
    if schedule in SINGLE_STAGE and virtual != 1:
        raise LayoutError("parallel.pp_virtual_stages", f"{schedule} runs one stage per rank; got {virtual} "
                          f"(use Interleaved1F1B or InterleavedZeroBubble for virtual stages)")
    if schedule in V_SCHEDULES and virtual != 2:
        raise LayoutError("parallel.pp_virtual_stages", f"{schedule} needs exactly 2 stages per rank, got {virtual}")
    if explicit and (len(explicit) != n_stages or sum(explicit) != n_layers or min(explicit) < 1):
        raise LayoutError("parallel.pp_layers", f"{list(explicit)} must list {n_stages} stages (pp * "
                          f"pp_virtual_stages) of at least one layer each, summing to model.n_layers={n_layers}")
    if n_stages > n_layers:
        raise LayoutError("parallel.pp", f"pp * pp_virtual_stages = {n_stages} stages but model.n_layers="
                          f"{n_layers}: every stage needs at least one layer")
    if schedule in ("1F1B", "DualPipeV") and n_microbatches < n_stages:
        raise LayoutError("data.global_batch_size", f"{schedule} needs at least as many microbatches as stages "
                          f"({n_stages}); this layout gives {n_microbatches} per step (global_batch_size / "
                          f"(micro_batch_size * dp))")
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise LayoutError("data.global_batch_size", f"{schedule} runs microbatches in rounds of pp={pp}: "
                              f"{n_microbatches} per step is not a multiple of its {rounds} rounds")


def stage_module(model: nn.Module, layers: List[int], first: bool, last: bool) -> nn.Module:
    """A copy of the (meta) model holding only `layers`, and the embedding / head when first / last."""
    stage = copy.deepcopy(model)
    for name in [n for n in stage.layers.keys() if int(n) not in layers]:
        del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm, stage.output = None, None
    return stage


class ScheduleGate:
    """Open while the computation running is one of the step's micro-batches or outside a schedule step (evaluation
    walks the stages itself). torch's pipelining initializes a schedule inside its first step by running each stage
    once more (forward, and a backward with ones as gradients): on the first micro-batch for the first stage, on
    uninitialized tensors shaped like it for the others. State that a forward records (FP8 delayed-scaling windows,
    engine/fp8 set_recording_gate) must not take that pass. The gate is closed inside the step except within a
    stage's forward_one_chunk / backward_one_chunk / backward_weight_one_chunk, which run the real micro-batches."""

    CHUNK_METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self):
        self.in_step, self.in_chunk = False, 0

    @property
    def open(self) -> bool:
        return not self.in_step or self.in_chunk > 0

    def wrap(self, stage) -> None:
        """Open the gate around the stage's micro-batch methods (instance attributes over the class's)."""
        for name in self.CHUNK_METHODS:
            method = getattr(stage, name, None)
            if method is not None:
                setattr(stage, name, self._opened(method))

    def _opened(self, method: Callable) -> Callable:
        def run(*args, **kwargs):
            self.in_chunk += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.in_chunk -= 1
        return run

    @contextlib.contextmanager
    def step(self):
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False


class Pipeline:
    """The stages of this pp rank and the schedule that runs them."""

    def __init__(self, parts: List[nn.Module], stage_ids: List[int], n_stages: int, ranks: List[int],
                 group: dist.ProcessGroup, device: torch.device, schedule: str, n_microbatches: int):
        self.parts, self.stage_ids, self.n_stages, self.ranks = parts, stage_ids, n_stages, ranks
        self.group, self.device, self.n_microbatches = group, device, n_microbatches
        self.stages = [pipelining.PipelineStage(part, sid, n_stages, device, group=group)
                       for part, sid in zip(parts, stage_ids)]
        self.gate = ScheduleGate()  # closed while torch runs the stages for shape inference
        for stage in self.stages:
            self.gate.wrap(stage)
        self._loss: Optional[Callable] = None
        self.current_micro = 0  # index of the micro-batch whose loss is being computed (for per-batch state)
        cls = getattr(pipelining, _CLASSES[schedule])
        stages = self.stages[0] if schedule in SINGLE_STAGE else self.stages
        self.schedule = cls(stages, n_microbatches=n_microbatches, loss_fn=self._schedule_loss, scale_grads=False)

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def _schedule_loss(self, logits: torch.Tensor, packed_targets: torch.Tensor) -> torch.Tensor:
        # packed_targets: [b, s + 1]: next-token ids, -1 where the position has no loss, then the micro-batch index
        # (torch's schedules may call the loss an extra time, on micro-batch 0, while they initialize a stage, so
        # the index travels with the data rather than being counted)
        self.current_micro = int(packed_targets[0, -1])
        targets = packed_targets[:, :-1]
        return self._loss(logits, targets.clamp(min=0), targets >= 0)

    def forward_backward(self, micro_batches: List, loss: Callable) -> torch.Tensor:
        """Run the schedule over the step's micro-batches; `loss(logits, targets, mask)` is what each microbatch
        backpropagates. Returns the sum of those losses, on every pp rank."""
        self._loss = loss
        inputs, targets, kwargs = _stack(micro_batches)
        losses: List[torch.Tensor] = []
        with self.gate.step():
            self.schedule.step(inputs, target=targets, losses=losses, **kwargs)
        total = torch.stack([l.detach().float() for l in losses]).sum() if losses else \
            torch.zeros((), device=self.device)
        dist.all_reduce(total, group=self.group)
        return total

    @torch.no_grad()
    def forward_only(self, micro_batches: List, loss: Callable) -> torch.Tensor:
        """Sum of loss(logits, targets, mask) over micro-batches, forward only, on every pp rank: each microbatch
        walks the stages in order, hidden states sent to the next stage's rank."""
        total = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            self.current_micro = index
            kwargs = {"position_ids": batch.position_ids, "doc_ids": batch.doc_ids}
            hidden: Optional[torch.Tensor] = batch.inputs
            for stage in range(self.n_stages):
                owner = self.ranks[stage]
                if owner != dist.get_rank(self.group):
                    continue
                if stage > 0 and self.ranks[stage - 1] != owner:
                    hidden = _recv(self.group, self.ranks[stage - 1], self.device)
                hidden = self.parts[self.stage_ids.index(stage)](hidden, **kwargs)
                if stage == self.n_stages - 1:
                    total += loss(hidden, batch.targets, batch.loss_mask).float()
                elif self.ranks[stage + 1] != owner:
                    _send(hidden, self.group, self.ranks[stage + 1])
        dist.all_reduce(total, group=self.group)
        return total


def _stack(micro_batches: List):
    """The step's micro-batches as whole-step tensors (the schedule cuts them back along dim 0)."""
    cat = (lambda name: torch.cat([getattr(b, name) for b in micro_batches]))
    targets = torch.where(cat("loss_mask"), cat("targets"), -1)  # [B, s]
    index = torch.cat([torch.full((b.targets.shape[0], 1), i, dtype=targets.dtype, device=targets.device)
                       for i, b in enumerate(micro_batches)])  # [B, 1]: which micro-batch each row came from
    targets = torch.cat([targets, index], dim=1)  # [B, s + 1]
    kwargs: Dict[str, torch.Tensor] = {"position_ids": cat("position_ids")}
    if micro_batches[0].doc_ids is not None:
        kwargs["doc_ids"] = cat("doc_ids")
    return cat("inputs"), targets, kwargs


_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _send(x: torch.Tensor, group: dist.ProcessGroup, group_rank: int) -> None:
    """Send a header (ndim, shape, dtype) then the tensor to `group_rank` of the pp group."""
    dst = dist.get_global_rank(group, group_rank)
    header = torch.tensor([x.ndim, *x.shape, _DTYPES.index(x.dtype)] + [0] * (7 - x.ndim), dtype=torch.int64)
    dist.send(header.to(x.device), dst=dst, group=group)
    dist.send(x.contiguous(), dst=dst, group=group)


def _recv(group: dist.ProcessGroup, group_rank: int, device: torch.device) -> torch.Tensor:
    src = dist.get_global_rank(group, group_rank)
    header = torch.empty(9, dtype=torch.int64, device=device)
    dist.recv(header, src=src, group=group)
    ndim = int(header[0])
    shape, dtype = header[1:1 + ndim].tolist(), _DTYPES[int(header[1 + ndim])]
    x = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(x, src=src, group=group)
    return x
