"""Bytes each rank moves per optimizer step, by collective and mesh axis, counted against the analytic formulas.

Every torch.distributed collective issued during one training step (after a warm-up step) is intercepted and
counted with the ring-algorithm cost per rank: all-reduce 2(n-1)/n of the buffer, all-gather and reduce-scatter
(n-1)/n of the full (gathered) buffer. The analytic figures, per micro-batch of b sequences of s tokens, width d,
L layers, P_u parameters in FSDP unit u, n = dp_shard, r = dp_replicate, t = tp, m micro-batches per step:

  tensor parallel, no SP (Shoeybi et al. 2019): (4L + 2) all-reduces of b*s*d  (+ 3 of b*s for the vocab-parallel
      cross-entropy), i.e. 2(t-1)/t * 4 bytes * ((4L + 2) b s d + 3 b s) per micro-batch
  tensor parallel with SP (Korthikanti et al. 2022): (8L + 4) all-gathers/reduce-scatters of b*s*d, the same
      bytes as without SP, plus the 3 cross-entropy all-reduces and the all-reduce of SP norm gradients
      ((2L + 1) d / n floats per step)
  full activation checkpointing re-runs a block's forward collectives except its last (recomputation stops early
      once every saved tensor is back): L more all-reduces without SP, 3L more all-gathers/reduce-scatters with SP
  FSDP (ZeRO-3): all-gather of each block's parameters in forward and again in backward per micro-batch, the
      root's once per micro-batch, and one reduce-scatter of all gradients per step: (n-1)/n * 4 bytes *
      (m (2 P_blocks + P_root) + P), with P the tp-local parameter count; HSDP adds an all-reduce over r of the
      sharded gradients: 2(r-1)/r * 4 bytes * P / n

    python -m benchmarks.comm_volume [--save]
"""

import io
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from benchmarks.report import demo_args, publish

LAYOUTS = {2: [["parallel.tp=2", "parallel.sequence_parallel=false"], ["parallel.tp=2"], ["parallel.dp_shard=2"],
               ["parallel.dp_replicate=2", "parallel.dp_shard=1"]],
           4: [["parallel.tp=2", "parallel.dp_shard=2"], ["parallel.tp=2", "parallel.dp_shard=2",
                                                          "parallel.activation_checkpointing=full"],
               ["parallel.tp=2", "parallel.dp_shard=2", "parallel.activation_checkpointing=full",
                "parallel.sequence_parallel=false"],
               ["parallel.dp_replicate=2", "parallel.dp_shard=2"], ["parallel.tp=4"]]}
_PATCHED = {"all_reduce": "all_reduce", "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
            "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}


class CollectiveCounter:
    """Counts ring bytes per rank of every collective, keyed by (operation, axis of its group)."""

    def __init__(self, axis_of_group):
        self.axis_of_group = axis_of_group
        self.bytes = defaultdict(float)
        self.calls = defaultdict(int)
        self._originals = {}

    def __enter__(self):
        for name, kind in _PATCHED.items():
            if hasattr(dist, name):
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(getattr(dist, name), kind))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _wrap(self, original, kind):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            size = max(t.numel() * t.element_size() for t in tensors)  # the full buffer (gathered / input)
            factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
            key = (kind, self.axis_of_group(group))
            self.bytes[key] += factor * size
            self.calls[key] += 1
            return original(*args, **kwargs)
        return counted


def analytic(cfg, dims, m: int, params_local: dict) -> dict:
    """Expected ring bytes per rank per step, by axis (formulas in the module docstring)."""
    b, s, d, L = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.dim, cfg.model.n_layers
    t, n, r = dims["tp"], dims["dp_shard"], dims["dp_replicate"]
    out = {}
    if t > 1:
        # recomputation re-runs a block's forward collectives but stops early (torch's non-reentrant checkpoint)
        # once every saved tensor is back, so the block's last one (w2's all-reduce / reduce-scatter) is skipped
        recompute = 0.0
        if cfg.parallel.activation_checkpointing == "full":
            recompute = 1.5 if cfg.parallel.sequence_parallel else 1.0
        per_micro = 2 * (t - 1) / t * 4 * ((4 * L + 2 + L * recompute) * b * s * d + 3 * b * s)
        # SP norm gradients are summed over tp after FSDP has sharded them over dp_shard
        sp_norms = 2 * (t - 1) / t * 4 * (2 * L + 1) * d / n if cfg.parallel.sequence_parallel else 0
        out["tp"] = m * per_micro + sp_norms
    if n * r > 1:
        blocks, root = params_local["blocks"], params_local["root"]
        shard_axis = n if n > 1 else 1
        fsdp = 0.0
        if shard_axis > 1:
            gathers = m * ((2 if cfg.parallel.reshard_after_forward else 1) * blocks + root)
            fsdp = (n - 1) / n * 4 * (gathers + blocks + root)
        out["dp_shard"] = fsdp
        if r > 1:
            out["dp_replicate"] = 2 * (r - 1) / r * 4 * (blocks + root) / n
    return out


def measure_layouts(rank: int, world_size: int, config: str, layouts: list) -> list:
    from engine.config import grad_accum_steps, load_config
    from engine.run import build_trainer
    rows = []
    for overrides in layouts:
        cfg = load_config(config, [*overrides, "data.valid=[]", "log.tensorboard=false", "log.jsonl=false",
                                   "log.name=comm", f"log.run_dir=/tmp/herd-comm-{rank}", "train.steps=2",
                                   "schedule.warmup_steps=1", "data.micro_batch_size=4"],
                          world_size=world_size)
        trainer = build_trainer(cfg, stream=io.StringIO())
        mesh = trainer.module.parallel.mesh
        groups = {id(mesh.dp_mesh.get_group()): "dp"}
        for axis in ("tp", "dp_shard", "dp_replicate"):  # a mesh axis wins when its group is also the dp group
            groups[id(mesh.group(axis))] = axis

        def axis_of(group):
            return "world" if group is None else groups.get(id(group), "other")
        trainer.state.total_steps = 1
        trainer.fit()  # warm-up step: FSDP builds its buffers
        trainer.state.total_steps = 2
        with CollectiveCounter(axis_of) as counter:
            trainer.fit()
        model = trainer.module.parallel.model
        block_params = sum(p.numel() for blk in model.layers.values() for p in blk.parameters())
        all_params = sum(p.numel() for p in model.parameters())
        dp = mesh.dims.dp_shard
        # DTensor numel is the global (tp-local) size, so these are P_blocks and P_root of the docstring
        local = {"blocks": block_params, "root": all_params - block_params}
        dims = {"tp": mesh.dims.tp, "dp_shard": dp, "dp_replicate": mesh.dims.dp_replicate}
        counted = defaultdict(float)
        for (kind, axis), value in counter.bytes.items():
            counted[axis] += value
        rows.append({"layout": " ".join(o.replace("parallel.", "") for o in overrides), "world": world_size,
                     "counted": {f"{k}@{a}": v for (k, a), v in counter.bytes.items()},
                     "calls": {f"{k}@{a}": v for (k, a), v in counter.calls.items()},
                     "counted_by_axis": dict(counted),
                     "analytic_by_axis": analytic(cfg, dims, grad_accum_steps(cfg), local)})
    return rows


def main() -> None:
    from parallel.multiprocess import run_on_ranks
    args = demo_args(__doc__.splitlines()[0])
    rows = []
    for world_size, layouts in LAYOUTS.items():
        rows += run_on_ranks(measure_layouts, world_size, args.config, layouts, timeout=1200)[0]
    lines = ["| ranks | layout | axis | counted MB/rank/step | analytic MB/rank/step | counted / analytic |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for axis in sorted((set(row["analytic_by_axis"]) | set(row["counted_by_axis"])) - {"dp", "world"}):
            got, want = row["counted_by_axis"].get(axis, 0.0), row["analytic_by_axis"].get(axis, 0.0)
            ratio = f"{got / want:.4f}" if want else "-"
            lines.append(f"| {row['world']} | {row['layout']} | {axis} | {got / 1e6:.3f} | {want / 1e6:.3f} | "
                         f"{ratio} |")
    publish("comm_volume", rows, "\n".join(lines),
            f"Bytes moved per rank per step, counted vs analytic ({time.strftime('%Y-%m-%d')})",
            "`python -m benchmarks.comm_volume --save` on CPU gloo ranks, configs/demo.yaml's debug model "
            "(ring-algorithm bytes; formulas in benchmarks/comm_volume.py). Left out: token counts and loss sums "
            "over dp and the gradient-norm sum over the world (a few floats per step).", args.save)


if __name__ == "__main__":
    main()
