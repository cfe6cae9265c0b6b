"""Checkpoint save and load time against checkpoint size (one process, local disk).

For a few model widths, builds the run, takes one optimizer step (so AdamW's moments exist) and times: the save
(DCP shards + RNG + fsync + sha256 of every file + manifest and marker) synchronously, the same save with
`checkpoint.async_save` (the time training is blocked: a host copy of the state; and the time until the
background commit), then a resume into a fresh run of the same config (verification of
every hash + DCP load). Sizes are model + AdamW state in fp32 (about 12 bytes per parameter).

    python -m benchmarks.checkpoint_io [--save]
"""

import io
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import demo_args, publish

WIDTHS = [(256, 4), (512, 8), (1024, 8)]  # (dim, layers)


def measure(dim: int, layers: int, config: str, root: Path) -> dict:
    from engine.config import load_config
    from engine.run import build_trainer
    overrides = [f"model.dim={dim}", f"model.n_layers={layers}", f"model.ffn_dim={dim * 3}", "data.valid=[]",
                 "train.steps=1", "schedule.warmup_steps=0", "data.micro_batch_size=2", "data.global_batch_size=2",
                 "data.seq_len=64", f"log.run_dir={root}", "log.name=io", "log.tensorboard=false",
                 "checkpoint.every=1000", "train.dtype=fp32"]
    trainer = build_trainer(load_config(config, overrides), stream=io.StringIO())
    trainer.fit()
    checkpointer = next(c.checkpointer for c in trainer.callbacks if hasattr(c, "checkpointer"))
    shutil.rmtree(checkpointer.store.step_dir(1))  # the end of fit saved it already: time a save of our own
    start = time.perf_counter()
    path = checkpointer.save(1)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    checkpointer.async_save = True  # the same save in the background: what blocks, and how long until committed
    start = time.perf_counter()
    checkpointer.save(2)
    async_blocking_s = time.perf_counter() - start
    checkpointer.wait()
    async_total_s = time.perf_counter() - start
    start = time.perf_counter()
    resumed = build_trainer(load_config(config, overrides + ["train.steps=2"]), stream=io.StringIO())
    build_and_load_s = time.perf_counter() - start
    start = time.perf_counter()
    resumed.callbacks[-1].checkpointer.store.verify(1)
    verify_s = time.perf_counter() - start
    params = sum(p.numel() for p in trainer.module.model.parameters())
    shutil.rmtree(root / "io", ignore_errors=True)
    return {"dim": dim, "layers": layers, "parameters": params, "bytes": size, "save_s": save_s,
            "async_blocking_s": async_blocking_s, "async_total_s": async_total_s, "resume_s": build_and_load_s,
            "verify_s": verify_s}


def main() -> None:
    args = demo_args(__doc__.splitlines()[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dim, layers in WIDTHS:
            rows.append(measure(dim, layers, args.config, Path(tmp)))
    lines = ["| model | parameters | checkpoint MB | sync save s | save MB/s | async: blocking s | async: until "
             "committed s | resume s (build + verify + load) | of which verify s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = r["bytes"] / 1e6
        lines.append(f"| dim {r['dim']}, {r['layers']} layers | {r['parameters'] / 1e6:.1f}M | {mb:.1f} | "
                     f"{r['save_s']:.2f} | {mb / r['save_s']:.0f} | {r['async_blocking_s']:.2f} | "
                     f"{r['async_total_s']:.2f} | {r['resume_s']:.2f} | {r['verify_s']:.2f} |")
    publish("checkpoint_io", rows, "\n".join(lines),
            f"Checkpoint save and resume time ({time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, local disk)",
            "`python -m benchmarks.checkpoint_io --save` (method in benchmarks/checkpoint_io.py). A synchronous save "
            "blocks training for all of it; an async save only for the host copy.", args.save)


if __name__ == "__main__":
    main()
