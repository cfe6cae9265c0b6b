"""Long-context evaluations (engine/eval/long_context.py, needle.py): the generated haystacks, the multiple-choice
needle score against a model that can and models that cannot retrieve, and the records in long_eval.jsonl,
metrics.jsonl and TensorBoard."""

import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import load_config
from engine.data.tokenizer import HFTokenizer
from engine.errors import ConfigError
from engine.eval.long_context import LongContextEvalCallback, ShardInfo, needle_accuracy
from engine.eval.needle import QUESTION, FillerPool, builtin_sentences, make_samples
from tests.distributed.long_eval_ranks import long_eval_config, read_jsonl, train_and_read
from tests.helpers import make_corpus

DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module")
def tokenizer(stdlib_bpe):
    return HFTokenizer(str(stdlib_bpe))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("long_eval"))


def test_haystack_length_depth_and_answer_mask(tokenizer):
    pool = FillerPool(tokenizer, 1024, seed=3)
    longest_sentence = max(len(s) for s in pool.sentences)
    samples = make_samples(tokenizer, [256, 1024], DEPTHS, trials=3, candidates=5, seed=3, pool=pool)
    assert len(samples) == 2 * len(DEPTHS) * 3
    for s in samples:
        # every candidate's sequence is exactly length + 1 tokens: inputs and targets of one sequence of length
        assert all(len(s.tokens(c)) == s.length + 1 for c in range(5))
        assert len({len(a) for a in s.answers}) == 1 and len({tuple(a) for a in s.answers}) == 5
        # the needle sits at a sentence boundary within one sentence of depth x filler tokens
        assert abs(s.needle_start - s.depth * s.filler_tokens) <= longest_sentence
        needle = tokenizer.decode(s.prefix[s.needle_start:s.needle_start + s.needle_tokens].tolist())
        planted = re.fullmatch(r" The secret number of ([A-Za-z ]+) is (\d{5})\.", needle)
        assert planted and planted.group(2) == tokenizer.decode(s.answers[s.true_index]).strip()
        assert tokenizer.decode(s.prefix.tolist()).endswith(QUESTION.format(name=planted.group(1)))
        batch = s.batch(s.true_index)
        assert batch.inputs.shape == (1, s.length) and batch.num_tokens == len(s.answers[0])
        # the loss mask covers the answer's tokens and nothing else
        masked = batch.loss_mask[0].nonzero().flatten().tolist()
        assert masked == list(range(s.length - len(s.answers[0]), s.length))
        assert batch.targets[0, masked].tolist() == s.answers[s.true_index]
        assert batch.doc_ids is None and batch.position_ids[0].tolist() == list(range(s.length))  # one document
    depth0 = [s for s in samples if s.depth == 0.0]
    assert all(s.needle_start == 0 for s in depth0)
    assert all(s.needle_start == s.filler_tokens for s in samples if s.depth == 1.0)  # right before the question
    # the true value is not always at the same candidate index (chance is 1 / candidates only if it moves)
    assert len({s.true_index for s in samples}) > 1


def test_builtin_filler_is_seeded_and_varied():
    first = [s for _, s in zip(range(400), builtin_sentences(7))]
    assert first == [s for _, s in zip(range(400), builtin_sentences(7))]
    assert first != [s for _, s in zip(range(400), builtin_sentences(8))]
    assert len(set(first)) > 0.95 * len(first)  # varied sentences, not one repeated
    assert all(s[0].isupper() and s.endswith(".") for s in first)


def test_file_filler(tokenizer, tmp_path):
    text = tmp_path / "filler.txt"
    text.write_text("Grass grows in the valley. Rivers run to the sea!\n\nMountains stand tall? Snow falls.")
    samples = make_samples(tokenizer, [256], [0.5], trials=1, candidates=3, filler=str(text))
    decoded = tokenizer.decode(samples[0].prefix.tolist())
    assert "Rivers run to the sea!" in decoded and "Mountains stand tall?" in decoded  # the file, reused
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    with pytest.raises(ConfigError, match="long_eval.filler: .*empty.txt: holds no text"):
        make_samples(tokenizer, [256], [0.5], trials=1, candidates=3, filler=str(empty))
    with pytest.raises(ConfigError, match="long_eval.filler: .*missing.txt: file not found"):
        make_samples(tokenizer, [256], [0.5], trials=1, candidates=3, filler=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="long_eval.needle_lengths: 16 tokens cannot hold"):
        make_samples(tokenizer, [16], [0.5], trials=1, candidates=3)


class ReadingModule:
    """A module that retrieves: the summed loss of an answer is 0.1 per token when its tokens follow "is" in the
    needle sentence somewhere in the inputs, 1.0 otherwise. It reads the haystack, not the label. `copies`
    multiplies both sums as eval_loss under dp does (every data rank scores the same sequence)."""

    def __init__(self, tokenizer, copies: int = 1):
        self.is_ids = tokenizer.encode_batch([" is"])[0]
        self.copies = copies

    def eval_loss(self, micro_batches):
        total, tokens = 0.0, 0
        for b in micro_batches:
            answer = b.targets[b.loss_mask].tolist()
            inputs = b.inputs[0].tolist()
            pattern = self.is_ids + answer
            planted = any(inputs[i:i + len(pattern)] == pattern for i in range(len(inputs) - len(pattern) + 1))
            total += (0.1 if planted else 1.0) * len(answer)
            tokens += len(answer)
        return total * self.copies, tokens * self.copies


def test_a_model_that_reads_the_needle_scores_one(tokenizer):
    samples = make_samples(tokenizer, [256, 512], DEPTHS, trials=2, candidates=6, seed=1)
    for copies in (1, 2):  # one process, and eval_loss's sums under dp=2: the same summed answer loss
        result = needle_accuracy(ReadingModule(tokenizer, copies), samples, ShardInfo(), "cpu")
        assert result["needle_mean"] == 1.0
        assert all(acc == 1.0 for by_depth in result["needle"].values() for acc in by_depth.values())
        assert result["needle"].keys() == {"256", "512"} and len(result["needle"]["256"]) == len(DEPTHS)
        assert result["needle_answer_loss"] == pytest.approx(0.1)


def test_a_model_that_cannot_see_scores_near_chance(tokenizer):
    """Candidate losses drawn at random (a model blind to the needle): with 4 candidates, 7 depths x 40 trials =
    280 samples, accuracy ~ Binomial(280, 1/4) / 280, standard deviation 0.026; the bound 0.13 is 5 of them
    (a false failure has probability below 1e-6 for an unlucky seed)."""
    samples = make_samples(tokenizer, [128], DEPTHS, trials=40, candidates=4, seed=2)
    rng = random.Random(5)

    class Blind:
        def eval_loss(self, micro_batches):
            return rng.random() * micro_batches[0].num_tokens, micro_batches[0].num_tokens

    result = needle_accuracy(Blind(), samples, ShardInfo(), "cpu")
    assert abs(result["needle_mean"] - 0.25) < 0.13


@pytest.mark.slow  # 420 forwards: 15 s on an idle 2-core machine, minutes on a loaded one
def test_an_untrained_model_scores_near_chance(corpus, tmp_path):
    """A real untrained model through LMTrainModule.eval_loss: it cannot retrieve, so its accuracy is chance
    (1/4) within 5 standard deviations of Binomial(105, 1/4) / 105 (0.042 each)."""
    from engine.data.tokenizer import load_tokenizer
    from engine.run import build_module
    cfg = long_eval_config(corpus, tmp_path, ["long_eval.needle_lengths=[160]", "long_eval.needle_trials=35",
                                              "long_eval.short_seq_len=0"])
    module = build_module(cfg, torch.device("cpu"), None)
    tok = load_tokenizer(cfg.data.tokenizer)
    samples = make_samples(tok, [160], [0.0, 0.5, 1.0], trials=35, candidates=4, seed=0)
    result = needle_accuracy(module, samples, ShardInfo(), torch.device("cpu"))
    assert abs(result["needle_mean"] - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 105)
    assert result["needle_answer_loss"] > 0.5 * math.log(512)  # near-uniform predictions: no retrieval


def test_records_in_jsonl_metrics_and_tensorboard(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train_and_read(long_eval_config(corpus, tmp_path / "with"))
    plain = train_and_read(long_eval_config(corpus, tmp_path / "without", ["long_eval.enabled=false"]), read=False)
    assert run["losses"] == plain["losses"]  # evaluating does not change what the run trains
    start, end = run["records"]
    assert (start["step"], start["when"], end["step"], end["when"]) == (0, "start", 6, "end")
    for record in (start, end):
        assert record["short_seq_len"] == 16 and math.isfinite(record["short_loss"])
        assert record["needle"].keys() == {"160"} and record["needle"]["160"].keys() == {"0", "1"}
        cells = [a for by_depth in record["needle"].values() for a in by_depth.values()]
        assert record["needle_mean"] == pytest.approx(sum(cells) / len(cells))
        assert record["needle_chance"] == pytest.approx(1 / 3) and record["needle_trials"] == 2
    assert end["short_loss"] < start["short_loss"]  # 6 steps of training lower the short-context loss
    metrics = read_jsonl(tmp_path / "with" / "t" / "metrics.jsonl")
    events = {m["event"]: m for m in metrics if "event" in m}
    assert events["long_eval_start"]["step"] == 0 and events["long_eval_end"]["step"] == 6
    assert events["long_eval_end"]["long_eval/short_loss"] == end["short_loss"]
    assert events["long_eval_end"]["long_eval/needle/len160/depth1"] == end["needle"]["160"]["1"]
    assert [m["step"] for m in metrics if "event" not in m] == [1, 2, 3, 4, 5, 6]  # step records unchanged
    events_file = EventAccumulator(str(tmp_path / "with" / "t" / "tb"))
    events_file.Reload()
    short = events_file.Scalars("long_eval/short_loss")
    assert [e.step for e in short] == [0, 6]
    assert [e.value for e in short] == pytest.approx([start["short_loss"], end["short_loss"]], rel=1e-6)
    mean = events_file.Scalars("long_eval/needle/mean")
    assert [e.value for e in mean] == pytest.approx([start["needle_mean"], end["needle_mean"]])
    assert [e.value for e in events_file.Scalars("long_eval/needle/len160/depth0")] == pytest.approx(
        [start["needle"]["160"]["0"], end["needle"]["160"]["0"]])


def _fake_trainer(module, step: int, total: int):
    return SimpleNamespace(module=module, device="cpu", loader=SimpleNamespace(), eval_records=[],
                           state=SimpleNamespace(step=step, total_steps=total))


def test_when_the_callback_evaluates(tokenizer, corpus, tmp_path):
    """at_start=false (a stage's later chunk): no evaluation before the first step; a run stopped before its last
    step (preemption) does not evaluate at its end; one that finished does, and rank 0 records it."""
    cfg = long_eval_config(corpus, tmp_path, ["long_eval.at_start=false", "long_eval.short_seq_len=0",
                                              "long_eval.needle_trials=1", "long_eval.needle_candidates=2"])
    callback = LongContextEvalCallback(cfg, tokenizer, rank=0, run_dir=tmp_path / "run")
    module = ReadingModule(tokenizer)
    trainer = _fake_trainer(module, 10, 20)
    callback.on_fit_start(trainer)
    callback.on_fit_end(trainer)  # stopped at step 10 of 20
    assert callback.results == [] and not (tmp_path / "run" / "long_eval.jsonl").exists()
    trainer.state.step = 20
    callback.on_fit_end(trainer)
    (record,) = read_jsonl(tmp_path / "run" / "long_eval.jsonl")
    assert record["when"] == "end" and record["step"] == 20 and record["needle_mean"] == 1.0
    assert trainer.eval_records[0]["event"] == "long_eval_end"
    other_rank = LongContextEvalCallback(cfg, tokenizer, rank=1, run_dir=tmp_path / "run1")
    other_rank.on_fit_end(trainer)
    assert other_rank.results and not (tmp_path / "run1").exists()  # evaluates (collectives), writes nothing


@pytest.mark.parametrize("override, world, message", [
    ("long_eval.needle_depths=[0.5,1.5]", 1, "long_eval.needle_depths[1]: must be in [0, 1], got 1.5"),
    ("long_eval.needle_lengths=[162]", 2, "long_eval.needle_lengths[0]: 162 cannot be cut into 2*cp=4"),
    ("long_eval.short_seq_len=18", 2, "long_eval.short_seq_len: 18 cannot be cut into 2*cp=4"),
    ("long_eval.needle_lengths=[512]", 1, "long_eval.needle_lengths[0]: 512 must be positive and at most "
                                          "model.max_seq_len=256"),
    ("long_eval.needle_candidates=1", 1, "long_eval.needle_candidates: must be between 2"),
    ("long_eval.needle_candidates=100000", 1, "long_eval.needle_candidates: must be between 2 (the true value and a "
                                              "distractor) and 1000"),  # it hung: 90,000 five-digit values exist
    ("long_eval.filler=/nonexistent/filler.txt", 1, "long_eval.filler: '/nonexistent/filler.txt' is not a file"),
    ("data.valid=[]", 1, "long_eval.short_seq_len: the short-context loss is measured on data.valid"),
    ("align.kind=sft", 1, "long_eval.enabled: needs align.kind=lm"),
])
def test_bad_settings_are_one_line_errors(corpus, tmp_path, override, world, message):
    extra = ["parallel.cp=2"] if world == 2 else []
    extra += ["align.train_file=x.jsonl"] if override.startswith("align.kind") else []  # read by align kinds only
    with pytest.raises(ConfigError) as error:
        long_eval_config(corpus, tmp_path, [*extra, override], world_size=world)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_short_batches_must_share_over_dp(corpus, tmp_path):
    from engine.run import check_parallel
    cfg = long_eval_config(corpus, tmp_path, ["parallel.dp_shard=2", "long_eval.short_batches=3"], world_size=2)
    with pytest.raises(ConfigError, match="long_eval.short_batches: 3 micro-batches cannot be shared equally"):
        check_parallel(cfg, 2)
