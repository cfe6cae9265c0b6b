"""Bad inputs of `herd plan`, `herd launch`, a dry run and an outside launcher's environment (helper H39's hunt):
each ended in a traceback (a zero TFLOP/s profile, a 306-byte --out, a world size beyond int32, MASTER_PORT in use)
or ran on (--dry-run --world-size 10**7, --gpus 10**20, a FIFO as the config, RANK=1 alone training without logs).
Each is refused with exit code 2 and one line `herd: error: ...` naming the flag, key, variable or file."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main

ROOT = Path(__file__).resolve().parents[2]
PROFILE = (ROOT / "configs" / "hardware" / "h100_sxm.yaml").read_text()
LONG = "a" * 300  # a file name longer than the 255 bytes Linux allows
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_USE_AGENT_STORE")
JOB = """\
model: {name: tiny, dim: 32, n_layers: 4, n_heads: 4, n_kv_heads: 4, ffn_dim: 64, vocab_size: 512, max_seq_len: 64}
data: {train: [{path: data/none, weight: 1.0}], seq_len: 32, micro_batch_size: 1, global_batch_size: 1,
       tokenizer: {kind: hf, path: TOKENIZER}}
train: {steps: 1, dtype: fp32, device: cpu, eval_batches: 1}
schedule: {warmup_steps: 0}
log: {name: job, run_dir: runs, tensorboard: false}
watchdog: {enabled: false}
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from engine.data.tokenizer import train_bpe
    path = tmp_path_factory.mktemp("tokenizer") / "tok.json"
    train_bpe(["alpha beta gamma delta epsilon"] * 20, 300, str(path))
    return path


@pytest.fixture
def job(tmp_path, monkeypatch, tokenizer):
    """A tiny job config in an empty working directory, with no launcher's variables in the environment."""
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(JOB.replace("TOKENIZER", str(tokenizer)))
    return tmp_path / "job.yaml"


def refused(code, capsys, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("herd: error: "), err
    assert expected in err, err
    return err


def herd(args, cwd: Path, env=None, timeout: float = 120):
    """herd in a process of its own (a case that hung before: the timeout only guards against a hang)."""
    env = {**{k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def refused_process(result, expected: str) -> None:
    err = result.stderr.strip()
    assert result.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("herd: error: "), err
    assert expected in err, err


# ------------------------------------------------------------------------------------------- 1: hardware profiles

@pytest.mark.parametrize("old, new, expected", [
    ("bf16: 989.4", "bf16: 0", "peak_tflops.bf16: must be a finite number > 0, got 0"),
    ("bf16: 989.4", "bf16: -5", "peak_tflops.bf16"),
    ("bf16: 989.4", "bf16: .nan", "peak_tflops.bf16"),
    ("bf16: 989.4", "bf16: .inf", "peak_tflops.bf16"),
    ("bf16: 989.4", "bf16: fast", "peak_tflops.bf16: 'fast' is not a number"),
    ("fp8: 1978.9", "fp9: 1978.9", "peak_tflops.fp8: missing"),
    ("bandwidth_gbs: 450.0", "bandwidth_gbs: 0", "links.nvlink.bandwidth_gbs"),
    ("bandwidth_gbs: 50.0", "bandwidth_gbs: .nan", "links.network.bandwidth_gbs"),
    ("latency_us: 8.0", "latency_us: -1", "links.network.latency_us"),
    ("memory_gib: 79.6", "memory_gib: 0", "memory_gib"),
    ("memory_gib: 79.6", "memory_gib: 7", "memory_reserve_gib: 7.6 leaves nothing of memory_gib 7"),
    ("memory_reserve_gib: 7.6", "memory_reserve_gib: .inf", "memory_reserve_gib"),
    ("gpus_per_node: 8", "gpus_per_node: .inf", "gpus_per_node"),
    ("gpus_per_node: 8", "gpus_per_node: 0", "gpus_per_node"),
    ("mfu_nvidia_h100_80gb_hbm3_8layers.json", "mfu_nvidia_h100_80gb_hbm3.json", "calibration_files"),
    ("calibration_files: [mfu_nvidia_h100_80gb_hbm3.json, ", "calibration_files: [nope.json, ", "nope.json"),
    ("copy_bandwidth_file: kernels_nvidia_h100_80gb_hbm3.json", "copy_bandwidth_file: ../../configs",
     "copy_bandwidth_file"),
])
def test_plan_refuses_a_profile_value_it_cannot_use(old, new, expected, job, capsys):
    assert old in PROFILE
    (job.parent / "hw.yaml").write_text(PROFILE.replace(old, new, 1))
    err = refused(main(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", "8", "--hardware", "hw.yaml"]), capsys, expected)
    assert "hw.yaml: not a valid hardware profile" in err


def test_plan_takes_the_shipped_profiles(job, capsys):
    for profile in ("h100_sxm", "h200"):
        assert main(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", "8", "--hardware", profile]) == 0
    assert "best as overrides" in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["--memory-limit", "inf"], "--memory-limit"),
    (["--gpus-per-node", "2000000"], "--gpus-per-node 2000000: herd plans for at most 1,048,576 GPUs"),
    (["--hardware", LONG + ".yaml"], "--hardware: the name"),
])
def test_plan_refuses_a_flag_out_of_range(args, expected, job, capsys):
    refused(main(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", "8", *args]), capsys, expected)


def test_plan_refuses_gpus_beyond_its_bound_at_once(job):
    refused_process(herd(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", str(10 ** 20)], job.parent),
                    "--gpus 100000000000000000000: herd plans for at most 1,048,576 GPUs")


# --------------------------------------------------------------------------------------- 2: --out names and kinds

@pytest.mark.parametrize("out, expected", [
    (LONG + ".sbatch", "--out: the name aaaaaaaaaaaaaaaaaaaa...aaaaa.sbatch is 307 bytes"),
    (f"{LONG}/job.sbatch", "--out: the name"),
])
def test_slurm_out_name_too_long_is_one_line(out, expected, job, capsys):
    code = main(["launch", "--slurm", "--no-data-check", "--nodes", "1", "--gpus-per-node", "1", "--out", out,
                 str(job)])
    refused(code, capsys, expected)
    assert sorted(p.name for p in job.parent.iterdir()) == ["job.yaml"]


@pytest.mark.parametrize("name", ["a" * 250, "\u00e9" * 125])  # 250 bytes: ASCII, and 2 bytes a character
def test_slurm_out_name_of_250_bytes_is_written(name, job, capsys):
    """The script's temporary file is named from at most 200 bytes of it, never cut inside a character
    (engine/files.py): room is left."""
    code = main(["launch", "--slurm", "--no-data-check", "--nodes", "1", "--gpus-per-node", "1", "--out", name,
                 str(job)])
    assert code == 0, capsys.readouterr()
    assert sorted(p.name for p in job.parent.iterdir()) == sorted([name, "job.yaml"])


def test_plan_out_name_of_250_bytes_is_written(job, capsys):
    """herd plan's checked temporary (a .yaml beside --out) fits beside a 250-byte name of 2-byte characters."""
    name = "\u00e9" * 122 + ".yaml"
    code = main(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", "8", "--out", name])
    assert code == 0, capsys.readouterr()
    assert sorted(p.name for p in job.parent.iterdir()) == sorted([name, "job.yaml"])
    assert (job.parent / name).read_text().startswith("# herd plan")


def test_slurm_default_out_names_the_job_name(job, capsys):
    code = main(["launch", "--slurm", "--no-data-check", "--nodes", "1", "--gpus-per-node", "1", str(job),
                 f"slurm.job_name={'b' * 250}"])
    refused(code, capsys, "slurm.job_name")


def test_plan_out_name_too_long_is_one_line(job, capsys):
    refused(main(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", "8", "--out", LONG + ".yaml"]), capsys, "--out: the name")


def test_plan_out_fifo_is_refused_not_read(job):
    os.mkfifo(job.parent / "plan.yaml")
    refused_process(herd(["plan", "--model", "debug", "--seq-len", "1024", "--gpus", "8", "--out", "plan.yaml"], job.parent),
                    "--out plan.yaml: exists and is not a file")


@pytest.mark.parametrize("command", [["train"], ["launch", "--slurm"], ["launch", "--nproc", "1"]])
def test_config_fifo_is_refused_not_read(command, job):
    os.mkfifo(job.parent / "fifo.yaml")
    refused_process(herd([*command, "fifo.yaml"], job.parent), "config fifo.yaml: is a FIFO, not a regular file; name a YAML file")


# -------------------------------------------------------------------------------------------- 3: world size bounds

def test_dry_run_world_size_beyond_int32_is_one_line(job, capsys):
    refused(main(["train", str(job), "--dry-run", "--world-size", str(10 ** 10), f"data.global_batch_size={10 ** 10}"]),
            capsys, "--world-size: a dry run takes at most 131,072 ranks, got 10,000,000,000")


def test_dry_run_world_size_above_the_bound_is_refused_at_once(job):
    refused_process(herd(["train", str(job), "--dry-run", "--world-size", str(10 ** 7),
                          f"data.global_batch_size={10 ** 7}"], job.parent), "--world-size: a dry run takes at most")


def test_dry_run_at_the_bound_runs(job, capsys):
    """The largest dry run allowed, with a layout a job of that size has (tp and pp): it builds and steps."""
    world = 2 ** 17
    assert main(["train", str(job), "--dry-run", "--world-size", str(world), "--rank", str(world - 1),
                 "parallel.tp=4", "parallel.pp=4", f"parallel.dp_shard={world // 16}",
                 f"data.global_batch_size={world // 4}"]) == 0
    assert f"dry run: rank {world - 1} of {world} (" in capsys.readouterr().out


def test_launch_nproc_beyond_the_machine_is_one_line(job, capsys):
    refused(main(["launch", "--nproc", str(10 ** 10), str(job), f"data.global_batch_size={10 ** 10}"]), capsys,
            "--nproc must be between 1 and 1,024")


def test_slurm_world_beyond_the_bound_is_one_line(job, capsys):
    code = main(["launch", "--slurm", "--no-data-check", "--nodes", str(10 ** 10), "--gpus-per-node", "8", str(job),
                 f"data.global_batch_size={8 * 10 ** 10}"])
    refused(code, capsys, "--nodes x --gpus-per-node (slurm.nodes x slurm.gpus_per_node) = 10,000,000,000 x 8")


# ------------------------------------------------------------------------------ 4, 5: an outside launcher's variables

@pytest.mark.parametrize("env, expected", [
    ({"RANK": "1"}, "RANK=1 is set in the environment but WORLD_SIZE is not"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set in the environment but RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": str(10 ** 10)}, "WORLD_SIZE=10000000000 in the environment: must be between 1"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set in the environment"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "29500"}, "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
])
def test_inconsistent_launcher_variables_are_refused(env, expected, job, capsys, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    refused(main(["train", str(job), "--print-config"]), capsys, expected)


def test_single_process_variables_still_run(job, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", str(job), "--print-config"]) == 0
    assert "name: tiny" in capsys.readouterr().out


def test_master_port_in_use_is_one_line(job):
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        result = herd(["train", str(job), "data.global_batch_size=2"], job.parent, env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    refused_process(result, f"MASTER_PORT={port}: the port is already in use on this host")
    assert not (job.parent / "runs").exists()  # refused before the run directory was claimed
