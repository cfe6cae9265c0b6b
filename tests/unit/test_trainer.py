"""The single-rank trainer: determinism, exact gradient accumulation, falling loss, and what it writes."""

import io
import json

import pytest
import torch

from engine.run import train
from tests.helpers import make_corpus, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def run(corpus, tmp_path, *extra):
    out = io.StringIO()
    trainer = train(tiny_config(corpus, tmp_path, list(extra)), stream=out)
    lines = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    return trainer, lines, out.getvalue()


def params_of(trainer):
    return {k: v.detach().clone() for k, v in trainer.module.model.state_dict().items()}


def test_same_seed_gives_bitwise_identical_losses(corpus, tmp_path):
    a, lines_a, _ = run(corpus, tmp_path / "a")
    b, lines_b, _ = run(corpus, tmp_path / "b")
    losses_a, losses_b = [m["loss"] for m in lines_a], [m["loss"] for m in lines_b]
    print("losses", losses_a)
    assert losses_a == losses_b
    pa, pb = params_of(a), params_of(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c, lines_c, _ = run(corpus, tmp_path / "c", "train.seed=99")
    assert [m["loss"] for m in lines_c] != losses_a


def test_gradient_accumulation_equals_one_large_batch(corpus, tmp_path):
    one, lines_one, _ = run(corpus, tmp_path / "one", "data.micro_batch_size=8")  # 1 micro-batch per step
    four, lines_four, _ = run(corpus, tmp_path / "four", "data.micro_batch_size=2")  # 4 micro-batches per step
    worst = max(abs(x["loss"] - y["loss"]) / x["loss"] for x, y in zip(lines_one, lines_four))
    print(f"largest relative loss difference, 1 vs 4 micro-batches: {worst:.2e}")
    assert worst < 1e-5
    p1, p4 = params_of(one), params_of(four)
    # fp32 sums in another order differ in the last bits; Adam divides by sqrt(v), so a weight whose gradient
    # is near zero (rare tokens' embedding rows) moves those bits up to ~lr * 1e-3: bound the absolute change.
    worst_param = max((p1[k] - p4[k]).abs().max().item() for k in p1)
    print(f"largest parameter difference after 6 steps: {worst_param:.2e}")
    assert worst_param < 1e-5


def test_loss_falls_and_bf16_autocast_trains(corpus, tmp_path):
    trainer, lines, console = run(corpus, tmp_path / "long", "train.steps=40", "train.eval_every=20",
                                  "train.dtype=bf16")
    initial, final = trainer.initial_val_loss, lines[-1]["val_loss"]
    print(f"validation loss {initial:.3f} -> {final:.3f}")
    assert final < initial - 1.0
    assert sum(m["loss"] for m in lines[-5:]) / 5 < lines[0]["loss"] - 0.5
    assert f"validation loss: {initial:.4f} before training -> {final:.4f} after 40 steps" in console


def test_metrics_jsonl_tensorboard_and_console(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    trainer, lines, console = run(corpus, tmp_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    for m in lines:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "tflops", "mem_gib", "eta_s"} <= set(m)
        assert m["tokens_per_s"] > 0 and m["grad_norm"] > 0
    assert [("val_loss" in m) for m in lines] == [False, False, True, False, False, True]
    events = EventAccumulator(str(tmp_path / "t" / "tb"))
    events.Reload()
    tb_loss = [e.value for e in events.Scalars("train/loss")]
    assert tb_loss == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert [e.step for e in events.Scalars("val/loss")] == [0, 3, 6]
    step_lines = [line for line in console.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 6 and "tok/s" in step_lines[0] and "ETA" in step_lines[0]
    assert "\x1b" not in console  # plain text for SLURM log files
    assert (tmp_path / "t" / "config.yaml").read_text().count("seq_len: 32") == 1


def test_a_rerun_moves_the_earlier_run_aside(corpus, tmp_path):
    run(corpus, tmp_path, "train.steps=1", "schedule.warmup_steps=0")
    first = (tmp_path / "t" / "metrics.jsonl").read_text()
    run(corpus, tmp_path, "train.steps=1", "schedule.warmup_steps=0")
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("t.")]
    assert len(archived) == 1 and (archived[0] / "metrics.jsonl").read_text() == first


def test_data_from_another_tokenizer_is_refused(corpus, tmp_path):
    from engine.data.tokenizer import train_bpe
    from engine.errors import ConfigError
    train_bpe(["some other text entirely"] * 10, 300, str(tmp_path / "other.json"))
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*corpus.train was prepared with hf:.*tok.json "
                                          r"\(vocab 500, .*but the config loads hf:.*other.json"):
        train(tiny_config(corpus, tmp_path, [f"data.tokenizer.path={tmp_path}/other.json"]))
