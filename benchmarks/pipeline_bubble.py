"""The pipeline bubble of each schedule, measured against theory.

Each of p pp ranks (CPU gloo processes) runs herd's Pipeline (parallel/pipeline_parallel.py) over stages whose
work is a timed wait instead of arithmetic, so the measurement shows the schedule, not CPU contention between the
processes: a stage's forward takes F, its input-gradient backward B and its weight-gradient backward W (zero-bubble
schedules run W separately; the others run B and W together). The whole model's work per microbatch is fixed:
with v stages per rank each stage costs 1/v of it. Bubble = 1 - (busy time per rank) / (step time), where busy
time is m microbatches x v stages x (F + B + W).

Theory, with F = B = W = t per stage (Narayanan et al. 2021; Qi et al. 2023/2024; DeepSeek-V3 for DualPipe):
  GPipe, 1F1B                 (p-1) / (m + p-1)
  Interleaved1F1B             (p-1) / (v m + p-1)
  InterleavedZeroBubble       (p-1) / (3 v m + p-1)   (ZB-H1 on chunks: the bubble shrinks to (p-1)(F+B-W))
  ZBVZeroBubble, DualPipeV    0                       (ZB-V: (p-1)(F+B-2W); DualPipe-V: (p/2-1)(F&B+B-3W))

    python -m benchmarks.pipeline_bubble [--pp 4] [--microbatches 8] [--ms 12] [--save]
"""

import argparse
import platform
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.report import publish

SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


class _Wait(torch.autograd.Function):
    """Identity that waits `forward_s` in forward and `backward_s` when its input gradient is computed."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class _WeightWait(torch.autograd.Function):
    """A parameter's path: waits `weight_s` when the weight gradient is computed (off the input-gradient path)."""

    @staticmethod
    def forward(ctx, weight, weight_s):
        ctx.weight_s = weight_s
        return weight.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.weight_s)
        return grad, None


class TimedStage(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x, position_ids=None, doc_ids=None):
        x = x.float() if not x.is_floating_point() else x
        y = _Wait.apply(x, self.seconds, self.seconds)
        return y * _WeightWait.apply(self.weight, self.seconds)  # [mb, 8]


def theory(schedule: str, p: int, m: int, v: int) -> float:
    if schedule in ("GPipe", "1F1B"):
        return (p - 1) / (m + p - 1)
    if schedule == "Interleaved1F1B":
        return (p - 1) / (v * m + p - 1)
    if schedule == "InterleavedZeroBubble":
        return (p - 1) / (3 * v * m + p - 1)
    return 0.0


def measure(rank: int, world_size: int, microbatches: int, stage_ms: float, steps: int) -> list:
    import torch.distributed as dist

    from parallel.pipeline_parallel import SINGLE_STAGE, Pipeline, stage_to_rank
    rows = []
    for schedule in SCHEDULES:
        v = 1 if schedule in SINGLE_STAGE else 2
        n_stages = world_size * v
        ranks = stage_to_rank(n_stages, world_size, schedule)
        mine = [s for s in range(n_stages) if ranks[s] == rank]
        parts = [TimedStage(stage_ms / 1000 / v) for _ in mine]
        pipeline = Pipeline(parts, mine, n_stages, ranks, dist.group.WORLD, torch.device("cpu"), schedule,
                            microbatches)
        batch = SimpleNamespace(inputs=torch.ones(1, 8), targets=torch.zeros(1, 8, dtype=torch.long),
                                loss_mask=torch.ones(1, 8, dtype=torch.bool),
                                position_ids=torch.zeros(1, 8, dtype=torch.long), doc_ids=None)
        times = []
        for step in range(steps + 1):  # the first step also infers shapes: not timed
            dist.barrier()
            start = time.perf_counter()
            pipeline.forward_backward([batch] * microbatches, lambda out, targets, mask: out.sum())
            dist.barrier()
            if step:
                times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        busy = microbatches * 3 * stage_ms / 1000  # v stages x 3 waits of stage_ms / v each
        rows.append({"schedule": schedule, "pp": world_size, "virtual_stages": v, "microbatches": microbatches,
                     "step_s": step_s, "busy_s": busy, "bubble": 1 - busy / step_s,
                     "theory": theory(schedule, world_size, microbatches, v)})
    return rows


def main() -> None:
    from parallel.multiprocess import run_on_ranks
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--ms", type=float, default=12.0, help="F = B = W per microbatch for a whole rank's layers")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    rows = run_on_ranks(measure, args.pp, args.microbatches, args.ms, args.steps, timeout=1200)[0]
    lines = [f"pp={args.pp}, {args.microbatches} microbatches, F = B = W = {args.ms:g} ms per rank per microbatch",
             "", "| schedule | stages/rank | step (s) | busy (s) | bubble measured | bubble theory |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['virtual_stages']} | {r['step_s']:.3f} | {r['busy_s']:.3f} | "
                     f"{r['bubble']:.1%} | {r['theory']:.1%} |")
    publish("pipeline_bubble", rows, "\n".join(lines),
            f"Pipeline bubble per schedule ({time.strftime('%Y-%m-%d')}, {platform.processor() or 'CPU'}, "
            f"torch {torch.__version__})",
            "`python -m benchmarks.pipeline_bubble --save`: herd's Pipeline over timed stages on CPU gloo ranks "
            "(method and theory in benchmarks/pipeline_bubble.py).", args.save)


if __name__ == "__main__":
    main()
