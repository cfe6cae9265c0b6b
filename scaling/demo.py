"""`make scaling-demo`: the IsoFLOP sweep of configs/scaling/demo.yaml trained for real on CPU on the demo corpus
(the CPython standard library's source, the files and held-out split of `make demo`), fitted, and its results copied to
benchmarks/results/scaling_demo.{json,md} and scaling_demo_*.png with the exact command, the wall time and the
machine's load.

The corpus is tokenized with its own 1,024-token BPE (data/stdlib1k.*): with the demo's 4,096 tokens the output
head alone (4096 x dim) would make every model that a 2-core machine can train at these budgets too large for
its tokens, and the IsoFLOP minima would all sit at the smallest size.

Run as `python -m scaling.demo [sweep overrides...]`. Finished runs of an earlier invocation are kept (the time
then covers only what this invocation trained; the summary says how many runs that was).
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from launch.cli import main as herd
from launch.demo import DATA, EXCLUDE

CONFIG = "configs/scaling/demo.yaml"
RESULTS = Path("benchmarks/results")
FILES = {"scaling.json": "scaling_demo.json", "scaling.md": "scaling_demo.md", "isoflop.png": "scaling_demo_isoflop.png",
         "power_law.png": "scaling_demo_power_law.png", "downstream.png": "scaling_demo_downstream.png"}


def prepare_corpus() -> int:
    """data/stdlib1k.{train,valid} and data/stdlib-bpe1k.json: `make demo`'s files, split and exclusions, with a
    1,024-token BPE (written once)."""
    import sysconfig
    if all((DATA / name).exists() for name in ("stdlib1k.train.bin", "stdlib1k.valid.bin", "stdlib-bpe1k.json")):
        return 0
    args = ["prepare-data", sysconfig.get_paths()["stdlib"], "--include", "*.py", "--out", str(DATA / "stdlib1k"),
            "--train-tokenizer", "--tokenizer-path", str(DATA / "stdlib-bpe1k.json"), "--vocab-size", "1024",
            "--valid-fraction", "0.02", "--on-bad-data", "skip"]
    for pattern in EXCLUDE:
        args += ["--exclude", pattern]
    return herd(args)


def main() -> int:
    code = prepare_corpus()
    if code:
        return code
    from engine.config import load_scaling
    from scaling.plan import load_job, plan_runs, sweep_dir
    cfg = load_scaling(CONFIG, sys.argv[1:])
    sweep = Path(sweep_dir(cfg))
    runs = [run.as_dict() for run in plan_runs(cfg, load_job(cfg))]  # this invocation's sweep, not an older plan's
    finished_before = _finished(sweep, runs)
    load_start, started, cpu_start = os.getloadavg(), time.monotonic(), _cpu_seconds()
    code = herd(["scaling", CONFIG, *sys.argv[1:]])
    if code:
        return code
    trained = _finished(sweep, runs) - finished_before
    seconds, load_end, cpu = time.monotonic() - started, os.getloadavg(), _cpu_seconds() - cpu_start
    RESULTS.mkdir(parents=True, exist_ok=True)
    for source, target in FILES.items():
        if (sweep / source).is_file():
            shutil.copyfile(sweep / source, RESULTS / target)
    command = " ".join(["make scaling-demo"] if not sys.argv[1:] else ["python -m scaling.demo", *sys.argv[1:]])
    note = (f"\nMeasured with `{command}` (= `herd scaling {CONFIG}` after preparing the corpus) on a machine with "
            f"{os.cpu_count()} CPU cores shared with other jobs: {trained} runs trained in this invocation, wall "
            f"time {seconds / 60:.1f} min including downstream scoring and fits; 1-minute load average "
            f"{load_start[0]:.1f} at the start and {load_end[0]:.1f} at the end (2.0 would be this sweep alone). "
            f"CPU time of this process and its runs: {cpu / 60:.1f} core-minutes, i.e. at least "
            f"{cpu / 60 / (os.cpu_count() or 1):.1f} min of wall time on {os.cpu_count()} idle cores.\n")
    with open(RESULTS / FILES["scaling.md"], "a") as f:
        f.write(note)
    document = json.loads((RESULTS / FILES["scaling.json"]).read_text())
    document["measured"] = {"command": command, "runs_trained": trained, "wall_s": round(seconds, 1),
                            "cpu_count": os.cpu_count(), "cpu_s": round(cpu, 1), "load_average_start": load_start[0],
                            "load_average_end": load_end[0]}
    (RESULTS / FILES["scaling.json"]).write_text(json.dumps(document, indent=1) + "\n")
    print(note.strip(), f"\nresults: {', '.join(str(RESULTS / t) for t in FILES.values())}", flush=True)
    return 0


def _finished(sweep: Path, runs: list) -> int:
    """How many of the runs are finished (the difference before and after is what an invocation trained)."""
    from scaling.runs import final_val_loss
    return sum(final_val_loss(sweep, run) is not None for run in runs)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children (the runs)."""
    import resource
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


if __name__ == "__main__":
    sys.exit(main())
