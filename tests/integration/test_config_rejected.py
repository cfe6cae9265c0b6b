"""R13 through the command: a bad config is one `herd: error:` line (exit 2) and nothing runs: `herd launch`
prints no torchrun line and starts no child, no run or checkpoint directory appears, no process group starts, and
a payload in the config never executes. (Type, key and layout errors of `herd train` / `herd launch` are also in
test_cli.py; load_config's own cases in tests/unit/test_config.py.)"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_FAKEtoken1234567890"


def herd(*args, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_TOKEN": TOKEN, **(env or {})}
    # the timeout only turns a hang (a process group waiting for absent peers) into a failure
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=300)


def assert_rejected(result, expected: str, tmp_path: Path):
    """One error line, nothing printed to stdout (so no torchrun command line), nothing created, no secret."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("herd: error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == "", result.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists() and not (tmp_path / "escape").exists()
    assert TOKEN not in result.stdout + result.stderr
    print(lines[0])


def _files(tmp_path: Path) -> dict:
    """Config files with one mistake each, written into tmp_path; values are (file, expected message)."""
    (tmp_path / "outside.yaml").write_text("optim: {lr: 1.0e-3}\n")
    (tmp_path / "conf").mkdir()

    def write(name: str, text: str) -> str:
        (tmp_path / "conf" / name).write_text(text)
        return str(tmp_path / "conf" / name)

    write("leaf.yaml", "include: [demo.yaml]\nlog:\n  name: ${oc.env:HF_TOKEN}\n")
    return {
        "dotdot_include": (write("a.yaml", "include: [../outside.yaml]\n"), "must be a relative path without '..'"),
        "absolute_include": (write("b.yaml", f"include: [{tmp_path}/outside.yaml]\n"),
                             "must be a relative path without '..'"),
        "resolver_in_included_file": (write("c.yaml", "include: [leaf.yaml]\n"), "log.name: resolver calls like"),
        "python_tag": (write("d.yaml", f"optim: !!python/object/apply:os.system [\"touch {tmp_path}/pwned\"]\n"),
                       "not valid YAML"),
    }


@pytest.mark.parametrize("case", ["dotdot_include", "absolute_include", "resolver_in_included_file", "python_tag"])
def test_bad_config_files_start_nothing(tmp_path, case):
    path, expected = _files(tmp_path)[case]
    result = herd("launch", "--nproc", "2", path, f"log.run_dir={tmp_path}/runs", f"checkpoint.dir={tmp_path}/ck")
    assert_rejected(result, expected, tmp_path)
    assert not (tmp_path / "pwned").exists()  # the YAML payload never ran


@pytest.mark.parametrize("overrides,expected", [
    (["data.tokenizer.path=${oc.env:HF_TOKEN}"], "data.tokenizer.path: resolver calls like"),
    # the same check in a list and with another resolver: the slow tier (each case is a CLI start, ~10 s)
    pytest.param(["data.train=[{path: '${oc.env:HF_TOKEN}'}]"], "data.train.0.path: resolver calls like",
                 marks=pytest.mark.slow),
    pytest.param([f"log.run_dir=${{oc.decode:'{TOKEN}'}}"], "log.run_dir: resolver calls like",
                 marks=pytest.mark.slow),
    (["log.name=../escape"], "log.name: '../escape' must be a plain directory name"),
    (["train.steps=many"], "train.steps: wrong type"),
    (["parallel.tpp=2"], "parallel.tpp: unknown key (command line) (did you mean 'parallel.tp'?)"),
])
def test_bad_overrides_start_nothing(tmp_path, overrides, expected):
    result = herd("launch", "--nproc", "2", "configs/demo.yaml", f"log.run_dir={tmp_path}/runs",
                  f"checkpoint.dir={tmp_path}/ck", *overrides)
    assert_rejected(result, expected, tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,overrides,expected", [
    (3, ["parallel.tp=3", "data.global_batch_size=24"], "parallel.tp: tp=3 does not divide model.n_heads=8"),
    (2, ["parallel.dp_shard=1"], "parallel: dp_replicate*dp_shard*pp*cp*tp = 1 but the world size is 2"),
    (2, ["train.grad_accum_fusion=true"], "parallel.dp_shard: 2 shards gradients with FSDP"),
])
def test_rank_of_a_bad_layout_exits_before_its_process_group(tmp_path, world, overrides, expected):
    """`herd train` as torchrun starts it (rank 0 of `world`, peers never come): had it called
    init_process_group it would wait for them; it must refuse first."""
    env = {"WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    result = herd("train", "configs/demo.yaml", f"log.run_dir={tmp_path}/runs", f"checkpoint.dir={tmp_path}/ck",
                  *overrides, env=env)
    assert_rejected(result, expected, tmp_path)
