"""The validation loss a user reads does not depend on the layout (shared/TESTING.md R22): `herd launch --nproc 2`
with dp_shard=2 writes the same val_loss to metrics.jsonl as one `herd train` process of the same config, because
train.eval_batches counts micro-batches of the whole validation set, shared out over the data-parallel ranks."""

import json

import pytest

from tests.helpers import make_corpus
from tests.integration.test_cli import assert_one_line_error, herd


def common(corpus, run_dir) -> list:
    """A tiny fp32 job: 2 steps, validation after each on 6 micro-batches of 2 sequences (3 per rank at dp=2)."""
    return ["configs/demo.yaml", f"data.train=[{{path: {corpus}/corpus.train}}]",
            f"data.valid=[{{path: {corpus}/corpus.valid}}]", f"data.tokenizer.path={corpus}/tok.json",
            "model.vocab_size=512", "model.n_layers=2", "model.dim=64", "model.ffn_dim=128", "data.seq_len=64",
            "data.micro_batch_size=2", "data.global_batch_size=8", "train.steps=2", "train.eval_every=1",
            "train.eval_batches=6", "schedule.warmup_steps=1", "log.tensorboard=false", f"log.run_dir={run_dir}"]


def val_losses(run_dir, name) -> list:
    rows = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["val_loss"]) for row in rows]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_dp2_launch_reports_the_one_process_val_loss(corpus, tmp_path):
    runs = tmp_path / "runs"
    single = herd("train", *common(corpus, runs), "log.name=one")
    assert single.returncode == 0, single.stderr[-3000:]
    launched = herd("launch", "--nproc", "2", *common(corpus, runs), "log.name=two", "parallel.dp_shard=2")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "world size 2 (dp_replicate 1 x dp_shard 2 x pp 1 x cp 1 x tp 1)" in launched.stdout
    one, two = val_losses(runs, "one"), val_losses(runs, "two")
    assert [step for step, _ in one] == [step for step, _ in two] == [1, 2]
    errors = [abs(a - b) / a for (_, a), (_, b) in zip(one, two)]
    print(f"val_loss one process {one}, dp_shard=2 {two}: relative differences {errors}")
    assert max(errors) < 1e-5


def test_eval_batches_not_divisible_by_dp_is_one_line_before_any_process(corpus, tmp_path):
    result = herd("launch", "--nproc", "2", *common(corpus, tmp_path / "runs"), "parallel.dp_shard=2",
                  "train.eval_batches=5")
    assert_one_line_error(result, "train.eval_batches: 5 validation micro-batches cannot be shared equally "
                                  "over dp=2 data-parallel ranks")
    assert "torch.distributed.run" not in result.stdout
    assert not (tmp_path / "runs").exists()
