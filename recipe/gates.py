"""Long-context gates (Llama 3 section 3.4.2: each long-context stage moved on once short-context performance had
recovered and needle-in-a-haystack was solved) and the recipe's closing table.

The measurements are long_eval's (engine/eval/long_context.py): rank 0 appends one JSON line per evaluation to
<run>/long_eval.jsonl with the step, whether it was taken at the start or the end of a run, the short-context
validation loss and the needle accuracy. A gate compares the end of a chunk with the stage's start.
"""

import json
from pathlib import Path
from typing import List, Optional

from engine.config import RecipeStageConfig
from engine.errors import ConfigError
from recipe.plan import Position, StagePlan, tokens_per_step

RECORDS = "long_eval.jsonl"


def check_stage(plan: StagePlan) -> None:
    """A gate needs the measurements it reads."""
    stage, job = plan.stage, plan.job
    if stage.gate.enabled and not job.long_eval.enabled:
        raise ConfigError(f"stages.{stage.name}.gate.enabled", "a gate reads long_eval's measurements: add "
                                                              "long_eval.enabled=true to the stage's overrides")
    if stage.gate.enabled and job.long_eval.needle_trials <= 0 and job.long_eval.short_seq_len <= 0:
        raise ConfigError(f"stages.{stage.name}.gate.enabled", "the gate has nothing to judge: long_eval measures "
                                                              "neither needles (needle_trials) nor short_seq_len")


def _records(run: Path) -> List[dict]:
    path = run / RECORDS
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:  # a line cut by a kill: the evaluation is taken again by the rerun
            continue
    return found


def _needle(record: Optional[dict]) -> Optional[float]:
    return None if record is None else record.get("needle_mean")


def _short(record: Optional[dict]) -> Optional[float]:
    return None if record is None else record.get("short_loss")


def measure(plan: StagePlan, run: Path, start_step: int, end_step: int) -> Optional[dict]:
    """The gate of a long-context stage after the chunk ending at `end_step` (None for other stages, or when
    long_eval is off): the pre-stage and current measurements and whether they pass."""
    if plan.stage.kind != "long_context" or not plan.job.long_eval.enabled:
        return None
    records = _records(run)
    before = next((r for r in records if r.get("when") == "start" and r.get("step") == start_step), None)
    after = next((r for r in reversed(records) if r.get("when") == "end" and r.get("step") == end_step), None)
    gate = plan.stage.gate
    short_before, short_after = _short(before), _short(after)
    recovered = None
    if short_before is not None and short_after is not None:
        recovered = short_after <= short_before * (1.0 + gate.short_loss_tolerance)
    needle_after = _needle(after)
    solved = None if needle_after is None else needle_after >= gate.needle_accuracy
    return {"step": end_step, "short_loss_before": short_before, "short_loss_after": short_after,
            "needle_before": _needle(before), "needle_after": needle_after,
            "needle_after_by_length": None if after is None else after.get("needle"),
            "short_recovered": recovered, "needle_solved": solved,
            "passed": (solved, recovered) != (None, None) and solved is not False and recovered is not False}


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def describe(stage: RecipeStageConfig, gate: dict, done: bool) -> str:
    verdict = "passed" if gate["passed"] else "not passed"
    if not stage.gate.enabled:
        then = "recorded (gate off)"
    else:
        then = "training on" if not done else "moving on" if gate["passed"] else "token budget spent, moving on"
    return (f"stage {stage.name} at step {gate['step']}: short-context loss {_fmt(gate['short_loss_before'])} -> "
            f"{_fmt(gate['short_loss_after'])} (tolerance {stage.gate.short_loss_tolerance:.0%}), needle accuracy "
            f"{_fmt(gate['needle_before'], 2)} -> {_fmt(gate['needle_after'], 2)} (needs "
            f"{stage.gate.needle_accuracy:.2f}): {verdict}, {then}")


def _losses(run: Path) -> dict:
    """step -> the training loss metrics.jsonl holds for it last (a resumed step is written again)."""
    path, losses = run / "metrics.jsonl", {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record and "step" in record:
            losses[record["step"]] = record["loss"]
    return losses


def summary(plans: List[StagePlan], state: dict, run: Path) -> List[str]:
    """What each stage did, one line each."""
    losses = _losses(run)
    lines = [f"{'stage':<16} {'kind':<12} {'steps':>13} {'tokens':>23} {'seq':>6} {'tok/step':>9} "
             f"{'layout':<18} {'loss':>7}  gate"]
    for plan in plans:
        record = state["stages"].get(plan.stage.name, {})
        if not record.get("done"):
            lines.append(f"{plan.stage.name:<16} {plan.stage.kind:<12} not finished")
            continue
        start, end = Position(**record["start"]), Position(**record["end"])
        p = plan.job.parallel
        layout = f"dp{p.dp_replicate * p.dp_shard} pp{p.pp} cp{p.cp} tp{p.tp}"
        gate = record["chunks"][-1].get("gate") if record["chunks"] else None
        gate_text = "-" if gate is None else (
            f"short {_fmt(gate['short_loss_before'])}->{_fmt(gate['short_loss_after'])}, needle "
            f"{_fmt(gate['needle_before'], 2)}->{_fmt(gate['needle_after'], 2)}, "
            f"{'passed' if gate['passed'] else 'not passed'} after {len(record['chunks'])} check(s)")
        lines.append(f"{plan.stage.name:<16} {plan.stage.kind:<12} {start.step:>6}-{end.step:<6} "
                     f"{start.tokens:>11,}-{end.tokens:<11,} {plan.job.data.seq_len:>6} "
                     f"{tokens_per_step(plan.job):>9,} {layout:<18} {_fmt(losses.get(end.step)):>7}  {gate_text}")
    return lines
