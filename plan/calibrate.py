"""Kernel efficiencies calibrated only from our own measurements (benchmarks/results), never from published runs.

Inputs: two one-GPU runs of the MFU proxy (benchmarks/mfu.py: L = 4 and L = 8 Llama-3-8B blocks, the full 128,256
vocabulary head, one [1, 8192] micro-batch, no parallelism), each with one profiled step whose GPU kernel time is
split by category (matmul, attention, optimizer, herd kernels, copy/cast, other), plus the copy bandwidth of the
kernels benchmark. Differences between the two runs isolate what one block costs; what is left at L = 0 is the
head, the loss and the embedding. Each constant below says which numbers it came from (`sources`).

  gemm_eff      = model GEMM FLOPs / (matmul ms x peak)          pooled over both runs (bf16 and fp8 separately)
  attn_eff      = 6 d S T per block / (attention ms per block x peak)  (causal FLOPs, engine/flops.py causal=True)
  ew_passes     = elementwise bytes per block, in passes over T (d + f) bf16 values, after the autocast weight cast
                  (6 bytes per block parameter: fp32 read, bf16 write) is taken out
  head_passes   = what is left at L = 0 after the head's weight cast, in passes over T V bf16 logits
  optim_bytes   = optimizer ms per extra parameter x copy bandwidth (fused AdamW and the norm: bytes per parameter)
  gap_block_ms, gap_fixed_ms = wall time not covered by GPU kernels (host launch gaps), per block and fixed
"""

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List

from plan.hardware import RESULTS_DIR, Hardware, ProfileError


@dataclass(frozen=True)
class Calibration:
    gemm_eff: Dict[str, float]  # by precision: bf16, fp8 (fp8 against the fp8 peak)
    attn_eff: float
    ew_passes: Dict[str, float]  # by precision
    head_passes: float
    optim_bytes: float
    gap_block_ms: float
    gap_fixed_ms: float
    sources: List[str] = field(default_factory=list)


def _block_params(row: dict) -> int:
    """Matmul parameters of one block of the proxy (wq, wo, wk, wv, w1, w2, w3)."""
    d, hd = row["dim"], row["dim"] // row["heads"]
    return d * hd * (2 * row["heads"] + 2 * row["kv_heads"]) + 3 * d * row["ffn_dim"]


def _rows(file_name: str) -> Dict[str, dict]:
    return {r["variant"]: r for r in json.loads((RESULTS_DIR / file_name).read_text()) if r.get("profile")}


def _elementwise_ms(profile: dict) -> float:
    cats = profile["by_category_ms"]
    return sum(cats.get(k, 0.0) for k in ("herd kernels", "copy/cast", "other"))


def _pair(hw: Hardware, variant: str):
    small, large = (_rows(f)[variant] for f in hw.calibration_files)
    if small["layers"] > large["layers"]:
        small, large = large, small
    return small, large


def calibrate(hw: Hardware) -> Calibration:
    """The constants above from the profile's calibration files (herd-bf16 and herd-fp8 rows)."""
    small, large = _pair(hw, "herd-bf16")
    bw = hw.calibration_copy_gbs * 1e9  # bytes are counted on the card the profiles ran on
    tokens = small["seq_len"] * small["batch_size"]
    blocks = large["layers"] - small["layers"]
    p_block = _block_params(small)
    p_head = small["vocab"] * small["dim"]
    d, f, s = small["dim"], small["ffn_dim"], small["seq_len"]
    peak = hw.peak_tflops["bf16"] * 1e12
    mm_flops = sum(6 * (r["layers"] * p_block + p_head) * tokens for r in (small, large))
    mm_ms = sum(r["profile"]["by_category_ms"]["matmul"] for r in (small, large))
    gemm_bf16 = mm_flops / (mm_ms * 1e-3) / peak
    attn_block_ms = (large["profile"]["by_category_ms"]["attention"]
                     - small["profile"]["by_category_ms"]["attention"]) / blocks
    attn_eff = 6 * d * s * tokens / (attn_block_ms * 1e-3) / peak
    cast_block_ms = 6 * p_block / bw * 1e3
    ew_block_ms = (_elementwise_ms(large["profile"]) - _elementwise_ms(small["profile"])) / blocks
    ew_bf16 = (ew_block_ms - cast_block_ms) * 1e-3 * bw / (tokens * (d + f) * 2)
    head_ms = _elementwise_ms(small["profile"]) - small["layers"] * ew_block_ms - 6 * p_head / bw * 1e3
    head_passes = head_ms * 1e-3 * bw / (tokens * small["vocab"] * 2)
    extra_params = blocks * (p_block + 2 * d)
    opt_ms = large["profile"]["by_category_ms"]["optimizer"] - small["profile"]["by_category_ms"]["optimizer"]
    optim_bytes = opt_ms * 1e-3 * bw / extra_params
    gaps = [r["ms_per_step"] - r["profile"]["total_ms"] for r in (small, large)]
    gap_block = (gaps[1] - gaps[0]) / blocks
    gemm_fp8, ew_fp8 = _fp8(hw, p_block, tokens, d, f, bw)
    sources = [f"{name}: herd-bf16 and herd-fp8 rows (layers {small['layers']} and {large['layers']}, "
               f"profile.by_category_ms, ms_per_step)" for name in hw.calibration_files]
    sources.append(f"calibration card copy bandwidth {hw.calibration_copy_gbs:.1f} GB/s; this card {hw.copy_gbs:.1f} "
                   f"GB/s ({hw.copy_source})")
    return Calibration(gemm_eff={"bf16": gemm_bf16, "fp8": gemm_fp8}, attn_eff=attn_eff,
                       ew_passes={"bf16": ew_bf16, "fp8": ew_fp8}, head_passes=head_passes,
                       optim_bytes=optim_bytes, gap_block_ms=gap_block,
                       gap_fixed_ms=gaps[0] - small["layers"] * gap_block,
                       sources=sources)


def _fp8(hw: Hardware, p_block: int, tokens: int, d: int, f: int, bw: float):
    """FP8 blocks (native, tensorwise): GEMM efficiency against the fp8 peak from the per-block matmul time, and
    elementwise passes per block including the quantization kernels (weights are quantized from fp32 directly,
    so no autocast cast is taken out)."""
    small, large = _pair(hw, "herd-fp8")
    blocks = large["layers"] - small["layers"]
    mm_block_ms = (large["profile"]["by_category_ms"]["matmul"] - small["profile"]["by_category_ms"]["matmul"]) / blocks
    gemm = 6 * p_block * tokens / (mm_block_ms * 1e-3) / (hw.peak_tflops["fp8"] * 1e12)
    ew_block_ms = (_elementwise_ms(large["profile"]) - _elementwise_ms(small["profile"])) / blocks
    return gemm, ew_block_ms * 1e-3 * bw / (tokens * (d + f) * 2)


def check_calibration(hw: Hardware) -> Calibration:
    """calibrate(hw), with the profile's calibration files found wanting named (ProfileError) instead of a
    traceback: rows missing, the same run twice (no block difference to take), or constants the step-time model
    cannot divide by (efficiencies not > 0, anything not finite)."""
    where = f"calibration_files: {', '.join(hw.calibration_files)}"
    try:
        cal = calibrate(hw)
    except KeyError as e:
        raise ProfileError(f"{where}: no {e.args[0]!r} in the rows") from None
    except ZeroDivisionError:
        raise ProfileError(f"{where}: the two runs must differ in layers (and profile time)") from None
    except (TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        raise ProfileError(f"{where}: not our MFU benchmark rows ({type(e).__name__}: {e})") from None
    values = [*cal.gemm_eff.values(), *cal.ew_passes.values(), cal.attn_eff, cal.head_passes, cal.optim_bytes,
              cal.gap_block_ms, cal.gap_fixed_ms]
    if not all(math.isfinite(v) for v in values) or min(*cal.gemm_eff.values(), cal.attn_eff) <= 0:
        raise ProfileError(f"{where}: give efficiencies that are not finite and positive ({cal.gemm_eff}, "
                           f"attention {cal.attn_eff})")
    return cal
