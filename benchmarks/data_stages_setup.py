"""Setup time and lookup time of the staged data stream (engine/data/stages.py) at a real recipe's scale.

Writes synthetic token files of a few billion tokens (the .idx is real, the .bin sparse: the setup reads only
document sizes, a lookup a few thousand tokens), then builds the blend of a three-stage recipe whose sequence
length goes 4096 -> 8192 -> 16384 with each change in the middle of the big dataset's first epoch (millions of
samples per epoch, scattered by the shuffled visit), and times: the vocabulary scan that today's build_blend
pays too (in a child process), opening the files, the stage replay, and single-sample lookups in the recut part
and in a fresh epoch. Prints, never asserts.

    python -m benchmarks.data_stages_setup [--tokens 8e9] [--skip-scan] [--save]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.config import DataConfig, DatasetConfig, DataStageConfig
from engine.data import stages
from engine.data.indexed import IndexedDataset, IndexedWriter

RESULTS = Path(__file__).resolve().parent / "results"


def write_sparse_dataset(prefix: Path, tokens: int, seed: int) -> int:
    """Document sizes like a web corpus (lognormal, median ~600 tokens), a sparse .bin; returns documents."""
    sizes = np.random.default_rng(seed).lognormal(6.4, 1.0, size=int(tokens / 1000)).astype(np.int64) + 16
    sizes = sizes[np.cumsum(sizes) <= tokens]
    writer = IndexedWriter(str(prefix), np.uint16)
    os.ftruncate(writer._bin.fileno(), int(sizes.sum()) * 2)  # zeros, never written: the setup reads sizes only
    writer.sizes = sizes.astype(np.int32)
    writer.finalize()
    return len(sizes)


def recipe(paths, starts) -> DataConfig:
    big, small = paths
    return DataConfig(
        train=[DatasetConfig(big, 0.5), DatasetConfig(small, 0.5)], seq_len=16384, seed=1234,
        stages=[DataStageConfig(starts[0], 4096, [DatasetConfig(big, 0.7), DatasetConfig(small, 0.3)]),
                DataStageConfig(starts[1], 8192, [DatasetConfig(big, 0.9), DatasetConfig(small, 0.1)])],
        stage_start_sample=starts[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=8e9, help="tokens of the big dataset (the small: 1/4)")
    parser.add_argument("--skip-scan", action="store_true",
                        help="leave out the vocabulary scan (minutes at 1e10 tokens; a cost of today's too)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/data_stages_setup.md")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="herd-stages-"))
    paths = [str(root / "big"), str(root / "small")]
    docs = [write_sparse_dataset(Path(paths[0]), int(args.tokens), 0),
            write_sparse_dataset(Path(paths[1]), int(args.tokens / 4), 1)]
    per_epoch = int(args.tokens) // 4096
    # stage 0 takes ~45% of the big dataset's 4096-epoch, stage 1 a further ~20% of its tokens at 8192
    starts = [0, int(0.45 * per_epoch / 0.7), 0]
    starts[2] = starts[1] + int(0.2 * per_epoch / 2 / 0.9)
    data = recipe(paths, starts)
    scan = None if args.skip_scan else _vocab_scan_seconds(paths)
    # the scan maps every page of the files: done above in a child process, so that the lookups below are not
    # timed under the memory pressure of gigabytes of mapped pages
    IndexedDataset.check_vocab = lambda self, vocab_size, on_bad_data: np.zeros(0, dtype=np.int64)
    opening, recuts = _timed(stages, "_open_streams"), _timed(stages, "recut")
    t0 = time.perf_counter()
    blend = stages.StagedBlend(data, vocab_size=65536)
    replay = time.perf_counter() - t0 - opening[0]
    head = blend.blends[-1].datasets[0]  # the big dataset in the current stage: its second recut, then fresh
    where = {"recut part": [], "fresh epoch": []}
    for local in list(range(2000)) + list(range(2 * head.head_left - 1000, 2 * head.head_left + 1000)):
        dataset, k = blend.blends[-1].locate(local)
        if dataset == 0:
            where["recut part" if k < head.head_left else "fresh epoch"].append(starts[2] + local)
    lookups = {name: ids[:200] for name, ids in where.items()}
    lines = [f"# staged data stream setup ({time.strftime('%Y-%m-%d')}, load average {os.getloadavg()[0]:.1f} on "
             f"{os.cpu_count()} cores at the end)", "",
             f"`python -m benchmarks.data_stages_setup --tokens {args.tokens:.0e}"
             f"{' --skip-scan' if args.skip_scan else ''}`: datasets of "
             f"{args.tokens:.2g} and {args.tokens / 4:.2g} tokens ({docs[0]:,} and {docs[1]:,} documents), "
             f"stages at samples {starts} with seq_len 4096 -> 8192 -> 16384; the big dataset has "
             f"{per_epoch:,} samples of 4096 per epoch, {head.head.samples:,} samples of 16384 in its second "
             f"recut ({len(head.head.starts):,} unconsumed intervals).", "",
             "| what | seconds |", "|---|---|",
             f"| vocabulary scan of both files (build_blend pays it today; a child process) | "
             f"{'not run (--skip-scan)' if scan is None else f'{scan:.2f}'} |",
             f"| opening both files, without the scan | {opening[0]:.2f} |",
             f"| the stage replay (StagedBlend without opening) | {replay:.2f} |",
             f"| of which the {len(recuts)} recuts (the rest: PackedDataset's epoch orders, as today) | "
             f"{sum(recuts):.2f} |"]
    for name, ids in lookups.items():
        for state in ("first read", "pages cached"):  # a first read faults the file's pages in (disk-bound)
            times = []
            for i in ids:
                t = time.perf_counter()
                blend[i]
                times.append(time.perf_counter() - t)
            lines.append(f"| one sample of 16384 in the {name}, {state} (median of {len(ids)}) | "
                         f"{statistics.median(times):.6f} |")
    lines += ["", "A first read faults the file's pages in: on a sparse synthetic file on a shared machine that "
              "measures page faults, not the index; 'pages cached' is the lookup's own cost."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        (RESULTS / "data_stages_setup.md").write_text(text)


def _vocab_scan_seconds(paths) -> float:
    code = ("import sys, time; from engine.data.indexed import IndexedDataset; t = time.perf_counter(); "
            "[IndexedDataset(p).check_vocab(65536, 'error') for p in sys.argv[1:]]; print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code, *paths], check=True, capture_output=True,
                                text=True).stdout)


def _timed(module, name: str) -> list:
    """Wrap module.name so that its run time lands in the returned list."""
    spent, inner = [], getattr(module, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = inner(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return result
    setattr(module, name, timed)
    return spent


if __name__ == "__main__":
    main()
