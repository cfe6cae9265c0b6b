"""herd's csrc/ kernels against Liger-Kernel's Triton kernels doing the same work on the same shapes (CUDA only).

    python -m benchmarks.kernels.liger [--save]

Cases, named as benchmarks/kernels/run.py names them so benchmarks/plots.py puts them beside its eager and
torch.compile figures (kernels_<card>.json) in one chart:

  rms_norm fwd / bwd   8192 x 4096, bf16 x, weight and output (Liger's output dtype is its input's, so the cases
                       with an fp32 residual stream have no Liger counterpart); Liger "llama" casting mode
  swiglu fwd / bwd     gate and up 8192 x 14336 bf16 (Liger's backward writes the two gradients over its inputs)
  rope fwd (in place)  q [1, 8192, 32, 128] and k [1, 8192, 8, 128] bf16 rotated in place; Liger takes the
                       Hugging Face layout (heads before tokens, a transposed view of the same memory) and full-width
                       cos/sin tables [1, 8192, 128], twice herd's half-width ones
  cross_entropy fwd+bwd  the loss and d(loss)/d(logits) of [8192, 128256] bf16 logits: herd's forward then backward
                       kernel; Liger's one kernel, which writes the gradient over the logits during the forward

% of copy uses the same minimum bytes for both (herd's: benchmarks/kernels/<op>.py), so it compares times; for
cross entropy the minimum is reading the logits once and writing the gradient once, which Liger's one pass can
reach and herd's two kernels (forward reading the logits, backward reading them again) cannot.
"""

import argparse
import re
from typing import Callable, List, NamedTuple

import torch

from benchmarks.kernels.harness import copy_bandwidth_gbs, time_ms
from benchmarks.report import publish

TOKENS, DIM, FFN, EPS = 8192, 4096, 14336, 1e-5
HQ, HK, HEAD_DIM, THETA, VOCAB = 32, 8, 128, 500000.0, 128256


class Pair(NamedTuple):
    op: str
    shape: str
    herd: Callable[[], object]
    liger: Callable[[], object]
    bytes_moved: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def rms_norm_pairs() -> List[Pair]:
    from liger_kernel.ops.rms_norm import rms_norm_backward, rms_norm_forward
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(DIM, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    y, rstd = torch.ops.herd.rms_norm_fwd(x, w, EPS, torch.bfloat16)
    _, _, liger_rstd, block, warps, casting = rms_norm_forward(x, w, EPS, 0.0, "llama", None)
    dx, dw = torch.ops.herd.rms_norm_bwd(dy, x, w, rstd, None)
    return [
        Pair("rms_norm fwd", f"{TOKENS}x{DIM} x bfloat16 w bfloat16 -> bf16",
             lambda: torch.ops.herd.rms_norm_fwd(x, w, EPS, torch.bfloat16),
             lambda: rms_norm_forward(x, w, EPS, 0.0, "llama", None), _nbytes(x, w, y, rstd)),
        Pair("rms_norm bwd", f"{TOKENS}x{DIM} dy bfloat16 h bfloat16 w bfloat16",
             lambda: torch.ops.herd.rms_norm_bwd(dy, x, w, rstd, None),
             lambda: rms_norm_backward(dy, x, w, liger_rstd, 0.0, casting, block, warps, False, None),
             _nbytes(dy, x, w, rstd, dx, dw)),
    ]


def swiglu_pairs() -> List[Pair]:
    from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    gate, up, dout = (torch.randn(TOKENS, FFN, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # Liger's backward overwrites its inputs with the gradients: it gets its own copies (values drift from call
    # to call; the work per call does not)
    liger_gate, liger_up = gate.clone(), up.clone()
    n = _nbytes(gate)
    return [
        Pair("swiglu fwd", f"{TOKENS}x{FFN} bf16", lambda: torch.ops.herd.swiglu_fwd(gate, up),
             lambda: swiglu_forward(gate, up), 3 * n),
        Pair("swiglu bwd", f"{TOKENS}x{FFN} bf16", lambda: torch.ops.herd.swiglu_bwd(dout, gate, up),
             lambda: swiglu_backward(liger_gate, liger_up, dout), 5 * n),
    ]


def rope_pairs() -> List[Pair]:
    from liger_kernel.ops.rope import rope_forward
    q = torch.randn(1, TOKENS, HQ, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, TOKENS, HK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    inv_freq = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))  # [d/2]
    angles = torch.outer(torch.arange(TOKENS, device="cuda").float(), inv_freq)  # [s, d/2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]  # herd: [1, s, 1, d/2] fp32
    full = torch.cat([angles, angles], dim=-1)  # Hugging Face's rotate_half tables: [s, d]
    hf_cos, hf_sin = full.cos()[None].to(torch.bfloat16), full.sin()[None].to(torch.bfloat16)  # [1, s, d]
    moved = 2 * _nbytes(q, k) + _nbytes(cos, sin)
    return [Pair("rope fwd (in place)", f"q 1x{TOKENS}x{HQ}x{HEAD_DIM} + k 1x{TOKENS}x{HK}x{HEAD_DIM} bf16",
                 lambda: torch.ops.herd.rope_(q, k, cos, sin, False),
                 lambda: rope_forward(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin), moved)]


def cross_entropy_pairs() -> List[Pair]:
    from liger_kernel.ops.cross_entropy import cross_entropy_forward
    logits = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16)
    liger_logits = logits.clone().requires_grad_(True)  # Liger computes the gradient only for inputs needing one
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    grad = torch.ones(TOKENS, device="cuda")

    def herd():  # as engine/ops/cross_entropy.py's autograd function runs them on one device
        row_max, sum_exp, target_logit = torch.ops.herd.cross_entropy_fwd(logits, targets, 0, VOCAB)
        lse = sum_exp.log() + row_max  # [N]
        return lse - target_logit, torch.ops.herd.cross_entropy_bwd(grad, logits, targets, lse, 0, VOCAB)

    def liger():
        with torch.no_grad():
            return cross_entropy_forward(liger_logits, targets, None, -100, 0.0, 0.0, "sum", None, False)

    return [Pair("cross_entropy fwd+bwd", f"{TOKENS}x{VOCAB} bf16", herd, liger,
                 2 * logits.numel() * 2 + TOKENS * (8 + 4))]


PAIRS = (rms_norm_pairs, swiglu_pairs, rope_pairs, cross_entropy_pairs)


def measure(pair: Pair, copy_gbs: float) -> dict:
    herd_ms, liger_ms = time_ms(pair.herd), time_ms(pair.liger)
    herd_pct = 100 * pair.bytes_moved / herd_ms / 1e6 / copy_gbs
    return {"op": pair.op, "shape": pair.shape, "bytes": pair.bytes_moved, "herd_ms": herd_ms, "liger_ms": liger_ms,
            "herd_pct_of_copy": herd_pct, "liger_pct_of_copy": herd_pct * herd_ms / liger_ms,
            "herd_vs_liger": liger_ms / herd_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/kernels_liger_<card>.{md,json}")
    args = parser.parse_args()
    import engine.ops  # noqa: F401  (defines the herd:: ops and loads the extension)
    import liger_kernel  # noqa: F401  (missing: the stage fails here, in one line)
    from engine.ops.library import kernel_status
    print("kernels:", kernel_status())
    card = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{card}: device copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for make in PAIRS:
        try:
            for pair in make():
                rows.append(measure(pair, copy_gbs))
                print(rows[-1], flush=True)
            torch.cuda.empty_cache()
        except Exception as err:  # one op's failure (a Liger API change, say) must not hide the others
            print(f"{make.__name__}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    header = ("| op | shape | herd ms | Liger ms | herd % of copy | Liger % of copy | herd x Liger |\n"
              "|---|---|---:|---:|---:|---:|---:|")
    lines = [f"| {r['op']} | {r['shape']} | {r['herd_ms']:.3f} | {r['liger_ms']:.3f} | {r['herd_pct_of_copy']:.0f}% | "
             f"{r['liger_pct_of_copy']:.0f}% | {r['herd_vs_liger']:.2f} |" for r in rows]
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")
    from importlib import metadata
    version = metadata.version("liger-kernel")
    publish(f"kernels_liger_{slug}", [dict(r, card=card, copy_gbs=copy_gbs, liger_kernel=version) for r in rows],
            "\n".join([header] + lines), title=f"csrc/ kernels against Liger-Kernel {version} on {card}",
            description=(f"Measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write). herd = the csrc/ "
                         "kernel through torch.ops.herd; Liger = liger_kernel.ops' Triton kernel on the same "
                         "tensors. CUDA events around 20 back-to-back calls, median of 5, after 5 warm-up calls. "
                         "torch.compile's figures for the same cases: kernels_<card>.md of the same call. "
                         "`python -m benchmarks.kernels.liger --save`."), save=args.save)


if __name__ == "__main__":
    main()
