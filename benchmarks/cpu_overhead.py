"""herd's single-rank step time against a bare PyTorch loop doing the same math, measured side by side.

Both train the same model (configs/demo.yaml's debug model unless overridden) from the same seed on the same
global batches: the bare loop gets its micro-batches pre-built in memory and runs forward, summed cross-entropy,
backward, clipping, AdamW and the LR schedule, nothing else; herd runs its Trainer with the data loader reading
the memory-mapped token files and every callback on (throughput, console, metrics.jsonl, TensorBoard). They run
in alternating rounds (ABBA order) so machine noise hits both; the median round is reported. Prints, never asserts.

    python -m benchmarks.cpu_overhead [--rounds 12] [--steps 3] [--save] [overrides...]
"""

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine import ops
from engine.config import load_config
from engine.run import build_trainer

RESULTS = Path(__file__).resolve().parent / "results"


def bare_loop(model, optimizer, scheduler, steps_of_batches, grad_clip: float) -> None:
    for micro_batches in steps_of_batches:
        total = sum(int(b.loss_mask.sum()) for b in micro_batches)
        optimizer.zero_grad(set_to_none=True)
        for b in micro_batches:
            logits = model(b.inputs, b.position_ids, b.doc_ids)
            (ops.cross_entropy_sum(logits, b.targets, b.loss_mask) / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        optimizer.step()
        scheduler.step()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(args) -> dict:
    overrides = [f"train.steps={args.rounds * args.steps + 1}", "data.valid=[]", "log.every=1000000",
                 f"log.run_dir={tempfile.mkdtemp(prefix='herd-bench-')}", "log.name=bench", *args.overrides]
    herd_trainer = build_trainer(load_config(args.config, overrides), stream=io.StringIO())
    bare_trainer = build_trainer(load_config(args.config, overrides + ["log.name=bare"]),  # same seed, init
                                 stream=io.StringIO())
    module = bare_trainer.module
    loader = bare_trainer.loader
    herd_times, bare_times = [], []
    herd_trainer.state.total_steps = 1  # one warm-up step each, untimed
    herd_trainer.fit()
    bare_loop(module.model, module.optimizer, module.scheduler, [loader.next_step()], module.grad_clip)
    for round_index in range(args.rounds):
        batches = [loader.next_step() for _ in range(args.steps)]
        for runner in (("bare", "herd") if round_index % 2 == 0 else ("herd", "bare")):  # ABBA: no order bias
            start = time.perf_counter()
            if runner == "bare":
                bare_loop(module.model, module.optimizer, module.scheduler, batches, module.grad_clip)
                bare_times.append((time.perf_counter() - start) / args.steps)
            else:
                herd_trainer.state.total_steps += args.steps
                herd_trainer.fit()
                herd_times.append((time.perf_counter() - start) / args.steps)
    herd_step, bare_step = statistics.median(herd_times), statistics.median(bare_times)
    cfg = load_config(args.config, overrides)
    return {"benchmark": "cpu_overhead", "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "config": args.config,
            "model": cfg.model.name, "tokens_per_step": cfg.data.global_batch_size * cfg.data.seq_len,
            "rounds": args.rounds, "steps_per_round": args.steps,
            "herd_step_s": herd_step, "bare_step_s": bare_step, "ratio": herd_step / bare_step,
            "herd_rounds_s": herd_times, "bare_rounds_s": bare_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/cpu_overhead.{json,md}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    r = measure(args)
    table = ("| machine | threads | torch | model | tokens/step | bare loop s/step | herd s/step | herd / bare |\n"
             "|---|---|---|---|---|---|---|---|\n"
             f"| {r['machine']} | {r['threads']} | {r['torch']} | {r['model']} | {r['tokens_per_step']} | "
             f"{r['bare_step_s']:.4f} | {r['herd_step_s']:.4f} | {r['ratio']:.3f}x |")
    print(table)
    print("per-round s/step: bare " + ", ".join(f"{t:.4f}" for t in r["bare_rounds_s"]) +
          " | herd " + ", ".join(f"{t:.4f}" for t in r["herd_rounds_s"]))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "cpu_overhead.json").write_text(json.dumps(r, indent=2) + "\n")
        (RESULTS / "cpu_overhead.md").write_text(
            f"# herd vs a bare PyTorch loop, one rank, CPU ({r['date']})\n\n"
            f"`python -m benchmarks.cpu_overhead --save` ({r['rounds']} alternating rounds of "
            f"{r['steps_per_round']} steps, median round; target: herd within 1.10x).\n\n{table}\n")


if __name__ == "__main__":
    main()
