"""A recipe's stages as training jobs: what each stage runs (its job config, tokens per step, step budget) and the
token-based LR schedule that ties them together (engine/schedule.py lr_multiplier_tokens).

Stages follow one another: stage k starts where stage k-1 ended, at a global optimizer step, a count of tokens
trained and a count of samples consumed (`Position`). A stage of T tokens at P tokens per step runs ceil(T / P)
steps (the last step may pass T by less than one batch; the next stage starts at the tokens actually trained).
A gated long-context stage runs in chunks of gate.check_every_tokens until its gate passes or T is spent, so
where later stages start is known only once it has run: the runner records positions as it goes
(recipe/runner.py); `static_plan` assumes every gated stage spends its whole budget (what --print-config shows).
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional

from engine.config import (DataStageConfig, DatasetConfig, JobConfig, RecipeConfig, RecipeStageConfig, load_config,
                           validate)
from engine.errors import ConfigError

TRAIN_NAME = "train"  # the run's directory under recipe.run_dir: <run_dir>/train (one lineage for every stage)


@dataclass
class Position:
    """Where a stage starts (or ended): global optimizer step, tokens trained, samples consumed."""

    step: int = 0
    tokens: int = 0
    samples: int = 0

    def after(self, steps: int, job: JobConfig) -> "Position":
        return Position(self.step + steps, self.tokens + steps * tokens_per_step(job),
                        self.samples + steps * job.data.global_batch_size)


@dataclass
class StagePlan:
    """A stage as planned before it runs (gated stages at their full budget)."""

    recipe: RecipeConfig
    stage: RecipeStageConfig
    job: JobConfig
    start: Position
    steps: int  # the step budget: ceil(tokens / tokens per step)
    chunk_steps: int  # a gated stage evaluates its gate every this many steps (= steps when not gated)
    history: List[DataStageConfig] = field(default_factory=list)  # the data stages before it


def tokens_per_step(job: JobConfig) -> int:
    return job.data.global_batch_size * job.data.seq_len


def base_job(recipe: RecipeConfig, stage: RecipeStageConfig, world_size: int,
             extra: Optional[List[str]] = None) -> JobConfig:
    """The stage's job as the recipe writes it (validated for `world_size`), before the runner's position keys;
    a bad override is a one-line error naming the stage."""
    run = [f"log.run_dir={recipe.run_dir}", f"log.name={TRAIN_NAME}"]
    try:
        return load_config(recipe.config, [*recipe.overrides, *stage.overrides, *run, *(extra or [])],
                           world_size=world_size)
    except ConfigError as e:
        raise ConfigError(f"stages.{stage.name}", str(e)) from None


def anneal_span(plan: "StagePlan") -> int:
    """Tokens over which the anneal stage's LR falls linearly to 0: its own tokens plus one step, so that the LR of
    its updates falls evenly (k/(n+1) of the start value for k = n..1) and its last update still learns; with the
    stage's own tokens the last update of a short anneal (Llama 3 405B: 3 steps of 16M tokens) would have LR 0."""
    return (plan.steps + 1) * tokens_per_step(plan.job)


def effective_every(plan: "StagePlan") -> int:
    """The stage's checkpoint interval as its run gets it (position_job: 0 saves only at the stage's end, its
    global step, of which no earlier step of the stage is a multiple)."""
    return plan.job.checkpoint.every if plan.job.checkpoint.every > 0 else plan.start.step + plan.steps


def stage_steps(stage: RecipeStageConfig, job: JobConfig) -> int:
    return max(1, math.ceil(int(stage.tokens) / tokens_per_step(job)))


def chunk_steps(stage: RecipeStageConfig, job: JobConfig, budget: int) -> int:
    every = int(stage.gate.check_every_tokens)
    if not stage.gate.enabled or every <= 0:
        return budget
    return min(budget, max(1, math.ceil(every / tokens_per_step(job))))


def data_stage(job: JobConfig, start: Position) -> DataStageConfig:
    """What the data stream of later stages needs to know of this one (engine/data/stages.py)."""
    return DataStageConfig(start_sample=start.samples, seq_len=job.data.seq_len,
                           train=[DatasetConfig(path=d.path, weight=d.weight) for d in job.data.train])


def static_plan(recipe: RecipeConfig, world_size: int) -> List[StagePlan]:
    """Every stage's job, start and budget, assuming gated stages spend their budgets."""
    plans, position, history = [], Position(), []
    for stage in recipe.stages:
        job = base_job(recipe, stage, world_size)
        steps = stage_steps(stage, job)
        plans.append(StagePlan(recipe, stage, job, position, steps, chunk_steps(stage, job, steps), list(history)))
        history.append(data_stage(job, position))
        position = position.after(steps, job)
    return plans


def schedule_horizon(recipe: RecipeConfig, plans: List[StagePlan]) -> int:
    """The main schedule's total tokens: recipe.total_tokens, or every stage's budget before the anneal stage."""
    if recipe.total_tokens > 0:
        return int(recipe.total_tokens)
    return sum(p.steps * tokens_per_step(p.job) for p in plans if p.stage.kind != "anneal")


def warmup_tokens(recipe: RecipeConfig, plans: List[StagePlan]) -> int:
    """recipe.warmup_tokens, or recipe.warmup_steps counted in the steps (and batch sizes) of the stages they span
    (Llama 3: 8,000 steps over the 4M- and 8M-token batches of the ramp)."""
    if not recipe.warmup_steps:
        return int(recipe.warmup_tokens)
    left, tokens = recipe.warmup_steps, 0
    for plan in plans:
        taken = min(left, plan.steps)
        tokens += taken * tokens_per_step(plan.job)
        left -= taken
        if left == 0:
            return tokens
    raise ConfigError("warmup_steps", f"{recipe.warmup_steps} warmup steps outlast the recipe's "
                      f"{sum(p.steps for p in plans)} steps")


def position_job(plan: StagePlan, start: Position, end_step: int, history: List[DataStageConfig], horizon: int,
                 warmup: int, anneal_tokens: int, world_size: int, first_chunk: bool) -> JobConfig:
    """The stage's job (freshly loaded) with the runner's keys: where it starts (data stream, schedule), where it
    stops (train.steps is the global step to reach), and the checkpoints it must keep."""
    job = base_job_of(plan, world_size)
    job.train.steps = end_step
    job.data.stages = list(history)
    job.data.stage_start_sample = start.samples
    s = job.schedule
    s.total_tokens, s.warmup_tokens = horizon, warmup
    s.warmup_steps = 0  # the token warmup (the recipe's warmup_steps counted in tokens) replaces the job's
    s.stage_start_step, s.stage_start_tokens = start.step, start.tokens
    if plan.stage.kind == "anneal":  # linear towards 0 over the stage's own steps, from the LR it starts at
        s.anneal_start_tokens, s.anneal_tokens = max(1, start.tokens), anneal_tokens
    if job.checkpoint.every <= 0:  # the end of every run saves (saves fall on global multiples: its end step has
        job.checkpoint.every = max(1, end_step)  # none before it in the run); the next stage starts from there
    if plan.stage.kind == "anneal":  # keep every checkpoint the stage may save (preemptions too): they are averaged
        job.checkpoint.keep_last = max(job.checkpoint.keep_last, plan.steps + 2)
    if hasattr(job.long_eval, "at_start"):  # the pre-stage measurement once (if wanted), not before every chunk
        job.long_eval.at_start = first_chunk and job.long_eval.at_start
    validate(job, world_size)
    return job


def base_job_of(plan: StagePlan, world_size: int) -> JobConfig:
    return base_job(plan.recipe, plan.stage, world_size)


def plan_table(recipe: RecipeConfig, plans: List[StagePlan]) -> List[str]:
    """The stage table of `herd recipe --print-config` (gated stages at their full budget)."""
    from engine.schedule import lr_multiplier_tokens
    horizon, warmup = schedule_horizon(recipe, plans), warmup_tokens(recipe, plans)
    lines = [f"recipe {recipe.name}: {len(plans)} stages, main schedule over {horizon:,} tokens with "
             f"{warmup:,} warmup tokens, run directory {recipe.run_dir}/{TRAIN_NAME}",
             f"{'stage':<16} {'kind':<21} {'start tokens':>18} {'tokens':>18} {'steps':>9} {'seq':>7} "
             f"{'batch seqs':>10} {'tok/step':>11} {'layout':<24} {'rope theta':>10} {'LR first->last':>20}"]
    for plan in plans:
        job, p = plan.job, plan.job.parallel
        per_step = tokens_per_step(job)
        s = job.schedule
        s.total_tokens, s.warmup_tokens = horizon, warmup
        if plan.stage.kind == "anneal":
            s.anneal_start_tokens, s.anneal_tokens = max(1, plan.start.tokens), anneal_span(plan)
        first = job.optim.lr * lr_multiplier_tokens(plan.start.tokens + per_step, s)
        last = job.optim.lr * lr_multiplier_tokens(plan.start.tokens + plan.steps * per_step, s)
        layout = f"dp{p.dp_replicate * p.dp_shard} pp{p.pp} cp{p.cp} tp{p.tp}"
        gate = " (gated)" if plan.stage.gate.enabled else ""
        lines.append(f"{plan.stage.name:<16} {plan.stage.kind + gate:<21} {plan.start.tokens:>18,} "
                     f"{plan.steps * per_step:>18,} {plan.steps:>9,} {job.data.seq_len:>7} "
                     f"{job.data.global_batch_size:>10,} {per_step:>11,} {layout:<24} {job.model.rope_theta:>10g} "
                     f"{first:>9.3g}->{last:<9.3g}")
    end = plans[-1].start.after(plans[-1].steps, plans[-1].job)
    lines.append(f"total: {end.step:,} steps, {end.tokens:,} tokens, {end.samples:,} sequences")
    return lines
