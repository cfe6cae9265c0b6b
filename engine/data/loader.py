"""Batches for a rank: which sample ids make up each optimizer step, sharded by data-parallel rank.

Step t consumes the global sample ids [t*G, (t+1)*G) of the blend, G = data.global_batch_size. Data-parallel rank
r of D takes the contiguous slice [r*G/D, (r+1)*G/D) of them and cuts it into micro-batches; under context
parallelism each cp rank keeps its zigzag share of every sequence. Tokens per optimizer
step therefore do not depend on the layout, and the union over ranks is the same set of samples in any layout.
The loader's state is the number of samples consumed; it restores exactly under any dp size.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from engine.config import DataConfig, DatasetConfig
from engine.data.dataset import BlendedDataset, PackedDataset, blend_of_usable
from engine.data.indexed import open_checked
from engine.data.skips import SkipReport
from engine.data.stages import StagedBlend
from parallel.context_parallel import shard_sequence


@dataclass
class Batch:
    """One micro-batch; every tensor is [b, s] except sample_ids [b]."""

    inputs: torch.Tensor  # token ids
    targets: torch.Tensor  # next-token ids
    loss_mask: torch.Tensor  # bool: this position counts in the loss
    position_ids: torch.Tensor  # 0..s-1, or restarting at 0 after each end-of-document token
    doc_ids: Optional[torch.Tensor]  # document index inside the packed sequence (None: no document mask)
    sample_ids: torch.Tensor  # global sample ids, for exactness checks across resumes
    num_tokens: int  # positions with loss, counted on the host (no device sync in the step)

    def shard_for_cp(self, cp: int, rank: int) -> "Batch":
        """This context-parallel rank's zigzag share of every sequence (parallel/context_parallel.py), positions
        and document ids included; sample ids are kept whole."""
        cut = (lambda t: None if t is None else shard_sequence(t, cp, rank))
        loss_mask = cut(self.loss_mask)
        return Batch(cut(self.inputs), cut(self.targets), loss_mask, cut(self.position_ids), cut(self.doc_ids),
                     self.sample_ids, int(loss_mask.sum()))

    def to(self, device: torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(*(move(getattr(self, f)) for f in ("inputs", "targets", "loss_mask", "position_ids",
                                                          "doc_ids")), self.sample_ids, self.num_tokens)


def collate(samples: np.ndarray, sample_ids: List[int], eod_id: int, document_mask: bool,
            eod_mask_loss: bool) -> Batch:
    """samples: [b, s+1] token ids -> a Batch with per-document position ids and document ids."""
    tokens = torch.from_numpy(samples)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # [b, s]
    is_eod = inputs == eod_id  # [b, s]
    loss_mask = ~is_eod if eod_mask_loss else torch.ones_like(is_eod)
    index = torch.arange(inputs.shape[1]).expand_as(inputs)
    position_ids, doc_ids = index.clone(), None
    if document_mask:
        doc_ids = torch.cumsum(is_eod, dim=1) - is_eod.long()  # the EOD token belongs to the document it ends
        starts = torch.zeros_like(is_eod)
        starts[:, 0] = True
        starts[:, 1:] = is_eod[:, :-1]
        position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    return Batch(inputs, targets, loss_mask, position_ids, doc_ids, torch.tensor(sample_ids, dtype=torch.int64),
                 int(loss_mask.sum()))


def build_blend(datasets: List[DatasetConfig], data: DataConfig, vocab_size: int, seed_offset: int = 0
                ) -> BlendedDataset:
    """Open each dataset, check its token ids against the model's vocab, and blend them. With
    data.on_bad_data=skip, documents holding ids outside the vocabulary are left out, and so is a whole pair that
    is truncated, corrupt, empty or shorter than one sample (the others keep their weights); each is counted in
    the blend's `skips`. A missing file, or nothing left to blend, is always an error."""
    packed, weights, skips = [], [], SkipReport()
    for i, ds in enumerate(datasets):
        seed = data.seed + 7919 * (i + seed_offset)
        dataset = open_checked(ds.path, vocab_size, data.on_bad_data, skips, lambda indexed, bad: PackedDataset(
            indexed, data.seq_len, seed=seed, skip_documents=bad))
        if dataset is None:
            continue
        packed.append(dataset)
        weights.append(ds.weight)
    blend = blend_of_usable(packed, weights, [ds.path for ds in datasets], skips)
    blend.skips = skips
    return blend


def distinct_samples(blend: BlendedDataset) -> int:
    """How many samples the blend yields before one of its datasets starts its next epoch (a sample read again):
    dataset d gives share w_d of the samples and holds samples_per_epoch_d."""
    return int(min(ds.samples_per_epoch / w for ds, w in zip(blend.datasets, blend.weights)))


def build_train_blend(data: DataConfig, vocab_size: int) -> "BlendedDataset | StagedBlend":
    """The training blend: data.train as above, or, with earlier recipe stages in data.stages, the staged blend in
    which every dataset's stream goes on where those stages left it (engine/data/stages.py)."""
    return StagedBlend(data, vocab_size) if data.stages else build_blend(data.train, data, vocab_size)


class StepLoader:
    """Yields, for each optimizer step, this rank's micro-batches; `state_dict` is the samples consumed."""

    def __init__(self, blend: "BlendedDataset | StagedBlend", data: DataConfig, eod_id: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, cp_rank: int = 0, cp_size: int = 1):
        self.blend, self.data, self.eod_id = blend, data, eod_id
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.per_rank = data.global_batch_size // dp_size
        self.consumed_samples = consumed_samples
        # what reading the data left out; build_data adds the validation data's, build_trainer reports it
        self.skips = blend.skips if isinstance(blend, (BlendedDataset, StagedBlend)) else SkipReport()
        self.notes: List[str] = []  # warning lines about the data for build_trainer to print

    def step_sample_ids(self, step_start: int) -> List[List[int]]:
        """This rank's micro-batches of sample ids for the step starting at global sample `step_start`."""
        first = step_start + self.dp_rank * self.per_rank
        mb = self.data.micro_batch_size
        return [list(range(first + m, first + m + mb)) for m in range(0, self.per_rank, mb)]

    def micro_batch(self, sample_ids: List[int]) -> Batch:
        samples = np.stack([self.blend[i] for i in sample_ids])  # [b, s+1]
        batch = collate(samples, sample_ids, self.eod_id, self.data.document_mask, self.data.eod_mask_loss)
        return batch.shard_for_cp(self.cp_size, self.cp_rank) if self.cp_size > 1 else batch

    def next_step(self) -> List[Batch]:
        batches = [self.micro_batch(ids) for ids in self.step_sample_ids(self.consumed_samples)]
        self.consumed_samples += self.data.global_batch_size
        return batches

    def fixed_micro_batches(self, count: int) -> List[Batch]:
        """`count` micro-batches from the start of the blend (the same every call: a fixed validation set)."""
        mb = self.data.micro_batch_size
        starts = [(k * self.dp_size + self.dp_rank) * mb for k in range(count)]
        return [self.micro_batch(list(range(start, start + mb))) for start in starts]

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
