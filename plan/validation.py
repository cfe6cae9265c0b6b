"""Predicted against measured and published: `python -m plan.validation [--save]`.

With --save it writes benchmarks/results/plan_validation.{md,json} and, when matplotlib is installed (the `plot`
extra), plan_validation.png. Nothing here is fitted to the published numbers: the model's constants come from
plan/calibrate.py (our own H100 files) and the hardware profile (datasheets).
"""

import argparse
import json
import time
from typing import Dict, List

from engine.config import CONFIGS_DIR, ModelConfig, load_config
from engine.flops import flops_per_token
from plan.calibrate import calibrate
from plan.hardware import RESULTS_DIR, load_hardware
from plan.layout import Layout
from plan.memory import worst_peak
from plan.search import Request, plan
from plan.steptime import bubble_units, step_time

GIB = 2 ** 30
# Llama 3 paper, Table 4 (405B, H100, BF16): GPUs, TP, CP, PP, DP, seq, batch tokens, TFLOP/s/GPU, MFU
META = [(8192, 8, 1, 16, 64, 8192, 16 * 2 ** 20, 430, 0.43), (16384, 8, 1, 16, 128, 8192, 16 * 2 ** 20, 400, 0.41),
        (16384, 8, 16, 16, 8, 131072, 16 * 2 ** 20, 380, 0.38)]


HEAD = """# herd plan's model against measured and published numbers ({date})

`python -m plan.validation --save` (CPU only; plan/validation.py). Errors are (predicted - reference) / reference.
Formulas, sources and the discussion of the misses: docs/scale.md. Plot: plan_validation.png.

"""
NOTES = """
## Published tables this could not be compared with

- Megatron-LM's README weak-scaling table (GPT models of 2B to 462B, sequence 4096, vocabulary 131,072, up to
  6,144 H100s) is an image (images/model_table.png); its rows (hidden size, layers, heads, TP/PP, batch, TFLOP/s)
  could not be read from any text we could retrieve, so no prediction is compared with it. The README's text gives
  only the MFU range (41% for the smallest model, 47-48% for the largest).
- NVIDIA's Llama 3.1 8B / 70B / 405B BF16 H100 rows (NeMo / Megatron-Bridge performance summaries): the pages we
  could retrieve held FP8 rows on GB200 / B200 and the H100 recipes' layouts (e.g. 405B: 1,024 GPUs, TP8 PP8 CP2;
  70B: 64 GPUs, TP4 PP4 CP2), not the BF16 H100 throughput figures, so no prediction is compared with them.
"""


def _preset(name: str) -> ModelConfig:
    return load_config(str(CONFIGS_DIR / "models" / f"{name}.yaml")).model


def proxy_rows() -> List[Dict]:
    """The one-GPU MFU proxy: every herd row of our H100 and H200 result files."""
    out = []
    for file_name, profile in (("mfu_nvidia_h100_80gb_hbm3.json", "h100_sxm"),
                               ("mfu_nvidia_h100_80gb_hbm3_8layers.json", "h100_sxm"),
                               ("mfu_nvidia_h100_80gb_hbm3_accum8.json", "h100_sxm"),
                               ("mfu_nvidia_h200.json", "h200")):
        hw = load_hardware(profile)
        cal, units = calibrate(hw), bubble_units()
        for row in json.loads((RESULTS_DIR / file_name).read_text()):
            if row["variant"] not in ("herd-bf16", "herd-fp8"):
                continue
            cfg = ModelConfig(dim=row["dim"], n_layers=row["layers"], n_heads=row["heads"],
                              n_kv_heads=row["kv_heads"], ffn_dim=row["ffn_dim"], vocab_size=row["vocab"],
                              max_seq_len=row["seq_len"])
            accum, seq = row.get("accum", 1), row["seq_len"]
            layout = Layout(mbs=row["batch_size"], fp8=row["variant"] == "herd-fp8", document_mask=False)
            st = step_time(cfg, layout, seq, seq * row["batch_size"] * accum, hw, cal, units)
            mem = worst_peak(cfg, layout, seq, accum)
            calibration = file_name in hw.calibration_files and profile == "h100_sxm"
            out.append({"file": file_name, "variant": row["variant"], "card": profile, "calibration": calibration,
                        "measured_ms": row["ms_per_step"], "predicted_ms": st.total * 1e3,
                        "measured_mfu": row["mfu"], "predicted_mfu": st.mfu,
                        "measured_gib": row["peak_mem_gib"], "predicted_gib": mem.total / GIB})
    return out


def meta_rows() -> List[Dict]:
    """Meta's three 405B layouts run by herd: the fastest fitting choice of the knobs Table 4 leaves open
    (micro-batch, schedule and virtual stages, checkpointing), predicted; also the same layout without
    checkpointing, fitting or not."""
    cfg, hw = _preset("llama3_405b"), load_hardware()
    out = []
    for gpus, tp, cp, pp, dp, seq, batch, tflops, mfu in META:
        req = Request(model=cfg, gpus=gpus, hardware=hw, seq_len=seq, global_tokens=batch, top=10 ** 6)
        result = plan(req)
        same = [c for c in result.best if (c.layout.tp, c.layout.cp, c.layout.pp, c.layout.dp) == (tp, cp, pp, dp)]
        row = {"gpus": gpus, "layout": f"TP{tp} CP{cp} PP{pp} DP{dp}", "seq": seq, "published_tflops": tflops,
               "published_mfu": mfu}
        if same:
            c = same[0]
            causal = flops_per_token(cfg, seq, causal=True) / flops_per_token(cfg, seq)
            row.update(choice=c.layout.describe(), predicted_tflops=c.time.tflops_gpu,
                       predicted_tflops_causal=c.time.tflops_gpu * causal, gib=c.memory.total / GIB,
                       parts={k: round(v, 3) for k, v in c.time.parts.items()}, step_s=c.time.total)
        plain = Layout(tp=tp, cp=cp, pp=pp, vpp=7 if pp * 8 > cfg.n_layers else 8, schedule="Interleaved1F1B",
                       dp_shard=dp)
        m = batch // seq // dp
        row["no_ac_gib"] = worst_peak(cfg, plain, seq, m).total / GIB
        row["no_ac_tflops"] = step_time(cfg, plain, seq, batch, hw, calibrate(hw), bubble_units()).tflops_gpu
        row["no_ac_choice"] = plain.describe()
        out.append(row)
    return out


def planner_picks() -> List[Dict]:
    cfg, hw = _preset("llama3_405b"), load_hardware()
    out = []
    for gpus, seq in ((8192, 8192), (16384, 8192), (8192, 131072), (16384, 131072)):
        started = time.time()
        result = plan(Request(model=cfg, gpus=gpus, hardware=hw, seq_len=seq, global_tokens=16 * 2 ** 20, top=3))
        elapsed = time.time() - started
        for rank, c in enumerate(result.best, 1):
            out.append({"gpus": gpus, "seq": seq, "rank": rank, "layout": c.layout.describe(),
                        "microbatches": c.microbatches, "gib": c.memory.total / GIB, "step_s": c.time.total,
                        "tflops": c.time.tflops_gpu, "mfu": c.time.mfu,
                        "parts": {k: round(v, 3) for k, v in c.time.parts.items()}, "plan_s": elapsed,
                        "evaluated": result.evaluated, "fitting": result.fitting})
    return out


def _err(predicted: float, reference: float) -> str:
    return f"{(predicted - reference) / reference:+.1%}"


def markdown(proxy: List[Dict], meta: List[Dict], picks: List[Dict]) -> str:
    lines = ["## The one-GPU MFU proxy (our measurements)", "",
             "| file | variant | calibration input | step ms measured | predicted | error | peak GiB measured | "
             "predicted | error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in proxy:
        lines.append(f"| {r['file']} | {r['variant']} | {'yes' if r['calibration'] else 'no'} | "
                     f"{r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {_err(r['predicted_ms'], r['measured_ms'])}"
                     f" | {r['measured_gib']:.1f} | {r['predicted_gib']:.1f} | "
                     f"{_err(r['predicted_gib'], r['measured_gib'])} |")
    lines += ["", "## Llama 3 405B, Table 4 (published, not used to calibrate)", "",
              "| GPUs | Meta's layout | seq | published TFLOP/s | herd's fastest fitting knobs for it | GiB | "
              "predicted TFLOP/s (PaLM) | error | predicted (causal FLOPs) | error | without checkpointing: GiB | "
              "its TFLOP/s (PaLM) | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in meta:
        if "predicted_tflops" in r:
            lines.append(f"| {r['gpus']:,} | {r['layout']} | {r['seq']:,} | {r['published_tflops']} | {r['choice']} | "
                         f"{r['gib']:.1f} | {r['predicted_tflops']:.0f} | "
                         f"{_err(r['predicted_tflops'], r['published_tflops'])} | {r['predicted_tflops_causal']:.0f} | "
                         f"{_err(r['predicted_tflops_causal'], r['published_tflops'])} | {r['no_ac_gib']:.0f} | "
                         f"{r['no_ac_tflops']:.0f} | {_err(r['no_ac_tflops'], r['published_tflops'])} |")
        else:
            lines.append(f"| {r['gpus']:,} | {r['layout']} | {r['seq']:,} | {r['published_tflops']} | does not fit "
                         f"under any knob | | | | | | {r['no_ac_gib']:.0f} | {r['no_ac_tflops']:.0f} | |")
    lines += ["", "## What herd plan picks for 405B (16M tokens per step, H100 SXM profile)", "",
              "| GPUs | seq | # | layout | m | GiB | step s | compute | tp | cp | pp | dp | bubble | optimizer | "
              "TFLOP/s | MFU | planning s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in picks:
        p = r["parts"]
        lines.append(f"| {r['gpus']:,} | {r['seq']:,} | {r['rank']} | {r['layout']} | {r['microbatches']} | "
                     f"{r['gib']:.1f} | {r['step_s']:.2f} | {p['compute']:.2f} | {p['tp']:.2f} | {p['cp']:.2f} | "
                     f"{p['pp']:.2f} | {p['dp']:.2f} | {p['bubble']:.2f} | {p['optimizer']:.2f} | "
                     f"{r['tflops']:.0f} | {r['mfu']:.1%} | {r['plan_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(proxy: List[Dict], meta: List[Dict], path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    for r in proxy:
        ax.scatter(r["measured_ms"], r["predicted_ms"], marker="o" if r["calibration"] else "s",
                   color="tab:blue" if r["variant"] == "herd-bf16" else "tab:orange")
    top = max(max(r["measured_ms"], r["predicted_ms"]) for r in proxy) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.fill_between([0, top], [0, top * 0.9], [0, top * 1.1], color="grey", alpha=0.15)
    ax.set(xscale="log", yscale="log", xlabel="measured ms/step (our H100/H200 runs)", ylabel="predicted ms/step",
           title="MFU proxy: circles calibrate, squares do not\nblue bf16, orange fp8; band: +-10%")
    ax = axes[1]
    for r in meta:
        if "predicted_tflops" in r:
            ax.scatter(r["published_tflops"], r["predicted_tflops"], color="tab:red")
            ax.scatter(r["published_tflops"], r["predicted_tflops_causal"], color="tab:green")
            ax.annotate(f"{r['gpus']} GPUs, {r['seq'] // 1024}K", (r["published_tflops"], r["predicted_tflops"]),
                        fontsize=8)
    ax.plot([300, 650], [300, 650], "k--", lw=0.8)
    ax.fill_between([300, 650], [270, 585], [330, 715], color="grey", alpha=0.15)
    ax.set(xlabel="Llama 3 Table 4 TFLOP/s/GPU (published)", ylabel="herd plan's prediction",
           title="405B, Meta's layouts: red PaLM FLOPs, green causal\nband: +-10%")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    proxy, meta, picks = proxy_rows(), meta_rows(), planner_picks()
    text = markdown(proxy, meta, picks)
    print(text)
    if args.save:
        (RESULTS_DIR / "plan_validation.json").write_text(json.dumps({"proxy": proxy, "meta": meta, "picks": picks},
                                                                     indent=1))
        (RESULTS_DIR / "plan_validation.md").write_text(HEAD.format(date=time.strftime("%Y-%m-%d")) + text + NOTES)
        print("plot:", plot(proxy, meta, RESULTS_DIR / "plan_validation.png"))


if __name__ == "__main__":
    main()
