"""The runs of an IsoFLOP sweep: for every compute budget C and every model width of the grid, one herd job.

Shapes (one documented rule, so that a size grid is a list of widths):
- n_heads = dim / head_dim (head width fixed), n_layers = dim / aspect_ratio (width per layer fixed),
  n_kv_heads = n_heads / kv_group (GQA groups fixed);
- ffn_dim by Llama 3's rule (the reference model.py's FeedForward): hidden = int(2 * 4 dim / 3), times
  ffn_multiplier, rounded up to a multiple of ffn_multiple_of (Llama 3 8B: dim 4096, 1.3, 1024 -> 14336).

Parameters N are counted as engine/flops.py counts the weights that multiply: every matrix and norm of the blocks,
the final norm and the output head, but not the input embedding (a lookup, no FLOPs). Compute is the paper's
C = 6 N D (Kaplan et al. 2020; Llama 3 section 3.2.1), so D = C / (6 N) tokens; herd's flops_per_token (6N plus the
attention score term) is recorded beside it, never used for the budget.

Each run trains with Llama 3's scaling-run schedule: linear warmup (warmup_fraction of the steps, at most
warmup_steps), cosine decay to min_lr_ratio of the peak, AdamW weight decay `weight_decay`, which torch's AdamW
(and so herd's) applies as weight_decay x the LR of each step (decoupled decay: p <- p - lr_t * wd * p), i.e.
"weight decay 0.1 x the LR at each step" for weight_decay=0.1 (tests/unit/test_scaling_plan.py checks it).
"""

import math
import re
from dataclasses import asdict, dataclass
from typing import List

from engine.config import JobConfig, ModelConfig, ScalingConfig, load_config
from engine.config_checks import INT64_MAX
from engine.errors import ConfigError
from engine.flops import flops_per_token, parameter_count


@dataclass
class RunSpec:
    """One (budget, size) run: its shape, its token budget, and what it is asked to do."""

    name: str  # run directory name under <sweep>/runs
    budget: float  # the nominal budget C (FLOPs) this run belongs to
    budget_index: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    params: int  # N: non-embedding parameters (engine/flops.py, include_embedding=False)
    batch_size: int  # sequences per optimizer step
    seq_len: int
    steps: int  # round(C / (6 N) / tokens per step)
    tokens: int  # D = steps x batch_size x seq_len (C / 6N up to rounding)
    compute: float  # 6 N D with the rounded D
    compute_with_attention: float  # flops_per_token x D (herd's MFU convention: 6N + 12 L H Q T per token)
    warmup_steps: int
    lr: float

    def overrides(self, cfg: ScalingConfig) -> List[str]:
        """The `herd train` overrides that make the sweep's job this run (after the sweep's own overrides)."""
        return [f"model.name=scaling-d{self.dim}", f"model.dim={self.dim}", f"model.n_layers={self.n_layers}",
                f"model.n_heads={self.n_heads}", f"model.n_kv_heads={self.n_kv_heads}",
                f"model.ffn_dim={self.ffn_dim}", f"data.global_batch_size={self.batch_size}",
                f"train.steps={self.steps}", "schedule.kind=cosine", f"schedule.warmup_steps={self.warmup_steps}",
                f"schedule.min_lr_ratio={cfg.min_lr_ratio}", f"optim.lr={self.lr}",
                f"optim.weight_decay={cfg.weight_decay}", "train.eval_every=0",
                f"train.eval_batches={cfg.eval_batches}", f"checkpoint.every={self.steps}", "checkpoint.resume=auto",
                f"log.run_dir={sweep_dir(cfg)}/runs", f"log.name={self.name}"]

    def as_dict(self) -> dict:
        return asdict(self)


# The job keys RunSpec.overrides sets for every run, after the sweep's `overrides` (which would be dropped without a
# word), and the sweep key that sets each instead ('' when none: the sweep fixes it). data.global_batch_size and
# optim.lr are the job's only while batch_sizes and lrs are empty (the plan then reads them from the job).
RUN_KEYS = {"model.name": "", "model.dim": "dims", "model.n_layers": "dims and aspect_ratio",
            "model.n_heads": "head_dim", "model.n_kv_heads": "kv_group",
            "model.ffn_dim": "ffn_multiplier and ffn_multiple_of", "data.global_batch_size": "batch_sizes",
            "train.steps": "budgets", "schedule.kind": "", "schedule.warmup_steps": "warmup_fraction and warmup_steps",
            "schedule.min_lr_ratio": "min_lr_ratio", "optim.lr": "lrs", "optim.weight_decay": "weight_decay",
            "train.eval_every": "", "train.eval_batches": "eval_batches", "checkpoint.every": "",
            "checkpoint.resume": "", "log.run_dir": "run_dir", "log.name": "name"}


def check_overrides(cfg: ScalingConfig) -> None:
    """The sweep's `overrides` may not set a key every run sets again (RUN_KEYS): one line naming the override
    and the sweep key to use instead."""
    for i, item in enumerate(cfg.overrides):
        key = str(item).split("=", 1)[0].strip().lstrip("+~")
        for owned, instead in RUN_KEYS.items():
            if owned != key and not owned.startswith(key + "."):
                continue
            if (owned == "data.global_batch_size" and not cfg.batch_sizes) or (owned == "optim.lr" and not cfg.lrs):
                continue  # the job's value, which the plan uses
            hint = f"set the sweep's {instead} instead" if instead else "the sweep fixes it"
            raise ConfigError(f"overrides[{i}]", f"'{item}': every run of the sweep sets {owned} itself, so this "
                                                 f"would be dropped; {hint}")


def check_job(job: JobConfig) -> None:
    """What a sweep's job must leave to the sweep, or no run could ever count as finished: each run's checkpoints
    in its own directory (where the final checkpoint is looked for), and validation data (the final loss)."""
    if job.checkpoint.dir:
        raise ConfigError("checkpoint.dir", f"'{job.checkpoint.dir}' (set by the sweep's job or overrides): every "
                                            f"run keeps its checkpoints in its own directory, where herd scaling "
                                            f"finds them; leave checkpoint.dir empty")
    if not job.data.valid:
        raise ConfigError("data.valid", "the sweep's job has no validation data, so no run would get the final "
                                        "validation loss the fits need; set data.valid")


def sweep_dir(cfg: ScalingConfig) -> str:
    return f"{cfg.run_dir}/{cfg.name}"


def llama3_ffn_dim(dim: int, multiplier: float, multiple_of: int) -> int:
    """Llama 3's SwiGLU width: int(2 * 4 dim / 3), scaled by ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def model_shape(dim: int, cfg: ScalingConfig, base: ModelConfig) -> ModelConfig:
    """The grid's model of width `dim` (the base model's vocabulary, RoPE and norm settings)."""
    n_heads = dim // cfg.head_dim
    return ModelConfig(**{**asdict(base), "rope_scaling": base.rope_scaling, "name": f"scaling-d{dim}", "dim": dim,
                          "n_layers": dim // cfg.aspect_ratio, "n_heads": n_heads,
                          "n_kv_heads": n_heads // cfg.kv_group,
                          "ffn_dim": llama3_ffn_dim(dim, cfg.ffn_multiplier, cfg.ffn_multiple_of)})


def check_scaling(cfg: ScalingConfig) -> None:
    """Every value that would make a sweep impossible, with its key (the run-level checks are in plan_runs)."""
    _require(re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.name) is not None and cfg.name not in (".", ".."), "name",
             f"'{cfg.name}' must be a plain directory name (letters, digits, '.', '_', '-')")
    _require(bool(cfg.job), "job", "name the job YAML every run starts from (e.g. configs/demo.yaml)")
    _require(bool(cfg.budgets), "budgets", "no compute budgets: give FLOPs, e.g. [1e12, 3e12, 1e13]")
    for i, budget in enumerate(cfg.budgets):
        _require(budget > 0, f"budgets[{i}]", f"must be a positive number of FLOPs, got {budget}")
    _require(len(set(cfg.budgets)) == len(cfg.budgets), "budgets", "a budget is listed twice")
    _require(len(cfg.dims) >= 3, "dims", f"the size grid needs at least 3 widths for a parabola, got "
                                         f"{len(cfg.dims)}" + (" (empty grid)" if not cfg.dims else ""))
    _require(len(set(cfg.dims)) == len(cfg.dims), "dims", "a width is listed twice")
    for key in ("head_dim", "aspect_ratio", "kv_group", "ffn_multiple_of", "min_steps", "eval_batches", "jobs"):
        _require(getattr(cfg, key) >= 1, key, f"must be at least 1, got {getattr(cfg, key)}")
    _require(cfg.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {cfg.head_dim}")
    for i, dim in enumerate(cfg.dims):
        unit = math.lcm(cfg.head_dim * cfg.kv_group, cfg.aspect_ratio)
        _require(dim > 0 and dim % unit == 0, f"dims[{i}]", f"{dim} must be a positive multiple of {unit} "
                 f"(head_dim x kv_group = {cfg.head_dim * cfg.kv_group} and aspect_ratio = {cfg.aspect_ratio})")
    _require(cfg.ffn_multiplier > 0, "ffn_multiplier", f"must be positive, got {cfg.ffn_multiplier}")
    _require(not cfg.batch_sizes or len(cfg.batch_sizes) == len(cfg.budgets), "batch_sizes",
             f"give one per budget ({len(cfg.budgets)}) or none, got {len(cfg.batch_sizes)}")
    for i, batch in enumerate(cfg.batch_sizes):
        _require(batch >= 1, f"batch_sizes[{i}]", f"must be at least 1 sequence, got {batch}")
    _require(not cfg.lrs or len(cfg.lrs) == len(cfg.dims), "lrs",
             f"give one per width in dims ({len(cfg.dims)}) or none, got {len(cfg.lrs)}")
    for i, lr in enumerate(cfg.lrs):
        _require(lr > 0, f"lrs[{i}]", f"must be positive, got {lr}")
    _require(0 <= cfg.warmup_fraction < 1, "warmup_fraction", f"must be in [0, 1), got {cfg.warmup_fraction}")
    _require(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    _require(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
    _require(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    for i, target in enumerate(cfg.targets):
        _require(target > 0, f"targets[{i}]", f"must be a positive number of FLOPs, got {target}")
    _require(len(set(cfg.targets)) == len(cfg.targets), "targets", "a target is listed twice")
    d = cfg.downstream
    _require(d.items >= 1, "downstream.items", f"must be at least 1, got {d.items}")
    _require(d.choices >= 2, "downstream.choices", f"must be at least 2, got {d.choices}")
    _require(d.context_tokens >= 1, "downstream.context_tokens", f"must be at least 1, got {d.context_tokens}")
    _require(d.min_line_chars >= 1, "downstream.min_line_chars", f"must be at least 1, got {d.min_line_chars}")
    _require(d.seed >= 0, "downstream.seed", f"must be >= 0, got {d.seed}")


def load_job(cfg: ScalingConfig) -> JobConfig:
    """The sweep's base job (validated as herd train would, with the first grid model so its shape checks pass)."""
    check_overrides(cfg)
    try:
        job = load_config(cfg.job, list(cfg.overrides))
    except ConfigError as e:
        raise ConfigError("job", f"{cfg.job}: {e}") from None
    check_job(job)
    return job


def plan_runs(cfg: ScalingConfig, job: JobConfig) -> List[RunSpec]:
    """Every (budget, width) run that reaches min_steps, in order of budget then width. A budget whose smallest
    model cannot reach min_steps, or that keeps fewer than 3 sizes, is an error naming budgets[i]."""
    check_scaling(cfg)
    limit = job.model.max_seq_len // 2  # the other half of the model's context holds the candidate line
    _require(not cfg.downstream.enabled or cfg.downstream.context_tokens <= limit, "downstream.context_tokens",
             f"must be at most half the job's model.max_seq_len={job.model.max_seq_len} (the candidate line follows "
             f"it), got {cfg.downstream.context_tokens}")
    seq_len = job.data.seq_len
    runs = []
    for b, budget in enumerate(cfg.budgets):
        batch = cfg.batch_sizes[b] if cfg.batch_sizes else job.data.global_batch_size
        _require(batch % job.data.micro_batch_size == 0, f"batch_sizes[{b}]" if cfg.batch_sizes else "job",
                 f"{batch} sequences is not a multiple of the job's data.micro_batch_size="
                 f"{job.data.micro_batch_size}")
        kept = []
        for i, dim in sorted(enumerate(cfg.dims), key=lambda item: item[1]):
            model = model_shape(dim, cfg, job.model)
            n = parameter_count(model, include_embedding=False)
            steps = round(budget / (6 * n) / (batch * seq_len))
            _require(steps <= INT64_MAX, f"budgets[{b}]",  # else train.steps fails naming a run, in 300 digits
                     f"{budget:.3g} FLOPs is too large for the grid: the model of dim {dim} ({n:,} parameters) would "
                     f"train {steps:.3g} steps, more than a 64-bit step count holds (about 9.2e18); lower the budget")
            if steps < cfg.min_steps:
                _require(bool(kept) or dim != min(cfg.dims), f"budgets[{b}]",
                         f"{budget:.3g} FLOPs gives the smallest model (dim {dim}, {n:,} parameters) {steps} steps of "
                         f"{batch} x {seq_len} tokens, fewer than min_steps={cfg.min_steps}: raise the budget")
                continue
            tokens = steps * batch * seq_len
            warmup = min(cfg.warmup_steps, max(1, round(cfg.warmup_fraction * steps))) if cfg.warmup_fraction else 0
            kept.append(RunSpec(
                name=f"c{budget:.3g}-d{dim}".replace("+", ""), budget=budget, budget_index=b, dim=dim,
                n_layers=model.n_layers, n_heads=model.n_heads, n_kv_heads=model.n_kv_heads, ffn_dim=model.ffn_dim,
                params=n, batch_size=batch, seq_len=seq_len, steps=steps, tokens=tokens, compute=6.0 * n * tokens,
                compute_with_attention=flops_per_token(model, seq_len) * tokens, warmup_steps=warmup,
                lr=cfg.lrs[i] if cfg.lrs else job.optim.lr))
        _require(len(kept) >= 3, f"budgets[{b}]", f"{budget:.3g} FLOPs leaves {len(kept)} model sizes with at least "
                                                  f"min_steps={cfg.min_steps} steps; a parabola needs 3")
        runs += kept
    names = [r.name for r in runs]
    _require(len(set(names)) == len(names), "budgets", "two budgets round to the same name (c<budget>-d<dim>): "
                                                       "make them differ in the first significant digit")
    for run in runs:
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", run.name) is not None, "budgets", f"bad run name {run.name}")
    return runs


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)
