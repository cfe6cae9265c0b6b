"""What `herd plan` prints and writes: the table of the best layouts and a config herd train / launch accept."""

import os
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from engine.config import CONFIGS_DIR, load_config
from engine.errors import HerdError
from engine.files import exclusive_temporary
from plan.layout import overrides
from plan.paths import check_name_lengths
from plan.search import Candidate, Request, Result

GIB = 2 ** 30
COLUMNS = ("compute", "tp", "cp", "pp", "dp", "bubble", "optimizer")


def header(req: Request, name: str, result: Result) -> List[str]:
    sequences = req.global_tokens // req.seq_len
    limit = req.limit_bytes / GIB
    return [f"herd plan: {name} on {req.gpus:,} x {req.hardware.name} ({req.gpus_per_node} per node), seq "
            f"{req.seq_len:,}, {req.global_tokens:,} tokens per step ({sequences:,} sequences), {req.precision}, "
            f"memory limit {limit:.1f} GiB per GPU",
            f"{result.evaluated:,} layouts valid for herd, {result.fitting:,} fit; best {len(result.best)} by "
            f"predicted step time (seconds; exposed communication by axis):"]


def table(result: Result) -> List[str]:
    rows = [f"{'#':>2} {'layout':<44} {'m':>4} {'GiB':>5} {'step':>7} "
            + " ".join(f"{c:>7}" for c in COLUMNS) + f" {'tok/s/GPU':>9} {'TFLOP/s':>7} {'MFU':>6}"]
    for i, c in enumerate(result.best, 1):
        t = c.time
        rows.append(f"{i:>2} {c.layout.describe():<44} {c.microbatches:>4} {c.memory.total / GIB:>5.1f} "
                    f"{t.total:>7.3f} " + " ".join(f"{t.parts[k]:>7.3f}" for k in COLUMNS)
                    + f" {t.tokens_per_s_gpu:>9,.0f} {t.tflops_gpu:>7.0f} {t.mfu:>6.1%}")
    return rows


def dotlist(req: Request, c: Candidate) -> List[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in overrides(c.layout, req.seq_len, req.global_tokens // req.seq_len, req.gpus_per_node).items()]


def _nested(flat: Dict[str, object]) -> Dict[str, Dict[str, object]]:
    out: Dict[str, Dict[str, object]] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = value
    return out


def include_for(out: Path, preset: Optional[str], config: Optional[str]) -> Optional[str]:
    """What the written config includes so that it loads unchanged: the model preset (found in configs/), or the
    user's config when herd's include rules can reach it (next to the output, or under configs/)."""
    if preset is not None:
        return f"models/{preset}.yaml"
    path = Path(config).resolve()
    for base in (out.resolve().parent, CONFIGS_DIR.resolve()):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return None


def check_destination(out: Path, preset: Optional[str], config: Optional[str]) -> str:
    """--out is a new file or an earlier plan, in an existing directory from which herd's include rules reach the
    config (R21: a user's file is never replaced); checked before the search prints anything. Returns the include."""
    from engine.config_checks import check_directory
    if not str(out) or out.name in ("", ".", ".."):
        raise HerdError(f"--out {str(out)!r}: name the YAML file to write")
    check_name_lengths(out, "--out")
    check_directory(str(out.parent), "--out")  # not under a file
    if out.is_dir():
        raise HerdError(f"--out {out}: is a directory; name the YAML file to write")
    if not out.parent.is_dir():
        raise HerdError(f"--out {out}: directory {out.parent} does not exist")
    if out.exists() and not out.is_file():  # a FIFO would block the read below, a device never end it
        raise HerdError(f"--out {out}: exists and is not a file; choose another path")
    if out.exists() and not _written_by_plan(out):
        raise HerdError(f"--out {out} exists and was not written by herd plan; choose another path")
    include = include_for(out, preset, config)
    if include is None:
        raise HerdError(f"--out {out}: herd's include rules cannot reach {config} from there (write it next to "
                        f"the config, or pass the printed overrides to herd train)")
    return include


def _written_by_plan(out: Path) -> bool:
    """Whether the regular file `out` starts as herd plan's files do; only its first bytes are read (the path may
    name any big file of the user's), an unreadable file is not known to be ours."""
    try:
        with open(out, "rb") as f:
            return f.read(len(b"# herd plan")) == b"# herd plan"
    except OSError:
        return False


def write_config(req: Request, c: Candidate, out: Path, preset: Optional[str], config: Optional[str],
                 extra: List[str]) -> Path:
    """A YAML layer holding the chosen layout, checked by herd's loader before it takes out's place (atomically);
    never replaces a file that is not an earlier plan."""
    include = check_destination(out, preset, config)
    flat = overrides(c.layout, req.seq_len, req.global_tokens // req.seq_len, req.gpus_per_node)
    body = {"include": [include], **_nested(flat)}
    note = (f"# herd plan: {c.layout.describe()} on {c.layout.world} GPUs; predicted {c.time.total:.3f} s/step, "
            f"{c.time.tflops_gpu:.0f} TFLOP/s/GPU, {c.memory.total / GIB:.1f} GiB/GPU\n")
    stream, temporary = exclusive_temporary(out, binary=False, suffix=".yaml")  # beside out: includes resolve alike
    try:
        with stream:
            stream.write(note + yaml.safe_dump(body, sort_keys=False))
        check_config(temporary, extra, c.layout.world)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return out


def check_config(path: Path, extra: List[str], world: int) -> None:
    """The written layout through herd's own loader and layout checks (what herd launch runs first)."""
    from engine.run import check_parallel
    cfg = load_config(str(path), list(extra), world_size=world)
    check_parallel(cfg, world)
