"""Checks of a loaded JobConfig that catch, at load time and naming the key, every value that torch, numpy or the
filesystem would otherwise reject later (as a traceback on every rank) or accept and train wrongly.

Generic rules first (every float finite, every integer within int64), then the values with a meaning: AdamW's
hyper-parameters (torch.optim.AdamW refuses betas outside [0, 1), a negative eps or weight decay), seeds (numpy's
generators refuse negative seeds; the init seeds are seed * 1,000,003 + crc32, which must fit a 64-bit generator
seed), blend weights, names that become file names, and directories that already exist as files.
"""

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterator, List, Tuple

from engine.config_schema import JobConfig
from engine.errors import ConfigError
from engine.files import file_problem

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
SEED_LIMIT = 1 << 32  # seeds are 32-bit: the init generator's seed is seed * 1_000_003 + crc32 (engine/model/init.py)
NAME_BYTES = 200  # a run directory name, and its archive name (+ ".YYYYmmdd-HHMMSS"), must fit 255 bytes
MAX_WORLD_SIZE = 2 ** 20  # 1,048,576 ranks: beyond any cluster built, far below torch's int32 ranks (launch, plan)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def leaves(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every scalar in a config dataclass tree; list elements as key[i]."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaves(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from leaves(item, f"{key}[{i}].")
                else:
                    yield f"{key}[{i}]", item
        else:
            yield key, value


def check_numbers(cfg: Any) -> None:
    """No NaN or infinity anywhere (YAML reads .nan, .inf and 1e400 as floats), no integer beyond int64 (Python's
    are unbounded; torch and numpy are not)."""
    for key, value in leaves(cfg):
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            _require(math.isfinite(value), key, f"must be a finite number, got {value}")
        elif isinstance(value, int):
            _require(INT64_MIN <= value <= INT64_MAX, key, f"{value} does not fit a 64-bit integer")


def check_optimizer(optim: Any, init_std: float) -> None:
    """torch.optim.AdamW's own checks, made at load time with the key named."""
    _require(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    for key in ("beta1", "beta2"):
        value = getattr(optim, key)
        _require(0 <= value < 1, f"optim.{key}", f"must be in [0, 1), got {value}")
    _require(optim.eps > 0, "optim.eps", f"must be positive (it keeps AdamW's denominator above 0), got {optim.eps}")
    _require(optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {optim.weight_decay}")
    _require(init_std > 0, "model.init_std", f"must be positive (0 would start every weight equal), got {init_std}")


_TOKEN_SCHEDULE = ("warmup_tokens", "anneal_start_tokens", "anneal_tokens", "stage_start_step", "stage_start_tokens")


def check_token_schedule(s: Any) -> None:
    """The token schedule (a recipe stage's: schedule.total_tokens > 0) and its fields, which the step schedule
    never reads: set without total_tokens they were ignored silently (no warmup at all), as was warmup_steps
    with it."""
    for name in ("total_tokens",) + _TOKEN_SCHEDULE:
        _require(getattr(s, name) >= 0, f"schedule.{name}", f"must be >= 0, got {getattr(s, name)}")
    if s.total_tokens == 0:
        for name in _TOKEN_SCHEDULE:
            _require(getattr(s, name) == 0, f"schedule.{name}", "is read only by the token schedule: set "
                     "schedule.total_tokens too (herd recipe writes these), or use schedule.warmup_steps")
        return
    _require(s.warmup_steps == 0, "schedule.warmup_steps", "the token schedule (schedule.total_tokens > 0) warms "
             "up over schedule.warmup_tokens; set that instead")
    _require(s.warmup_tokens <= s.total_tokens, "schedule.warmup_tokens",
             f"must be at most schedule.total_tokens={s.total_tokens}, got {s.warmup_tokens}")


def check_seeds(cfg: Any) -> None:
    for key in ("train.seed", "data.seed"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(0 <= value < SEED_LIMIT, key, f"must be in [0, 2**32), got {value}")


def check_blend(datasets: List[Any], group: str, staged: bool = False) -> None:
    """Weights are relative shares: each positive and normal (not a subnormal that divides to nothing), their sum
    finite so that every share is a real fraction. A dataset named twice (under any spelling) is refused: its
    share is its weight, so two entries are one weight split in two (a staged blend also keys its stream by it)."""
    for i, ds in enumerate(datasets):
        _require(ds.weight >= 2.2250738585072014e-308, f"data.{group}[{i}].weight",
                 f"must be positive (a share of the blend), got {ds.weight}")
        same = [other.path for other in datasets[:i] if os.path.realpath(other.path) == os.path.realpath(ds.path)]
        _require(not same, f"data.{group}[{i}].path", f"'{ds.path}' is listed twice in "
                 + ("a staged blend" if staged else "the blend")
                 + (f" (as '{same[0]}')" if same and same[0] != ds.path else "")
                 + (" (its path is its stream)" if staged else "") + ": merge the weights")
    total = sum(ds.weight for ds in datasets)  # overflows to inf (math.fsum would raise)
    _require(math.isfinite(total), f"data.{group}",
             "the weights sum to more than a float holds; scale them down (only their ratios matter)")


def check_file_name(value: str, key: str) -> None:
    _require(len(value.encode()) <= NAME_BYTES, key,
             f"is {len(value.encode())} bytes long; a file name holds at most {NAME_BYTES} here")


def first_existing(path: Path) -> Path:
    """path itself, or its nearest ancestor that exists (what a mkdir -p of path would build on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_directory(value: str, key: str) -> None:
    """A directory herd will create (or use) must not be a file, nor lie under one, nor be unwritable, nor have
    a name the file system cannot hold (a traceback from the first stat)."""
    if not value:
        return
    _require(not value.startswith("~") and "$" not in value, key, f"'{value[:200]}': herd does not expand ~ or "
             f"$VARIABLES in paths (it would create a directory of that name); write the path itself")
    path = Path(value)
    for part in path.parts:
        _require(len(os.fsencode(part)) <= 255, key, f"'{value[:60]}...': a name of {len(os.fsencode(part))} bytes, "
                                                     f"longer than the 255 a directory name may have")
    existing = first_existing(path if path.is_absolute() else Path.cwd() / path)
    _require(existing.is_dir(), key, f"'{value}' cannot be a directory: {existing} "
             f"{(file_problem(existing) or 'is a file').split(', not')[0]}")
    _require(os.access(existing, os.W_OK | os.X_OK), key, f"'{value}': {existing} is not writable")


def check_existing_directory(value: str, key: str) -> None:
    """A directory the run reads (a checkpoint root to load weights from) must exist."""
    if value:
        _require(Path(value).is_dir(), key, f"'{value}' is not a directory (a checkpoint root)")


def check_long_eval(cfg: Any) -> None:
    """long_eval (engine/eval/long_context.py): every evaluation length must be one the layout can cut (cp's 2*cp
    zigzag chunks, sequence parallelism's cp*tp shards) and RoPE covers; the needle test needs a real choice."""
    e, p = cfg.long_eval, cfg.parallel
    if not e.enabled:
        return
    _require(cfg.align.kind == "lm", "long_eval.enabled", f"needs align.kind=lm (got {cfg.align.kind})")
    _require(e.short_seq_len >= 0, "long_eval.short_seq_len", f"must be >= 0 (0: not measured), got {e.short_seq_len}")
    _require(e.needle_trials >= 0, "long_eval.needle_trials", f"must be >= 0 (0: no needle), got {e.needle_trials}")
    _require(e.short_seq_len > 0 or e.needle_trials > 0, "long_eval.enabled",
             "nothing to evaluate: set long_eval.short_seq_len or long_eval.needle_trials")
    _require(not e.short_seq_len or bool(cfg.data.valid), "long_eval.short_seq_len",
             "the short-context loss is measured on data.valid, which is empty")
    _require(e.short_batches >= 1, "long_eval.short_batches", f"must be at least 1, got {e.short_batches}")
    _require(2 <= e.needle_candidates <= 1000, "long_eval.needle_candidates",
             f"must be between 2 (the true value and a distractor) and 1000 (each candidate's answer is scored on "
             f"every haystack), got {e.needle_candidates}")
    _require(bool(e.needle_depths), "long_eval.needle_depths", "must list at least one depth")
    for i, depth in enumerate(e.needle_depths):
        _require(0.0 <= depth <= 1.0, f"long_eval.needle_depths[{i}]", f"must be in [0, 1], got {depth}")
        _require(depth not in e.needle_depths[:i], f"long_eval.needle_depths[{i}]",
                 f"{depth} is listed twice (the results are one cell per depth)")
    for i, length in enumerate(e.needle_lengths):
        _require(length not in e.needle_lengths[:i], f"long_eval.needle_lengths[{i}]",
                 f"{length} is listed twice (the results are one cell per length)")
    _require(0 <= e.seed < SEED_LIMIT, "long_eval.seed", f"must be in [0, 2**32), got {e.seed}")
    problem = file_problem(e.filler) if e.filler else None
    _require(problem is None, "long_eval.filler",
             f"'{e.filler[:200]}' {'is not a file' if problem == 'does not exist' else problem}")
    lengths = [("long_eval.short_seq_len", e.short_seq_len)] if e.short_seq_len else []
    if e.needle_trials:
        lengths += [(f"long_eval.needle_lengths[{i}]", n) for i, n in enumerate(e.needle_lengths)]
    for key, length in lengths:
        _require(0 < length <= cfg.model.max_seq_len, key,
                 f"{length} must be positive and at most model.max_seq_len={cfg.model.max_seq_len} (the RoPE limit)")
        _require(p.cp == 1 or length % (2 * p.cp) == 0, key,
                 f"{length} cannot be cut into 2*cp={2 * p.cp} equal chunks (parallel.cp={p.cp})")
        _require(p.tp == 1 or not p.sequence_parallel or length % (p.cp * p.tp) == 0, key,
                 f"{length} tokens cannot be split over cp*tp={p.cp * p.tp} sequence-parallel ranks")


FP8_WEIGHT_RECIPES = ("same", "tensorwise", "delayed")


def check_fp8_fusion(fp8: Any, tp: int = 1, compile: bool = False) -> None:
    """fp8.weight_recipe and the fused casts (engine/fp8/fused_cast.py): the casts need native FP8 layers to feed,
    the delayed recipe (the scale known before the one pass that writes FP8), no tensor parallelism (it
    redistributes the norm's output before the projections) and no torch.compile (it would not trace them)."""
    _require(fp8.weight_recipe in FP8_WEIGHT_RECIPES, "fp8.weight_recipe",
             f"'{fp8.weight_recipe}' is not one of {', '.join(FP8_WEIGHT_RECIPES)}")
    _require(fp8.weight_recipe == "same" or fp8.backend == "native", "fp8.weight_recipe",
             f"'{fp8.weight_recipe}' needs fp8.backend=native (herd's FP8 layers scale the weights; "
             f"backend {fp8.backend} would ignore it)")
    for key in ("fuse_norm_cast", "fuse_swiglu_cast"):
        if not getattr(fp8, key):
            continue
        _require(fp8.backend == "native", f"fp8.{key}",
                 f"needs fp8.backend=native (it writes the input of herd's FP8 layers), got {fp8.backend}")
        _require(fp8.recipe == "delayed", f"fp8.{key}",
                 "needs fp8.recipe=delayed: the one fused pass needs the scale before it, and tensorwise scaling "
                 "takes it from the amax of the tensor being written")
        _require(tp == 1, f"fp8.{key}", f"needs parallel.tp=1 (tensor parallelism redistributes the activation "
                                        f"between the op and its FP8 layers), got tp={tp}")
        _require(not compile, f"fp8.{key}", "cannot run under train.compile (torch.compile does not trace the "
                                            "fused cast's hand-off to the FP8 layers); turn one of them off")


def ignored_settings(cfg: Any) -> List[str]:
    """Warning lines for settings this layout never reads (a base config's pipeline keys under a pp=1 override):
    said, not refused, since the same file serves both layouts."""
    p, default = cfg.parallel, type(cfg.parallel)()
    if p.pp > 1:
        return []
    keys = [k for k in ("pp_schedule", "pp_virtual_stages", "pp_layers", "pp_head_cost")
            if getattr(p, k) != getattr(default, k)]
    return [f"warning: {', '.join(f'parallel.{k}' for k in keys)} {'has' if len(keys) == 1 else 'have'} no effect at "
            f"parallel.pp=1 (no pipeline)"] if keys else []


# job keys the recipe runner sets for every stage (recipe/plan.py position_job): an override of one was dropped,
# or (checkpoint.resume=never) moved the recipe's run aside; with what to write instead
RECIPE_KEYS = {"train.steps": "stages[i].tokens", "schedule.total_tokens": "the recipe's total_tokens",
               "schedule.warmup_tokens": "the recipe's warmup_tokens", "schedule.warmup_steps": "the recipe's "
               "warmup_steps", "schedule.stage_start_step": "nothing (the stage's position)",
               "schedule.stage_start_tokens": "nothing (the stage's position)", "schedule.anneal_start_tokens":
               "an anneal stage", "schedule.anneal_tokens": "an anneal stage", "data.stages": "nothing (the "
               "earlier stages)", "data.stage_start_sample": "nothing (the stage's position)", "log.name":
               "run_dir (the run is <run_dir>/train)", "log.run_dir": "the recipe's run_dir", "checkpoint.resume":
               "nothing (every stage resumes from the one before)"}
# ... and what only the whole recipe may set: every stage continues one lineage of checkpoints
STAGE_LINEAGE_KEYS = {"checkpoint.dir": "the recipe's overrides (all stages share one lineage)",
                      "checkpoint.on_foreign": "the recipe's overrides"}


def check_recipe_overrides(recipe: Any, sets: Any) -> None:
    """No override (the recipe's, or a stage's) names a key the runner sets; `sets(item, key)` tells whether an
    override sets a key (engine.config.override_sets)."""
    where = [("overrides", o) for o in recipe.overrides]
    where += [(f"stages.{s.name}.overrides", o) for s in recipe.stages for o in s.overrides]
    for key, item in where:
        owned = RECIPE_KEYS if key == "overrides" else {**RECIPE_KEYS, **STAGE_LINEAGE_KEYS}
        for job_key, use in owned.items():  # the runner replaces them: ignored, or (resume) moved the run aside
            _require(not sets(item, job_key), key, f"'{item}' sets {job_key}, which the recipe sets itself; use "
                                                   f"{use}")


def check_recipe_schedule(recipe: Any) -> None:
    """The recipe's warmup fits its stages, and its horizon (when given) its warmup."""
    _require(recipe.total_tokens >= 0, "total_tokens", "must be >= 0")
    _require(recipe.warmup_tokens >= 0 and recipe.warmup_steps >= 0, "warmup_tokens", "must be >= 0")
    _require(not (recipe.warmup_tokens and recipe.warmup_steps), "warmup_steps",
             "give warmup_tokens or warmup_steps, not both")
    budget = sum(s.tokens for s in recipe.stages)
    _require(recipe.warmup_tokens <= budget, "warmup_tokens", f"{recipe.warmup_tokens:g} warmup tokens outlast the "
             f"recipe's {budget:g} tokens")
    _require(not recipe.total_tokens or recipe.total_tokens >= recipe.warmup_tokens, "total_tokens",
             f"{recipe.total_tokens:g} is shorter than the warmup ({recipe.warmup_tokens:g} tokens)")


SAMPLING_FIELDS = ("samples", "max_new_tokens", "temperature", "top_p")
MAX_SAMPLES = 256  # completions per prompt: one generate call holds them all (Llama 3 paper: 10 to 30)


def check_sampling(stage: Any, key: str) -> None:
    """A pipeline stage's sampling fields: read by rejection sampling only (set on a training stage they were
    ignored), each in range."""
    if stage.kind != "rejection_sampling":
        default = type(stage)()
        for name in SAMPLING_FIELDS:
            _require(getattr(stage, name) == getattr(default, name), f"{key}.{name}",
                     f"a {stage.kind} stage does not use it (rejection sampling's)")
        return
    _require(1 <= stage.samples <= MAX_SAMPLES, f"{key}.samples",
             f"must be between 1 and {MAX_SAMPLES}, got {stage.samples}")
    _require(stage.max_new_tokens >= 1, f"{key}.max_new_tokens", f"must be at least 1, got {stage.max_new_tokens}")
    _require(stage.temperature >= 0, f"{key}.temperature", f"must be >= 0 (0: greedy), got {stage.temperature}")
    _require(stage.temperature > 0 or stage.samples == 1, f"{key}.temperature",
             f"0 (greedy) gives {stage.samples} identical samples per prompt: set samples: 1, or a temperature")
    _require(0 < stage.top_p <= 1, f"{key}.top_p", f"must be in (0, 1], got {stage.top_p}")


def check_slurm(s: Any) -> None:
    """Only what would make a broken sbatch script; the rendered script is checked again by sbatch itself."""
    _require(s.nodes >= 1, "slurm.nodes", f"must be at least 1, got {s.nodes}")
    _require(s.gpus_per_node >= 1, "slurm.gpus_per_node", f"must be at least 1, got {s.gpus_per_node}")
    _require(s.cpus_per_task >= 0, "slurm.cpus_per_task", f"must be >= 0 (0: SLURM's default), got {s.cpus_per_task}")
    _require(s.signal_seconds >= 0, "slurm.signal_seconds", f"must be >= 0, got {s.signal_seconds}")
    _require(s.master_port == 0 or 1024 <= s.master_port <= 65535, "slurm.master_port",
             f"must be 0 (from the job id) or a port in 1024-65535, got {s.master_port}")
    for key in ("job_name", "partition", "account", "qos"):
        value = getattr(s, key)
        _require(re.fullmatch(r"[A-Za-z0-9_.,+-]*", value) is not None, f"slurm.{key}",
                 f"'{value}' may hold only letters, digits and . , _ + -")
    # only [D-]HH:MM:SS: YAML reads an unquoted 4:00:00 as the number 14400, which SLURM would take as minutes
    limit = re.fullmatch(r"(?:(\d+)-)?(\d\d):(\d\d):(\d\d)|", s.time)
    _require(limit is not None, "slurm.time",
             f"'{s.time}' is not a time limit of the form HH:MM:SS or D-HH:MM:SS (two-digit hours, e.g. 04:00:00)")
    _require(s.signal_seconds <= 65535, "slurm.signal_seconds",
             f"must be at most 65535 (sbatch --signal's largest lead time), got {s.signal_seconds}")
    if s.time:
        days, hours, minutes, seconds = (int(g or 0) for g in limit.groups())
        _require(minutes < 60 and seconds < 60 and (not days or hours < 24), "slurm.time",
                 f"'{s.time}': minutes and seconds run to 59, and hours to 23 after a day count")
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        _require(total > 0, "slurm.time", f"'{s.time}' gives the job no time; leave it empty for the partition's "
                                          f"limit")
        _require(s.signal_seconds < total, "slurm.signal_seconds",
                 f"{s.signal_seconds} s is not before the end of the job's time limit slurm.time={s.time} "
                 f"({total} s): the save signal would never come before the kill")
    for i, arg in enumerate(s.sbatch_args):
        _require(re.fullmatch(r"--[a-z][a-z-]*(=[^\s'\"`$;&|<>]+)?", arg) is not None, f"slurm.sbatch_args[{i}]",
                 f"'{arg}' must be one sbatch option like --exclusive or --constraint=h100 (no spaces or quotes)")


def check_guards(cfg: Any) -> None:
    g = cfg.guards
    for key in ("nonfinite", "spike"):
        value = getattr(g, key)
        _require(value in ("skip", "rollback", "stop"), f"guards.{key}",
                 f"'{value}' is not one of skip, rollback, stop")
        _require(value != "rollback" or cfg.checkpoint.every > 0, f"guards.{key}",
                 "rollback needs checkpoints to roll back to: set checkpoint.every > 0")
    _require(g.spike_factor == 0 or g.spike_factor > 1, "guards.spike_factor",
             f"must be 0 (off) or above 1, got {g.spike_factor}")
    _require(g.spike_window >= 3, "guards.spike_window", f"must be at least 3 (a median), got {g.spike_window}")
    _require(g.max_consecutive_skips >= 1, "guards.max_consecutive_skips", "must be at least 1")
    _require(g.max_rollbacks >= 0, "guards.max_rollbacks", "must be >= 0")
    _require(g.straggler_every >= 0, "guards.straggler_every", "must be >= 0 (0: off)")
    _require(g.straggler_threshold > 0, "guards.straggler_threshold",
             f"must be positive (a fraction of the median step time), got {g.straggler_threshold}")
    _require(g.straggler_patience >= 1, "guards.straggler_patience", "must be at least 1")
    _require(g.telemetry_every >= 0, "guards.telemetry_every", "must be >= 0 (0: off)")


def check_watchdog(w: Any) -> None:
    for key in ("collective_timeout", "timeout", "heartbeat_every", "dump_wait"):
        _require(getattr(w, key) > 0, f"watchdog.{key}", f"must be positive (seconds), got {getattr(w, key)}")
    _require(w.heartbeat_every < w.timeout, "watchdog.heartbeat_every",
             f"{w.heartbeat_every:g} s must be shorter than watchdog.timeout={w.timeout:g} s")
    _require(w.trace_buffer >= 0, "watchdog.trace_buffer", f"must be >= 0 (0: off), got {w.trace_buffer}")


_PRODUCERS = {"data": ("rejection_sampling",), "valid": ("rejection_sampling",), "init": ("sft", "dpo"),
              "reward": ("rm",)}


def check_references(pipeline: Any, i: int) -> None:
    """Each "@name" of stage i names an earlier stage (in round 1 a later one has produced nothing) whose kind
    produces what the field takes; rejection sampling has a policy and a reward model."""
    stage = pipeline.stages[i]
    names = [s.name for s in pipeline.stages]
    kinds = {s.name: s.kind for s in pipeline.stages}
    for field_name, producers in _PRODUCERS.items():
        value = getattr(stage, field_name)
        if not value.startswith("@"):
            continue
        key = f"stages[{i}].{field_name}"  # these two errors' key as it always was
        _require(value[1:] in kinds, key, f"'{value}' names no stage of this pipeline ({', '.join(kinds)})")
        _require(kinds[value[1:]] in producers, key,
                 f"'{value}' is a stage of kind {kinds[value[1:]]}, which produces no {_WHAT[field_name]} "
                 f"(a stage of kind {' or '.join(producers)} does)")
        which = "this stage itself" if value[1:] == stage.name else "a later stage"
        _require(names.index(value[1:]) < i, f"stages.{stage.name}.{field_name}",
                 f"'{value}' is {which}: in round 1 it has produced nothing when this stage starts (name an earlier "
                 f"stage)")
    if stage.kind == "rejection_sampling":
        earlier = {s.kind for s in pipeline.stages[:i]}
        _require(bool(stage.reward) or "rm" in earlier, f"stages.{stage.name}.reward",
                 "rejection sampling needs a reward model: no rm stage comes before this one; add one or name a "
                 "checkpoint root")
        _require(bool(stage.init or pipeline.init) or bool(earlier & {"sft", "dpo"}), f"stages.{stage.name}.init",
                 "rejection sampling needs a policy: no sft or dpo stage comes before this one and the pipeline "
                 "has no init; add one or name a checkpoint root")


_WHAT = {"data": "rows", "valid": "rows", "init": "policy weights", "reward": "reward model"}


def check_data_stages(d: Any, max_seq_len: int) -> None:
    """Earlier recipe stages (engine/data/stages.py): they start the stream at 0 and come in order before this
    stage, within the RoPE tables; a staged blend names each dataset once (also as another spelling of the same
    path: `a/../corpus/x`), since its path is its stream."""
    _require(d.stage_start_sample >= 0, "data.stage_start_sample", f"must be >= 0, got {d.stage_start_sample}")
    starts = [s.start_sample for s in d.stages] + [d.stage_start_sample]
    for j, stage in enumerate(d.stages):
        key = f"data.stages[{j}]"
        _require(stage.start_sample == 0 or j > 0, f"{key}.start_sample",
                 f"must be 0 (the first stage begins the data stream), got {stage.start_sample}")
        _require(0 < stage.seq_len <= max_seq_len, f"{key}.seq_len",
                 f"must be positive and at most model.max_seq_len={max_seq_len} (the RoPE tables), got "
                 f"{stage.seq_len}")
        _require(bool(stage.train), f"{key}.train", "is empty: a stage trains on at least one dataset")
        later = f"data.stages[{j + 1}].start_sample" if j + 1 < len(d.stages) else "data.stage_start_sample"
        _require(starts[j + 1] > stage.start_sample, later,
                 f"{starts[j + 1]} must exceed {key}.start_sample={stage.start_sample} (stages come in order)")
    blends = [(f"stages[{j}].train", s.train) for j, s in enumerate(d.stages)]
    for group, train in blends + ([("train", d.train)] if d.stages else []):
        for i, ds in enumerate(train):
            _require(bool(ds.path), f"data.{group}[{i}].path", "is empty")
        check_blend(train, group, staged=True)


def suggest_key(full_key: str) -> str:
    """' (did you mean 'optim.lr'?)' for the closest field name at the same place in the schema."""
    parts = [p for p in re.split(r"[.\[\]]", full_key) if p and not p.isdigit()]
    node: Any = JobConfig
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return ""
        node = _field_type(node, fields[part])
    if not dataclasses.is_dataclass(node) or not parts:
        return ""
    names = [f.name for f in dataclasses.fields(node)]
    close = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.5)
    return f" (did you mean '{'.'.join(parts[:-1] + close)}'?)" if close else f" (valid keys: {', '.join(names)})"


def _field_type(owner: Any, f: dataclasses.Field) -> Any:
    """The dataclass a field holds: its own type, or the element type of a List[...] field."""
    hint = typing.get_type_hints(owner)[f.name]
    args = typing.get_args(hint)
    return args[0] if args and dataclasses.is_dataclass(args[0]) else hint

