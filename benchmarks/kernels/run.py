"""Every csrc/ kernel against the device copy bandwidth, eager PyTorch and torch.compile (CUDA only).

    python -m benchmarks.kernels.run [--save]

Targets (issue 6): 85% or more of the measured copy bandwidth and faster than torch.compile's kernel.
"""

import argparse
import importlib
import re

import torch

from benchmarks.kernels.harness import copy_bandwidth_gbs, measure
from benchmarks.report import publish

OP_MODULES = ["rms_norm", "rope", "swiglu", "fp8_cast", "cross_entropy", "fp8_fused"]  # benchmarks/kernels/<name>.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/kernels_<card>.{md,json}")
    parser.add_argument("--only", default="", help="comma-separated op modules to run")
    args = parser.parse_args()
    import engine.ops  # noqa: F401  (defines the herd:: ops and loads the extension)
    from engine.ops.library import kernel_status
    print("kernels:", kernel_status())
    card = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{card}: device copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for name in (args.only.split(",") if args.only else OP_MODULES):
        try:
            module = importlib.import_module(f"benchmarks.kernels.{name}")
            for case in module.cases():
                rows.append(measure(case, copy_gbs))
                print(rows[-1], flush=True)  # partial results survive a time limit
                torch.cuda.empty_cache()
        except Exception as err:  # one broken op must not hide the others' figures
            print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    header = ("| op | shape | fused ms | GB/s | % of copy | eager ms | compiled ms | x eager | x compiled |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['op']} | {r['shape']} | {r['fused_ms']:.3f} | {r['fused_gbs']:.0f} | {r['pct_of_copy']:.0f}% | "
             f"{r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | {r['vs_eager']:.2f} | {r['vs_compiled']:.2f} |"
             for r in rows]
    table = "\n".join([header] + lines)
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")  # as benchmarks/mfu.py names its results
    publish(f"kernels_{slug}", [dict(r, card=card, copy_gbs=copy_gbs) for r in rows], table,
            title=f"csrc/ kernels on {card}",
            description=(f"Measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write). Fused = the csrc/ "
                         "kernel through torch.ops.herd; eager = the pure-torch reference; compiled = the reference "
                         "under torch.compile. CUDA events around 20 back-to-back calls, median of 5 such runs, after 5 warm-up calls. "
                         "`python -m benchmarks.kernels.run --save`."),
            save=args.save)


if __name__ == "__main__":
    main()
