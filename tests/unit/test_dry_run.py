"""`herd train --dry-run` (engine/dry_run.py, issue 17 item 1): rank R of a Llama 3 405B job of 8,192 or 16,384
GPUs in the paper's Table 4 layouts, built and stepped on torch's fake process group under fake tensors. The state
bytes each rank holds are checked against formulas derived here by hand from the layout (not from herd's code):
Llama 3's block under tensor parallelism (column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2, GQA KV heads split
over tp), pipeline stages of 7, 8 x 14, 7 layers (embedding and head on the end stages), and FSDP2's row chunks
over dp_shard x cp, all fp32, with AdamW's two fp32 moments and one fp32 step counter per parameter tensor."""

import math

import pytest

from engine.config import load_config
from engine.dry_run import dry_run, pipeline_actions
from launch.cli import main
from plan.layout import Layout, rank_state

CONFIG = "configs/pretrain_llama3_405b.yaml"
DIM, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 16384, 126, 128, 8, 53248, 128256
STAGE_LAYERS = [7] + [8] * 14 + [7]  # Llama 3 section 3.3.2: one layer fewer on the first and last stage


def chunk_rows(rows: int, shards: int, index: int) -> int:
    """Rows of FSDP2 shard `index` of a dim-0 split into `shards` chunks of ceil(rows / shards) (torch.chunk)."""
    size = math.ceil(rows / shards)
    return max(0, min(size, rows - index * size))


def expected_elements(tp: int, shards: int, index: int, stage: int) -> tuple:
    """(elements, parameter tensors) of FSDP shard `index` of pipeline stage `stage` on one tp rank."""
    head_dim = DIM // HEADS
    kv_rows = max(head_dim, KV_HEADS * head_dim // tp)  # at most one KV head per rank (replicated beyond)
    # (rows, columns) of each tp-local matrix of a block; the norms are vectors of DIM
    block = [(DIM // tp, DIM), (kv_rows, DIM), (kv_rows, DIM), (DIM, DIM // tp),
             (FFN // tp, DIM), (FFN // tp, DIM), (DIM, FFN // tp), (DIM, 1), (DIM, 1)]
    tensors = block * STAGE_LAYERS[stage]
    vocab_rows = math.ceil(VOCAB / tp)  # the vocabulary padded to a multiple of tp, split by rows
    if stage == 0:
        tensors = tensors + [(vocab_rows, DIM)]
    if stage == len(STAGE_LAYERS) - 1:
        tensors = tensors + [(DIM, 1), (vocab_rows, DIM)]
    return sum(chunk_rows(rows, shards, index) * cols for rows, cols in tensors), len(tensors)


TABLE_4 = [  # GPUs, overrides, (dp_shard index, pp stage, cp index) of the rank to build
    pytest.param(8192, [], (0, 0, 0), id="8192-tp8-pp16-dp64-first-stage"),
    pytest.param(16384, ["parallel.dp_shard=128"], (127, 15, 0), id="16384-tp8-pp16-dp128-last-stage"),
    pytest.param(16384, ["data.seq_len=131072", "data.global_batch_size=128", "parallel.cp=16",
                         "parallel.dp_shard=8"], (5, 9, 11), id="16384-tp8-cp16-pp16-dp8-128k"),
]


@pytest.mark.parametrize("world, overrides, where", TABLE_4)
def test_table4_rank_holds_the_hand_derived_state(world, overrides, where, capsys):
    cfg = load_config(CONFIG, overrides, world_size=world)
    p = cfg.parallel
    dp_index, stage, cp_index = where
    tp_index = 3
    rank = ((dp_index * p.pp + stage) * p.cp + cp_index) * p.tp + tp_index  # mesh axes: dp_shard, pp, cp, tp
    report = dry_run(cfg, world, rank)
    print("\n".join(report.lines()))
    assert report.coordinates == {"dp_replicate": 0, "dp_shard": dp_index, "pp": stage, "cp": cp_index,
                                  "tp": tp_index}
    assert report.stages == [stage] and report.micro_batches == 2048 * 8192 // cfg.data.seq_len // p.dp_shard
    # FSDP shards over dp_shard x cp: the cp ranks of one dp rank hold different chunks
    elements, tensors = expected_elements(p.tp, p.dp_shard * p.cp, dp_index * p.cp + cp_index, stage)
    assert report.parameters == elements
    assert report.bytes["parameters"] == report.bytes["gradients"] == 4 * elements
    assert report.bytes["optimizer"] == 2 * 4 * elements + 4 * tensors
    assert report.bytes["step_peak"] > 0
    # herd plan's memory model (plan/layout.py) predicts the same state bytes for this rank (issue 17, item 4)
    predicted = rank_state(cfg.model, Layout(tp=p.tp, cp=p.cp, pp=p.pp, schedule=p.pp_schedule,
                                             dp_shard=p.dp_shard), pp_rank=stage,
                           shard_index=dp_index * p.cp + cp_index)
    assert (predicted.params, predicted.grads, predicted.optimizer) == \
        (report.bytes["parameters"], report.bytes["gradients"], report.bytes["optimizer"])


def test_fake_tensors_count_what_real_tensors_hold():
    """The same small rank (tp2 x pp2 x dp2, world 8) with fake and with real tensors: equal state bytes and a step
    peak within 5% (fake tensors follow the same ops; the real run frees some buffers a little earlier)."""
    overrides = ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=2", "data.global_batch_size=32"]
    fake = dry_run(load_config("configs/demo.yaml", overrides, world_size=8), 8, 3, fake=True)
    real = dry_run(load_config("configs/demo.yaml", overrides, world_size=8), 8, 3, fake=False)
    assert fake.stages == real.stages == [1]
    for key in ("parameters", "gradients", "optimizer"):
        assert fake.bytes[key] == real.bytes[key] > 0
    assert real.bytes["step_peak"] > 0
    assert abs(fake.bytes["step_peak"] - real.bytes["step_peak"]) <= 0.05 * real.bytes["step_peak"]


def test_one_f_one_b_keeps_stages_minus_stage_micro_batches_in_flight():
    """The order the dry run executes for 1F1B: stage s of S runs min(n, S - s) forwards before its first backward,
    then alternates, so at most that many micro-batches hold activations (Narayanan et al. 2021)."""
    class Pipe:  # what pipeline_actions reads of a 1F1B pipeline
        class Schedule1F1B:
            pass
        schedule, n_microbatches, n_stages = Schedule1F1B(), 6, 4

    for stage in range(4):
        Pipe.stage_ids = [stage]
        actions = pipeline_actions(Pipe)
        in_flight, most = 0, 0
        for kind, _, _ in actions:
            in_flight += 1 if kind == "F" else -1
            most = max(most, in_flight)
        assert [a[0] for a in actions].count("F") == [a[0] for a in actions].count("B") == 6
        assert most == min(6, 4 - stage) and in_flight == 0


@pytest.mark.parametrize("argv, message", [
    (["train", "configs/demo.yaml", "--dry-run"], "--dry-run needs the job's number of ranks"),
    (["train", "configs/demo.yaml", "--rank", "3"], "--world-size, --rank and --device go with --dry-run"),
    (["train", "configs/demo.yaml", "--dry-run", "--world-size", "4", "--rank", "4"], "--rank: must be in [0, 4)"),
    (["train", "configs/demo.yaml", "--dry-run", "--world-size", "0"], "--world-size: must be at least 1"),
    (["train", "configs/demo.yaml", "--dry-run", "--world-size", "3", "parallel.tp=2"],
     "parallel.dp_shard: world size 3 is not divisible"),
])
def test_bad_dry_run_requests_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_prints_the_rank_report(capsys):
    assert main(["train", "configs/demo.yaml", "--dry-run", "--world-size", "4", "--rank", "1",
                 "parallel.tp=2", "parallel.dp_shard=2"]) == 0
    out = capsys.readouterr().out
    assert "dry run: rank 1 of 4 (dp_replicate 0 dp_shard 0 pp 0 cp 0 tp 1" in out
    assert "optimizer state" in out and "estimated peak" in out


def test_a_rank_that_does_not_fit_the_gpu_is_one_line(monkeypatch, capsys):
    """--device cuda answers "does this rank fit": the allocator's out-of-memory error is that answer, one line."""
    import torch

    import engine.dry_run

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    monkeypatch.setattr(engine.dry_run, "dry_run", out_of_memory)
    assert main(["train", "configs/demo.yaml", "--dry-run", "--world-size", "2", "--rank", "1", "--device", "cuda",
                 "parallel.dp_shard=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "herd: error: rank 1 of 2 does not fit on this GPU: CUDA out of memory. Tried to allocate 2.00 GiB"
