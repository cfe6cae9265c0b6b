"""Hardware profiles (configs/hardware/*.yaml): datasheet peaks, memory, links, and which of our benchmark result
files calibrate the kernel efficiencies. A profile is plain data; `calibrate.py` turns its files into numbers."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import yaml

from engine.errors import HerdError

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "configs" / "hardware"
RESULTS_DIR = ROOT / "benchmarks" / "results"


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
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = PROFILES_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise HerdError(f"--hardware {name}: no such profile (known: {known}; or a path to a YAML profile)")
    return candidate


def measured_copy_gbs(file_name: str) -> float:
    """Device copy bandwidth that benchmarks/kernels measured (the same value is stored with every row)."""
    rows = json.loads((RESULTS_DIR / file_name).read_text())
    values = {round(r["copy_gbs"], 3) for r in rows if r.get("copy_gbs")}
    if len(values) != 1:
        raise HerdError(f"{file_name}: expected one copy_gbs value, found {sorted(values)}")
    return values.pop()


def load_hardware(name: str = "h100_sxm") -> Hardware:
    path = profile_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
        links = raw["links"]
        copy_file = raw["copy_bandwidth_file"]
        return Hardware(name=raw["name"], memory_gib=float(raw["memory_gib"]),
                        memory_reserve_gib=float(raw["memory_reserve_gib"]),
                        peak_tflops={k: float(v) for k, v in raw["peak_tflops"].items()},
                        copy_gbs=measured_copy_gbs(copy_file), gpus_per_node=int(raw["gpus_per_node"]),
                        nvlink=Link(float(links["nvlink"]["bandwidth_gbs"]), float(links["nvlink"]["latency_us"])),
                        network=Link(float(links["network"]["bandwidth_gbs"]),
                                     float(links["network"]["latency_us"])),
                        calibration_files=list(raw["calibration_files"]), copy_source=copy_file,
                        calibration_copy_gbs=measured_copy_gbs(raw["calibration_copy_file"]))
    except (KeyError, TypeError, ValueError, yaml.YAMLError, OSError) as e:
        raise HerdError(f"{path}: not a valid hardware profile ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    """One line: YAML's problem at its line and column, or the error's first line (YAML's own span several)."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {getattr(error, 'problem', None) or 'not valid YAML'}"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
