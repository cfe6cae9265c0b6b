"""Context-parallel communication per rank per step, by attention variant, counted against the formulas.

Trains the demo's debug model (fp32) under cp = 2 and 4 with each variant, intercepts every collective and P2P
transfer on the cp group during one step (after a warm-up step) and compares the bytes one rank sends with
parallel/context_parallel.cp_bytes_per_layer x layers x microbatches, plus the document ids each forward gathers
(int64, b x S/cp per rank). Ring all-gather / reduce-scatter cost (n-1)/n of the full buffer per rank; a P2P send
costs its size. Only attention's traffic is counted (the K/V gather and its backward reduce-scatter, the document
id gather, ring P2P): FSDP's, sharded over dp_shard x cp and here on the same ranks, is not.

    python -m benchmarks.cp_comm [--save]
"""

import io
import time

import torch
import torch.distributed as dist

from benchmarks.report import demo_args, publish
from parallel import comm

LAYOUTS = {2: [["parallel.cp=2", "parallel.cp_attention=all_gather"], ["parallel.cp=2", "parallel.cp_attention=ring"]],
           4: [["parallel.cp=4", "parallel.cp_attention=all_gather"], ["parallel.cp=4", "parallel.cp_attention=ring"]]}


class AttentionCollectives:
    """Counts the sequence all-gathers / reduce-scatters and list all-gathers issued on the cp group."""

    def __init__(self, group):
        self.group, self.bytes, self.calls = group, 0.0, 0

    def _count(self, original, full_size):
        def counted(x, group, *args, **kwargs):
            if group is self.group:
                n = dist.get_world_size(group)
                self.bytes += (n - 1) / n * full_size(x, n)
                self.calls += 1
            return original(x, group, *args, **kwargs)
        return counted

    def __enter__(self):
        self._saved = (comm._gather_seq, comm._reduce_scatter_seq, dist.all_gather)
        comm._gather_seq = self._count(comm._gather_seq, lambda x, n: n * x.numel() * x.element_size())
        comm._reduce_scatter_seq = self._count(comm._reduce_scatter_seq, lambda x, n: x.numel() * x.element_size())
        original_all_gather = dist.all_gather

        def all_gather(outputs, x, group=None, **kwargs):  # the document ids
            if group is self.group:
                n = dist.get_world_size(group)
                self.bytes += (n - 1) * x.numel() * x.element_size()
                self.calls += 1
            return original_all_gather(outputs, x, group=group, **kwargs)
        dist.all_gather = all_gather
        return self

    def __exit__(self, *exc):
        comm._gather_seq, comm._reduce_scatter_seq, dist.all_gather = self._saved


class P2PCounter:
    """Counts the bytes of every isend issued through dist.batch_isend_irecv on one group."""

    def __init__(self, group):
        self.group, self.bytes, self.calls = group, 0.0, 0

    def __enter__(self):
        self._original = dist.batch_isend_irecv

        def counted(ops):
            for op in ops:
                if op.op is dist.isend and op.group is self.group:
                    self.bytes += op.tensor.numel() * op.tensor.element_size()
                    self.calls += 1
            return self._original(ops)
        dist.batch_isend_irecv = counted
        return self

    def __exit__(self, *exc):
        dist.batch_isend_irecv = self._original


def measure(rank: int, world_size: int, config: str, layouts: list) -> list:
    from engine.config import grad_accum_steps, load_config
    from engine.run import build_trainer
    from parallel.context_parallel import cp_bytes_per_layer
    rows = []
    for overrides in layouts:
        cfg = load_config(config, [*overrides, "data.valid=[]", "log.tensorboard=false", "log.jsonl=false",
                                   "log.name=cp", f"log.run_dir=/tmp/herd-cp-{rank}", "train.steps=2",
                                   "schedule.warmup_steps=1", "data.micro_batch_size=4", "train.dtype=fp32"],
                          world_size=world_size)
        trainer = build_trainer(cfg, stream=io.StringIO())
        cp_group = trainer.module.parallel.mesh.group("cp")
        trainer.state.total_steps = 1
        trainer.fit()
        trainer.state.total_steps = 2
        with AttentionCollectives(cp_group) as collectives, P2PCounter(cp_group) as p2p:
            trainer.fit()
        m, b, s, cp = grad_accum_steps(cfg), cfg.data.micro_batch_size, cfg.data.seq_len, world_size
        per_layer = cp_bytes_per_layer(cfg.parallel.cp_attention, cp, b, s, cfg.model.n_kv_heads,
                                       cfg.model.dim // cfg.model.n_heads, 4)
        doc_ids = (cp - 1) * b * (s // cp) * 8
        kv_counted = collectives.bytes + p2p.bytes
        rows.append({"layout": " ".join(o.replace("parallel.", "") for o in overrides), "cp": cp,
                     "microbatches": m, "layers": cfg.model.n_layers,
                     "counted_bytes": kv_counted,
                     "analytic_kv_bytes": m * cfg.model.n_layers * (per_layer["forward"] + per_layer["backward"]),
                     "analytic_doc_id_bytes": m * doc_ids,
                     "p2p_sends": p2p.calls,
                     "collective_calls": collectives.calls})
    return rows


def main() -> None:
    from parallel.multiprocess import run_on_ranks
    args = demo_args(__doc__.splitlines()[0])
    rows = []
    for world_size, layouts in LAYOUTS.items():
        rows += run_on_ranks(measure, world_size, args.config, layouts, timeout=1200)[0]
    lines = ["| layout | microbatches x layers | counted MB/rank/step | analytic K/V + doc ids MB | counted / analytic |",
             "|---|---|---|---|---|"]
    for r in rows:
        want = r["analytic_kv_bytes"] + r["analytic_doc_id_bytes"]
        lines.append(f"| {r['layout']} | {r['microbatches']} x {r['layers']} | {r['counted_bytes'] / 1e6:.3f} | "
                     f"{r['analytic_kv_bytes'] / 1e6:.3f} + {r['analytic_doc_id_bytes'] / 1e6:.3f} | "
                     f"{r['counted_bytes'] / want:.4f} |")
    publish("cp_comm", rows, "\n".join(lines),
            f"Context-parallel bytes per rank per step ({time.strftime('%Y-%m-%d')}, torch {torch.__version__})",
            "`python -m benchmarks.cp_comm --save` on CPU gloo ranks, configs/demo.yaml's debug model in fp32 "
            "(formulas in benchmarks/cp_comm.py and parallel/context_parallel.py).", args.save)


if __name__ == "__main__":
    main()
