"""TrainModules of the reward model and DPO: the pretraining step (engine/train_module.py) with another loss.

Both read per-sequence numbers off a micro-batch laid out as in align/preference.py (k blocks of m sequences):
the reward model a scalar per sequence, DPO the summed log-probability of the response tokens. A sequence's
number is summed from pieces that live on different ranks (vocabulary shards over tp inside the loss, sequence
shards over cp), then the loss is computed from the whole number on every one of those ranks. `sum_rows` does the
sum with an identity backward: each rank's own piece receives d loss / d number once, so the ranks' gradients add
up to the one-process gradient (the same accounting the pretraining loss uses for cp).

Normalization: a step's loss is the mean over its preference rows on all data-parallel ranks; `count_tokens` returns
that row count (and DPO's chosen-token count for its NLL term), `micro_loss` the micro-batch's sum, so the engine's
division by the count gives the mean exactly as for token losses.
"""

from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from engine.config import AlignConfig
from engine.data.loader import Batch
from engine.train_module import LMTrainModule

from align.losses import dpo_objective, ranking_reward_loss
from align.preference import DPO_BLOCKS, REWARD_BLOCKS


class _SumRows(torch.autograd.Function):
    """All-reduce SUM forward, identity backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, group) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, group=group)
        return values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_rows(values: torch.Tensor, groups: List) -> torch.Tensor:
    for group in groups:
        values = _SumRows.apply(values, group)
    return values


class PreferenceTrainModule(LMTrainModule):
    """What the reward model and DPO share: row counting, knowing which micro-batch `micro_loss` is computing (its
    sample ids key DPO's reference table), and metric reduction."""

    blocks: Tuple[str, ...] = ()
    metric_names: Tuple[str, ...] = ()  # what micro_loss reports, averaged over the step's rows

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mesh = self.parallel.mesh
        self.cp_group = mesh.group("cp") if mesh is not None and mesh.dims.cp > 1 else None
        self.loss_copies = mesh.dims.cp if mesh is not None else 1
        self._queue: List[Batch] = []  # the step's micro-batches, in order
        self._current: Optional[Batch] = None
        self._metric_sums: Dict[str, torch.Tensor] = {}
        self._metrics_from: Set[int] = set()  # micro-batches already counted in the current step
        self.eval_metrics: Dict[str, float] = {}

    def rows_per_block(self, batch: Batch) -> int:
        return batch.inputs.shape[0] // len(self.blocks)

    def _dp_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (ranks with other preference rows; cp ranks hold the same rows)."""
        mesh = self.parallel.mesh
        if mesh is not None and mesh.dims.dp > 1:
            dist.all_reduce(values, group=mesh.dp_mesh.get_group())
        return values

    def count_tokens(self, micro_batches: List[Batch]) -> int:
        local = torch.tensor(float(sum(self.rows_per_block(b) for b in micro_batches)), device=self.device)
        return int(self._dp_sum(local).item())

    def _add_metrics(self, metrics: Dict[str, torch.Tensor], rows: int) -> None:
        batch = id(self.current_batch())
        if batch in self._metrics_from:  # torch's schedules may compute micro-batch 0's loss twice in a first step
            return
        self._metrics_from.add(batch)
        for name, value in metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value.detach().double() * rows

    def _take_metrics(self, rows: int) -> Dict[str, float]:
        """Means over the step's rows. Every tp and cp rank of the last pipeline stage holds the same sums, the
        other stages zeros: sum over the world, divide by those copies and by the rows."""
        names = self.metric_names  # fixed, so ranks that computed none (earlier pipeline stages) join the reduce
        sums = torch.stack([torch.as_tensor(self._metric_sums.get(n, 0.0), device=self.device, dtype=torch.float64)
                            for n in names])
        self._metric_sums, self._metrics_from = {}, set()
        mesh = self.parallel.mesh
        if mesh is not None:
            dist.all_reduce(sums)
            sums /= mesh.dims.tp * mesh.dims.cp
        return {name: (value / max(1, rows)).item() for name, value in zip(names, sums)}

    def current_batch(self) -> Batch:
        """The micro-batch whose logits `micro_loss` has: the pipeline says which, else `_loss_sum` set it."""
        pipeline = self.parallel.pipeline
        return self._queue[pipeline.current_micro] if pipeline is not None else self._current

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        self._current = batch
        return super()._loss_sum(batch)

    def _forward_backward(self, micro_batches: List[Batch], total_tokens: int) -> torch.Tensor:
        self._queue, self.step_rows = list(micro_batches), total_tokens
        return super()._forward_backward(micro_batches, total_tokens)

    def train_step(self, micro_batches: List[Batch]) -> Dict[str, float]:
        metrics = super().train_step(micro_batches)
        metrics["pairs"] = metrics.pop("loss_tokens")
        metrics.update(self._take_metrics(metrics["pairs"]))
        return metrics

    @torch.no_grad()
    def eval_loss(self, micro_batches: List[Batch]) -> Tuple[float, int]:
        """(summed row loss, rows) over every data-parallel rank; the held-out metrics go to `eval_metrics`."""
        self.parallel.train(False)
        rows = self.count_tokens(micro_batches)
        self._queue, self.step_rows = list(micro_batches), rows
        total = self._dp_sum(self._forward_total(micro_batches))
        self.eval_metrics = self._take_metrics(rows)
        return total.item(), rows


class RewardTrainModule(PreferenceTrainModule):
    """Reward model (Llama 3 paper section 4.1.2): the scalar head's value at each response's last token, ranked
    edited > chosen > rejected with -log sigma(r_i - r_j) over the valid ordered pairs."""

    blocks = REWARD_BLOCKS
    metric_names = ("rewards/accuracies", "rewards/margins")
    fresh_parameters = ("output.weight",)  # a new head: never loaded from the language model it starts from

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mesh = self.parallel.mesh
        self.tp_group = mesh.tp_group if mesh is not None and mesh.dims.tp > 1 else None
        # under tp the one-row head is padded to tp rows; the real row lives on tp rank 0
        self.head_owner = self.tp_group is None or dist.get_rank(self.tp_group) == 0

    def rewards(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """logits [k*m, s, 1 (head shard)], mask [k*m, s] (the scored position) -> rewards [k*m] on every rank."""
        local = (logits[..., 0].float() * mask).sum(dim=1)  # [k*m]
        if not self.head_owner:
            local = local * 0.0  # a padding row of the head: contributes nothing, learns nothing
        return sum_rows(local, [g for g in (self.tp_group, self.cp_group) if g is not None])

    def micro_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = self.current_batch()
        m = self.rows_per_block(batch)
        rewards = self.rewards(logits, mask).view(len(self.blocks), m).t()  # [m, k], best first
        scored = mask.float().sum(dim=1)  # [k*m]: 1 where the sequence exists (an absent edited response: 0)
        valid = sum_rows(scored, [self.cp_group] if self.cp_group is not None else []).view(len(self.blocks), m)
        out = ranking_reward_loss(rewards, valid.t() > 0)
        self._add_metrics(out.metrics, m)
        return out.losses.sum()


class DPOTrainModule(PreferenceTrainModule):
    """DPO with Llama 3's changes (paper section 4.1.4): formatting tokens masked (align/preference.py), an NLL
    term on the chosen responses; the reference log-probs come from a table computed once (align/reference.py)."""

    blocks = DPO_BLOCKS
    metric_names = ("loss/dpo", "nll", "rewards/accuracies", "rewards/chosen", "rewards/margins", "rewards/rejected")

    def __init__(self, *args, align: AlignConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.align = align
        self.reference: Optional[torch.Tensor] = None  # [examples, 2]: summed log-probs of chosen, rejected
        self.collect: Optional[List[torch.Tensor]] = None  # set by align/reference.py: keep log-probs, no loss
        self.chosen_tokens = 0

    def row_logps(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
        """(summed log-probs [k*m], token counts [k*m]) of the masked targets, whole over tp and cp."""
        logps = torch.stack([-self.parallel.loss_sum(logits[r:r + 1], targets[r:r + 1], mask[r:r + 1])
                             for r in range(logits.shape[0])])  # [k*m], vocabulary shards summed inside
        counts = mask.float().sum(dim=1)
        groups = [self.cp_group] if self.cp_group is not None else []
        return sum_rows(logps, groups), sum_rows(counts, groups)

    def count_tokens(self, micro_batches: List[Batch]) -> int:
        """Rows of the step; also the step's chosen-token count over all ranks (the NLL term's denominator)."""
        chosen = sum(float(b.loss_mask[:self.rows_per_block(b)].sum()) for b in micro_batches)
        local = torch.tensor([float(sum(self.rows_per_block(b) for b in micro_batches)), chosen],
                             device=self.device, dtype=torch.float64)
        mesh = self.parallel.mesh
        if mesh is not None and mesh.data_ranks > 1:  # rows are repeated over cp, chosen tokens split over it
            dist.all_reduce(local, group=mesh.data_mesh.get_group())
            local[0] /= mesh.dims.cp
        self.chosen_tokens = int(local[1].item())
        return int(round(local[0].item()))

    def micro_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = self.current_batch()
        logps, counts = self.row_logps(logits, targets, mask)
        if self.collect is not None:
            self.collect.append(torch.stack([logps, counts]).detach())
            return logps.sum() * 0.0
        m = self.rows_per_block(batch)
        reference = self.reference[batch.sample_ids.to(self.reference.device)].to(logps.device)  # [m, 2]
        a = self.align
        loss, metrics = dpo_objective(policy_chosen=logps[:m], policy_rejected=logps[m:], ref_chosen=reference[:, 0],
                                      ref_rejected=reference[:, 1], chosen_count=counts[:m],
                                      rejected_count=counts[m:], beta=a.dpo_beta, loss_type=a.dpo_loss,
                                      label_smoothing=a.dpo_label_smoothing, nll_alpha=a.dpo_nll_alpha,
                                      sequences_total=self.step_rows, chosen_tokens_total=self.chosen_tokens)
        # loss/dpo and nll come normalized by the whole step (rows, chosen tokens); as per-row means of this
        # micro-batch they average (weighted by rows) back to the step's values
        for name in ("loss/dpo", "nll"):
            metrics[name] = metrics[name] * self.step_rows / m
        self._add_metrics(metrics, m)
        return loss * self.step_rows  # the engine divides the step's sum by its rows
