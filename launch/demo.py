"""`make demo`: prepare a real corpus present on every machine (the CPython standard library's own source),
train a byte-level BPE on it, tokenize it with a held-out split, and train the debug model on it (configs/demo.yaml);
then run its first steps again on 16 processes in a 4D layout (tensor 2 x context 2 x pipeline 2 x FSDP 2) and
compare the losses.

Run as `python -m launch.demo [overrides...]`; overrides go to `herd train` (e.g. train.steps=50).
"""

import json
import sys
import sysconfig
from pathlib import Path

from launch.cli import main as herd

DATA = Path("data")
EXCLUDE = ["test/*", "*/test/*", "*/tests/*", "idlelib/*", "site-packages/*", "dist-packages/*"]


def prepare_corpus() -> int:
    # the tokenizer is written after the data (launch/cli.py): all three exist once the step has finished
    if all((DATA / name).exists() for name in ("stdlib.train.bin", "stdlib.valid.bin", "stdlib-bpe.json")):
        print(f"corpus already prepared under {DATA}/ (make clean-demo to redo it)", flush=True)
        return 0
    stdlib = sysconfig.get_paths()["stdlib"]
    print(f"preparing the corpus: Python sources of the standard library at {stdlib} "
          f"(tests left out), 2% of files held out for validation", flush=True)
    args = ["prepare-data", stdlib, "--include", "*.py", "--out", str(DATA / "stdlib"), "--train-tokenizer",
            "--tokenizer-path", str(DATA / "stdlib-bpe.json"), "--vocab-size", "4096", "--valid-fraction", "0.02",
            "--on-bad-data", "skip"]
    for pattern in EXCLUDE:
        args += ["--exclude", pattern]
    return herd(args)


LAYOUT_STEPS = 30  # the warm-up, so the learning rates equal the long run's
LAYOUT = ["parallel.tp=2", "parallel.cp=2", "parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=1F1B",
          "parallel.cp_attention=all_gather", "data.micro_batch_size=2"]  # 4 microbatches per step through 2 stages


def compare_layout_run() -> int:
    """The first steps again on 16 processes (tp 2 x cp 2 x pp 2 x FSDP 2); their losses against the
    single-process run's."""
    print(f"\nthe same job's first {LAYOUT_STEPS} steps on 16 processes: tensor 2 x context 2 x pipeline 2 (1F1B) x "
          f"FSDP 2", flush=True)
    code = herd(["launch", "--nproc", "16", "configs/demo.yaml", *LAYOUT, f"train.steps={LAYOUT_STEPS}",
                 "data.valid=[]", "log.name=demo-4d", "log.every=5"])
    if code:
        return code
    one, many = ([json.loads(line)["loss"] for line in open(Path("runs") / name / "metrics.jsonl")]
                 for name in ("demo", "demo-4d"))
    gaps = [abs(a - b) / a for a, b in zip(one[:LAYOUT_STEPS], many)]
    print(f"4D on 16 processes vs 1 process: largest relative difference of the per-step losses "
          f"{max(gaps[:10]):.1e} over the first 10 steps, {max(gaps):.1e} over all {LAYOUT_STEPS} (the same math "
          f"summed in another order; training amplifies such rounding differences as the learning rate rises)",
          flush=True)
    return 0


def main() -> int:
    code = prepare_corpus()
    if code:
        return code
    code = herd(["train", "configs/demo.yaml", *sys.argv[1:]])
    if code or sys.argv[1:]:  # a customized main run is not comparable step by step
        return code
    return compare_layout_run()


if __name__ == "__main__":
    sys.exit(main())
