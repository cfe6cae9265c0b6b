"""Where one training step's GPU time goes: the step run once under torch.profiler (CUDA activity only), each
kernel's time summed by name and by a rough category read from the name (matrix multiplies, attention, the
optimizer, herd's csrc/ kernels, copies and casts, the rest). benchmarks/mfu.py --profile adds this to each
variant's row, after its timed steps (profiling slows the step; the timing is not taken from it).

The categories are name patterns, so they are a guide, not an accounting: a cuBLAS or cuDNN kernel renamed in a
later CUDA release falls into "other" until its pattern is added here.
"""

import re
from typing import Callable, Dict, Iterable, List, Tuple

# (category, pattern on the kernel's name, case-insensitive); the first that matches wins, "other" catches the rest
CATEGORIES: Tuple[Tuple[str, str], ...] = (
    ("herd kernels", r"herd"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|scaled_mm|splitk"),
    ("optimizer", r"adam|multi_tensor"),
    ("copy/cast", r"copy|cast|convert|fill"),
    ("other", r""),
)


def category(kernel_name: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, kernel_name, re.IGNORECASE):
            return name
    return "other"


def summarize(kernels: Iterable[Tuple[str, float]], top: int = 12) -> Dict:
    """(kernel name, microseconds) per launch -> {"total_ms", "by_category_ms" (largest first), "top" (the `top`
    kernels by summed time: name shortened, category, ms, calls)}."""
    by_name: Dict[str, List[float]] = {}
    for name, micros in kernels:
        by_name.setdefault(name, []).append(micros)
    by_category: Dict[str, float] = {}
    for name, times in by_name.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + sum(times) / 1000.0
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "total_ms": sum(by_category.values()),
        "by_category_ms": dict(sorted(by_category.items(), key=lambda item: -item[1])),
        "top": [{"kernel": _short(name), "category": category(name), "ms": sum(times) / 1000.0,
                 "calls": len(times)} for name, times in ranked],
    }


def _short(name: str, limit: int = 90) -> str:
    name = re.sub(r"\s+", " ", name).replace("|", "/")  # a table cell
    return name if len(name) <= limit else name[:limit - 3] + "..."


def profile_step(run_step: Callable[[], None]) -> Dict:
    """Run `run_step` (one whole training step, optimizer included) under the CUDA profiler; summarize()'s dict."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_step()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "device_time_total", None)  # a kernel event's own duration, microseconds
        if micros is None:  # the name before torch 2.4
            micros = getattr(event, "cuda_time_total", 0.0)
        kernels.append((event.name, float(micros)))
    return summarize(kernels, top=30)


def markdown(rows: List[Dict], top: int = 12) -> str:
    """A section for the results file: per profiled variant, ms by category and its `top` kernels (the JSON keeps
    summarize()'s longer list)."""
    out = []
    for row in rows:
        prof = row.get("profile")
        if not prof or prof.get("error"):
            if prof and prof.get("error"):
                out.append(f"- {row['variant']}: profiling failed: {prof['error']}")
            continue
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in prof["by_category_ms"].items())
        out.append(f"**{row['variant']}**: {prof['total_ms']:.1f} ms of GPU kernels in one profiled step: {parts} "
                   f"(ms)\n")
        out.append("| kernel | category | ms | calls |\n|---|---|---:|---:|")
        out += [f"| `{k['kernel']}` | {k['category']} | {k['ms']:.2f} | {k['calls']} |" for k in prof["top"][:top]]
        out.append("")
    return "\n".join(out)
