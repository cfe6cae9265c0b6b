"""benchmarks/peers.py on CPU: rows for peers that cannot run say why, the parent's reading of a child's output
(result, crash, out of memory, timeout, spent budget), herd's rows of the same settings joined, the table, and a
tiny in-process run of the HF eager peer. benchmarks/gpu/check.sh: syntax and its DRY=1 plan."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import mfu, peers, report
from engine.flops import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--seq-len", "32", "--layers", "2", "--dim", "64", "--ffn-dim", "128", "--heads", "4", "--kv-heads", "2",
        "--vocab", "256", "--n-batches", "2", "--device", "cpu", "--peak-tflops", "2.5"]


def _args(*extra):
    return peers.parse_args([*extra, *TINY])


def test_peer_with_a_missing_package_gets_a_row_naming_it_and_builds_nothing(monkeypatch):
    built = []
    monkeypatch.setitem(peers.PEERS, "ghost", peers.Peer("ghost", (("no_such_module_h8", "no-such-package"),),
                                                          "ghost_builder", "a peer whose package is missing"))
    monkeypatch.setattr(peers, "ghost_builder", lambda *a: built.append(a), raising=False)
    _, args = _args("--steps", "1", "--warmup", "0")
    row = peers.run_child("ghost", args)
    assert row["why"] == "missing dependency" and built == []
    assert row["error"].startswith("missing dependency: no-such-package") and "no_such_module_h8" in row["error"]
    assert row["note"] == "a peer whose package is missing" and "tokens_per_s" not in row


@pytest.mark.parametrize("error, why", [
    ("missing dependency: torchtitan (No module named 'torchtitan')", "missing dependency"),
    ("ModuleNotFoundError: No module named 'spmd_types'", "missing dependency"),
    ("ImportError: cannot import name 'apply_compile' from 'torchtitan.distributed.compile'", "import error"),
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB", "out of memory"),
    ("timed out after 75 s (killed)", "timeout"),
    ("not run: the time budget of 160 s was spent", "timeout"),
    ("AttributeError: 'GPTModel' object has no attribute 'x'", "failed"),
])
def test_classify_names_why_a_peer_has_no_numbers(error, why):
    assert peers.classify(error) == why


def _fake_child(monkeypatch, script: str):
    """The parent runs `script` (python -c, with the row's path as argv[1]) instead of a real peer child."""
    monkeypatch.setattr(peers, "child_command",
                        lambda args, name, json_out: [sys.executable, "-c", script, str(json_out)])


def test_parent_reads_the_childs_row(tmp_path, monkeypatch):
    _fake_child(monkeypatch, "import json, sys; json.dump({'variant': 'hf-compile', 'peer': 'hf-compile', "
                             "'error': None, 'tokens_per_s': 1234.5}, open(sys.argv[1], 'w'))")
    _, args = _args()
    row = peers.run_peer(args, "hf-compile", tmp_path, timeout=60)
    assert row["tokens_per_s"] == 1234.5 and row["error"] is None and "why" not in row
    assert row["log"] == str(tmp_path / "hf-compile.log") and row["wall_s"] > 0


def test_child_dying_of_oom_without_a_row_is_classified_from_its_last_line(tmp_path, monkeypatch):
    _fake_child(monkeypatch, "import sys; print('building...'); "
                             "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB'); "
                             "sys.exit(3)")
    _, args = _args()
    row = peers.run_peer(args, "megatron-local", tmp_path, timeout=60)
    assert row["why"] == "out of memory"
    assert row["error"].startswith("exit code 3: torch.OutOfMemoryError: CUDA out of memory")
    assert row["note"] == peers.PEERS["megatron-local"].note


def test_hanging_child_is_killed_at_its_timeout(tmp_path, monkeypatch):
    _fake_child(monkeypatch, "import time\nwhile True: time.sleep(1)")
    _, args = _args()
    row = peers.run_peer(args, "titan-compile", tmp_path, timeout=0.5)
    assert row["error"] == "timed out after 0.5 s (killed)" and row["why"] == "timeout"


def test_spent_budget_leaves_rows_that_say_so_and_the_table_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    started = []
    monkeypatch.setattr(peers, "run_peer", lambda *a, **k: started.append(a))
    own, args = _args("--peers", "hf-liger,titan-fp8", "--budget", "5", "--log-dir", str(tmp_path / "logs"),
                      "--save")
    rows = peers.run_parent(own, args)
    assert started == [] and [r["variant"] for r in rows] == ["hf-liger", "titan-fp8"]
    assert all(r["why"] == "timeout" and "time budget of 5 s" in r["error"] for r in rows)
    table = (tmp_path / "results" / "peers_unknown.md").read_text()
    assert "| hf-liger | timeout |" in table and "| titan-fp8 | timeout |" in table


def _row(variant, tps, **extra):
    row = {"variant": variant, "error": None, "tokens_per_s": tps, "ms_per_step": 65536e3 / tps, "mfu": 0.5,
           "peak_mem_gib": 40.0, "first_loss": 12.0, "last_loss": 11.0, "loss_finite": True, "seq_len": 32,
           "batch_size": 1, "accum": 8, "layers": 2, "dim": 64, "ffn_dim": 128, "heads": 4, "kv_heads": 2,
           "vocab": 256}
    row.update(extra)
    return row


def test_herd_rows_of_other_settings_or_failed_are_left_out(tmp_path):
    results = tmp_path / "mfu_x_accum8.json"
    results.write_text(json.dumps([_row("herd-bf16", 100.0), _row("herd-fp8", 120.0, seq_len=64),
                                   {"variant": "hf-bf16", "error": "OutOfMemoryError"}, _row("hf-bf16", 80.0)]))
    _, args = _args("--accum", "8")
    rows = peers.herd_rows(str(results), args)
    assert [r["variant"] for r in rows] == ["herd-bf16", "hf-bf16"]
    assert all(r["source"] == "benchmarks/mfu.py (mfu_x_accum8.json)" for r in rows)
    _, other = _args("--accum", "1")
    assert peers.herd_rows(str(results), other) == []
    assert peers.herd_rows(str(tmp_path / "missing.json"), args) == []


def test_table_states_herd_against_the_fastest_peer_and_why_others_failed():
    rows = [_row("herd-bf16", 150.0, source="benchmarks/mfu.py (f.json)"),
            _row("hf-compile", 100.0, peer="hf-compile", note="transformers + torch.compile"),
            _row("titan-compile", 120.0, peer="titan-compile", note="torchtitan"),
            {"variant": "titan-fp8", "peer": "titan-fp8", "note": "torchtitan + float8",
             "error": "timed out after 75 s (killed)", "why": "timeout"}]
    table = peers.make_table(rows)
    lines = table.splitlines()
    assert lines[2].startswith("| herd-bf16 | 150 |") and "| 1.25x |" in lines[2]
    assert "| 0.83x |" in lines[3] and "| 1.00x |" in lines[4]
    assert lines[5] == "| titan-fp8 | timeout | - | - | - | - | - | torchtitan + float8 |"
    assert "herd-bf16 / best peer (titan-compile): 1.25x" in table
    assert "titan-fp8 did not run (timeout): timed out after 75 s (killed)" in table
    assert "without TransformerEngine" in table


def test_hf_eager_peer_trains_in_process_on_cpu():
    pytest.importorskip("transformers")
    _, args = _args("--steps", "2", "--warmup", "1", "--accum", "2")
    row = peers.run_child("hf-eager", args)
    assert row["error"] is None, row["error"]
    tokens = 2 * 2 * 32
    assert row["tokens_per_step"] == 64 and row["tokens_per_s"] == pytest.approx(tokens / row["seconds"])
    fpt = flops_per_token(mfu.model_config(args), 32, causal=False)
    assert row["flops_per_token"] == fpt and row["mfu"] == pytest.approx(fpt * row["tokens_per_s"] / 1e12 / 2.5)
    assert row["loss_finite"] and abs(row["first_loss"] - math.log(256)) < 0.3
    assert row["attn_implementation"] == "sdpa" and row["device_name"] == "cpu"


def test_child_main_writes_its_row_for_an_unknown_peer(tmp_path):
    out = tmp_path / "row.json"
    assert peers.main(["--peer", "no-such-peer", "--json-out", str(out), *TINY]) == 1
    row = json.loads(out.read_text())
    assert "unknown peer 'no-such-peer'" in row["error"] and row["why"] == "failed"


def test_child_command_forwards_the_shape_and_timing_options(tmp_path):
    _, args = _args("--steps", "3", "--accum", "4", "--seed", "9")
    cmd = peers.child_command(args, "hf-liger", tmp_path / "x.json")
    assert cmd[1:7] == ["-m", "benchmarks.peers", "--peer", "hf-liger", "--json-out", str(tmp_path / "x.json")]
    own, child = peers.parse_args(cmd[3:])
    assert own.peer == "hf-liger"
    for _, attr in mfu.FORWARDED:
        assert getattr(child, attr) == getattr(args, attr), attr


# ---------------------------------------------------------------------------------------------- check.sh

CHECK = ROOT / "benchmarks" / "gpu" / "check.sh"


def test_check_sh_parses():
    assert subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True).returncode == 0


def _dry(tmp_path, **env):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(CHECK)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, DRY="1", OUT=str(out), **env))
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()  # nothing written, nothing run
    return proc.stdout


def test_check_sh_dry_run_prints_every_stage_in_order_with_its_cap(tmp_path):
    text = _dry(tmp_path)
    stages = [line.split(":")[0].split()[1] for line in text.splitlines() if line.startswith("stage ")]
    assert stages == ["build", "tests", "mfu", "mfu-fp8", "accum", "fused", "fused-fp8", "peers", "kernels", "liger",
                      "mfu8", "dryrun-cuda", "dryrun-cpu", "attnmem"]
    fp8_rows = [line for line in text.splitlines() if line.startswith(("stage mfu-fp8:", "stage fused-fp8:"))]
    assert all("cap 45 s" in line for line in fp8_rows) and "herd-fp8-delayed-fcast" in fp8_rows[0] + fp8_rows[1]
    assert "--accum 8" in fp8_rows[1] and "herd-fp8-delayed," in fp8_rows[1] and "herd-fp8-wdelayed" in fp8_rows[0]
    fused = next(line for line in text.splitlines() if line.startswith("stage fused:"))
    assert "--accum 8" in fused and "herd-bf16-fused-compile" in fused and "herd-fp8-fused-compile" in fused
    assert "DEADLINE=480 s" in text
    tests_line = next(line for line in text.splitlines() if line.startswith("stage tests:"))
    files = [word.rsplit("/", 1)[1] for word in tests_line.split() if word.startswith("tests/gpu/")]
    assert len(files) == len(list((ROOT / "tests" / "gpu").glob("test_*.py")))  # every GPU test file, once
    kernel_files = [name.startswith("test_kernel_") for name in files]
    assert kernel_files == sorted(kernel_files, reverse=True)  # the csrc kernels' tests before the training runs
    peers_line = next(line for line in text.splitlines() if line.startswith("stage peers:"))
    assert "cap 170 s" in peers_line and "benchmarks.peers" in peers_line and "--accum 8" in peers_line
    assert "--peers hf-liger,hf-compile,titan-compile,megatron-local,titan-fp8" in peers_line
    assert "nvidia-smi" not in text and "exit" not in text


def test_check_sh_dry_run_follows_stages_and_deadline(tmp_path):
    text = _dry(tmp_path, STAGES="liger peers", DEADLINE="300", PEERS="hf-eager")
    stages = [line.split(":")[0] for line in text.splitlines() if line.startswith("stage ")]
    assert stages == ["stage peers", "stage liger"]  # the script's order, not the variable's
    assert "DEADLINE=300 s" in text and "--peers hf-eager " in text
