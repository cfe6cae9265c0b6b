"""Preference pairs as engine batches, for the reward model (align/reward.py) and DPO (align/dpo.py).

A micro-batch of m preference rows is k blocks of m sequences, one block per response, best first: [edited,
chosen, rejected] for the reward model (k = 3; a row without an edited response has an empty, all-padding edited
sequence; a file without any edited response leaves the block out, k = 2), [chosen, rejected] for DPO (k = 2). Every sequence is right-padded to data.seq_len and runs as one
causal sequence (no packing: padding after the last real token cannot change what comes before it). The
pipeline schedule stacks micro-batches along dim 0 and cuts them back, so the blocks stay together.

What counts where, in `loss_mask` [k*m, s]:
- reward model: the position of the response's last token (its <|eot_id|>), where the scalar head is read
  (Llama 3 paper section 4.1.2 trains the reward model on prompt + response);
- DPO: the positions whose next token is a response token other than a formatting token (section 4.1.4 masks
  header and termination tokens out of chosen and rejected).
"""

from typing import List, Optional, Sequence

import numpy as np
import torch

from engine.config import DataConfig
from engine.data.loader import Batch, StepLoader

from align.chat import ChatTokens
from align.formats import PreferenceExample
from align.sft import EpochOrder

REWARD_BLOCKS = ("edited", "chosen", "rejected")
DPO_BLOCKS = ("chosen", "rejected")


def _row(tokens: Sequence[int], width: int, pad_id: int) -> np.ndarray:
    row = np.full(width, pad_id, dtype=np.int64)
    row[:len(tokens)] = tokens
    return row


def reward_sequence(dialog: Optional[ChatTokens], seq_len: int, pad_id: int):
    """(inputs [s], score mask [s]): the whole dialog as input, scored at its last token."""
    mask = np.zeros(seq_len, dtype=bool)
    if dialog is None:
        return np.full(seq_len, pad_id, dtype=np.int64), mask
    if len(dialog.tokens) > seq_len:
        raise ValueError(f"a response of {len(dialog.tokens)} tokens does not fit data.seq_len={seq_len}")
    mask[len(dialog.tokens) - 1] = True
    return _row(dialog.tokens, seq_len, pad_id), mask


def dpo_sequence(dialog: ChatTokens, seq_len: int, pad_id: int):
    """(inputs [s], targets [s], mask [s]): next-token pairs; the mask keeps learned, non-formatting targets."""
    if len(dialog.tokens) > seq_len + 1:
        raise ValueError(f"a response of {len(dialog.tokens)} tokens does not fit data.seq_len + 1 = {seq_len + 1}")
    tokens = _row(dialog.tokens, seq_len + 1, pad_id)
    keep = np.array([learn and not special for learn, special in zip(dialog.learn, dialog.special)], dtype=bool)
    mask = np.zeros(seq_len + 1, dtype=bool)
    mask[:len(keep)] = keep
    return tokens[:-1], tokens[1:], mask[1:]


def preference_batch(examples: Sequence[PreferenceExample], sample_ids: Sequence[int], kind: str, seq_len: int,
                     pad_id: int, blocks: Sequence[str] = ()) -> Batch:
    """m examples -> one Batch of k*m sequences, block by block (see the module docstring)."""
    blocks = blocks or (REWARD_BLOCKS if kind == "rm" else DPO_BLOCKS)
    inputs, targets, masks = [], [], []
    for block in blocks:
        for example in examples:
            dialog = getattr(example, block)
            if kind == "rm":
                row, mask = reward_sequence(dialog, seq_len, pad_id)
                inputs.append(row)
                targets.append(np.zeros(seq_len, dtype=np.int64))  # unused: the head is read, not a token
            else:
                row, target, mask = dpo_sequence(dialog, seq_len, pad_id)
                inputs.append(row)
                targets.append(target)
            masks.append(mask)
    as_tensor = (lambda rows: torch.from_numpy(np.stack(rows)))
    loss_mask = as_tensor(masks)
    position_ids = torch.arange(seq_len).expand(len(inputs), seq_len).contiguous()
    return Batch(as_tensor(inputs), as_tensor(targets), loss_mask, position_ids, None,
                 torch.tensor(list(sample_ids), dtype=torch.int64), int(loss_mask.sum()))


class PreferenceStepLoader(StepLoader):
    """The engine's StepLoader (dp sharding, micro-batches, cp zigzag, consumed-samples state) over preference
    rows: global sample id i is example perm_e[i mod n] of epoch e = i // n, each epoch in its own seeded order.
    `sample_ids` of a batch are example indices plus `id_offset` (what the DPO reference table is keyed by)."""

    def __init__(self, examples: List[PreferenceExample], kind: str, pad_id: int, data: DataConfig,
                 dp_rank: int = 0, dp_size: int = 1, cp_rank: int = 0, cp_size: int = 1, id_offset: int = 0):
        if not examples:
            raise ValueError("no preference rows to train on")
        super().__init__(blend=None, data=data, eod_id=pad_id, dp_rank=dp_rank, dp_size=dp_size,
                         cp_rank=cp_rank, cp_size=cp_size)
        self.examples, self.kind, self.pad_id = examples, kind, pad_id
        # a reward-model file without any edited response leaves out the (all-padding) edited block: 1/3 less work
        with_edits = kind == "rm" and any(e.edited is not None for e in examples)
        self.blocks = REWARD_BLOCKS if with_edits else DPO_BLOCKS
        self.id_offset = id_offset  # added to batch sample ids: held-out rows follow the training rows in one table
        self.held_out: Optional["PreferenceStepLoader"] = None  # the validation loader, for DPO's reference table
        self.example_of = EpochOrder(len(examples), data.seed)  # global sample id -> example

    @property
    def sequences_per_sample(self) -> int:
        """Sequences one preference row runs as (the engine counts tokens per step with it)."""
        return len(self.blocks)

    def batch_of_examples(self, indices: Sequence[int]) -> Batch:
        batch = preference_batch([self.examples[i] for i in indices], [i + self.id_offset for i in indices],
                                 self.kind, self.data.seq_len, self.pad_id, self.blocks)
        return batch.shard_for_cp(self.cp_size, self.cp_rank) if self.cp_size > 1 else batch

    def micro_batch(self, sample_ids: List[int]) -> Batch:
        return self.batch_of_examples([self.example_of(i) for i in sample_ids])

    def fixed_micro_batches(self, count: int) -> List[Batch]:
        """`count` micro-batches of this rank's share of the first examples, in file order (a fixed held-out
        set, the same under any layout)."""
        mb = self.data.micro_batch_size
        starts = [(k * self.dp_size + self.dp_rank) * mb for k in range(count)]
        return [self.batch_of_examples([i % len(self.examples) for i in range(s, s + mb)]) for s in starts]
