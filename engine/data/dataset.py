"""Packed fixed-length samples from indexed documents, and deterministic weighted blends of several datasets.

Every sample is addressed by an integer id and computed from (seed, id) alone, with no iteration state: the
loader's whole state is one number (samples consumed), so a resume, or a resume at another data-parallel size,
continues exactly (no duplicate, no skipped sample).
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np

from engine.data.indexed import BadShard, IndexedDataset
from engine.data.skips import SkipReport
from engine.errors import DataError


class PackedDataset:
    """Documents concatenated in a shuffled order and cut into samples of seq_len + 1 tokens.

    Epoch e shuffles the documents with a generator seeded by (seed, e), concatenates them (each ends with its
    end-of-document token) and cuts the stream into samples of seq_len + 1 tokens (inputs plus shifted targets;
    consecutive samples overlap by one token, as in Megatron). The samples of the epoch are then visited in a
    second shuffled order. Sample id i lies in epoch i // samples_per_epoch, so ids go on past one epoch.
    """

    def __init__(self, indexed: IndexedDataset, seq_len: int, seed: int, skip_documents: Sequence[int] = ()):
        self.indexed, self.seq_len, self.seed = indexed, seq_len, seed
        keep = np.ones(len(indexed), dtype=bool)
        keep[np.asarray(skip_documents, dtype=np.int64)] = False
        self.documents = np.flatnonzero(keep)  # [n_docs]
        self.tokens_per_epoch = int(indexed.sizes[self.documents].sum(dtype=np.int64))
        self.samples_per_epoch = (self.tokens_per_epoch - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise BadShard(f"{indexed.bin_path}: {self.tokens_per_epoch} tokens"
                           f"{' left' if len(skip_documents) else ''}, fewer than one sample of "
                           f"data.seq_len + 1 = {seq_len + 1}", "shard_too_short")
        self._epochs: Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, cumulative token offsets, sample order) of one epoch; the last two are cached."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.documents)  # [n_docs]
            offsets = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.indexed.sizes[order], out=offsets[1:])
            sample_order = rng.permutation(self.samples_per_epoch)
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, offsets, sample_order)
        return self._epochs[epoch]

    def __getitem__(self, sample_id: int) -> np.ndarray:
        """Tokens [seq_len + 1] (int64) of one sample."""
        epoch, within = divmod(int(sample_id), self.samples_per_epoch)
        order, offsets, sample_order = self._epoch(epoch)
        start = int(sample_order[within]) * self.seq_len
        return read_stream(self.indexed, order, offsets, start, start + self.seq_len + 1)


def read_stream(indexed: IndexedDataset, order: np.ndarray, offsets: np.ndarray, start: int, end: int
                ) -> np.ndarray:
    """Tokens [end - start] (int64) at positions [start, end) of an epoch's stream: the documents `order`
    concatenated, document k starting at position offsets[k]."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    pieces, position, doc = [], start, first
    while position < end:
        tokens = indexed[int(order[doc])]
        local = position - int(offsets[doc])
        take = tokens[local:local + end - position]
        pieces.append(take)
        position += len(take)
        doc += 1
    return np.concatenate(pieces).astype(np.int64)


class BlendedDataset:
    """A weighted mix of datasets with exact proportions and O(1) lookup of any sample id.

    Sample ids are grouped in blocks of `block` samples. Each block holds the same number of samples of each
    dataset (weights rounded by largest remainder, so proportions are exact to 1 / block) spread evenly through
    the block (stride scheduling: dataset d's k-th sample sits at key (k + 0.5) / count_d). Block b's k-th
    sample of dataset d is that dataset's sample b * count_d + k.
    """

    def __init__(self, datasets: List[PackedDataset], weights: List[float], block: int = 10_000):
        if len(datasets) != len(weights) or not datasets:
            raise DataError("a blend needs one positive weight per dataset")
        self.datasets = datasets
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        counts = np.floor(w * block).astype(np.int64)
        remainder_order = np.argsort(-(w * block - counts), kind="stable")
        counts[remainder_order[:block - counts.sum()]] += 1
        if (counts == 0).any():
            raise DataError(f"blend weight {float(w[np.argmin(counts)]):.2e} is too small to draw any sample")
        self.block, self.counts, self.weights = block, counts, w
        keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        owners = np.concatenate([np.full(c, d) for d, c in enumerate(counts)])
        ranks = np.concatenate([np.arange(c) for c in counts])
        order = np.lexsort((owners, keys))
        self.block_dataset, self.block_rank = owners[order], ranks[order]  # [block] each
        self.skips = SkipReport()  # what reading the datasets left out (engine/data/loader.py build_blend)

    def locate(self, sample_id: int) -> Tuple[int, int]:
        """(dataset index, that dataset's sample id) of a blended sample id."""
        block, pos = divmod(int(sample_id), self.block)
        d = int(self.block_dataset[pos])
        return d, block * int(self.counts[d]) + int(self.block_rank[pos])

    def __getitem__(self, sample_id: int) -> np.ndarray:
        d, local = self.locate(sample_id)
        return self.datasets[d][local]


def blend_of_usable(datasets: List, weights: List[float], paths: Sequence[str], skips: SkipReport,
                    where: str = "") -> BlendedDataset:
    """The blend of the datasets that data.on_bad_data=skip left usable; with none left, the one error naming
    every path of the blend (`where`: " at seq_len L" for a recipe stage's) and what was skipped."""
    if not datasets:
        raise DataError(f"no usable data in {', '.join(paths)}{where}: every dataset was left out under "
                        f"data.on_bad_data=skip ({skips.summary()})")
    return BlendedDataset(datasets, weights)
