"""Supervised fine-tuning data: chat samples packed into fixed-length rows with document masks, served by the
engine's step loader so that SFT is the pretraining step (engine/train_module.py LMTrainModule) on other batches.

Llama 3 paper section 4.1.3: SFT trains with the standard cross-entropy on the target tokens while masking the loss
on prompt tokens. Here a token is learned when align/chat.py marked it (assistant content and the <|eot_id|> that
ends it); a position's loss counts when its *target* is learned and belongs to the same sample as its input.

Packing: samples, in a seeded order, are laid one after another into rows of seq_len + 1 tokens (first fit in
order; a sample never spans two rows); a row's unused tail is padding with its own document id and no loss.
Document ids keep attention inside each sample and position ids restart at 0 per sample (the same mask the
pretraining loader builds from end-of-document tokens). Row k of epoch e is row perm_e[k] with a permutation
seeded by (seed, e), so step t consumes the same rows under any layout, as the pretraining loader does.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from engine.config import DataConfig
from engine.data.loader import Batch, StepLoader


@dataclass
class PackedRows:
    """Rows of seq_len + 1 tokens; every array is [rows, seq_len + 1]."""

    tokens: np.ndarray  # int64 token ids (padding: pad_id)
    learn: np.ndarray  # bool: the model must learn to produce this token
    doc: np.ndarray  # int64: sample index inside the row (padding gets one past the last sample)
    samples: int  # samples packed
    learn_tokens: int  # learned tokens over all rows


def pack_samples(samples: Sequence[Tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int,
                 seed: int) -> PackedRows:
    """(tokens, learn) samples of at most seq_len + 1 tokens each -> PackedRows, in a seeded sample order."""
    width = seq_len + 1
    order = np.random.default_rng(seed).permutation(len(samples))
    rows: List[List[int]] = []  # sample indices of each row
    used: List[int] = []
    for index in order:
        length = len(samples[index][0])
        if length > width:
            raise ValueError(f"sample {index} has {length} tokens, more than seq_len + 1 = {width}")
        if not rows or used[-1] + length > width:
            rows.append([])
            used.append(0)
        rows[-1].append(int(index))
        used[-1] += length
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    learn = np.zeros((len(rows), width), dtype=bool)
    doc = np.zeros((len(rows), width), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for d, index in enumerate(members):
            ids, marks = samples[index]
            tokens[r, at:at + len(ids)] = ids
            learn[r, at:at + len(ids)] = marks
            doc[r, at:at + len(ids)] = d
            at += len(ids)
        doc[r, at:] = len(members)  # the padding is a document of its own: nothing attends into it
    return PackedRows(tokens, learn, doc, len(samples), int(learn.sum()))


def collate_rows(rows: PackedRows, indices: Sequence[int], sample_ids: Sequence[int]) -> Batch:
    """Rows -> a Batch: inputs/targets shifted by one, loss where the target is learned in the input's sample."""
    tokens = torch.from_numpy(rows.tokens[list(indices)])  # [b, s + 1]
    learn = torch.from_numpy(rows.learn[list(indices)])
    doc = torch.from_numpy(rows.doc[list(indices)])
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # [b, s]
    doc_ids = doc[:, :-1].contiguous()  # [b, s]
    loss_mask = learn[:, 1:] & (doc[:, 1:] == doc_ids)  # the target is learned and in the same sample
    index = torch.arange(inputs.shape[1]).expand_as(inputs)
    starts = torch.ones_like(loss_mask)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    position_ids = index - torch.cummax(torch.where(starts, index, 0), dim=1).values  # 0 at each sample start
    return Batch(inputs, targets, loss_mask, position_ids, doc_ids, torch.tensor(list(sample_ids)),
                 int(loss_mask.sum()))


class EpochOrder:
    """Global sample id -> item index: epochs cycle over `count` items, each epoch in its own order seeded by
    (seed, epoch), so any layout maps step t to the same items (shared by the SFT and preference loaders)."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._orders: Dict[int, np.ndarray] = {}

    def __call__(self, sample_id: int) -> int:
        epoch, k = divmod(sample_id, self.count)
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a step spans at most two epochs; keep memory bounded
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return int(self._orders[epoch][k])


class SFTStepLoader(StepLoader):
    """The engine's StepLoader (dp sharding, micro-batches, cp zigzag, state) over packed SFT rows."""

    def __init__(self, rows: PackedRows, data: DataConfig, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, cp_rank: int = 0, cp_size: int = 1):
        if len(rows.tokens) == 0:
            raise ValueError("no SFT rows to train on")
        super().__init__(blend=None, data=data, eod_id=-1, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=consumed_samples, cp_rank=cp_rank, cp_size=cp_size)
        self.rows = rows
        self.row_of = EpochOrder(len(rows.tokens), data.seed)  # global sample id -> row

    def micro_batch(self, sample_ids: List[int]) -> Batch:
        batch = collate_rows(self.rows, [self.row_of(i) for i in sample_ids], sample_ids)
        return batch.shard_for_cp(self.cp_size, self.cp_rank) if self.cp_size > 1 else batch
