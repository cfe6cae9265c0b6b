"""Hardware profiles (configs/hardware/*.yaml): datasheet peaks, memory, links, and which of our benchmark result
files calibrate the kernel efficiencies. A profile is plain data; `calibrate.py` turns its files into numbers."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import yaml

from engine.errors import HerdError

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "configs" / "hardware"
RESULTS_DIR = ROOT / "benchmarks" / "results"


class ProfileError(ValueError):
    """A value of a hardware profile that the planner cannot use; the message names its key."""


@dataclass(frozen=True)
class Link:
    """One link class: bandwidth per GPU each way (GB/s) and the latency of one ring step (microseconds)."""

    bandwidth_gbs: float
    latency_us: float


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float
    memory_reserve_gib: float
    peak_tflops: Dict[str, float]
    copy_gbs: float  # measured device-memory copy bandwidth (our kernels benchmark)
    gpus_per_node: int
    nvlink: Link
    network: Link
    calibration_files: List[str] = field(default_factory=list)
    copy_source: str = ""
    calibration_copy_gbs: float = 0.0  # copy bandwidth of the card the calibration files were measured on

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - self.memory_reserve_gib


def profile_path(name: str) -> Path:
    """A profile by name (configs/hardware/NAME.yaml) or by path."""
    from plan.paths import check_input_file
    check_input_file(name, "--hardware")  # a name too long for a file name, a FIFO
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PROFILES_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise HerdError(f"--hardware {name}: no such profile (known: {known}; or a path to a YAML profile)")
    return candidate


def results_file(name: object, key: str) -> Path:
    """A measurement the profile names: a file directly in benchmarks/results/ (`key` is the profile's key)."""
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ProfileError(f"{key}: {name!r} is not a file name in {RESULTS_DIR}")
    path = RESULTS_DIR / name
    if not path.is_file():
        raise ProfileError(f"{key}: {name} is not a file in {RESULTS_DIR}")
    return path


def measured_copy_gbs(file_name: str, key: str = "copy_bandwidth_file") -> float:
    """Device copy bandwidth that benchmarks/kernels measured (the same value is stored with every row)."""
    rows = json.loads(results_file(file_name, key).read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ProfileError(f"{key}: {file_name} is not a list of benchmark rows")
    values = {round(r["copy_gbs"], 3) for r in rows if r.get("copy_gbs")}
    if len(values) != 1:
        raise ProfileError(f"{key}: {file_name}: expected one copy_gbs value, found {sorted(values)}")
    return _number(values.pop(), f"{key} ({file_name}): copy_gbs", positive=True)


def _number(value: object, key: str, positive: bool) -> float:
    """A finite number, > 0 (`positive`) or >= 0 (YAML reads 1e3, without a dot, as a string: one that is a number
    is taken); anything else, a bool, NaN or infinity is refused naming `key`."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except (ValueError, OverflowError):
        number = None
    if number is None:
        raise ProfileError(f"{key}: {value!r} is not a number")
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ProfileError(f"{key}: must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return number


def _link(links: object, name: str) -> Link:
    link = _mapping(_key(_mapping(links, "links"), name, "links."), f"links.{name}")
    return Link(_number(_key(link, "bandwidth_gbs", f"links.{name}."), f"links.{name}.bandwidth_gbs", positive=True),
                _number(_key(link, "latency_us", f"links.{name}."), f"links.{name}.latency_us", positive=False))


def _key(mapping: dict, key: str, prefix: str = "") -> object:
    if key not in mapping:
        raise ProfileError(f"{prefix}{key}: missing")
    return mapping[key]


def _mapping(value: object, key: str) -> dict:
    if not isinstance(value, dict):
        raise ProfileError(f"{key}: expected a mapping, got {value!r}")
    return value


def _hardware(raw: object) -> Hardware:
    """The profile's values, each checked (ValueError/KeyError naming the key): the planner divides by the peaks,
    the bandwidths and the memory, so a zero, a negative, NaN or infinity would be a traceback or a wrong plan."""
    raw = _mapping(raw, "profile")
    peaks = _mapping(raw["peak_tflops"], "peak_tflops")
    for precision in ("bf16", "fp8"):  # the calibration and the step time read both
        _key(peaks, precision, "peak_tflops.")
    memory = _number(raw["memory_gib"], "memory_gib", positive=True)
    reserve = _number(raw["memory_reserve_gib"], "memory_reserve_gib", positive=False)
    if reserve >= memory:
        raise ProfileError(f"memory_reserve_gib: {reserve:g} leaves nothing of memory_gib {memory:g}")
    per_node = raw["gpus_per_node"]
    if isinstance(per_node, str) and per_node.strip().isdigit():
        per_node = int(per_node)
    if isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
        raise ProfileError(f"gpus_per_node: must be a whole number >= 1, got {per_node!r}")
    files = raw["calibration_files"]
    if not isinstance(files, list) or len(files) != 2:
        raise ProfileError(f"calibration_files: expected a list of two files (the 4- and 8-layer MFU runs), "
                         f"got {files!r}")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise ProfileError(f"name: expected a string, got {raw['name']!r}")
    return Hardware(name=raw["name"], memory_gib=memory, memory_reserve_gib=reserve,
                    peak_tflops={k: _number(v, f"peak_tflops.{k}", positive=True) for k, v in peaks.items()},
                    copy_gbs=measured_copy_gbs(raw["copy_bandwidth_file"]), gpus_per_node=per_node,
                    nvlink=_link(raw["links"], "nvlink"), network=_link(raw["links"], "network"),
                    calibration_files=[str(results_file(f, "calibration_files").name) for f in files],
                    copy_source=raw["copy_bandwidth_file"],
                    calibration_copy_gbs=measured_copy_gbs(raw["calibration_copy_file"], "calibration_copy_file"))


def load_hardware(name: str = "h100_sxm") -> Hardware:
    path = profile_path(name)
    try:
        hardware = _hardware(yaml.safe_load(path.read_text()))
        from plan.calibrate import check_calibration
        check_calibration(hardware)
        return hardware
    except KeyError as e:
        raise HerdError(f"{path}: not a valid hardware profile ({e.args[0]}: missing)") from None
    except ProfileError as e:
        raise HerdError(f"{path}: not a valid hardware profile ({e})") from None
    except (TypeError, ValueError, ArithmeticError, yaml.YAMLError, OSError) as e:
        raise HerdError(f"{path}: not a valid hardware profile ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    """One line: YAML's problem at its line and column, or the error's first line (YAML's own span several)."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(error, 'problem', None) or 'not valid YAML'}"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
