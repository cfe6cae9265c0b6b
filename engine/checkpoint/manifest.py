"""What a checkpoint's manifest may hold, checked before any of it is used (docs/checkpointing.md, "Threat model").

A manifest is JSON that anyone who controls the directory can rewrite together with its marker, so every field
a load uses is checked for presence, type and shape first, and a bad one is refused with one line naming the file
and the field (`meta.scheduler.last_epoch`), never a KeyError or TypeError traceback from deep inside a load:

    {"format": 1, "step": int, "lineage": str (optional), "files": {relative path: {"bytes": int, "sha256": hex}},
     "meta": {...}}

`meta` depends on what wrote the checkpoint: a training run's (step, loader, scheduler, world_size, layout,
config) is checked against the resuming run's own state (`check_train_meta`); an import's (weights_only, model)
by `saved_model_config`, which resume refuses, load_weights and export read.
"""

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

from engine.checkpoint.store import FORMAT, CheckpointError

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _show(value: Any) -> str:
    text = repr(value)  # repr escapes newlines: the message stays one line
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(file: Path, field: str, wanted: str, value: Any) -> None:
    raise CheckpointError(f"{file}: field '{field}' must be {wanted}, got {_show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_manifest(manifest: Any, file: Path, step: int) -> dict:
    """The manifest's own fields (what the store needs to verify files); returns it."""
    if not isinstance(manifest, dict):
        _refuse(file, "(top level)", "a JSON object", type(manifest).__name__)
    for key in ("format", "step", "files", "meta"):
        if key not in manifest:
            raise CheckpointError(f"{file}: field '{key}' is missing")
    if manifest["format"] != FORMAT or not _is_int(manifest["format"]):
        _refuse(file, "format", f"{FORMAT} (this herd's checkpoint format)", manifest["format"])
    if not _is_int(manifest["step"]) or manifest["step"] != step:
        _refuse(file, "step", f"{step} (the step of its directory)", manifest["step"])
    if "lineage" in manifest and not isinstance(manifest["lineage"], str):
        _refuse(file, "lineage", "a string (the run that wrote it)", manifest["lineage"])
    if not isinstance(manifest["meta"], dict):
        _refuse(file, "meta", "a JSON object", manifest["meta"])
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        _refuse(file, "files", "a non-empty object of relative path -> {bytes, sha256}", files)
    for name, info in files.items():
        if not isinstance(info, dict):
            _refuse(file, f"files.{name}", "an object {bytes, sha256}", info)
        if not _is_int(info.get("bytes")) or info["bytes"] < 0:
            _refuse(file, f"files.{name}.bytes", "a size in bytes (an integer >= 0)", info.get("bytes"))
        if not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            _refuse(file, f"files.{name}.sha256", "64 lowercase hex digits", info.get("sha256"))
    return manifest


def _same_shape(saved: Any, ours: Any, file: Path, field: str) -> None:
    """`saved` has the structure of `ours` (this run's own value): the same keys, list lengths, and types (an int
    stands for a float: JSON writes 2.0 as 2.0 but a hand-edited file may say 2)."""
    if isinstance(ours, dict):
        if not isinstance(saved, dict):
            _refuse(file, field, "an object", saved)
        for key in saved:
            if key not in ours:
                raise CheckpointError(f"{file}: field '{field}.{key}' is not part of this run's state")
        for key, value in ours.items():
            if key in saved:
                _same_shape(saved[key], value, file, f"{field}.{key}")
    elif isinstance(ours, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(ours):
            _refuse(file, field, f"a list of {len(ours)}", saved)
        for i, (a, b) in enumerate(zip(saved, ours)):
            _same_shape(a, b, file, f"{field}[{i}]")
    elif isinstance(ours, bool):
        if not isinstance(saved, bool):
            _refuse(file, field, "true or false", saved)
    elif _is_int(ours):
        if not _is_int(saved):
            _refuse(file, field, "an integer", saved)
    elif isinstance(ours, float):
        if not _is_number(saved):
            _refuse(file, field, "a number", saved)
    elif ours is None:
        if saved is not None:
            _refuse(file, field, "null", saved)
    elif isinstance(ours, str) and not isinstance(saved, str):
        _refuse(file, field, "a string", saved)


_SCHEDULER_NEEDS = ("base_lrs", "last_epoch", "_step_count", "_last_lr")


def check_train_meta(manifest: dict, file: Path, loader_state: dict, scheduler_state: dict) -> dict:
    """The `meta` a resume uses, against this run's own loader and scheduler state (their structure, not values:
    a resumed run may change its schedule's length); returns it."""
    meta = manifest["meta"]
    if meta.get("weights_only"):
        raise CheckpointError(f"{file}: a weights-only checkpoint (an import) cannot be resumed; start from it with "
                              f"checkpoint.load_weights=<its directory> and another checkpoint.dir")
    for key in ("step", "loader", "scheduler", "world_size"):
        if key not in meta:
            raise CheckpointError(f"{file}: field 'meta.{key}' is missing")
    if not _is_int(meta["step"]) or meta["step"] != manifest["step"]:
        _refuse(file, "meta.step", f"{manifest['step']} (the manifest's step)", meta["step"])
    if not _is_int(meta["world_size"]) or meta["world_size"] < 1:
        _refuse(file, "meta.world_size", "an integer >= 1", meta["world_size"])
    _same_shape(meta["loader"], loader_state, file, "meta.loader")
    if _is_int(meta["loader"].get("consumed_samples")) and meta["loader"]["consumed_samples"] < 0:
        _refuse(file, "meta.loader.consumed_samples", "an integer >= 0", meta["loader"]["consumed_samples"])
    _same_shape(meta["scheduler"], scheduler_state, file, "meta.scheduler")
    for key in _SCHEDULER_NEEDS:  # the scheduler's load_state_dict copies every key onto itself: all must be there
        if key in scheduler_state and key not in meta["scheduler"]:
            raise CheckpointError(f"{file}: field 'meta.scheduler.{key}' is missing")
    return meta


def saved_section(config_text: str, key: str) -> dict:
    """One top-level section of a saved job's YAML (a run's config.yaml, a manifest's meta.config) as plain data;
    {} when the text is no such YAML. Only that section is read: the rest may hold secrets scrubbed to `***`,
    which would not load as a job."""
    import yaml
    try:
        section = (yaml.safe_load(config_text) or {}).get(key)
    except (yaml.YAMLError, AttributeError, RecursionError):
        return {}
    return section if isinstance(section, dict) else {}


def saved_model_config(manifest: dict, file: Path) -> Optional[dict]:
    """`meta.model` (an import's model config, as ModelConfig's fields), checked: None when absent."""
    from engine.config import ModelConfig
    if "model" not in manifest["meta"]:
        return None
    model = manifest["meta"]["model"]  # null is no model config: refused below, not taken for an absent one
    reference = dataclasses.asdict(ModelConfig())
    reference["name"] = ""
    _same_shape(model, reference, file, "meta.model")  # a missing key takes ModelConfig's default
    return model


def check_export_meta(manifest: dict, file: Path) -> None:
    """What an export reads of `meta`: an import's model config, or a training run's config text and world size."""
    meta = manifest["meta"]
    if saved_model_config(manifest, file) is not None:
        return
    if not isinstance(meta.get("config"), str):
        _refuse(file, "meta.config", "the run's resolved config (YAML text)", meta.get("config"))
    if "world_size" in meta and (not _is_int(meta["world_size"]) or meta["world_size"] < 1):
        _refuse(file, "meta.world_size", "an integer >= 1", meta["world_size"])


def model_config_of(manifest: dict, file: Path):
    """The ModelConfig a checkpoint was saved with: an import's `meta.model`, else the training run's resolved
    config (`meta.config`, YAML); one line naming the file and field when neither describes a valid model."""
    return configs_of(manifest, file)[0]


def configs_of(manifest: dict, file: Path) -> tuple:
    """(ModelConfig, TokenizerConfig or None): a checkpoint's model, and its training run's tokenizer (None for an
    import, which holds no tokenizer), each checked; one line naming the file and field when they do not load."""
    from engine.config import ModelConfig, RopeScalingConfig, load_config, validate_model
    from engine.errors import HerdError
    check_export_meta(manifest, file)
    model = saved_model_config(manifest, file)
    try:
        if model is not None:
            config = ModelConfig(**{**model, "rope_scaling": RopeScalingConfig(**model.get("rope_scaling", {}))})
            validate_model(config)
            return config, None
        # validated for the world the run had (its layout's degrees multiply to that, not to this one process)
        job = _config_from_yaml(manifest["meta"]["config"], load_config, manifest["meta"].get("world_size", 1))
        return job.model, job.data.tokenizer
    except HerdError as e:
        if isinstance(e, CheckpointError):
            raise
        field = "meta.model" if model is not None else "meta.config"
        raise CheckpointError(f"{file}: field '{field}' describes no valid model ({e})") from None


def _config_from_yaml(text: str, load_config, world_size: int):
    import tempfile
    from engine.errors import HerdError
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        try:
            return load_config(str(path), ["data.train=[]", "data.valid=[]"], world_size=world_size)
        except HerdError as e:  # said of the saved config, not of a temporary file the user never saw
            raise HerdError(str(e).replace(str(path), "the saved config")) from None
