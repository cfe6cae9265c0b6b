"""The training data of a recipe whose stages change the sequence length and the blend: one stream per dataset
that goes on exactly where it stopped.

A recipe (issue 18; Llama 3's pretraining, shared/LLAMA3.md) runs stages, each a normal training job. Stage j
starts at global sample `start_j` and trains on its own blend at its own data.seq_len L_j; the loader's state
stays one number, the global samples consumed (engine/data/loader.py). Stage j's sample g (start_j <= g <
start_{j+1}) is its blend's sample g - start_j: an exact-proportion BlendedDataset over the stage's datasets,
whose k-th sample of dataset P is the next sample of P's own stream. Global batch size does not enter: a step
consumes consecutive global ids whatever its size.

P's stream (P is identified by its path, so it continues across stages whatever its weight, index or absence in
between; its shuffling seed is data.seed + 7919 * i, i the order of its first appearance over the stages, which
is build_blend's seed for the first stage) is epochs of its documents, shuffled and concatenated exactly as
PackedDataset does. An epoch is consumed in *cuts*. The first cut is today's PackedDataset epoch: input
positions [0, T - 1) (the epoch's last token is only ever a target) cut into samples of L tokens, visited in a
shuffled order. When L changes in the middle of an epoch, the input positions not yet consumed (the unvisited
samples and the short tail, as sorted disjoint intervals) are concatenated, cut into samples of the new length
and visited in a new shuffled order (seeded by (seed, epoch, cut number)): cut k+1 is made of what cut k left.
When a cut is exhausted at the same L, the next epoch starts with a fresh first cut.

What "exact" means (tests/unit/test_data_stages.py checks every clause on a whole recipe):

1. No input position of P's stream is an input twice: each token of each epoch is trained on at most once.
2. Epochs are consumed in order and completely, except a remainder shorter than one sample at the length in
   force when the epoch ran out (PackedDataset's tail, or what is left of a recut), plus the epoch's last token,
   which is only a target.
3. Consecutive samples overlap by one token, as in Megatron: a sample's last token is its last input's
   target and may be another sample's input; it is never an input twice.
4. Every target is its input's true successor in the epoch stream, except inside a recut sample that spans a
   gap between two unconsumed intervals: there the last input before the gap predicts the first input after
   it, one such target per gap spanned (document masking sees the two pieces as one document unless an
   end-of-document token lies between them). A sample that ends exactly at a gap still gets the true successor
   as its last target.

A dataset that leaves the blend keeps its place and resumes there when it comes back, at whatever length.
data.seed and data.on_bad_data apply to every stage (the recipe keeps them fixed). Blend proportions inside a
stage are BlendedDataset's (exact to one sample per block of 10,000).

The setup replays the earlier stages once with numpy index arrays (O(samples per epoch) per length change,
Megatron-style); a lookup is then a few array reads.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from engine.config import DataConfig, DatasetConfig
from engine.data.dataset import BlendedDataset, PackedDataset, blend_of_usable, read_stream
from engine.data.indexed import BadShard, IndexedDataset, open_checked
from engine.data.skips import SkipReport
from engine.errors import DataError


@dataclass
class Cut:
    """(What is left of) one epoch of a dataset cut into samples of seq_len input tokens, visited in a shuffled
    order. The cut covers the input intervals [starts[i], ends[i]) of the epoch stream (sorted, disjoint);
    concatenated, they form a virtual stream in which interval i begins at virtual[i]."""

    epoch: int
    number: int  # 0: the epoch's first cut (PackedDataset's); k: made by the k-th length change in the epoch
    seq_len: int
    starts: np.ndarray  # [m] int64
    ends: np.ndarray  # [m] int64
    virtual: np.ndarray  # [m + 1] int64: cumulative interval lengths
    visit: np.ndarray  # [n] sample indices in visiting order
    documents: np.ndarray  # [n_docs] the epoch's document order
    offsets: np.ndarray  # [n_docs + 1] stream position of each document's first token

    @property
    def samples(self) -> int:
        return len(self.visit)

    def sample(self, indexed: IndexedDataset, j: int) -> np.ndarray:
        """Tokens [seq_len + 1] of the j-th visited sample: its inputs, read interval by interval, then the true
        successor of its last input (clause 4: a gap at the sample's end costs nothing)."""
        v = int(self.visit[j]) * self.seq_len
        k = int(np.searchsorted(self.virtual, v, side="right")) - 1
        pieces, need = [], self.seq_len
        while need:
            begin = int(self.starts[k]) + v - int(self.virtual[k])
            take = min(need, int(self.ends[k]) - begin)
            last = take == need  # this piece holds the last input: read its successor too
            pieces.append(read_stream(indexed, self.documents, self.offsets, begin, begin + take + last))
            need, v, k = need - take, v + take, k + 1
        return np.concatenate(pieces)

    def unconsumed(self, used: int) -> Tuple[np.ndarray, np.ndarray]:
        """Input intervals (starts [m'], ends [m']) of the epoch stream that the first `used` visited samples
        left: the unvisited samples and the tail after the last whole sample, mapped back from virtual
        positions to stream positions."""
        n, length = self.samples, self.seq_len
        left = np.ones(n, dtype=bool)
        left[self.visit[:used]] = False
        index = np.flatnonzero(left)  # sorted unvisited sample indices
        breaks = np.flatnonzero(np.diff(index) != 1)  # runs of consecutive indices are one interval
        firsts = index[np.r_[0, breaks + 1]] if len(index) else index
        lasts = index[np.r_[breaks, len(index) - 1]] if len(index) else index
        v_starts, v_ends = firsts.astype(np.int64) * length, (lasts.astype(np.int64) + 1) * length
        total = int(self.virtual[-1])
        if total > n * length:  # the tail shorter than one sample joins the last run when adjacent
            if len(v_ends) and v_ends[-1] == n * length:
                v_ends[-1] = total
            else:
                v_starts, v_ends = np.append(v_starts, n * length), np.append(v_ends, total)
        return self._to_stream(v_starts, v_ends)

    def _to_stream(self, v_starts: np.ndarray, v_ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Virtual intervals -> stream intervals: split at this cut's interval boundaries, shift, merge."""
        if not len(v_starts):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        points = np.sort(np.concatenate([v_starts, v_ends, self.virtual[1:-1]]))
        points = points[np.r_[True, points[1:] != points[:-1]]]  # distinct (np.unique hashes: slower here)
        lo, hi = points[:-1], points[1:]
        owner = np.searchsorted(v_starts, lo, side="right") - 1
        keep = (owner >= 0) & (lo < v_ends[np.maximum(owner, 0)])
        lo, hi = lo[keep], hi[keep]
        k = np.searchsorted(self.virtual, lo, side="right") - 1
        starts = self.starts[k] + (lo - self.virtual[k])
        ends = starts + (hi - lo)
        joined = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # pieces that touch are one interval
        return starts[np.r_[0, joined]], ends[np.r_[joined - 1, len(ends) - 1]]


def first_cut(packed: PackedDataset, epoch: int) -> Cut:
    """PackedDataset's own epoch as a cut: inputs [0, T - 1), its sample order."""
    documents, offsets, visit = packed._epoch(epoch)
    total = packed.tokens_per_epoch - 1
    return Cut(epoch, 0, packed.seq_len, np.array([0], dtype=np.int64), np.array([total], dtype=np.int64),
               np.array([0, total], dtype=np.int64), visit, documents, offsets)


def recut(cut: Cut, used: int, seq_len: int, seed: int) -> Optional[Cut]:
    """What `cut` left after `used` samples, cut into samples of seq_len, in a new shuffled order; None when less
    than one sample is left (clause 2: the epoch is over)."""
    starts, ends = cut.unconsumed(used)
    virtual = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=virtual[1:])
    samples = int(virtual[-1]) // seq_len
    if samples < 1:
        return None
    number = cut.number + 1
    visit = np.random.default_rng([seed, cut.epoch, number]).permutation(samples)
    return Cut(cut.epoch, number, seq_len, starts, ends, virtual, visit, cut.documents, cut.offsets)


class StageRun:
    """One dataset's samples in one stage: what is left of its current cut (the head), then fresh epochs of
    PackedDataset at the stage's seq_len. Item k is the dataset's k-th sample in the stage."""

    def __init__(self, packed: PackedDataset, head: Optional[Cut], head_used: int, next_epoch: int):
        self.packed, self.head, self.head_used, self.next_epoch = packed, head, head_used, next_epoch
        self.head_left = head.samples - head_used if head is not None else 0

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if k < self.head_left:
            return self.head.sample(self.packed.indexed, self.head_used + k)
        return self.packed[self.next_epoch * self.packed.samples_per_epoch + k - self.head_left]

    def state_after(self, count: int) -> Optional[Tuple[Cut, int]]:
        """(current cut, samples of it used) once the stage has taken `count` samples; None if nothing yet."""
        if count <= self.head_left:
            return (self.head, self.head_used + count) if self.head is not None else None
        fresh, per_epoch = count - self.head_left, self.packed.samples_per_epoch
        epoch, used = divmod(fresh, per_epoch)
        if used == 0:  # the last epoch it reached is exactly used up
            epoch, used = epoch - 1, per_epoch
        return first_cut(self.packed, self.next_epoch + epoch), used


class DatasetStream:
    """One dataset (one path) through the recipe: its PackedDataset at each length and its position."""

    def __init__(self, indexed: IndexedDataset, seed: int, skip_documents: Sequence[int]):
        self.indexed, self.seed, self.skip_documents = indexed, seed, skip_documents
        self._packed: Dict[int, PackedDataset] = {}
        self.state: Optional[Tuple[Cut, int]] = None  # (current cut, samples of it used)

    def packed(self, seq_len: int) -> PackedDataset:
        """PackedDataset at seq_len (BadShard when the dataset holds less than one such sample)."""
        if seq_len not in self._packed:
            self._packed[seq_len] = PackedDataset(self.indexed, seq_len, self.seed, self.skip_documents)
        return self._packed[seq_len]

    def continue_at(self, seq_len: int, count: Optional[int]) -> StageRun:
        """The dataset's samples in the next stage it is part of (seq_len); `count` samples are taken there
        (None: the current stage, unbounded)."""
        packed = self.packed(seq_len)
        head, head_used, next_epoch = None, 0, 0
        if self.state is not None:
            cut, used = self.state
            next_epoch = cut.epoch + 1
            if cut.seq_len == seq_len:
                head, head_used = cut, used
            else:
                head = recut(cut, used, seq_len, self.seed)
        run = StageRun(packed, head, head_used, next_epoch)
        if count is not None:
            self.state = run.state_after(count) or self.state
        return run


def _prefix_counts(blend: BlendedDataset, length: int) -> np.ndarray:
    """Samples of each dataset among the blend's first `length` ids: [n_datasets]."""
    whole, part = divmod(length, blend.block)
    counts = whole * blend.counts
    return counts + np.bincount(blend.block_dataset[:part], minlength=len(blend.counts))


class StagedBlend:
    """Global sample id -> tokens [seq_len + 1] over every stage of a recipe: data.stages (the earlier ones, each
    bounded by the next one's start) then the current stage (data.train at data.seq_len from
    data.stage_start_sample on). Built from the DataConfig alone; the earlier stages are replayed once."""

    def __init__(self, data: DataConfig, vocab_size: int):
        stages = [(s.start_sample, s.seq_len, s.train) for s in data.stages]
        stages.append((data.stage_start_sample, data.seq_len, data.train))
        self.starts = np.array([start for start, _, _ in stages], dtype=np.int64)  # [n_stages]
        self.skips = SkipReport()  # what reading the datasets left out, each file counted once
        streams = _open_streams([ds.path for _, _, train in stages for ds in train], data, vocab_size, self.skips)
        self.blends: List[BlendedDataset] = []
        too_short = set()
        for j, (start, seq_len, train) in enumerate(stages):
            length = int(self.starts[j + 1] - start) if j + 1 < len(stages) else None
            self.blends.append(_stage_blend(train, seq_len, length, streams, data, too_short, self.skips))

    def locate(self, sample_id: int) -> Tuple[int, int]:
        """(stage, id inside the stage's blend) of a global sample id."""
        stage = int(np.searchsorted(self.starts, sample_id, side="right")) - 1
        if stage < 0:
            raise DataError(f"sample {sample_id} lies before the recipe's first stage (sample {self.starts[0]})")
        return stage, int(sample_id) - int(self.starts[stage])

    def __getitem__(self, sample_id: int) -> np.ndarray:
        stage, local = self.locate(sample_id)
        return self.blends[stage][local]


def _stream_key(path: str) -> str:
    """The stream's identity: its path, spelled either way ("./a" is "a"; as engine/config.py compares them)."""
    return str(Path(path))


def _open_streams(paths: List[str], data: DataConfig, vocab_size: int, skips: SkipReport
                  ) -> Dict[str, Optional[DatasetStream]]:
    """Each distinct path once, in order of first appearance (its seed index, build_blend's for the first
    stage), its vocabulary checked; None for a pair that data.on_bad_data=skip leaves out."""
    streams: Dict[str, Optional[DatasetStream]] = {}
    for path in paths:
        key = _stream_key(path)
        if key in streams:
            continue
        seed = data.seed + 7919 * len(streams)
        streams[key] = open_checked(path, vocab_size, data.on_bad_data, skips,
                                    lambda indexed, bad: DatasetStream(indexed, seed, bad))
    return streams


def _stage_blend(train: List[DatasetConfig], seq_len: int, length: Optional[int],
                 streams: Dict[str, Optional[DatasetStream]], data: DataConfig, too_short: set,
                 skips: SkipReport) -> BlendedDataset:
    """One stage's exact-proportion blend over its usable datasets, each continuing its stream; `length` is
    the stage's sample count (None: the current stage). Advances every member's stream past the stage."""
    members, weights = [], []
    for ds in train:
        stream = streams[_stream_key(ds.path)]
        if stream is None:
            continue
        try:
            stream.packed(seq_len)
        except BadShard as e:  # fewer tokens than one sample of this length
            if data.on_bad_data != "skip":
                raise
            if (ds.path, seq_len) not in too_short:
                too_short.add((ds.path, seq_len))
                skips.add(e.reason, ds.path, places=[str(e)])
            continue
        members.append(stream)
        weights.append(ds.weight)
    blend = blend_of_usable(members, weights, [ds.path for ds in train], skips, f" at seq_len {seq_len}")
    counts = _prefix_counts(blend, length) if length is not None else [None] * len(members)
    blend.datasets = [stream.continue_at(seq_len, None if count is None else int(count))
                      for stream, count in zip(members, counts)]
    return blend
