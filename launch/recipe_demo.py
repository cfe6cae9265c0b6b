"""`make recipe-demo`: the Llama 3 pretraining recipe in miniature (configs/recipes/demo.yaml) on 2 CPU ranks.

Prepares the two datasets if they are missing (the standard library's source as `make demo` prepares it, and the
licence texts of /usr/share/doc/*/copyright tokenized with the same BPE), then runs
`herd recipe configs/recipes/demo.yaml --nproc 2`. Run it again to see a finished recipe skipped stage by stage;
`make clean-demo` removes its run. Extra arguments are recipe overrides (e.g. run_dir=runs/r2).
"""

import sys
from pathlib import Path

from launch.cli import main as herd
from launch.demo import DATA, prepare_corpus

LICENCES = Path("/usr/share/doc")  # every Debian package's copyright file: licence texts, many near-identical


def prepare_licences() -> int:
    if all((DATA / f"licenses.{split}.{ext}").exists() for split in ("train", "valid") for ext in ("bin", "idx")):
        print(f"licence texts already prepared under {DATA}/", flush=True)
        return 0
    if not LICENCES.is_dir():
        print(f"no {LICENCES} on this machine: the recipe demo needs its licence texts", file=sys.stderr)
        return 2
    print(f"preparing the second dataset: the copyright files under {LICENCES}, with the standard library's BPE",
          flush=True)
    return herd(["prepare-data", str(LICENCES), "--include", "copyright", "--out", str(DATA / "licenses"), "--tokenizer-path", str(DATA / "stdlib-bpe.json"),
                 "--valid-fraction", "0.05", "--on-bad-data", "skip"])


def main() -> int:
    for prepare in (prepare_corpus, prepare_licences):
        code = prepare()
        if code:
            return code
    return herd(["recipe", "configs/recipes/demo.yaml", "--nproc", "2", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
