"""The `herd` command as a user runs it: one-line errors (never a traceback) and an end-to-end run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import STDLIB

ROOT = Path(__file__).resolve().parents[2]


def herd(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(result, expected: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error: "), result.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("args,expected", [
    (["train", "configs/demo.yaml", "optim.lrr=1e-3"], "optim.lrr: unknown key (command line) (did you mean "
                                                       "'optim.lr'?)"),
    (["train", "configs/demo.yaml", "train.steps=many"], "train.steps: wrong type"),
    (["train", "configs/demo.yaml", "model.n_kv_heads=3"], "model.n_heads: n_heads=8 is not divisible by "
                                                          "n_kv_heads=3"),
    (["train", "configs/demo.yaml", "data.seq_len=4096"], "data.seq_len: 4096 exceeds model.max_seq_len=2048"),
    (["train", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    (["train", "configs/demo.yaml", "data.train=[{path: /nonexistent/x}]", "data.valid=[]",
      "data.tokenizer.kind=llama3", "model.vocab_size=128256"], "/nonexistent/x.idx: file not found"),
    (["train", "configs/demo.yaml", "data.tokenizer.path=/nonexistent/tok.json"],
     "data.tokenizer.path: /nonexistent/tok.json: tokenizer file not found"),
])
def test_bad_input_is_one_line(args, expected):
    assert_one_line_error(herd(*args), expected)


def test_prepare_data_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    result = herd("prepare-data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--train-tokenizer",
                  "--tokenizer-path", str(tmp_path / "t.json"), "--vocab-size", "300")
    assert_one_line_error(result, f"{tmp_path / 'd.jsonl'}:2: invalid JSON")
    assert not (tmp_path / "o.bin").exists()  # nothing half-written


def test_prepare_and_train_end_to_end(tmp_path):
    src = [str(p) for p in sorted((STDLIB / "email").glob("*.py"))]
    prep = herd("prepare-data", *src, "--out", str(tmp_path / "json"), "--train-tokenizer", "--tokenizer-path",
                str(tmp_path / "tok.json"), "--vocab-size", "400", "--valid-fraction", "0.2")
    assert prep.returncode == 0, prep.stderr
    assert "wrote" in prep.stdout and "json.train.{bin,idx}" in prep.stdout
    result = herd("train", "configs/demo.yaml", f"data.train=[{{path: {tmp_path}/json.train}}]",
                  f"data.valid=[{{path: {tmp_path}/json.valid}}]", f"data.tokenizer.path={tmp_path}/tok.json",
                  "model.vocab_size=400", "model.n_layers=1", "data.seq_len=64", "train.steps=3",
                  "schedule.warmup_steps=1", "train.eval_batches=1", f"log.run_dir={tmp_path}/runs", "log.every=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\nstep ") == 3
    assert f"metrics: {tmp_path}/runs/demo/metrics.jsonl" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs/demo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
