"""`herd train CONFIG --dry-run --world-size N [--rank R]`: rank R of the real N-rank job, built and stepped on one
machine, so a user can see what one GPU of a 16,384-GPU job holds before asking for the cluster (issue 17).

The rank runs the same code as in the job: the layout checks, the mesh, the meta model, parallelize (pipeline
stages, tensor/sequence parallel, FSDP/HSDP), the optimizer, then one training step. What makes it cheap:
- torch's fake process-group backend (`init_process_group("fake")`): every collective returns at once and no
  peer exists; the mesh and every process group of the N-rank job are still created, so the rank's coordinates
  and group sizes are the job's;
- on CPU, torch's FakeTensorMode: tensors carry shapes and dtypes but no memory and no math, so 405B on 16,384
  GPUs builds and steps in seconds. On a GPU (`--device cuda`) the tensors are real: the same rank with its real
  shapes, measured (peak memory from the CUDA allocator, the step's compute time; collectives still cost nothing).

What the fake backend cannot run, handled here explicitly rather than skipped:
- Pipeline point-to-point: torch's schedules exchange shapes and tensors with the neighbouring stages (and read
  the result with .item(), which a fake tensor cannot answer). The dry run executes this rank's part of the
  schedule itself, in the schedule's own order (`pipeline_actions`): a forward of a stage that is not the first
  takes a new tensor of the boundary's shape [micro_batch, seq / cp (/ tp with sequence parallel), dim] in the
  dtype the first stage produces, and a backward of a stage that is not the last takes a gradient of its output's
  shape. Activations stay alive exactly as long as the schedule keeps them. Zero-bubble schedules split the
  backward into input (I) and weight (W) parts; the dry run computes both at I, so the activations that W keeps
  alive a little longer are not counted there.
- Host reads of device values (the step's token count, the loss and gradient norm for the console): the token
  count is the synthetic batch's, known on the host; loss and norm are not read.
The data are synthetic micro-batches of the rank's shape (no corpus is read).
"""

import contextlib
import os
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from engine.config import JobConfig, grad_accum_steps
from engine.data.loader import Batch
from engine.errors import ConfigError
from parallel.parallelize import _local  # a DTensor's shard on this rank

GIB = 2 ** 30


@dataclass
class DryRunReport:
    world_size: int
    rank: int
    coordinates: Dict[str, int]  # this rank's place on each mesh axis
    stages: List[int]  # pipeline stages this rank holds
    parameters: int  # elements of this rank's parameter shards
    bytes: Dict[str, int] = field(default_factory=dict)  # parameters, gradients, optimizer, step_peak, ...
    micro_batches: int = 0
    fake: bool = True
    seconds: Dict[str, float] = field(default_factory=dict)  # build, step (wall time of this process)

    def lines(self) -> List[str]:
        axes = " ".join(f"{k} {v}" for k, v in self.coordinates.items())
        b = self.bytes
        out = [f"dry run: rank {self.rank} of {self.world_size} ({axes}; pipeline stage(s) {self.stages}) "
               f"{'fake tensors' if self.fake else 'real tensors'}",
               f"  parameters {self.parameters:,} elements: {b['parameters'] / GIB:.3f} GiB | gradients "
               f"{b['gradients'] / GIB:.3f} GiB | optimizer state {b['optimizer'] / GIB:.3f} GiB",
               f"  one step of {self.micro_batches} micro-batch(es): peak {b['step_peak'] / GIB:.3f} GiB above the "
               f"state before it ({b['state_before_step'] / GIB:.3f} GiB) -> estimated peak "
               f"{(b['state_before_step'] + b['step_peak']) / GIB:.3f} GiB"]
        if "cuda_peak" in b:
            out.append(f"  measured on the GPU: peak allocated {b['cuda_peak'] / GIB:.3f} GiB, "
                       f"step compute {self.seconds.get('step_compute', 0.0) * 1e3:.1f} ms")
        out.append(f"  built in {self.seconds['build']:.1f} s, stepped in {self.seconds['step']:.1f} s")
        return out


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage an op creates while the mode is on, alive until the storage is freed, and their
    peak. It sees the plain tensors that ops produce (activations, gathered parameters, gradient buffers); what
    existed before the mode started is counted separately (`state_bytes`)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter) \
                    or _is_fake(value):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size


def _is_fake(value) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(value, FakeTensor)


def state_bytes(parts, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes this rank holds of parameters (its shards), gradients and optimizer state (AdamW's two moments and
    step counters), each tensor counted once."""
    params = [p for part in parts for p in part.parameters()]
    nbytes = (lambda t: _local(t).numel() * _local(t).element_size())
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"parameters": sum(nbytes(p) for p in params),
            "gradients": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(t) for t in states)}


@contextlib.contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """This process as rank `rank` of `world_size` on torch's fake backend (the environment a launcher sets,
    restored after)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synthetic_batches(cfg: JobConfig, device: torch.device) -> List[Batch]:
    """The rank's micro-batches of one step, in the loader's shapes: [micro_batch, seq_len / cp] token ids, every
    position counted in the loss, one document per sequence (no document mask, as data.doc_mask=false)."""
    b, s = cfg.data.micro_batch_size, cfg.data.seq_len // cfg.parallel.cp
    zeros = torch.zeros(b, s, dtype=torch.long, device=device)
    positions = torch.arange(s, device=device).expand(b, s)
    return [Batch(zeros, zeros, torch.ones(b, s, dtype=torch.bool, device=device), positions, None,
                  torch.zeros(b, dtype=torch.long, device=device), b * s) for _ in range(grad_accum_steps(cfg))]


# torch builds the fake mesh's groups and FSDP its shard descriptors rank by rank: a dry run's time grows with the
# world size (pure FSDP over 131,072 ranks: about a minute on a laptop CPU; with tp and pp, seconds), 10**7 ran for
# hours and 10**10 overflowed torch's int32 ranks
MAX_WORLD_SIZE = 2 ** 17


def check_request(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise ConfigError("--world-size", f"must be at least 1, got {world_size}")
    if world_size > MAX_WORLD_SIZE:
        raise ConfigError("--world-size", f"a dry run takes at most {MAX_WORLD_SIZE:,} ranks, got {world_size:,}")
    if not 0 <= rank < world_size:
        raise ConfigError("--rank", f"must be in [0, {world_size}), got {rank}")


# ---------------------------------------------------------------------------------------------------------------
# Pipeline: this rank's part of the schedule, in the schedule's order, without point-to-point


def pipeline_actions(pipeline) -> List[Tuple[str, int, int]]:
    """(kind, stage, micro-batch) of this pp rank's compute actions in the order its schedule runs them; kind F
    (forward), B (full backward), I (backward to the input) or W (backward to the weights). Multi-stage schedules
    run the order they publish (`pipeline_order`); GPipe and 1F1B run one stage in an order written in their step
    (their `pipeline_order` only draws it, and differs: torch 2.13's 1F1B drawing leaves out the last stage's
    first forward): every forward then every backward (GPipe), or min(n, stages - stage) forwards first, then one
    backward and one forward in turn, then the remaining backwards (1F1B, Narayanan et al. 2021)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti
    schedule, n = pipeline.schedule, pipeline.n_microbatches
    if isinstance(schedule, PipelineScheduleMulti):
        actions = []
        for action in schedule.pipeline_order[dist.get_rank(pipeline.group)]:
            for each in (action.sub_actions or (action,)) if action is not None else ():
                kind = each.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    actions.append((kind, each.stage_index, each.microbatch_index))
        return actions
    stage = pipeline.stage_ids[0]
    if type(schedule).__name__ == "ScheduleGPipe":
        return [("F", stage, m) for m in range(n)] + [("B", stage, m) for m in range(n)]
    warmup = min(n, pipeline.n_stages - stage)
    actions, forwards = [("F", stage, m) for m in range(warmup)], warmup
    for backward in range(n):
        actions.append(("B", stage, backward))
        if forwards < n:
            actions.append(("F", stage, forwards))
            forwards += 1
    return actions


def boundary_dtype(module, cfg: JobConfig) -> torch.dtype:
    """The dtype of the hidden states between stages: the embedding's output dtype, kept by the residual stream
    (bf16 block outputs added to it promote to it). FSDP computes with its param_dtype (bf16 under train.dtype=bf16);
    without FSDP the fp32 weight is used as it is (autocast does not cast an embedding)."""
    return torch.bfloat16 if module.parallel.fsdp and cfg.train.dtype == "bf16" else torch.float32


def run_pipeline(module, cfg: JobConfig, batches: List[Batch], total_tokens: int) -> None:
    """Forward and backward of this rank's stages as its schedule orders them (module docstring: what stands in
    for the neighbours), then FSDP's end-of-step gradient reduction, as the schedule does it."""
    from torch.distributed.fsdp import FSDPModule
    pipeline, scale = module.parallel.pipeline, module.parallel.loss_scale
    p, last = cfg.parallel, pipeline.n_stages - 1
    seq = cfg.data.seq_len // p.cp // (p.tp if p.tp > 1 and p.sequence_parallel else 1)
    boundary = (cfg.data.micro_batch_size, seq, cfg.model.dim)
    dtype, alive = boundary_dtype(module, cfg), {}
    for kind, stage, micro in pipeline_actions(pipeline):
        index = pipeline.stage_ids.index(stage)
        part, batch = pipeline.parts[index], batches[micro]
        if kind == "F":
            inputs = batch.inputs if stage == 0 else \
                torch.empty(boundary, dtype=dtype, device=module.device).requires_grad_()
            with module.autocast():
                out = part(inputs, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
                if stage == last:
                    out = module.micro_loss(out, batch.targets, batch.loss_mask) / total_tokens * scale
            if stage == 0 and stage != last and (tuple(out.shape), out.dtype) != (boundary, dtype):
                raise RuntimeError(f"dry run: stage 0 hands on {tuple(out.shape)} {out.dtype}, the other stages "
                                   f"were given {boundary} {dtype}")
            alive[stage, micro] = out
        elif kind in ("B", "I"):
            out = alive.pop((stage, micro))
            if isinstance(part, FSDPModule):  # as torch's stage: accumulate, reduce once after the last micro-batch
                part.set_is_last_backward(False)
                part.set_reshard_after_backward(False)
                part.set_requires_gradient_sync(False)
            torch.autograd.backward(out, None if stage == last else torch.empty_like(out))
    for stage in pipeline.stages:
        stage.perform_reduce_grad(1)


# ---------------------------------------------------------------------------------------------------------------
# The dry run


def dry_step(module, cfg: JobConfig, batches: List[Batch]) -> None:
    """LMTrainModule.train_step without its host reads (module docstring): forward and backward of every
    micro-batch, the gradients' layout sums, the global norm and clipping, the optimizer and schedule step."""
    total_tokens = sum(b.num_tokens for b in batches) * module.parallel.mesh.data_ranks \
        if module.parallel.mesh is not None else sum(b.num_tokens for b in batches)
    module.parallel.train(True)
    module.optimizer.zero_grad(set_to_none=True)
    with module.step_context():
        if module.parallel.pipeline is None:
            module._forward_backward(batches, total_tokens)
        else:
            run_pipeline(module, cfg, batches, total_tokens)
    module.parallel.finish_gradients()
    module.parallel.clip_grad_norm(module.grad_clip)
    module.optimizer.step()
    module.scheduler.step()


def dry_run(cfg: JobConfig, world_size: int, rank: int, device_name: str = "cpu",
            fake: Optional[bool] = None) -> DryRunReport:
    """Build rank `rank` of the `world_size`-rank job `cfg` (validated for that world size) and run one step;
    fake tensors on CPU, real ones on CUDA (module docstring). fake=False on CPU: real tensors there too (the
    tests compare the two on small models)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.run import build_module, setup_distributed
    check_request(world_size, rank)
    cfg.train.device = device_name
    fake = device_name == "cpu" if fake is None else fake
    started = time.perf_counter()
    with fake_world(world_size, rank):
        with warnings.catch_warnings():  # the fake backend has no timeout to set: nothing is waited for
            warnings.filterwarnings("ignore", message="Set timeout is now only supported")
            device, mesh = setup_distributed(cfg)
        mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        module = build_module(cfg, device, mesh, materialize=lambda: mode)
        with mode:
            built = time.perf_counter()
            batches = synthetic_batches(cfg, device)
            report = _report(cfg, module, mesh, world_size, rank, fake)
            report.seconds["build"] = built - started
            before = sum(state_bytes(module.parallel.parts, module.optimizer).values())
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            tracker, step_started = LiveBytes(), time.perf_counter()
            with tracker:
                dry_step(module, cfg, batches)
            if cuda:
                torch.cuda.synchronize(device)
                report.bytes["cuda_peak"] = torch.cuda.max_memory_allocated(device)
                report.bytes["cuda_before_step"] = base
                report.seconds["step_compute"] = _timed_step(module, cfg, batches, device)
            report.seconds["step"] = time.perf_counter() - step_started
            report.bytes.update(state_bytes(module.parallel.parts, module.optimizer))
            report.bytes.update(state_before_step=before, step_peak=tracker.peak)
    return report


def _timed_step(module, cfg: JobConfig, batches: List[Batch], device: torch.device) -> float:
    """Seconds of one more step on the GPU (after the first, which allocated and warmed up), CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dry_step(module, cfg, batches)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def _report(cfg: JobConfig, module, mesh, world_size: int, rank: int, fake: bool) -> DryRunReport:
    axes = ("dp_replicate", "dp_shard", "pp", "cp", "tp")
    coordinates = {axis: mesh.rank(axis) for axis in axes} if mesh is not None else dict.fromkeys(axes, 0)
    pipeline = module.parallel.pipeline
    stages = list(pipeline.stage_ids) if pipeline is not None else [0]
    parameters = sum(_local(p).numel() for part in module.parallel.parts for p in part.parameters())
    return DryRunReport(world_size, rank, coordinates, stages, parameters, micro_batches=grad_accum_steps(cfg),
                        fake=fake)
