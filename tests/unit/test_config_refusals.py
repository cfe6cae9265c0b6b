"""Config inputs a bad-input hunt (helper H40) found read wrongly, silently or not at all: numbers YAML 1.1 reads
as octal or base 60 (`train.steps=010` trained 8 steps), a config path that is a FIFO (hung), a blend of 2,000
files (refused by omegaconf 2.4's node limit), the token schedule's fields without total_tokens (no warmup at all),
and messages that named the wrong key or none."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import is_recipe_file, load_config
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def error_of(overrides, path=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("override, key, words", [
    ("train.steps=010", "train.steps", "'010' is read by YAML 1.1 as the octal number 8: write 10"),
    ("train.seed=0777", "train.seed", "the octal number 511: write 777"),
    ("log.every=1:00", "log.every", "'1:00' is read by YAML 1.1 as a base-60 number (60)"),
    ("optim.lr=", "optim.lr", "gives no value"),
    ("data.train.0.weight=2", "", "a list element cannot be set by its index"),
    ("data.train[0].weight=2", "", "a list element cannot be set by its index"),
    ("parallel.pp_head_cost=-1", "parallel.pp_head_cost", "a stage cost must be >= 0, got -1.0"),
    ("schedule.warmup_tokens=1000", "schedule.warmup_tokens", "is read only by the token schedule"),
    ("schedule.stage_start_step=1000", "schedule.stage_start_step", "is read only by the token schedule"),
    ("schedule.anneal_tokens=-5", "schedule.anneal_tokens", "must be >= 0, got -5"),
    ("log.run_dir=~/runs", "log.run_dir", "herd does not expand ~ or $VARIABLES in paths"),  # made a dir named ~
    ("checkpoint.dir=$HOME/ck", "checkpoint.dir", "herd does not expand ~ or $VARIABLES in paths"),
])
def test_an_override_is_refused_naming_its_key(override, key, words):
    error = error_of([override])
    assert error.key == key and words in str(error), str(error)


def test_a_quoted_number_is_a_string_as_written():
    assert load_config(None, ["log.name='010'"]).log.name == "010"
    assert load_config(None, ["train.steps=10", "log.every=8"]).train.steps == 10


def test_the_token_schedule_refuses_step_warmup_beside_it():
    error = error_of(["schedule.total_tokens=100000", "schedule.warmup_steps=3"])
    assert error.key == "schedule.warmup_steps" and "schedule.warmup_tokens" in str(error)
    error = error_of(["schedule.total_tokens=100", "schedule.warmup_tokens=200"])
    assert error.key == "schedule.warmup_tokens" and "at most schedule.total_tokens=100" in str(error)


def test_the_bad_override_among_several_is_the_one_named():
    error = error_of(["optim.lr=1e-3", "log.name=@x", "optim.beta1=0.9"])
    assert str(error).startswith("bad override 'log.name=@x': ")


@pytest.mark.parametrize("text, words", [
    ("train:\n  steps: 010\n", "train.steps: {path}:2: '010' is read by YAML 1.1 as the octal number 8"),
    ("data:\n  train:\n    - {path: a, weight: 0_10}\n", "data.train[0].weight: {path}:3: '0_10'"),
    ("just a string\n", "{path}: the top level must be a mapping of sections, got the single value 'just a string'"),
    ("- a\n- b\n", "{path}: the top level must be a mapping of sections, got a list"),
])
def test_a_config_file_is_refused_naming_file_and_line(tmp_path, text, words):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert words.format(path=path) in str(error_of([], str(path)))


def test_a_config_path_that_is_a_fifo_is_one_line_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "job.yaml")
    assert not is_recipe_file(str(tmp_path / "job.yaml"))  # used to open it for reading: blocked forever
    done = subprocess.run([sys.executable, "-m", "launch", "train", str(tmp_path / "job.yaml"), "--print-config"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,  # a guard: it hung before
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "job.yaml" in done.stderr and "FIFO" in done.stderr


def test_an_include_that_is_a_directory_is_named_for_what_it_is(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "job.yaml").write_text("include: [sub]\n")
    error = error_of([], str(tmp_path / "job.yaml"))
    assert error.key == "include" and f"included file {tmp_path / 'sub'} is a directory" in str(error)


def test_a_blend_of_thousands_of_files_loads(tmp_path):
    rows = "".join(f"    - {{path: shard{i:05d}, weight: 1}}\n" for i in range(3000))
    (tmp_path / "job.yaml").write_text(f"data:\n  tokenizer: {{path: tok.json}}\n  train:\n{rows}  valid: []\n")
    assert len(load_config(str(tmp_path / "job.yaml")).data.train) == 3000


def test_a_list_given_as_an_interpolation_is_not_read_letter_by_letter(tmp_path):
    (tmp_path / "job.yaml").write_text("data:\n  tokenizer: {path: tok.json}\n  valid: [{path: v, weight: 1}]\n"
                                       "  train: ${data.valid}\n")
    assert [d.path for d in load_config(str(tmp_path / "job.yaml")).data.train] == ["v"]


def test_an_env_file_that_is_not_a_file_is_named_for_what_it_is(tmp_path):
    from launch.slurm import _env_file
    (tmp_path / "envdir").mkdir()
    os.mkfifo(tmp_path / "fifo.env")
    for name, words in (("envdir", "is a directory, not a regular file"), ("fifo.env", "is a FIFO, not a regular file")):
        with pytest.raises(ConfigError, match=rf"^slurm\.env_file: .*{name} {words}$"):
            _env_file(str(tmp_path / name))  # it said "file not found"


def test_an_env_file_bash_cannot_parse_is_refused(tmp_path):
    """Every job sources it first: a syntax error would end each job and requeue at its first line."""
    from launch.slurm import _env_file
    (tmp_path / "bad.env").write_text("export NCCL_DEBUG=WARN\nif [ -n \"$X\" ]; then\n")
    with pytest.raises(ConfigError, match=r"^slurm\.env_file: .*bad\.env: bash cannot parse it \(.*line \d+: "):
        _env_file(str(tmp_path / "bad.env"))
    for shipped in ("launch/clusters/example_h100.env", "launch/clusters/local.env"):
        assert _env_file(shipped).is_file()
