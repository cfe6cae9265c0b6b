"""Checks of a loaded JobConfig that catch, at load time and naming the key, every value that torch, numpy or the
filesystem would otherwise reject later (as a traceback on every rank) or accept and train wrongly.

Generic rules first (every float finite, every integer within int64), then the values with a meaning: AdamW's
hyper-parameters (torch.optim.AdamW refuses betas outside [0, 1), a negative eps or weight decay), seeds (numpy's
generators refuse negative seeds; the init seeds are seed * 1,000,003 + crc32, which must fit a 64-bit generator
seed), blend weights, names that become file names, and directories that already exist as files.
"""

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Iterator, List, Tuple

from engine.errors import ConfigError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
SEED_LIMIT = 1 << 32  # seeds are 32-bit: the init generator's seed is seed * 1_000_003 + crc32 (engine/model/init.py)
NAME_BYTES = 200  # a run directory name, and its archive name (+ ".YYYYmmdd-HHMMSS"), must fit 255 bytes


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


def check_seeds(cfg: Any) -> None:
    for key in ("train.seed", "data.seed"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(0 <= value < SEED_LIMIT, key, f"must be in [0, 2**32), got {value}")


def check_blend(datasets: List[Any], group: str) -> None:
    """Weights are relative shares: each positive and normal (not a subnormal that divides to nothing), their sum
    finite so that every share is a real fraction."""
    for i, ds in enumerate(datasets):
        _require(ds.weight >= 2.2250738585072014e-308, f"data.{group}[{i}].weight",
                 f"must be positive (a share of the blend), got {ds.weight}")
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
    """A directory herd will create (or use) must not be a file, nor lie under one, nor be unwritable."""
    if not value:
        return
    path = Path(value)
    existing = first_existing(path if path.is_absolute() else Path.cwd() / path)
    _require(existing.is_dir(), key, f"'{value}' cannot be a directory: {existing} is a file")
    _require(os.access(existing, os.W_OK | os.X_OK), key, f"'{value}': {existing} is not writable")


def check_existing_directory(value: str, key: str) -> None:
    """A directory the run reads (a checkpoint root to load weights from) must exist."""
    if value:
        _require(Path(value).is_dir(), key, f"'{value}' is not a directory (a checkpoint root)")
