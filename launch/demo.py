"""`make demo`: prepare a real corpus present on every machine (the CPython standard library's own source),
train a byte-level BPE on it, tokenize it with a held-out split, and train the debug model on it (configs/demo.yaml).

Run as `python -m launch.demo [overrides...]`; overrides go to `herd train` (e.g. train.steps=50).
"""

import sys
import sysconfig
from pathlib import Path

from launch.cli import main as herd

DATA = Path("data")
EXCLUDE = ["test/*", "*/test/*", "*/tests/*", "idlelib/*", "site-packages/*", "dist-packages/*"]


def prepare_corpus() -> int:
    if (DATA / "stdlib.train.bin").exists() and (DATA / "stdlib.valid.bin").exists():
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


def main() -> int:
    code = prepare_corpus()
    if code:
        return code
    return herd(["train", "configs/demo.yaml", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
