"""herd's configuration: typed nested dataclasses, YAML presets and dotlist overrides.

This is the only module that imports omegaconf. Everything else receives plain dataclass instances, and each
component only its own slice (`cfg.model` for the model, `cfg.data` for the loader, ...).

Loading order: the schema's defaults, then the YAML file (after the files it `include`s), then command-line
overrides (`optim.lr=1e-4`). Every mistake is a `ConfigError` whose one-line message names the key; the CLI prints
it before any process group, model or data file is touched.
"""

import dataclasses
import os
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.config_checks import (_field_type, suggest_key, check_blend,  # noqa: F401 (_field_type: tests)
                                  check_directory, check_existing_directory, check_file_name,
                                  check_fp8_fusion, check_guards, check_long_eval, check_numbers, check_optimizer,
                                  check_data_stages, check_recipe_overrides, check_recipe_schedule, check_references,
                                  check_sampling, check_seeds, check_slurm, check_token_schedule, check_watchdog)
from engine.config_schema import (  # noqa: F401  (re-exported: components import them from here)
    RopeScalingConfig, ModelConfig, ParallelConfig, DatasetConfig, TokenizerConfig, DataConfig, DataStageConfig, OptimConfig,
    ScheduleConfig, TrainConfig, CheckpointConfig, FP8Config, GuardConfig, WatchdogConfig, SlurmConfig, LogConfig,
    AlignConfig, LongContextEvalConfig, JobConfig, PipelineConfig, StageConfig, RecipeGateConfig,
    RecipeStageConfig, RecipeConfig)
from engine.config_yaml import (CONFIGS_DIR, OVERRIDE_FORM, check_config_text, check_override,  # noqa: F401
                                include_path, yaml_error)
from engine.errors import ConfigError
from engine.files import file_problem
from engine.secrets import redact_tree



# ---------------------------------------------------------------------------------------------- loading

_RESOLVER_CALL = re.compile(r"\$\{\s*[^}]*:")  # ${oc.env:X}, ${eval:...}: resolvers run code or read secrets


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: int = 1) -> JobConfig:
    """Schema defaults <- YAML file (and its includes) <- dotlist overrides, then validated."""
    cfg = _load_structured(JobConfig, path, overrides, "config")
    validate(cfg, world_size)
    return cfg


def _load_structured(schema: Any, path: Optional[str], overrides: Optional[List[str]], source: str) -> Any:
    """An instance of the dataclass `schema`: its defaults <- the YAML file's layers <- the overrides."""
    merged = OmegaConf.structured(schema)
    if path is not None:
        for layer_source, layer in _yaml_layers(Path(path), chain=()):
            merged = _merge(merged, layer, layer_source)
    staged = [o for o in overrides or [] if o.startswith("stages.")] if "stages" in merged else []
    general = [o for o in overrides or [] if o not in staged]
    if general:
        merged = _merge(merged, _parse_overrides(general), "command line")
    for item in staged:  # after the rest: a stage is picked by its name in the stages the file and overrides made
        _override_stage(merged, item)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _as_config_error(e, source) from None


def _override_stage(merged: DictConfig, item: str) -> None:
    """`stages.NAME.KEY=VALUE` (or `stages.INDEX.KEY=VALUE`): one stage's field from the command line, e.g.
    `stages.anneal.tokens=4e9` or `stages.long.overrides=[data.seq_len=8192]` (a stage's job overrides, replaced
    whole as in the file). A dotlist cannot address a list element by its name, so herd picks the stage here."""
    names = [str(stage.get("name", "")) for stage in merged.stages]
    rest = item[len("stages."):]
    chosen = [(i, n) for i, n in enumerate(names) if n and rest.startswith(f"{n}.")]
    index_key = re.match(r"(\d+)\.", rest)
    if chosen:
        i, selector = max(chosen, key=lambda c: len(c[1]))  # names may hold dots: the longest that matches
        if selector.isdigit() and int(selector) != i and int(selector) < len(names):
            raise ConfigError(f"stages.{selector}", f"override '{item}' is ambiguous: '{selector}' is the name of "
                                                    f"stage {i} and the index of stage '{names[int(selector)]}'")
    elif index_key and int(index_key.group(1)) < len(names):
        i, selector = int(index_key.group(1)), index_key.group(1)
    else:
        target = rest.split("=", 1)[0]
        whole = target in names or target.isdigit()
        raise ConfigError(f"stages.{target if whole else target.rsplit('.', 1)[0]}",
                          f"override '{item}' " + ("sets a whole stage" if whole else "names no stage") +
                          f" (stages: {', '.join(names) or 'none'}); give stages.NAME.KEY=VALUE")
    key, field_override = f"stages.{selector}", rest[len(selector) + 1:]
    if not OVERRIDE_FORM.match(field_override):
        raise ConfigError(key, f"override '{item}' is not of the form stages.NAME.KEY=VALUE")
    try:
        merged.stages[i] = _merge(merged.stages[i], _parse_overrides([field_override]), "command line")
    except ConfigError as e:  # OmegaConf names the element by its index (stages[3].tokens): name it as given
        inner = e.key[len(f"stages[{i}]"):].lstrip(".") if e.key.startswith(f"stages[{i}]") else e.key
        inner = inner or field_override.split("=", 1)[0]  # a value YAML cannot read: the key it was for
        message = (str(e)[len(e.key) + 2:] if e.key else str(e)).replace(f"'{field_override}'", f"'{item}'")
        raise ConfigError(f"{key}.{inner}" if inner else key, message) from None


STAGE_KINDS = ("sft", "rm", "dpo", "rejection_sampling")


def load_pipeline(path: str, overrides: Optional[List[str]] = None) -> PipelineConfig:
    """An alignment pipeline YAML (<- dotlist overrides), checked: stage names, kinds, the files and "@stage"
    references each kind needs. The jobs of its stages are loaded (and validated) by the runner."""
    pipeline = _load_structured(PipelineConfig, path, overrides, path)
    check_numbers(pipeline)  # first: a NaN is "not finite", not "must be >= 0"
    _require(bool(pipeline.config), "config", f"{path}: name the job YAML every stage starts from")
    _require(Path(pipeline.config).is_file(), "config", f"config file not found: {pipeline.config}")
    _require(pipeline.rounds >= 1, "rounds", f"must be at least 1, got {pipeline.rounds}")
    _require(bool(pipeline.stages), "stages", f"{path}: no stages")
    names = [s.name for s in pipeline.stages]
    for i, stage in enumerate(pipeline.stages):
        key = f"stages[{i}]"
        _require(re.fullmatch(r"[A-Za-z0-9_-]+", stage.name) is not None, f"{key}.name",
                 f"'{stage.name}' must be a non-empty name of letters, digits, '_' and '-'")
        _require(names.count(stage.name) == 1, f"{key}.name", f"'{stage.name}' is used by more than one stage")
        _require(stage.kind in STAGE_KINDS, f"{key}.kind", f"'{stage.kind}' is not one of {', '.join(STAGE_KINDS)}")
        needed = ("prompts",) if stage.kind == "rejection_sampling" else ("data",)
        for field_name in needed:
            _require(bool(getattr(stage, field_name)), f"{key}.{field_name}", f"a {stage.kind} stage needs it")
        unused = ("data", "valid") if stage.kind == "rejection_sampling" else ("prompts", "reward")
        for field_name in unused:  # set but never read: the user meant something the stage does not do
            _require(not getattr(stage, field_name), f"{key}.{field_name}", f"a {stage.kind} stage does not use it")
        check_references(pipeline, i)
        check_sampling(stage, key)
    check_directory(pipeline.run_dir, "run_dir")
    return pipeline


RECIPE_KINDS = ("pretrain", "long_context", "anneal")


def load_recipe(path: str, overrides: Optional[List[str]] = None) -> RecipeConfig:
    """A pretraining recipe YAML (<- dotlist overrides), checked: stage names, kinds, token budgets, the schedule
    and at most one anneal stage, the last. The stages' jobs are loaded (and validated) by the runner."""
    recipe = _load_structured(RecipeConfig, path, overrides, path)
    check_numbers(recipe)  # first: a NaN is "not finite", not "must be >= 0"
    _require(bool(recipe.config), "config", f"{path}: name the job YAML every stage starts from")
    _require(Path(recipe.config).is_file(), "config", f"config file not found: {recipe.config}")
    _require(bool(recipe.stages), "stages", f"{path}: no stages")
    names = [s.name for s in recipe.stages]
    for i, stage in enumerate(recipe.stages):
        key = f"stages[{i}]"
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", stage.name) is not None, f"{key}.name",
                 f"'{stage.name}' must be a non-empty name of letters, digits, '.', '_' and '-'")
        _require(stage.name not in names[:i], f"{key}.name", f"'{stage.name}' is already the name of an earlier stage")
        _require(stage.kind in RECIPE_KINDS, f"{key}.kind", f"'{stage.kind}' is not one of {', '.join(RECIPE_KINDS)}")
        _require(1 <= stage.tokens < 2 ** 62, f"{key}.tokens", f"must be at least 1 token and below 2**62, got "
                                                                f"{stage.tokens:g}")
        _require(stage.kind != "anneal" or i == len(recipe.stages) - 1, f"{key}.kind",
                 "the anneal stage must be the last (its LR ends at 0)")
        _require(not stage.average or stage.kind == "anneal", f"{key}.average", "only an anneal stage averages")
        g = stage.gate
        _require(not g.enabled or stage.kind == "long_context", f"{key}.gate.enabled",
                 "only a long_context stage has a gate")
        _require(g.check_every_tokens >= 0, f"{key}.gate.check_every_tokens", "must be >= 0")
        _require(g.short_loss_tolerance >= 0, f"{key}.gate.short_loss_tolerance", "must be >= 0")
        _require(0 <= g.needle_accuracy <= 1, f"{key}.gate.needle_accuracy", "must be in [0, 1]")
    check_recipe_overrides(recipe, override_sets)
    check_recipe_schedule(recipe)
    check_directory(recipe.run_dir, "run_dir")
    return recipe


def is_recipe_file(path: str) -> bool:
    """Whether a YAML file is a recipe (a top-level `stages:` list of stages with `tokens`), so that `herd train`
    can run or print it too. Unreadable files answer False: loading them reports the error."""
    if not Path(path).is_file():  # a FIFO would block the read (the job loader names what it is)
        return False
    try:
        node = _load_yaml(Path(path))
    except Exception:  # noqa: BLE001 - the job loader gives the one-line error
        return False
    stages = node.get("stages") if isinstance(node, DictConfig) else None
    return isinstance(stages, ListConfig) and len(stages) > 0 and all(
        isinstance(s, DictConfig) and "tokens" in s for s in stages)


def load_structured(schema: Any, path: str, overrides: Optional[List[str]] = None) -> Any:
    """Any typed YAML of a package above engine/ (herd curate's pipeline: curate/config.py), with dotlist
    overrides, includes refused as for jobs, and no NaN, infinity or int64 overflow: the one OmegaConf loader."""
    loaded = _load_structured(schema, path, overrides, path)
    check_numbers(loaded)
    return loaded


# what an "@stage" reference needs from the stage it names: rows come from rejection sampling, a policy's
# weights from sft or dpo, a reward model from rm
def _load_yaml(path: Path) -> Any:
    """OmegaConf.load, with room for a blend of thousands of files: omegaconf 2.4 refuses documents of more than
    10,000 nodes even without an alias (its guard against alias bombs; the expansion-ratio guard stays on)."""
    try:
        return OmegaConf.load(path, max_yaml_expanded_nodes=10_000_000)
    except TypeError:  # omegaconf 2.3: no limit to raise
        return OmegaConf.load(path)


def _yaml_layers(path: Path, chain: tuple) -> List[tuple]:
    """The YAML file's layers in merge order: included files first (depth first), then the file itself."""
    if not path.is_file():
        problem = file_problem(path)
        raise ConfigError("", f"config file not found: {path}" if problem == "does not exist" else
                          f"{path}: {problem}, not a YAML file")
    if path.resolve() in chain:
        raise ConfigError("include", f"{path}: include cycle")
    try:
        raw = _load_yaml(path)
    except Exception as e:  # yaml.YAMLError and friends: one line with the file, line and column
        raise ConfigError("", yaml_error(path, e)) from None
    check_config_text(path, path.read_text(encoding="utf-8-sig"))
    _reject_resolvers(raw, str(path))
    layers = []
    includes = raw.pop("include", None)
    for name in ([] if includes is None else list(includes) if isinstance(includes, ListConfig) else [includes]):
        layers += _yaml_layers(include_path(path, str(name)), chain + (path.resolve(),))
    layers.append((str(path), raw))
    return layers


def _parse_overrides(overrides: List[str]) -> DictConfig:
    for item in overrides:
        check_override(item)
    try:
        layer = OmegaConf.from_dotlist(list(overrides))
    except Exception:  # omegaconf's own errors, and YAML's for a value like `@x` that YAML cannot read
        for item in overrides:  # name the one at fault
            try:
                OmegaConf.from_dotlist([item])
            except Exception as e:  # noqa: BLE001 - said in one line
                raise ConfigError("", f"bad override '{item}': {str(e).splitlines()[0]} (quote values that start "
                                      f"with @, `, %, !, *, &, | or a quote)") from None
        raise
    _reject_resolvers(layer, "command line")
    return layer


def _reject_resolvers(node: Any, source: str, prefix: str = "") -> None:
    """Interpolations of other keys (${data.seq_len}) are fine; resolver calls (${oc.env:TOKEN}) are not."""
    container = OmegaConf.to_container(node, resolve=False) if isinstance(node, (DictConfig, ListConfig)) else node
    items = container.items() if isinstance(container, dict) else enumerate(container) \
        if isinstance(container, list) else ()
    for key, value in items:
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            _reject_resolvers(value, source, full)
        elif isinstance(value, str) and _RESOLVER_CALL.search(value):
            raise ConfigError(full, f"resolver calls like '{value}' are not allowed ({source})")


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    _check_shape(OmegaConf.to_container(layer, resolve=False), OmegaConf.get_type(base), "", source)
    try:
        return OmegaConf.merge(base, layer)
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        error = _as_config_error(e, source)
        where = _failing_element(OmegaConf.to_container(layer, resolve=False), OmegaConf.get_type(base), "")
        raise (error if where is None else ConfigError(where + error.key, str(error)[len(error.key) + 2:])) from None


def _check_shape(node: Any, schema: Any, prefix: str, source: str) -> None:
    """A section must be a mapping and a list field a list (OmegaConf's own merge error names neither the key
    nor the file)."""
    if not dataclasses.is_dataclass(schema) or not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if key not in fields:
            continue  # unknown keys get OmegaConf's error, with a suggestion
        full = f"{prefix}{key}"
        hint = typing.get_type_hints(schema)[key]
        if dataclasses.is_dataclass(hint):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(full, f"must be a mapping of {hint.__name__} keys, got {value!r} ({source})")
            _check_shape(value, hint, full + ".", source)
        elif typing.get_origin(hint) in (list, List):
            if value is not None and not isinstance(value, list) and not _is_interpolation(value):
                raise ConfigError(full, f"must be a list, got {value!r} ({source})")
            element = typing.get_args(hint)[0]
            for i, item in enumerate(value if isinstance(value, list) else []):  # not an interpolation's text
                if dataclasses.is_dataclass(element) and not isinstance(item, dict):
                    raise ConfigError(f"{full}[{i}]", f"must be a mapping of {element.__name__} keys, got "
                                                      f"{item!r} ({source})")
                _check_shape(item, element, f"{full}[{i}].", source)
        elif isinstance(value, (dict, list)):
            raise ConfigError(full, f"must be a single value, got {value!r} ({source})")
        elif hint is bool and not isinstance(value, bool) and value is not None and not _is_interpolation(value):
            # OmegaConf turns any number into a bool (2 -> true) and strings like "off" too: say it plainly
            raise ConfigError(full, f"must be true or false, got {value!r} ({source})")


def _failing_element(node: Any, schema: Any, prefix: str) -> Optional[str]:
    """'data.train[1].' for the first list element (of dataclass entries) that does not merge into its entry type:
    inside a list OmegaConf's error forgets the path (`weight: wrong type`), so find the element it meant."""
    if not dataclasses.is_dataclass(schema) or not isinstance(node, dict):
        return None
    for f in dataclasses.fields(schema):
        value, hint = node.get(f.name), typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            found = _failing_element(value, hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) in (list, List) and dataclasses.is_dataclass(typing.get_args(hint)[0]) \
                and isinstance(value, list):
            found = next((f"{prefix}{f.name}[{i}]." for i, item in enumerate(value)
                          if not _merges(item, typing.get_args(hint)[0])), None)
        else:
            found = None
        if found is not None:
            return found
    return None


def _merges(item: Any, entry: Any) -> bool:
    try:
        OmegaConf.merge(OmegaConf.structured(entry), item)
        return True
    except (OmegaConfBaseException, TypeError, ValueError):
        return False


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${")


def _as_config_error(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or ""
    first = str(getattr(e, "msg", None) or e).splitlines()[0]
    if "not in" in first or type(e).__name__ == "ConfigKeyError":
        owner = getattr(e, "object_type", None)
        if "." not in str(key) and dataclasses.is_dataclass(owner) and owner is not JobConfig:
            # inside a list element OmegaConf forgets the path: name the section's type instead
            close = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(owner)], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return ConfigError(str(key), f"unknown key in a {owner.__name__} entry ({source}){hint}")
        return ConfigError(str(key), f"unknown key ({source}){suggest_key(str(key))}")
    if "could not be converted" in first or "Value '" in first:
        return ConfigError(str(key), f"wrong type ({source}): {first}")
    return ConfigError(str(key), f"{first} ({source})")


SECRET = {"secret": True}  # field(..., metadata=SECRET): dumped as *** whatever the field's name (engine/secrets.py)


def config_tree(cfg: Any) -> dict:
    """A config dataclass as plain nested dicts and lists (what DONE.json and a sweep's plan record)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def config_fields(cfg: Any, scrub_environment: bool = True) -> Dict[str, Any]:
    """A job config as {dotted key: value} (lists kept whole) with secret fields redacted: what a pipeline's
    DONE.json and a scaling sweep's plan.json record and compare. `scrub_environment=False` keeps values that
    merely equal a secret in the environment (the same config must give the same fields everywhere)."""
    from engine.secrets import redact_tree
    marked = secret_fields()
    tree = redact_tree(config_tree(cfg), lambda path: ".".join(path) in marked,
                       values=None if scrub_environment else [])
    fields: Dict[str, Any] = {}
    pending = [("", tree)]
    while pending:
        prefix, node = pending.pop()
        for key, value in node.items():
            if isinstance(value, dict):
                pending.append((f"{prefix}{key}.", value))
            else:
                fields[f"{prefix}{key}"] = value
    return fields


def override_sets(item: str, key: str) -> bool:
    """Whether the dotlist override `item` sets `key` (directly, `align.kind=rm`, or inside a section it sets,
    `align={kind: rm}`); False for what is not an override at all (loading the job says so in one line)."""
    try:
        return OmegaConf.select(OmegaConf.from_dotlist([item]), key, default=None, throw_on_missing=False) is not None
    except Exception:  # noqa: BLE001 - not an override, or `align=x` (not a section): the job's load refuses it
        return False


def secret_fields(schema: Any = JobConfig, prefix: str = "") -> set:
    """Dotted paths (list indices left out) of the fields declared with metadata=SECRET; none today: herd configs
    hold no credentials, the environment does. Fields whose names look secret are redacted without it."""
    found = set()
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        if f.metadata.get("secret"):
            found.add(path)
        inner = _field_type(schema, f)
        if dataclasses.is_dataclass(inner):
            found |= secret_fields(inner, path + ".")
    return found


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML, for the run directory and checkpoints (resumes and reproductions start from
    it). Values under secret-looking or SECRET keys are ***, and secret environment values are scrubbed from the
    rest (R17): a dump is shared with logs, so it never carries a credential."""
    marked = secret_fields()
    tree = redact_tree(OmegaConf.to_container(OmegaConf.structured(cfg)), lambda path: ".".join(path) in marked)
    return OmegaConf.to_yaml(tree)


# ---------------------------------------------------------------------------------------------- validation

_CHOICES = {
    "data.tokenizer.kind": ("hf", "llama3"),
    "data.on_bad_data": ("error", "skip"),
    "schedule.kind": ("cosine", "wsd", "linear", "constant"),
    "train.dtype": ("bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "checkpoint.resume": ("auto", "never"),
    "checkpoint.on_foreign": ("refuse", "new_lineage"),
    "fp8.backend": ("none", "native", "te"),
    "fp8.recipe": ("tensorwise", "delayed"),
    "fp8.grad_dtype": ("e5m2", "e4m3"),
    "align.kind": ("lm", "sft", "rm", "dpo"),
    "align.on_too_long": ("truncate", "skip"),
    "align.dpo_loss": ("sigmoid", "ipo"),
    "parallel.activation_checkpointing": ("none", "full", "selective"),
    "parallel.pp_schedule": ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble",
                             "DualPipeV"),
    "parallel.cp_attention": ("all_gather", "ring"),
    "slurm.shape": ("torchrun", "srun"),
}


def _get(cfg: JobConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def validate(cfg: JobConfig, world_size: int = 1) -> None:
    """Reject impossible values with the key that holds them; cheap, runs before anything heavy."""
    check_numbers(cfg)
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        _require(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")
    validate_model(cfg.model)
    _validate_data(cfg)
    resolve_parallel(cfg.parallel, world_size)
    grad_accum_steps(cfg)
    _require(cfg.train.steps > 0, "train.steps", f"must be positive, got {cfg.train.steps}")
    check_optimizer(cfg.optim, cfg.model.init_std)
    check_seeds(cfg)
    _require(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(0 <= cfg.schedule.warmup_steps <= cfg.train.steps, "schedule.warmup_steps",
             f"must be between 0 and train.steps={cfg.train.steps}, got {cfg.schedule.warmup_steps}")
    _require(0 <= cfg.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be between 0 and 1")
    check_token_schedule(cfg.schedule)
    _require(0 < cfg.schedule.decay_fraction <= 1, "schedule.decay_fraction", "must be in (0, 1]")
    _require(cfg.checkpoint.keep_last >= 2, "checkpoint.keep_last",
             f"must be at least 2 so a complete checkpoint survives a failed save, got {cfg.checkpoint.keep_last}")
    _require(re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.log.name) is not None and cfg.log.name not in (".", ".."),
             "log.name", f"'{cfg.log.name}' must be a plain directory name (letters, digits, '.', '_', '-')")
    _require(cfg.log.every >= 1, "log.every", "must be at least 1")
    _require(cfg.log.peak_tflops >= 0, "log.peak_tflops", f"must be >= 0 (0: look the device up), got "
                                                           f"{cfg.log.peak_tflops}")
    _require(cfg.train.eval_every >= 0, "train.eval_every", f"must be >= 0 (0: only at the end), got "
                                                             f"{cfg.train.eval_every}")
    _require(cfg.train.eval_batches >= 1, "train.eval_batches", f"must be at least 1, got {cfg.train.eval_batches}")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0 (0: never), got {cfg.checkpoint.every}")
    _require(cfg.checkpoint.verify_sample >= 0, "checkpoint.verify_sample",
             f"must be >= 0 (0: hash every file), got {cfg.checkpoint.verify_sample}")
    _require(cfg.fp8.amax_history_len >= 1, "fp8.amax_history_len",
             f"must be at least 1, got {cfg.fp8.amax_history_len}")
    check_fp8_fusion(cfg.fp8, cfg.parallel.tp, cfg.train.compile)
    check_file_name(cfg.log.name, "log.name")
    check_file_name(cfg.slurm.job_name, "slurm.job_name")
    check_directory(cfg.log.run_dir, "log.run_dir")
    run = Path(cfg.log.run_dir or ".") / cfg.log.name
    _require(not os.path.lexists(run) or run.is_dir(), "log.name",
             f"{run} {(file_problem(run) or 'is a file').split(', not')[0]}, not a run directory: choose another "
             f"log.name or move it away")
    check_directory(cfg.checkpoint.dir, "checkpoint.dir")
    check_existing_directory(cfg.checkpoint.load_weights, "checkpoint.load_weights")
    check_existing_directory(cfg.align.reference, "align.reference")
    check_watchdog(cfg.watchdog)
    check_guards(cfg)
    check_slurm(cfg.slurm)
    _validate_align(cfg)
    check_long_eval(cfg)


def _validate_align(cfg: JobConfig) -> None:
    a = cfg.align
    if a.kind == "lm":
        for key in ("train_file", "valid_file"):  # a forgotten align.kind pretrained on data.train instead
            _require(not getattr(a, key), f"align.{key}", f"'{getattr(a, key)}' is read by align.kind sft, rm or "
                     f"dpo; this job has align.kind=lm (pretraining on data.train): set align.kind")
        return
    _require(bool(a.train_file), "align.train_file", f"align.kind={a.kind} needs a JSONL file of training rows")
    # beta scales log-ratios of whole responses (sigmoid) or sets IPO's margin 1/(2 beta): outside these bounds
    # the loss overflows and the guards skip every step
    _require(0 < a.dpo_beta <= 1000, "align.dpo_beta", f"must be in (0, 1000] (DPO uses 0.01 to 1), got {a.dpo_beta}")
    _require(a.dpo_loss != "ipo" or a.dpo_beta >= 1e-9, "align.dpo_beta",
             f"{a.dpo_beta} sets IPO's target margin 1/(2 beta) beyond what the loss can hold; use at least 1e-9")
    _require(a.dpo_nll_alpha >= 0, "align.dpo_nll_alpha", f"must be >= 0, got {a.dpo_nll_alpha}")
    _require(0 <= a.dpo_label_smoothing < 0.5, "align.dpo_label_smoothing", "must be in [0, 0.5)")
    _require(a.dpo_loss == "sigmoid" or a.dpo_label_smoothing == 0, "align.dpo_label_smoothing",
             f"{a.dpo_label_smoothing}: label smoothing applies to dpo_loss=sigmoid only (IPO has no label-noise "
             f"term)")


def validate_model(m: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        value = getattr(m, key)
        _require(value > 0, f"model.{key}", f"must be positive, got {value}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_heads",
             f"n_heads={m.n_heads} is not divisible by n_kv_heads={m.n_kv_heads} (GQA groups must be equal)")
    _require(m.dim % m.n_heads == 0, "model.dim", f"dim={m.dim} is not divisible by n_heads={m.n_heads}")
    _require((m.dim // m.n_heads) % 2 == 0, "model.dim", f"head dim {m.dim // m.n_heads} must be even for RoPE")
    _require(m.rope_theta > 0, "model.rope_theta", "must be positive")
    _require(m.norm_eps > 0, "model.norm_eps", "must be positive")
    s = m.rope_scaling
    if s.enabled:
        _require(s.factor >= 1, "model.rope_scaling.factor", f"must be >= 1, got {s.factor}")
        _require(s.high_freq_factor > s.low_freq_factor > 0, "model.rope_scaling.high_freq_factor",
                 "must exceed low_freq_factor, which must be positive")
        _require(s.original_max_seq_len > 0, "model.rope_scaling.original_max_seq_len", "must be positive")


def _validate_data(cfg: JobConfig) -> None:
    d = cfg.data
    _require(d.seq_len > 0, "data.seq_len", f"must be positive, got {d.seq_len}")
    _require(d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
             f"{d.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} (the RoPE limit)")
    _require(d.micro_batch_size > 0, "data.micro_batch_size", "must be positive")
    _require(d.global_batch_size > 0, "data.global_batch_size", "must be positive")
    for group in ("train", "valid"):
        for i, ds in enumerate(getattr(d, group)):
            _require(bool(ds.path), f"data.{group}[{i}].path", "is empty")
        check_blend(getattr(d, group), group)
    _require(d.tokenizer.kind != "hf" or bool(d.tokenizer.path) or not d.train, "data.tokenizer.path",
             "kind=hf needs the tokenizer.json that the data was prepared with")
    _require(d.tokenizer.kind != "llama3" or not d.tokenizer.path, "data.tokenizer.path",
             f"'{d.tokenizer.path}': kind=llama3 reads the tokenizer the llama-models package ships, not a file; "
             f"remove the path, or set data.tokenizer.kind=hf")
    check_data_stages(d, cfg.model.max_seq_len)


def resolve_parallel(p: ParallelConfig, world_size: int) -> ParallelConfig:
    """Fill dp_shard=-1 from the world size and check that the degrees multiply to it."""
    for key in ("dp_replicate", "pp", "cp", "tp"):
        _require(getattr(p, key) >= 1, f"parallel.{key}", f"must be at least 1, got {getattr(p, key)}")
    others = p.dp_replicate * p.pp * p.cp * p.tp
    if p.dp_shard == -1:
        _require(world_size % others == 0, "parallel.dp_shard",
                 f"world size {world_size} is not divisible by dp_replicate*pp*cp*tp={others}")
        p.dp_shard = world_size // others
    _require(p.dp_shard >= 1, "parallel.dp_shard", f"must be at least 1 or -1, got {p.dp_shard}")
    _require(p.ac_every >= 1, "parallel.ac_every", f"must be at least 1, got {p.ac_every}")
    for i, layers in enumerate(p.pp_layers):
        _require(layers >= 0, f"parallel.pp_layers[{i}]", f"must be >= 0, got {layers}")
    _require(p.pp_virtual_stages >= 1, "parallel.pp_virtual_stages", f"must be at least 1, got {p.pp_virtual_stages}")
    for name in ("pp_embedding_cost", "pp_head_cost"):
        _require(getattr(p, name) >= 0, f"parallel.{name}", f"a stage cost must be >= 0, got {getattr(p, name)}")
    _require(others * p.dp_shard == world_size, "parallel",
             f"dp_replicate*dp_shard*pp*cp*tp = {others * p.dp_shard} but the world size is {world_size}")
    return p


def data_parallel_size(p: ParallelConfig) -> int:
    return p.dp_replicate * p.dp_shard


def grad_accum_steps(cfg: JobConfig) -> int:
    """Micro-batches per optimizer step on each rank, so that tokens per step do not depend on layout."""
    dp = data_parallel_size(cfg.parallel)
    per_step = cfg.data.micro_batch_size * dp
    if cfg.data.global_batch_size % per_step:
        raise ConfigError("data.global_batch_size",
                          f"{cfg.data.global_batch_size} is not divisible by micro_batch_size*dp = {per_step}")
    return cfg.data.global_batch_size // per_step


# ---------------------------------------------------------------------------------------------- herd scaling

from engine.config_schema import DownstreamTaskConfig, ScalingConfig  # noqa: E402,F401  (re-exported)


def load_scaling(path: str, overrides: Optional[List[str]] = None) -> ScalingConfig:
    """An IsoFLOP sweep YAML (<- dotlist overrides) as typed dataclasses; scaling/plan.py checks its values (budgets,
    the size grid, what each run can do) with the key named."""
    scaling = _load_structured(ScalingConfig, path, overrides, path)
    check_numbers(scaling)
    check_file_name(scaling.name, "name")
    check_directory(scaling.run_dir, "run_dir")
    return scaling
