"""The staged data stream (engine/data/stages.py): a recipe whose stages change the sequence length, the batch and
the blend consumes every dataset's token stream exactly, as the module docstring states it."""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from engine.config import DataConfig, DatasetConfig, DataStageConfig, load_config
from engine.data.dataset import BlendedDataset, PackedDataset
from engine.data.indexed import IndexedDataset, IndexedWriter
from engine.data.loader import StepLoader, build_blend, build_train_blend
from engine.data.stages import StagedBlend, first_cut, recut
from engine.errors import ConfigError, DataError

VOCAB = 1 << 20
TOKENS_PER_DATASET = 100_000  # dataset d's file position p holds token d * TOKENS_PER_DATASET + p: unique ids
EOD = VOCAB - 1  # never in the data: collate sees one long document


@dataclass
class Stage:
    seq_len: int
    global_batch: int
    steps: int
    blend: Dict[str, float]  # dataset name -> weight


# seq_len 32 -> 64 -> 48 -> 32 with each change mid-epoch, batch 4 -> 8 -> 4 -> 8, weights 0.5/0.5 -> 0.9/0.1,
# C joins at stage 2, B leaves at stage 3 and comes back at stage 4 (its stream recut 32 -> 64 -> 32)
RECIPE = [Stage(32, 4, 10, {"A": 0.5, "B": 0.5}),
          Stage(32, 8, 8, {"A": 0.9, "B": 0.1}),
          Stage(64, 8, 6, {"A": 0.5, "B": 0.2, "C": 0.3}),
          Stage(48, 4, 8, {"A": 0.5, "C": 0.5}),
          Stage(32, 8, 8, {"A": 0.3, "B": 0.7})]
DOCUMENTS = {"A": 30, "B": 25, "C": 20}


def write_dataset(prefix: Path, index: int, documents: int, seed: int) -> None:
    sizes = np.random.default_rng(seed).integers(20, 120, size=documents)
    writer, position = IndexedWriter(str(prefix), np.int32), index * TOKENS_PER_DATASET
    for size in sizes:
        writer.add_document(np.arange(position, position + size))
        position += int(size)
    writer.finalize()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("stages")
    for index, (name, documents) in enumerate(DOCUMENTS.items()):
        write_dataset(root / name, index, documents, seed=index)
    return {name: str(root / name) for name in DOCUMENTS}


def stage_starts(recipe: List[Stage]) -> List[int]:
    starts = [0]
    for stage in recipe[:-1]:
        starts.append(starts[-1] + stage.steps * stage.global_batch)
    return starts


def stage_config(corpus: Dict[str, str], k: int, recipe: List[Stage] = RECIPE, **extra) -> DataConfig:
    """Stage k's data config as the recipe runner writes it: the earlier stages in data.stages."""
    starts = stage_starts(recipe)
    blend = (lambda stage: [DatasetConfig(path=corpus[n], weight=w) for n, w in stage.blend.items()])
    earlier = [DataStageConfig(start_sample=starts[j], seq_len=recipe[j].seq_len, train=blend(recipe[j]))
               for j in range(k)]
    stage = recipe[k]
    return DataConfig(train=blend(stage), seq_len=stage.seq_len, micro_batch_size=stage.global_batch // 2,
                      global_batch_size=stage.global_batch, seed=17, stages=earlier,
                      stage_start_sample=starts[k], **extra)


def run_recipe(corpus: Dict[str, str], recipe: List[Stage] = RECIPE) -> List[Tuple[int, np.ndarray]]:
    """(global sample id, tokens) of every sample the recipe trains on, each stage read by its own job's
    loader from its own config, as the recipe runner runs them."""
    consumed, out = [], 0
    for k, stage in enumerate(recipe):
        data = stage_config(corpus, k, recipe)
        loader = StepLoader(build_train_blend(data, VOCAB), data, EOD, consumed_samples=stage_starts(recipe)[k])
        for _ in range(stage.steps):
            for batch in loader.next_step():
                tokens = np.concatenate([batch.inputs.numpy(), batch.targets.numpy()[:, -1:]], axis=1)
                consumed += list(zip(batch.sample_ids.tolist(), tokens))
        out = loader.consumed_samples
    assert out == sum(s.steps * s.global_batch for s in recipe)
    return consumed


class StreamOracle:
    """One dataset's epochs as PackedDataset orders them (seed by first appearance), and what was consumed."""

    def __init__(self, path: str, seed: int):
        self.indexed = IndexedDataset(path)
        self.packed = PackedDataset(self.indexed, 8, seed)  # any length: the document order does not use it
        self.file_starts = self.indexed.pointers // 4  # int32 tokens
        self.tokens = int(self.indexed.total_tokens)
        self.epoch, self.used = 0, np.zeros(self.tokens, dtype=bool)
        self.completed, self.glued_targets = 0, 0

    def positions(self, tokens: np.ndarray, epoch: int) -> np.ndarray:
        """Stream positions [len] of the given tokens in `epoch`."""
        file_position = tokens % TOKENS_PER_DATASET
        doc = np.searchsorted(self.file_starts, file_position, side="right") - 1
        order, offsets, _ = self.packed._epoch(epoch)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return offsets[rank[doc]] + file_position - self.file_starts[doc]

    def consume(self, tokens: np.ndarray) -> None:
        """Check one sample [L + 1] against the module's clauses and mark its inputs consumed."""
        length = len(tokens) - 1
        position = self.positions(tokens, self.epoch)
        if self.used[position[:-1]].any():  # this epoch ran out: the sample opens the next one (clause 2)
            left = int((~self.used[:self.tokens - 1]).sum())
            assert left < length, f"epoch {self.epoch} ended with {left} input tokens unconsumed (>= {length})"
            self.epoch, self.completed = self.epoch + 1, self.completed + 1
            self.used[:] = False
            position = self.positions(tokens, self.epoch)
        inputs, targets = position[:-1], position[1:]
        assert not self.used[inputs].any(), "an input token trained on twice (clause 1)"
        assert (inputs < self.tokens - 1).all(), "the epoch's last token is only a target"
        assert targets[-1] == inputs[-1] + 1, "the last target is the true successor (clause 4)"
        for i in np.flatnonzero(targets != inputs + 1):  # a gap between unconsumed intervals (clause 4)
            assert targets[i] > inputs[i] + 1 and self.used[inputs[i] + 1:targets[i]].all(), \
                f"input {inputs[i]} predicts {targets[i]}: neither its successor nor across consumed tokens"
            self.glued_targets += 1
        self.used[inputs] = True


def trace(corpus: Dict[str, str], consumed: List[Tuple[int, np.ndarray]]) -> Dict[str, StreamOracle]:
    order = list(dict.fromkeys(n for stage in RECIPE for n in stage.blend))  # first appearance
    oracles = {n: StreamOracle(corpus[n], 17 + 7919 * i) for i, n in enumerate(order)}
    for _, tokens in sorted(consumed, key=lambda item: item[0]):
        owner = "ABC"[int(tokens[0]) // TOKENS_PER_DATASET]
        assert (tokens // TOKENS_PER_DATASET == "ABC".index(owner)).all(), "a sample mixes datasets"
        oracles[owner].consume(tokens)
    return oracles


def test_recipe_consumes_every_dataset_stream_exactly(corpus):
    consumed = run_recipe(corpus)
    ids = [i for i, _ in consumed]
    assert sorted(ids) == list(range(len(ids)))  # the loader's side: every global id once
    lengths = {stage.seq_len for stage in RECIPE}
    assert {len(t) - 1 for _, t in consumed} == lengths
    oracles = trace(corpus, consumed)
    # the recipe really exercises the hard cases: epochs completed, recut samples spanning gaps
    assert oracles["A"].completed >= 2 and oracles["B"].completed >= 1
    assert sum(o.glued_targets for o in oracles.values()) > 0
    final = StagedBlend(stage_config(corpus, len(RECIPE) - 1), VOCAB)  # length changes composed in one epoch:
    a_at_48, b_back_at_32 = final.blends[3].datasets[0].head, final.blends[4].datasets[1].head
    assert (a_at_48.number, a_at_48.seq_len) == (2, 48)  # A: 32 -> 64 -> 48 inside its second epoch
    assert (b_back_at_32.number, b_back_at_32.seq_len) == (2, 32)  # B: 32 -> 64, away, back at 32
    # every stage drew its datasets in its own proportions (exact to one sample per block)
    starts = stage_starts(RECIPE) + [len(ids)]
    for k, stage in enumerate(RECIPE):
        owners = [int(t[0]) // TOKENS_PER_DATASET for i, t in consumed if starts[k] <= i < starts[k + 1]]
        total = sum(stage.blend.values())
        for name, weight in stage.blend.items():
            share = owners.count("ABC".index(name))
            assert abs(share - weight / total * len(owners)) <= 1, (k, name, share)


def test_unconsumed_and_consumed_partition_each_cut(corpus):
    """Clauses 1-2 at the level of one cut: the inputs of the visited samples and the intervals left over cover
    the cut exactly, tail included, through a first cut and a recut of it (what `recut` feeds on)."""
    oracle = StreamOracle(corpus["A"], seed=5)
    packed = PackedDataset(oracle.indexed, 32, seed=5)
    cut = first_cut(packed, epoch=1)
    for length, used in ((48, 23), (40, 9)):
        covered = np.zeros(oracle.tokens, dtype=np.int64)
        for a, b in zip(cut.starts, cut.ends):
            covered[a:b] += 1
        starts, ends = cut.unconsumed(used)
        for a, b in zip(starts, ends):
            covered[a:b] -= 1
        for j in range(used):
            covered[oracle.positions(cut.sample(oracle.indexed, j), epoch=1)[:-1]] -= 1
        assert not covered.any()  # every covered position once: visited or left, never both, never lost
        assert (ends[:-1] < starts[1:]).all()  # sorted, disjoint, not touching: real gaps only
        cut = recut(cut, used, length, seed=5)
        assert cut.number >= 1 and cut.samples == int((ends - starts).sum()) // length


def test_first_stage_is_todays_blend_bitwise(corpus):
    """A recipe's first stage, seen from any later stage's config, is today's non-staged blend, sample for
    sample over several epochs (same seeds, same order)."""
    recipe = [Stage(32, 4, 80, {"A": 0.5, "B": 0.5}), Stage(64, 8, 2, {"A": 1.0})]
    later = StagedBlend(stage_config(corpus, 1, recipe), VOCAB)
    today = DataConfig(train=stage_config(corpus, 0, recipe).train, seq_len=32, seed=17)
    plain = build_blend(today.train, today, VOCAB)
    assert isinstance(build_train_blend(today, VOCAB), BlendedDataset)  # no stages: today's code path
    for i in range(320):  # A's epoch holds 67 samples of 32: this crosses two of its epochs
        np.testing.assert_array_equal(later[i], plain[i])
        assert later[i].dtype == plain[i].dtype


def test_later_stages_replay_the_earlier_ones(corpus):
    """The last stage's blend rebuilds every earlier stage's samples as that stage's own job produced them."""
    starts = stage_starts(RECIPE)
    last = StagedBlend(stage_config(corpus, len(RECIPE) - 1), VOCAB)
    for k in range(len(RECIPE) - 1):
        own = StagedBlend(stage_config(corpus, k), VOCAB) if k else build_train_blend(stage_config(corpus, 0),
                                                                                     VOCAB)
        for i in range(starts[k], starts[k + 1]):
            np.testing.assert_array_equal(last[i], own[i])
    with pytest.raises(DataError, match="before the recipe's first stage"):
        last[-1]


def batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for field in ("inputs", "targets", "loss_mask", "position_ids", "doc_ids", "sample_ids"):
            assert (getattr(x, field) is None and getattr(y, field) is None) or \
                bool((getattr(x, field) == getattr(y, field)).all())


def test_restore_at_any_step_matches_uninterrupted(corpus):
    """A job killed anywhere inside any stage and restored from its consumed_samples (a new process: blend
    rebuilt from the config) yields the batches the uninterrupted job did; the same under 2 data-parallel
    ranks, whose union is the single rank's step."""
    starts = stage_starts(RECIPE)
    for k, stage in enumerate(RECIPE):
        data = stage_config(corpus, k)
        run = StepLoader(build_train_blend(data, VOCAB), data, EOD, consumed_samples=starts[k])
        uninterrupted = [run.next_step() for _ in range(stage.steps)]
        for t in range(stage.steps):
            restored = StepLoader(build_train_blend(data, VOCAB), data, EOD)
            restored.load_state_dict({"consumed_samples": starts[k] + t * stage.global_batch})
            batches_equal(restored.next_step(), uninterrupted[t])
        t = stage.steps - 1
        ranks = [StepLoader(build_train_blend(data, VOCAB), data, EOD, dp_rank=r, dp_size=2,
                            consumed_samples=starts[k] + t * stage.global_batch).next_step() for r in range(2)]
        batches_equal(ranks[0] + ranks[1], uninterrupted[t])


@pytest.mark.parametrize("stages,start,expected", [
    ("[{start_sample: 0, seq_len: 32, train: [{path: a}]}]", 0,
     "data.stage_start_sample: 0 must exceed data.stages[0].start_sample=0"),
    ("[{start_sample: 0, seq_len: 32, train: [{path: a}]}, {start_sample: 0, seq_len: 64, train: [{path: a}]}]", 9,
     "data.stages[1].start_sample: 0 must exceed data.stages[0].start_sample=0"),
    ("[{start_sample: 0, seq_len: 32, train: [{path: a}]}, {start_sample: 12, seq_len: 64, train: [{path: a}]}]",
     12, "data.stage_start_sample: 12 must exceed data.stages[1].start_sample=12"),
    ("[{start_sample: 4, seq_len: 32, train: [{path: a}]}]", 9,
     "data.stages[0].start_sample: must be 0 (the first stage begins the data stream), got 4"),
    ("[{start_sample: 0, seq_len: 0, train: [{path: a}]}]", 9, "data.stages[0].seq_len: must be positive and at "
                                                               "most model.max_seq_len=8192 (the RoPE tables), got 0"),
    ("[{start_sample: 0, seq_len: 9000, train: [{path: a}]}]", 9, "data.stages[0].seq_len: must be positive and at "
                                                                  "most model.max_seq_len=8192"),  # an IndexError
    ("[{start_sample: 0, seq_len: 32, train: [{path: corpus/a}, {path: corpus/../corpus/a}]}]", 9,
     "data.stages[0].train[1].path: 'corpus/../corpus/a' is listed twice in a staged blend (as 'corpus/a')"),
    ("[{start_sample: 0, seq_len: 32, train: []}]", 9, "data.stages[0].train: is empty"),
    ("[{start_sample: 0, seq_len: 32, train: [{path: ''}]}]", 9, "data.stages[0].train[0].path: is empty"),
    ("[{start_sample: 0, seq_len: 32, train: [{path: a}, {path: ./a}]}]", 9,
     "data.stages[0].train[1].path: './a' is listed twice in a staged blend"),
    ("[{start_sample: 0, seq_len: 32, train: [{path: a, weight: 0}]}]", 9,
     "data.stages[0].train[0].weight: must be positive"),
    ("[]", -1, "data.stage_start_sample: must be >= 0, got -1"),
])
def test_bad_stages_are_one_line_config_errors(stages, start, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=[{path: a}]", "data.tokenizer.path=t.json", f"data.stages={stages}",
                           f"data.stage_start_sample={start}"])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_data_policy_holds_per_dataset(tmp_path, corpus):
    """A document outside the vocabulary stops the run naming the file (error) or is left out of every stage
    and counted once (skip); a dataset too short for a stage's length sits that stage out (skip)."""
    bad = tmp_path / "bad"
    writer = IndexedWriter(str(bad), np.int32)
    for d in range(12):
        writer.add_document(np.full(40, 3 * TOKENS_PER_DATASET + d if d != 5 else VOCAB + 1))
    writer.finalize()
    short = tmp_path / "short"
    write_dataset(short, 4, documents=1, seed=9)  # 20-119 tokens: under one sample of 128
    recipe = [Stage(32, 4, 6, {"A": 1.0, "bad": 1.0}), Stage(128, 4, 6, {"A": 1.0, "short": 1.0}),
              Stage(32, 4, 3, {"bad": 1.0, "short": 1.0})]
    paths = dict(corpus, bad=str(bad), short=str(short))
    with pytest.raises(DataError, match=f"{bad}.bin: document 5 holds token id {VOCAB + 1}"):
        StagedBlend(stage_config(paths, 2, recipe), VOCAB)
    staged = StagedBlend(stage_config(paths, 2, recipe, on_bad_data="skip"), VOCAB)
    assert staged.skips.files[str(bad)] == {"token_id_out_of_vocab": 1}  # once, though in two stages
    assert staged.skips.files[str(short)] == {"shard_too_short": 1}
    samples = np.concatenate([staged[i] for i in range(sum(s.steps * s.global_batch for s in recipe))])
    assert VOCAB + 1 not in samples
    stage_1 = np.concatenate([staged[i] for i in range(24, 48)]) // TOKENS_PER_DATASET
    assert set(stage_1.tolist()) == {0}  # only A: short sat the stage out
    recipe[0].blend = {"A": 1.0}
    with pytest.raises(DataError, match=f"{short}.bin: .* fewer than one sample of data.seq_len \\+ 1 = 129"):
        StagedBlend(stage_config(paths, 1, recipe), VOCAB)  # policy error: the too-short dataset stops it
    alone = [recipe[0], Stage(128, 4, 6, {"short": 1.0})]  # nothing left of the stage: an error naming its length
    with pytest.raises(DataError, match=f"no usable data in {short} at seq_len 128: every dataset was left out under "
                                        "data.on_bad_data=skip \\(1 skipped \\(1 shard_too_short\\)\\)$"):
        StagedBlend(stage_config(paths, 1, alone, on_bad_data="skip"), VOCAB)
