"""herd plan's memory model (plan/memory.py) against the dry run (engine/dry_run.py) on Llama 3 405B's Table 4
layouts: the first and the last pipeline stage of each, with and without full activation checkpointing.

The dry run builds the rank with herd's own code and steps it under fake tensors on torch's fake process group;
its peak is the state before the step plus the largest live bytes of everything the step allocated (a
dispatch-level tracker, so no allocator fragmentation or workspace). The model's peak is its formula. The state
bytes (parameters, gradients, optimizer) must agree exactly; the peaks are compared and the error stated.

    python -m benchmarks.dry_run_memory [--save]
"""

import argparse
import platform
import time

from benchmarks.report import publish

CONFIG = "configs/pretrain_llama3_405b.yaml"
ROWS = [  # name, GPUs, overrides
    ("8192 GPUs, TP8 CP1 PP16 DP64, 8K", 8192, []),
    ("16384 GPUs, TP8 CP1 PP16 DP128, 8K", 16384, ["parallel.dp_shard=128"]),
    ("16384 GPUs, TP8 CP16 PP16 DP8, 128K", 16384, ["data.seq_len=131072", "data.global_batch_size=128",
                                                  "parallel.cp=16", "parallel.dp_shard=8"]),
]
GIB = 2 ** 30


def measure(name: str, world: int, overrides: list, ac: str, stage: int) -> dict:
    from engine.config import grad_accum_steps, load_config
    from engine.dry_run import dry_run
    from plan.layout import Layout
    from plan.memory import peak_memory
    cfg = load_config(CONFIG, overrides + [f"parallel.activation_checkpointing={ac}"], world_size=world)
    p = cfg.parallel
    rank = stage * p.cp * p.tp  # dp_shard 0, cp 0, tp 0 of this stage (mesh axes dp_shard, pp, cp, tp)
    started = time.perf_counter()
    report = dry_run(cfg, world, rank)
    seconds = time.perf_counter() - started
    layout = Layout(tp=p.tp, cp=p.cp, pp=p.pp, schedule=p.pp_schedule, dp_shard=p.dp_shard, ac=ac,
                    sequence_parallel=p.sequence_parallel, document_mask=False)  # synthetic batches: no doc mask
    model = peak_memory(cfg.model, layout, cfg.data.seq_len, grad_accum_steps(cfg), stage)
    dry_peak = report.bytes["state_before_step"] + report.bytes["step_peak"]
    state = report.bytes["parameters"] + report.bytes["gradients"] + report.bytes["optimizer"]
    model_state = model.parts["params"] + model.parts["grads"] + model.parts["optimizer"]
    return {"layout": name, "activation_checkpointing": ac, "stage": stage, "rank": rank,
            "dry_run_state_bytes": state, "model_state_bytes": model_state,
            "dry_run_peak_gib": round(dry_peak / GIB, 3), "model_peak_gib": round(model.total / GIB, 3),
            "peak_error": round(model.total / dry_peak - 1, 4), "dry_run_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/dry_run_memory.{json,md}")
    args = parser.parse_args()
    rows = [measure(name, world, overrides, ac, stage) for name, world, overrides in ROWS
            for ac in ("none", "full") for stage in (0, 15)]
    lines = ["| layout | activation checkpointing | stage | state bytes (dry run = model) | dry-run peak GiB | "
             "model peak GiB | model error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "equal" if r["dry_run_state_bytes"] == r["model_state_bytes"] else \
            f"{r['dry_run_state_bytes']} vs {r['model_state_bytes']}"
        lines.append(f"| {r['layout']} | {r['activation_checkpointing']} | {r['stage']} | {same} | "
                     f"{r['dry_run_peak_gib']:.2f} | {r['model_peak_gib']:.2f} | {100 * r['peak_error']:+.1f}% |")
    description = (f"Made by `python -m benchmarks.dry_run_memory --save` on {platform.node() or 'this machine'} "
                   f"({platform.machine()}, CPU only: the dry run uses fake tensors, so no GPU is involved). "
                   "Rank: dp_shard 0, cp 0, tp 0 of the stage. Peaks are per GPU; the dry run's is the state before "
                   "the step plus the largest live bytes the step allocated (no allocator fragmentation, no "
                   "cuBLAS/NCCL workspaces), under the CPU kernels' choices (SDPA on CPU picks its flash kernel "
                   "when no mask is given). docs/scale.md discusses the errors.")
    publish("dry_run_memory", rows, "\n".join(lines), "Memory model against the dry run (Llama 3 405B, Table 4)",
            description, args.save)


if __name__ == "__main__":
    main()
