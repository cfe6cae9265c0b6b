"""PNG charts of the GPU benchmarks' results files, written beside them in benchmarks/results/.

    python -m benchmarks.plots [--results benchmarks/results] [FILE.json ...]

For every results file it knows (all of them in --results when no FILE is named):

  mfu_<card><suffix>.json, peers_<card>.json   <stem>_throughput.png: tokens/s and MFU per variant (a failed
                                               variant is drawn as an empty bar labelled with why it failed);
                                               <stem>_steps.png: one profiled step per variant as stacked bars of
                                               GPU milliseconds by category (benchmarks/step_profile.py), when
                                               the rows carry profiles
  kernels_<card>.json                          <stem>.png: each csrc/ kernel case as % of the measured device
                                               copy bandwidth, beside the eager reference and torch.compile's
                                               kernel doing the same work (and Liger-Kernel's, from
                                               kernels_liger_<card>.json, where that file exists)

Percentages of copy bandwidth for eager, compiled and Liger are the case's minimum bytes over that
implementation's time, so the bars compare times on one scale: 100% is a kernel that moves its bytes as fast as
a device-to-device copy. matplotlib is needed (the `plot` extra); the charts are drawn headless (Agg).
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks.step_profile import CATEGORIES

RESULTS = Path(__file__).resolve().parent / "results"
THROUGHPUT_FILE = re.compile(r"^(mfu|peers)_[a-z0-9_]+\.json$")
KERNELS_FILE = re.compile(r"^kernels_(?!liger_)[a-z0-9_]+\.json$")
CATEGORY_ORDER = [name for name, _ in CATEGORIES]
# one colour per step category, stable across charts (matplotlib's tab10)
CATEGORY_COLOURS = dict(zip(CATEGORY_ORDER, ["tab:purple", "tab:red", "tab:blue", "tab:orange", "tab:olive",
                                             "tab:gray"]))
KERNEL_SERIES = (("herd csrc/", "tab:blue"), ("Liger-Kernel (Triton)", "tab:green"),
                 ("torch.compile", "tab:orange"), ("eager PyTorch", "tab:gray"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    # no "Software" stamp: the same results give the same bytes whatever matplotlib drew them
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def _label(row: Dict) -> str:
    return str(row.get("variant") or row.get("peer") or "?")


def _short_error(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def throughput_chart(rows: List[Dict], title: str, path: Path) -> Path:
    """Two panels of horizontal bars, one row per variant: tokens/s and MFU (%, against the bf16 peak)."""
    plt = _pyplot()
    labels = [_label(r) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, key, scale, xlabel in ((axes[0], "tokens_per_s", 1.0, "tokens/s"),
                                   (axes[1], "mfu", 100.0, "MFU % (PaLM FLOPs / dense bf16 peak)")):
        values = [0.0 if r.get("error") or r.get(key) is None else scale * r[key] for r in rows]
        colours = ["tab:orange" if "fp8" in label else "tab:blue" for label in labels]
        bars = ax.barh(range(len(rows)), values, color=colours)
        top = max(values + [1.0])
        for bar, row, value in zip(bars, rows, values):
            text = (f"failed: {_short_error(row['error'])}" if row.get("error")
                    else f"{value:,.0f}" if key == "tokens_per_s" else f"{value:.1f}%")
            ax.text(value + 0.01 * top, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8,
                    color="tab:red" if row.get("error") else "black")
        ax.set_xlim(0, top * 1.35)
        ax.set_xlabel(xlabel)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()  # first variant on top, as in the table
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def step_breakdown_chart(rows: List[Dict], title: str, path: Path) -> Optional[Path]:
    """Stacked horizontal bars: each profiled variant's GPU milliseconds by category; None if none profiled."""
    profiled = [r for r in rows if isinstance(r.get("profile"), dict) and "by_category_ms" in r["profile"]]
    if not profiled:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(profiled) + 1.8))
    left = [0.0] * len(profiled)
    extra = sorted({c for r in profiled for c in r["profile"]["by_category_ms"]} - set(CATEGORY_ORDER))
    for category in CATEGORY_ORDER + extra:
        widths = [r["profile"]["by_category_ms"].get(category, 0.0) for r in profiled]
        if not any(widths):
            continue
        ax.barh(range(len(profiled)), widths, left=left, label=category,
                color=CATEGORY_COLOURS.get(category, "tab:brown"))
        left = [a + b for a, b in zip(left, widths)]
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.1f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(profiled)), [_label(r) for r in profiled])
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.15)
    ax.set_xlabel("GPU kernel time in one profiled optimizer step (ms)")
    ax.legend(ncol=len(CATEGORY_ORDER), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _case_key(row: Dict) -> str:
    return f"{row['op']}\n{row['shape']}"  # the y label: op, and its shape below it


def kernel_percentages(rows: List[Dict], liger_rows: Sequence[Dict] = ()) -> List[Dict]:
    """Per case: % of copy bandwidth of herd's kernel, eager, compiled and (where measured) Liger's. Each is the
    case's minimum bytes over that implementation's time: pct_of_copy (herd's) x herd ms / their ms."""
    liger = {_case_key(r): r for r in liger_rows if r.get("liger_ms")}
    out = []
    for r in rows:
        pct, fused = r["pct_of_copy"], r["fused_ms"]

        def of(ms):
            return pct * fused / ms if ms and ms == ms and ms > 0 else None  # ms == ms: not NaN
        match = liger.get(_case_key(r))
        out.append({"case": _case_key(r), "herd csrc/": pct, "eager PyTorch": of(r.get("eager_ms")),
                    "torch.compile": of(r.get("compiled_ms")),
                    # Liger's own run carries its own herd timing: compare it within that run
                    "Liger-Kernel (Triton)": (match["liger_pct_of_copy"] if match else None)})
    return out


def kernels_chart(rows: List[Dict], liger_rows: Sequence[Dict], title: str, path: Path) -> Path:
    """Grouped horizontal bars, one group per kernel case, one bar per implementation present."""
    plt = _pyplot()
    table = kernel_percentages(rows, liger_rows)
    series = [(name, colour) for name, colour in KERNEL_SERIES if any(t[name] is not None for t in table)]
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(12, 0.25 * len(table) * len(series) + 1.8))
    for k, (name, colour) in enumerate(series):
        ys = [i + k * height for i in range(len(table))]
        values = [t[name] or 0.0 for t in table]
        ax.barh(ys, values, height=height, color=colour, label=name)
    ax.axvline(100.0, color="black", lw=0.8, ls="--")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(table))], [t["case"] for t in table], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of the measured device copy bandwidth (higher is faster; 100% = copy speed)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _rows(path: Path) -> List[Dict]:
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of result rows")
    return rows


def _device(rows: List[Dict]) -> str:
    return next((r.get("device_name") or r.get("card") for r in rows
                 if r.get("device_name") or r.get("card")), "unknown device")


def plot_file(path: Path) -> List[Path]:
    """The charts of one results file (see the module docstring); the PNG paths written."""
    stem = path.stem
    if THROUGHPUT_FILE.match(path.name):
        rows = _rows(path)
        ok = next((r for r in rows if not r.get("error")), {})
        shape = (f"{ok.get('layers', '?')} layers, {ok.get('accum', 1)} x [{ok.get('batch_size', '?')}, "
                 f"{ok.get('seq_len', '?')}] tokens per optimizer step")
        kind = "peers" if stem.startswith("peers") else "herd variants"
        written = [throughput_chart(rows, f"{stem}: {kind} on {_device(rows)}, {shape}",
                                    path.with_name(f"{stem}_throughput.png"))]
        steps = step_breakdown_chart(rows, f"{stem}: where one step's GPU time goes ({_device(rows)})",
                                     path.with_name(f"{stem}_steps.png"))
        return written + ([steps] if steps else [])
    if KERNELS_FILE.match(path.name):
        rows = _rows(path)
        liger_path = path.with_name(path.name.replace("kernels_", "kernels_liger_", 1))
        liger = _rows(liger_path) if liger_path.exists() else []
        return [kernels_chart(rows, liger, f"{stem}: csrc/ kernels vs copy bandwidth on {_device(rows)}",
                              path.with_name(f"{stem}.png"))]
    return []


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: every known one in --results)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of results files")
    args = parser.parse_args(argv)
    try:
        _pyplot()
    except ImportError:
        print("benchmarks.plots: matplotlib is not installed (pip install -e '.[plot]')", file=sys.stderr)
        return 2
    paths = [Path(f) for f in args.files] or sorted(Path(args.results).glob("*.json"))
    written = []
    for path in paths:
        try:
            written += plot_file(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"benchmarks.plots: {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
