"""herd scaling's run generation (scaling/plan.py): shapes by the documented rule, N counted as engine/flops.py
counts it (checked against the built model's own parameters), steps from C = 6ND, Llama 3's schedule and weight
decay, and the sweep config's mistakes as one-line errors naming the key."""

from pathlib import Path

import pytest
import torch

from engine.config import ScalingConfig, load_config
from engine.model import build_meta_model
from engine.optim import build_optimizer, build_scheduler
from launch.cli import main as herd
from scaling.plan import llama3_ffn_dim, model_shape, plan_runs

ROOT = Path(__file__).resolve().parents[2]
DEMO_JOB = str(ROOT / "configs/demo.yaml")


def sweep(**changes) -> ScalingConfig:
    values = dict(job=DEMO_JOB, budgets=[1e12, 4e12], dims=[64, 128, 192], head_dim=16, aspect_ratio=32,
                  batch_sizes=[8, 16], min_steps=10)
    return ScalingConfig(**{**values, **changes})


def test_llama3_ffn_rule_gives_the_released_models():
    """Llama 3 8B, 70B and 405B (dim, ffn_dim_multiplier, multiple_of) -> their published ffn widths."""
    assert llama3_ffn_dim(4096, 1.3, 1024) == 14336
    assert llama3_ffn_dim(8192, 1.3, 4096) == 28672
    assert llama3_ffn_dim(16384, 1.2, 4096) == 53248


def test_runs_follow_the_shape_rule_and_6nd():
    job = load_config(DEMO_JOB)
    cfg = sweep()
    runs = plan_runs(cfg, job)
    assert [(r.budget, r.dim) for r in runs] == [(b, d) for b in cfg.budgets for d in cfg.dims]
    for run in runs:
        assert (run.n_heads, run.n_layers, run.n_kv_heads) == (run.dim // 16, run.dim // 32, run.dim // 32)
        model = build_meta_model(model_shape(run.dim, cfg, job.model))
        embedding = job.model.vocab_size * run.dim  # the input lookup: not counted (engine/flops.py)
        assert run.params == sum(p.numel() for p in model.parameters()) - embedding
        tokens_per_step = run.batch_size * job.data.seq_len
        assert run.steps == round(run.budget / (6 * run.params * tokens_per_step))
        assert run.tokens == run.steps * tokens_per_step
        assert abs(run.compute - run.budget) <= 6 * run.params * tokens_per_step / 2  # within half a step
        assert run.compute_with_attention > run.compute
        assert run.warmup_steps == max(1, round(0.1 * run.steps))
    # a run's overrides make a valid herd job of exactly that shape and length
    run = runs[-1]
    job_cfg = load_config(DEMO_JOB, run.overrides(cfg))
    assert (job_cfg.model.dim, job_cfg.model.n_layers, job_cfg.train.steps) == (run.dim, run.n_layers, run.steps)
    assert (job_cfg.schedule.kind, job_cfg.schedule.min_lr_ratio, job_cfg.optim.weight_decay) == ("cosine", 0.1, 0.1)
    assert job_cfg.checkpoint.every == run.steps and job_cfg.log.name == run.name


def test_sizes_below_min_steps_are_left_out():
    runs = plan_runs(sweep(dims=[64, 96, 128, 160, 192], min_steps=40), load_config(DEMO_JOB))
    # 1e12 FLOPs with 8 x 256-token steps: d160 gets 34 steps and d192 22, below 40
    assert [r.dim for r in runs if r.budget == 1e12] == [64, 96, 128]
    assert [r.dim for r in runs if r.budget == 4e12] == [64, 96, 128, 160, 192]


def test_weight_decay_is_the_scheduled_lr_times_the_coefficient():
    """Llama 3's scaling runs decay weights by 0.1 x the LR at each step. herd's AdamW (decoupled decay) does that
    with optim.weight_decay=0.1: with zero gradients (no Adam update) a matrix shrinks by exactly 1 - 0.1 lr_t at
    step t of the warmup + cosine schedule, and a norm weight does not shrink."""
    job = load_config(DEMO_JOB, ["optim.lr=0.5", "optim.weight_decay=0.1", "schedule.warmup_steps=3",
                                 "schedule.min_lr_ratio=0.1", "train.steps=12"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4, bias=False))
    optimizer = build_optimizer(model, job.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, job.schedule, job.train.steps)
    matrix, norm = model[0].weight, model[1].weight
    for step in range(job.train.steps):
        lr = optimizer.param_groups[0]["lr"]
        before, norm_before = matrix.detach().clone(), norm.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
        torch.testing.assert_close(matrix.detach(), before * (1 - 0.1 * lr), rtol=1e-6, atol=0)
        assert torch.equal(norm.detach(), norm_before)
    assert lr == pytest.approx(0.5 * 0.1)  # the last step's LR: cosine down to 0.1 of the peak


@pytest.mark.parametrize("overrides,expected", [
    (["budgets=[1e12,-3e12]"], "budgets[1]: must be a positive number of FLOPs, got -3000000000000.0"),
    (["budgets=[]"], "budgets: no compute budgets"),
    (["dims=[]"], "dims: the size grid needs at least 3 widths for a parabola, got 0 (empty grid)"),
    (["dims=[64,96,100]"], "dims[2]: 100 must be a positive multiple of 16"),
    (["budgets=[1e9,1e12,1e13]", "batch_sizes=[8,16,16]"], "budgets[0]: 1e+09 FLOPs gives the smallest model (dim "),
    (["budgets=[1e12,3e12,1e13]", "batch_sizes=[8]"], "batch_sizes: give one per budget (3) or none, got 1"),
    (["budgets=[1e12,3e12,1e13]", "batch_sizes=[8,16,12]"], "batch_sizes[2]: 12 sequences is not a multiple of the job's "
                                "data.micro_batch_size=8"),
    (["lrs=[1e-3]"], "lrs: give one per width in dims (5) or none, got 1"),
    (["budgetz=[1e12]"], "budgetz: unknown key"),
    (["budgets=lots"], "budgets: must be a list"),
    (["job=/nonexistent.yaml"], "job: /nonexistent.yaml: config file not found"),
    (["overrides=[optim.lrr=1]"], "job: configs/demo.yaml: optim.lrr: unknown key"),
    (["downstream.choices=1"], "downstream.choices: must be at least 2, got 1"),
    (["downstream.context_tokens=100000"], "downstream.context_tokens: must be at most half the job's "
                                        "model.max_seq_len="),  # every run trained, then scoring failed
    (["name=a b"], "name: 'a b' must be a plain directory name"),
    (["--slurm", "--time", "4:00:00; rm -rf x"], "--time '4:00:00; rm -rf x' is not a time limit"),
    (["--slurm", "--partition", "gpu$(id)"], "--partition 'gpu$(id)' may hold only"),
])
def test_sweep_mistakes_are_one_line_naming_the_key(overrides, expected, capsys, tmp_path):
    code = herd(["scaling", str(ROOT / "configs/scaling/demo.yaml"), f"run_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("herd: error: "), err
    assert expected in err[0], err[0]
    assert not any(tmp_path.iterdir())  # nothing planned, written or trained
