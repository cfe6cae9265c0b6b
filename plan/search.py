"""Enumerate every valid 4D layout of herd for a request, drop those that do not fit, rank the rest by step time.

The rules are herd's own (parallel/mesh.py check_layout, parallel/pipeline_parallel.py check_pipeline,
engine/config.py grad_accum_steps), restated here as arithmetic so the inner loop never touches torch; the layouts
printed are then loaded through engine.config.load_config and engine.run.check_parallel (report.check_overrides).
HSDP splits are tried for the best plain-FSDP layouts only (they change communication, not memory order).
"""

from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Tuple

from engine.config import ModelConfig
from engine.config_checks import MAX_WORLD_SIZE
from engine.errors import HerdError
from plan.calibrate import Calibration, calibrate
from plan.hardware import Hardware
from plan.layout import Layout
from plan.memory import Memory, worst_peak
from plan.steptime import StepTime, bubble_units, step_time

DEFAULT_SCHEDULES = ("1F1B", "Interleaved1F1B")
ALL_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
MAX_GPUS = MAX_WORLD_SIZE  # a plan of that many takes seconds, --gpus 10**20 hours


class PlanError(HerdError):
    """A request no layout can serve; the message is the one line the CLI prints."""


@dataclass
class Request:
    model: ModelConfig
    gpus: int
    hardware: Hardware
    seq_len: int
    global_tokens: int
    gpus_per_node: int = 8
    precision: str = "bf16"  # bf16 | fp8
    memory_limit_gib: Optional[float] = None  # None: the profile's usable memory
    schedules: Tuple[str, ...] = DEFAULT_SCHEDULES
    micro_batches: Tuple[int, ...] = (1, 2, 4)
    checkpointing: Tuple[str, ...] = ("none", "selective", "full")
    document_mask: bool = True
    top: int = 5

    @property
    def limit_bytes(self) -> float:
        gib = self.memory_limit_gib if self.memory_limit_gib is not None else self.hardware.usable_gib
        return gib * 2 ** 30


@dataclass
class Candidate:
    layout: Layout
    memory: Memory
    time: StepTime
    microbatches: int


@dataclass
class Result:
    best: List[Candidate]
    evaluated: int
    fitting: int
    smallest: Optional[Candidate] = None  # the least memory seen (for the 'does not fit' message)
    calibration: Optional[Calibration] = field(default=None, repr=False)


def _powers_of_two(limit: int) -> List[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


def _divisors(n: int) -> List[int]:
    """Every divisor of n in order, by trial up to sqrt(n) (counting to n took minutes at 10**9 GPUs)."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def tp_options(cfg: ModelConfig, gpus: int, per_node: int) -> List[int]:
    """check_layout's tp rules; tp stays inside a node (its collectives are synchronous and per block)."""
    return [tp for tp in _divisors(gpus) if tp <= per_node and cfg.n_heads % tp == 0 and cfg.ffn_dim % tp == 0
            and (cfg.n_kv_heads % tp == 0 or tp % cfg.n_kv_heads == 0)]


def cp_options(seq_len: int, tp: int, rest: int) -> List[int]:
    return [cp for cp in _powers_of_two(rest) if rest % cp == 0 and seq_len % (2 * cp) == 0
            and (tp == 1 or (seq_len // cp) % tp == 0)]


def pipeline_options(cfg: ModelConfig, rest: int, schedules) -> Iterator[Tuple[int, int, str]]:
    """(pp, virtual stages, schedule) that check_pipeline accepts on the model (microbatch rules come later)."""
    yield 1, 1, "1F1B"
    for pp in _divisors(rest):
        if pp == 1 or pp > cfg.n_layers:
            continue
        for s in schedules:
            if s in ("GPipe", "1F1B"):
                vs = [1]
            elif s in ("ZBVZeroBubble", "DualPipeV"):
                vs = [2]
            else:
                vs = [v for v in (2, 3, 4, 6, 8) if pp * v <= cfg.n_layers]
            for v in vs:
                if pp * v <= cfg.n_layers:
                    yield pp, v, s


def microbatch_rule(layout: Layout, m: int) -> bool:
    """check_pipeline's microbatch rules for the step's m micro-batches."""
    if layout.pp == 1:
        return True
    n_stages = layout.pp * layout.vpp
    if layout.schedule in ("1F1B", "DualPipeV") and m < n_stages:
        return False
    if layout.schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, m // layout.pp)
        return m % rounds == 0
    return True


def base_layouts(req: Request) -> Iterator[Tuple[Layout, int]]:
    """Every (layout, micro-batches per step) with dp_replicate = 1 that herd's checks accept."""
    cfg, sequences = req.model, req.global_tokens // req.seq_len
    fp8 = req.precision == "fp8"
    for tp in tp_options(cfg, req.gpus, req.gpus_per_node):
        for cp in cp_options(req.seq_len, tp, req.gpus // tp):
            for pp, v, sched in pipeline_options(cfg, req.gpus // (tp * cp), req.schedules):
                dp = req.gpus // (tp * cp * pp)
                for mbs in req.micro_batches:
                    if sequences % (mbs * dp):
                        continue
                    m = sequences // (mbs * dp)
                    for ac in req.checkpointing:
                        layout = Layout(tp=tp, cp=cp, pp=pp, vpp=v, schedule=sched, dp_shard=dp, mbs=mbs, ac=ac,
                                        fp8=fp8, document_mask=req.document_mask)
                        if microbatch_rule(layout, m):
                            yield layout, m


def check_request(req: Request) -> None:
    if req.gpus < 1 or req.gpus_per_node < 1:
        raise PlanError(f"--gpus and --gpus-per-node must be at least 1, got {req.gpus} and {req.gpus_per_node}")
    if req.gpus > MAX_GPUS or req.gpus_per_node > MAX_GPUS:
        raise PlanError(f"--gpus and --gpus-per-node must be at most {MAX_GPUS:,}, got {req.gpus:,} and "
                        f"{req.gpus_per_node:,}")
    if req.gpus > req.gpus_per_node and req.gpus % req.gpus_per_node:
        raise PlanError(f"--gpus {req.gpus} is not a whole number of nodes of {req.gpus_per_node} GPUs")
    if req.global_tokens % req.seq_len:
        raise PlanError(f"--global-batch-tokens {req.global_tokens} is not a multiple of --seq-len {req.seq_len}")
    if req.seq_len > req.model.max_seq_len:
        raise PlanError(f"--seq-len {req.seq_len} exceeds the model's max_seq_len {req.model.max_seq_len}")


def _evaluate(req: Request, layout: Layout, m: int, cal, units) -> Tuple[Memory, Optional[StepTime]]:
    memory = worst_peak(req.model, layout, req.seq_len, m)
    if memory.total > req.limit_bytes:
        return memory, None
    return memory, step_time(req.model, layout, req.seq_len, req.global_tokens, req.hardware, cal, units)


def plan(req: Request) -> Result:
    """The best `req.top` layouts by predicted step time (PlanError when none exists or none fits)."""
    check_request(req)
    cal, units = calibrate(req.hardware), bubble_units()
    fitting: List[Candidate] = []
    smallest, evaluated = None, 0
    for layout, m in base_layouts(req):
        evaluated += 1
        memory, time = _evaluate(req, layout, m, cal, units)
        if smallest is None or memory.total < smallest.memory.total:
            smallest = Candidate(layout, memory, time, m)
        if time is not None:
            fitting.append(Candidate(layout, memory, time, m))
    if evaluated == 0:
        raise PlanError(f"no layout of {req.gpus} GPUs serves this request: no tp x cp x pp x dp of {req.gpus} "
                        f"meets the model's head/FFN divisibility and a global batch of "
                        f"{req.global_tokens // req.seq_len} sequences of {req.seq_len} tokens (it must divide into "
                        f"micro-batches over the data-parallel ranks)")
    if not fitting:
        raise PlanError(f"{req.model.name} does not fit on {req.gpus} GPUs at {req.seq_len} tokens: the smallest "
                        f"layout ({smallest.layout.describe()}) needs {smallest.memory.total / 2 ** 30:.1f} GiB per "
                        f"GPU, the limit is {req.limit_bytes / 2 ** 30:.1f} GiB")
    fitting.sort(key=lambda c: c.time.total)
    fitting = _with_hsdp(req, fitting[:max(20, req.top)], cal, units) + fitting[max(20, req.top):]
    fitting.sort(key=lambda c: c.time.total)
    return Result(best=_distinct(fitting, req.top), evaluated=evaluated, fitting=len(fitting), smallest=smallest,
                  calibration=cal)


def _distinct(ranked: List[Candidate], top: int) -> List[Candidate]:
    """The best `top` layouts, each data-parallel split (dp_shard x dp_replicate) of one layout shown once."""
    seen, out = set(), []
    for c in ranked:
        key = replace(c.layout, dp_shard=c.layout.dp, dp_replicate=1)
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == top:
            break
    return out


def _with_hsdp(req: Request, leaders: List[Candidate], cal, units) -> List[Candidate]:
    """The leaders plus every dp_replicate split of their data-parallel ranks that fits."""
    out = list(leaders)
    for c in leaders:
        dp = c.layout.dp_shard
        for rep in _divisors(dp)[1:]:
            layout = replace(c.layout, dp_shard=dp // rep, dp_replicate=rep)
            memory, time = _evaluate(req, layout, c.microbatches, cal, units)
            if time is not None:
                out.append(Candidate(layout, memory, time, c.microbatches))
    return out
