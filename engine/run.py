"""Assembling a training run from a validated JobConfig: device, data, model, optimizer, callbacks, run dir."""

import contextlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, ContextManager, List, Optional, TextIO, Tuple

import torch
import torch.distributed as dist

from engine import __version__, ops
from engine.callbacks import (Callback, CheckpointCallback, ConsoleCallback, EvalCallback, JsonlCallback,
                              PreemptionCallback, TensorBoardCallback, ThroughputCallback)
from engine.callbacks.guards import GuardCallback, StepGuard, StragglerCallback
from engine.callbacks.telemetry import Telemetry, TelemetryCallback
from engine.callbacks.watchdog import WatchdogCallback
from engine.callbacks.writers import report_data_skips
from engine.checkpoint.checkpointer import Checkpointer, checkpoint_root
from engine.checkpoint.manifest import saved_section
from engine.checkpoint.store import CheckpointError, CheckpointStore
from engine.config import DatasetConfig, JobConfig, grad_accum_steps, to_yaml
from engine.config_checks import ignored_settings
from engine.data.indexed import read_sidecar
from engine.data.loader import Batch, StepLoader, build_blend, build_train_blend, distinct_samples
from engine.data.tokenizer import Tokenizer, load_tokenizer
from engine.errors import ConfigError
from engine.files import aside_name, file_problem, write_atomic
from engine.fp8 import (apply_fp8, check_fp8_config, fp8_forward_context, fp8_step_context, init_fp8_weights,
                        recompute_contexts, set_amax_groups, set_recording_gate)
from engine.flops import device_peak_tflops, flops_per_token, parameter_count
from engine.host_memory import keep_freed_heap
from engine.model import build_meta_model, init_weights
from engine.ops.accum_linear import check_fused_accumulation, use_fused_accumulation
from engine.optim import build_optimizer, build_scheduler
from engine.secrets import scrub
from engine.train_module import LMTrainModule
from engine.trainer import Trainer, TrainState
from parallel.flight_recorder import flight_recorder_env, set_collective_timeout
from parallel.mesh import LayoutError, Mesh, ParallelDims, build_mesh, check_layout
from parallel.parallelize import ParallelizeOptions, parallelize
from parallel.pipeline_parallel import check_pipeline


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare_run_dir(cfg: JobConfig, stream: TextIO, resumed: bool = False) -> Path:
    """<run_dir>/<name>, with config.yaml. An earlier run of the same name is moved aside, never overwritten,
    unless this run resumes from its checkpoint (then its logs are appended to)."""
    run = Path(cfg.log.run_dir) / cfg.log.name
    if run.exists() and any(run.iterdir()) and not resumed:
        move_aside(run, stream)
    run.mkdir(parents=True, exist_ok=True)
    problem = file_problem(run / "config.yaml")
    if problem not in (None, "does not exist") and not (run / "config.yaml").is_symlink():
        raise ConfigError("log.name", f"{run / 'config.yaml'} {problem}; move it away (herd writes the run's "
                                      f"config there)")
    for name in ("metrics.jsonl", "long_eval.jsonl", "stragglers.jsonl"):  # appended to: never through a link
        if os.path.lexists(run / name) and ((run / name).is_symlink() or file_problem(run / name)):
            what = file_problem(run / name) or f"is a symlink to {os.readlink(run / name)}"
            raise ConfigError("log.name", f"{run / name} {what.split(', not')[0]}, not the file herd appends the "
                                          f"run's records to; move it away")
    for name in ("tb", "heartbeat", "hang"):  # the directories the run's writers create or append to
        if os.path.lexists(run / name) and not (run / name).is_dir():  # (a symlink to a directory is fine)
            what = file_problem(run / name) or "is a file"
            raise ConfigError("log.name", f"{run / name} {what.split(', not')[0]}, not the directory herd writes "
                                          f"its {name} files into; move it away")
    write_atomic(run / "config.yaml", to_yaml(cfg).encode())  # replaces a symlink there, never writes through it
    return run


# what herd writes into a run directory: a non-empty directory holding none of these is not an earlier run, and
# moving it aside would take a user's folder away (log.name=data in the directory holding data/ did that)
RUN_DIR_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "tb", "heartbeat", "hang", ".herd-lock",
                   "skipped.json", "stragglers.jsonl")


def move_aside(run: Path, stream: TextIO) -> None:
    if not any(os.path.lexists(run / name) for name in RUN_DIR_ENTRIES):
        raise ConfigError("log.name", f"{run} exists and is not a herd run directory (it holds none of "
                                      f"{', '.join(RUN_DIR_ENTRIES)}); herd moves an earlier run aside, never "
                                      f"another folder: choose another log.name or log.run_dir")
    refuse_live_run(run)
    archive = aside_name(run)
    run.rename(archive)
    print(scrub(f"an earlier run of the same name was moved to {archive}"), file=stream, flush=True)


def refuse_live_run(run: Path) -> None:
    """A run still going in `run` keeps its directory: moved aside under it, its next write failed and the run died
    (a second run of the same name with another checkpoint.dir did that). Every live run's rank 0 holds the lock
    of its run directory (`hold_run_dir`), and a run that saves that of its checkpoint directory (the one its
    config.yaml names)."""
    from engine.checkpoint.ownership import DirectoryBusy, DirectoryLock
    named = None
    if file_problem(run / "config.yaml") is None:  # a FIFO there would block the read
        with contextlib.suppress(OSError):
            named = saved_section((run / "config.yaml").read_text(errors="replace"), "checkpoint").get("dir")
    roots = [run, run / "checkpoints", *([Path(str(named))] if named else [])]
    for root in dict.fromkeys(roots):  # in this order: the message names the same lock every time
        try:
            DirectoryLock(root).test()
        except DirectoryBusy as e:
            if e.is_this_process():
                continue  # this process's own earlier run (a Python caller building one run after another)
            raise ConfigError("log.name", f"{run} belongs to a run still going ({e.recorded or 'a live process'}, "
                                          f"holding {root}): wait for it to end, or choose another log.name") from None
        except CheckpointError:
            continue  # a lock file that is not one (a FIFO, say) holds nothing; the claim names it


class RunDirLock(Callback):
    """Rank 0 holds `<run>/.herd-lock` from the run directory's preparation to the end of fit, saving or not, so
    that a second run of the same log.name refuses to move the directory aside while this run writes its logs
    there (`refuse_live_run`); a clean end removes the file, and the kernel drops the lock if the process dies."""

    def __init__(self, run: Path):
        from engine.checkpoint.ownership import DirectoryBusy, DirectoryLock
        self.lock = DirectoryLock(run)
        try:
            self.lock.acquire()  # a filesystem without locks: no lock, as for checkpoint directories (warned there)
        except DirectoryBusy as e:
            if not e.is_this_process():  # (this process's own earlier run, built and never fitted, holds it)
                holder = e.recorded or "a live process"
                raise ConfigError("log.name", f"{run} belongs to a run still going ({holder}): wait for it to end, "
                                              f"or choose another log.name") from None

    def on_fit_end(self, trainer) -> None:
        self.lock.release()

    def on_fit_abort(self, trainer) -> None:
        self.lock.release()


def check_prepared_with(datasets: List[DatasetConfig], tokenizer: Tokenizer) -> None:
    """Data tokenized by another tokenizer would train on garbage with wrong document boundaries: refuse it."""
    for ds in datasets:
        meta = read_sidecar(ds.path)  # written by prepare-data (data from elsewhere may have none); checked
        if meta is None:
            continue
        if meta.get("eod_id") != tokenizer.eod_id or meta.get("vocab_size") != tokenizer.vocab_size:
            raise ConfigError("data.tokenizer", f"{ds.path} was prepared with {meta.get('tokenizer')} "
                              f"(vocab {meta.get('vocab_size')}, end-of-document id {meta.get('eod_id')}) but the "
                              f"config loads {tokenizer.name} (vocab {tokenizer.vocab_size}, id {tokenizer.eod_id})")
        # the same sizes, other tokens (a BPE trained on other text): summaries since 2026-12-07 record the mapping
        if "vocab_sha256" in meta and meta["vocab_sha256"] != tokenizer.vocab_fingerprint:
            raise ConfigError("data.tokenizer", f"{ds.path} was prepared with {meta.get('tokenizer')}, whose "
                              f"tokens differ from those of {tokenizer.name} (same vocabulary size "
                              f"{tokenizer.vocab_size}, another token -> id mapping: vocab_sha256 in {ds.path}.json)")


def check_parallel(cfg: JobConfig, world_size: int) -> ParallelDims:
    """The layout's degrees, checked against the world size and the model (a ConfigError, before any group)."""
    p = cfg.parallel
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.pp, p.cp, p.tp)
    try:
        check_layout(dims, world_size, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.ffn_dim,
                     cfg.data.seq_len, p.sequence_parallel)
        if dims.pp > 1:
            check_pipeline(dims.pp, p.pp_virtual_stages, p.pp_schedule, cfg.model.n_layers, grad_accum_steps(cfg),
                           p.pp_layers)
    except LayoutError as e:
        raise ConfigError(e.key, e.message) from None
    check_fused_accumulation(cfg.train.grad_accum_fusion, p, cfg.train.compile)  # FSDP etc.: before any group
    has_validation = cfg.data.valid if cfg.align.kind == "lm" else cfg.align.valid_file
    if has_validation:
        eval_share(cfg, dims.dp)
    if cfg.long_eval.enabled and cfg.long_eval.short_seq_len:
        from engine.eval.long_context import short_share
        short_share(cfg, dims.dp)
    return dims


def eval_share(cfg: JobConfig, dp: int) -> int:
    """Validation micro-batches per data-parallel rank. train.eval_batches counts the whole validation set (as one
    process evaluates it); the loaders interleave the ranks' shares, so their union is that set under any dp."""
    count = cfg.train.eval_batches
    if count % dp:
        raise ConfigError("train.eval_batches", f"{count} validation micro-batches cannot be shared equally over "
                          f"dp={dp} data-parallel ranks (dp_replicate x dp_shard): use a multiple of {dp}")
    return count // dp


def setup_distributed(cfg: JobConfig) -> Tuple[torch.device, Optional[Mesh]]:
    """The device of this rank and, with more than one process, the mesh (process groups start here)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = check_parallel(cfg, world_size)
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_heap()  # a CPU step reallocates what the last one freed (engine/host_memory.py)
    if world_size == 1:
        return device, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    timeout = cfg.watchdog.collective_timeout  # a collective blocked on a dead or hung peer fails, not waits
    if not dist.is_initialized():
        hang_prefix = str(Path(cfg.log.run_dir) / cfg.log.name / "hang" / "torch_fr_rank")
        flight_recorder_env(device.type, cfg.watchdog.trace_buffer, hang_prefix)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        except dist.DistNetworkError as e:  # the port was free at the launcher's check (launch/local.py), not now
            if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                raise
            raise ConfigError("", f"MASTER_PORT={os.environ.get('MASTER_PORT')}: the port is already in use on "
                                  f"this host; rank 0 serves the rendezvous there: choose another MASTER_PORT") from None
    mesh = build_mesh(dims, device.type)
    set_collective_timeout(timeout)  # the mesh's groups get torch's default timeout, not init_process_group's
    return device, mesh


def build_data(cfg: JobConfig, mesh: Optional[Mesh]) -> Tuple[StepLoader, List[Batch]]:
    """This rank's training loader and its share of the fixed validation micro-batches (eval_share)."""
    if not cfg.data.train:
        raise ConfigError("data.train", "no training data: list at least one dataset prefix")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, {tokenizer.name})")
    check_prepared_with(cfg.data.train + cfg.data.valid, tokenizer)
    dp_rank, dp_size = (mesh.dp_rank, mesh.dims.dp) if mesh is not None else (0, 1)
    cp_rank, cp_size = (mesh.rank("cp"), mesh.dims.cp) if mesh is not None else (0, 1)
    loader = StepLoader(build_train_blend(cfg.data, cfg.model.vocab_size), cfg.data, tokenizer.eod_id,
                        dp_rank, dp_size, cp_rank=cp_rank, cp_size=cp_size)
    loader.vocab_sha256 = tokenizer.vocab_fingerprint  # saved with the checkpoints (Checkpointer.identity)
    eval_batches: List[Batch] = []
    if cfg.data.valid:
        valid = StepLoader(build_blend(cfg.data.valid, cfg.data, cfg.model.vocab_size, seed_offset=1000),
                           cfg.data, tokenizer.eod_id, dp_rank, dp_size, cp_rank=cp_rank, cp_size=cp_size)
        eval_batches = valid.fixed_micro_batches(eval_share(cfg, dp_size))
        loader.skips.merge(valid.skips)  # one skip report for the run (build_trainer writes it)
        wanted, held = cfg.train.eval_batches * cfg.data.micro_batch_size, distinct_samples(valid.blend)
        if wanted > held:  # build_trainer prints it: the loss is still right, over samples counted twice
            loader.notes.append(f"warning: train.eval_batches={cfg.train.eval_batches} x data.micro_batch_size="
                                f"{cfg.data.micro_batch_size} = {wanted:,} validation samples, but data.valid holds "
                                f"{held:,} at data.seq_len={cfg.data.seq_len}: some are measured more than once")
    return loader, eval_batches


def build_module(cfg: JobConfig, device: torch.device, mesh: Optional[Mesh],
                 adapt_model: Optional[Callable[[torch.nn.Module], None]] = None,
                 module_factory: Callable[..., LMTrainModule] = LMTrainModule,
                 materialize: Callable[[], ContextManager] = contextlib.nullcontext) -> LMTrainModule:
    """The model is built on the meta device and parallelized there; then each rank allocates only its shards
    and fills them from the full initial values (same seed everywhere, so the shards agree and equal the
    single-process model). Then optimizer and schedule. Post-training may change the meta model first
    (`adapt_model`: the reward model's scalar head) and bring its own TrainModule class. `materialize` is entered
    from the allocation on (a dry run's FakeTensorMode, engine/dry_run.py: torch cannot move a module built under
    that mode off the meta device, so the meta model and its parallelization are built outside it)."""
    check_fp8_config(cfg.fp8, device, cfg.parallel)
    if cfg.train.fused_projections and cfg.fp8.backend == "te":
        raise ConfigError("train.fused_projections", "fp8.backend=te builds its own layers (TransformerEngine fuses "
                          "q/k/v itself); use fp8.backend=native or none with fused projections")
    model = build_meta_model(cfg.model, cfg.train.fused_projections)
    if adapt_model is not None:
        adapt_model(model)
    apply_fp8(model, cfg.fp8)  # before parallelize: TP and FSDP then shard the FP8 layers' plain weights
    check_fused_accumulation(cfg.train.grad_accum_fusion, cfg.parallel, cfg.train.compile)
    if cfg.train.grad_accum_fusion:  # the remaining plain linears add their weight grads into fp32 in backward
        use_fused_accumulation(model)
    p = cfg.parallel
    options = ParallelizeOptions(sequence_parallel=p.sequence_parallel,
                                 activation_checkpointing=p.activation_checkpointing, ac_every=p.ac_every,
                                 param_dtype=torch.bfloat16 if cfg.train.dtype == "bf16" else None,
                                 reshard_after_forward=p.reshard_after_forward, pp_schedule=p.pp_schedule,
                                 pp_virtual_stages=p.pp_virtual_stages, pp_layers=tuple(p.pp_layers),
                                 pp_embedding_cost=p.pp_embedding_cost, pp_head_cost=p.pp_head_cost,
                                 pp_microbatches=grad_accum_steps(cfg), cp_attention=p.cp_attention,
                                 compile=cfg.train.compile,
                                 # the recomputation replays its forward's delayed FP8 scales, compiled or not
                                 # (a compiled block is compiled inside its eager checkpoint: apply_compile)
                                 recompute_contexts=recompute_contexts if cfg.fp8.backend == "native" else None)
    parallel = parallelize(model, mesh, options, reference_loss_sum=ops.cross_entropy_sum)
    if mesh is not None and cfg.fp8.backend == "native":  # ranks holding pieces of one tensor share its scale
        set_amax_groups(parallel.parts, [mesh.tp_group if p.tp > 1 else None,
                                         mesh.group("cp") if p.cp > 1 else None])
    if parallel.pipeline is not None and cfg.fp8.backend == "native":  # not from torch's shape-inference pass
        set_recording_gate(parallel.parts, parallel.pipeline.gate)
    with materialize():
        for part in parallel.parts:
            part.to_empty(device=device)
            init_weights(part, cfg.train.seed, parallel.full_shape, parallel.init_parameter)
            init_fp8_weights(part, cfg.fp8, cfg.train.seed)
        optimizer = build_optimizer(torch.nn.ModuleList(parallel.parts), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.steps,
                                cfg.data.global_batch_size * cfg.data.seq_len)
    return module_factory(parallel, optimizer, scheduler, device, cfg.train.dtype, cfg.optim.grad_clip,
                          forward_context=fp8_forward_context(cfg.fp8),
                          step_context=fp8_step_context(cfg.fp8, parallel.parts, weights_sharded=p.dp_shard > 1))


def build_callbacks(cfg: JobConfig, state: TrainState, device: torch.device, eval_batches: List[Batch],
                    stream: TextIO, resumed: bool = False) -> List[Callback]:
    """Every rank evaluates (it takes collectives); rank 0 alone prints and writes the run directory."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    callbacks: List[Callback] = []
    if cfg.watchdog.enabled:  # first, so its section marks bracket the other callbacks' work
        callbacks.append(WatchdogCallback(cfg.watchdog, Path(cfg.log.run_dir) / cfg.log.name,
                                          int(os.environ.get("RANK", "0")), world_size))
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    straggler, guards = guard_callbacks(cfg, device, stream)
    callbacks += straggler  # before evaluation: its optimizer section must hold no other callback's collectives
    if eval_batches:
        callbacks.append(EvalCallback(eval_batches, cfg.train.eval_every))
    if cfg.long_eval.enabled:  # before the writers: its records reach them at fit start and end
        from engine.eval.long_context import build_long_eval
        callbacks.append(build_long_eval(cfg, stream))
    callbacks += guards
    if int(os.environ.get("RANK", "0")) != 0:
        return callbacks
    peak = cfg.log.peak_tflops or (device_peak_tflops(torch.cuda.get_device_name(device))
                                   if device.type == "cuda" else 0.0)
    run = prepare_run_dir(cfg, stream, resumed)
    callbacks.append(RunDirLock(run))
    p = cfg.parallel
    header = [f"herd {__version__} | model {cfg.model.name}: {parameter_count(cfg.model) / 1e6:.1f}M parameters, "
              f"{cfg.model.n_layers} layers, dim {cfg.model.dim} | device {device} | world size {world_size} "
              f"(dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x pp {p.pp} x cp {p.cp} x tp {p.tp})",
              f"{state.tokens_per_step:,} tokens per step = {state.tokens_per_step // cfg.data.seq_len} sequences x "
              f"{cfg.data.seq_len} ({grad_accum_steps(cfg)} micro-batch(es) of {cfg.data.micro_batch_size} per "
              f"rank) | {cfg.train.steps} steps | {fpt / 1e6:.1f} MFLOP per token | run dir {run}"]
    footer = []  # where the logs are: only those this run writes
    if cfg.log.jsonl:
        footer.append(f"metrics: {run / 'metrics.jsonl'}")
    if cfg.log.tensorboard:
        footer.append(f"TensorBoard: {run / 'tb'} (view with: tensorboard --logdir {run / 'tb'})")
    callbacks.insert(0, ThroughputCallback(fpt, world_size, peak))
    callbacks.append(ConsoleCallback(cfg.log.every, header, footer, stream))
    if cfg.log.jsonl:
        callbacks.append(JsonlCallback(run / "metrics.jsonl"))
    if cfg.log.tensorboard:
        callbacks.append(TensorBoardCallback(run / "tb"))
    return callbacks


def guard_callbacks(cfg: JobConfig, device: torch.device, stream: TextIO) -> Tuple[List[Callback], List[Callback]]:
    """(the straggler detector, [non-finite/spike guard, telemetry]) on every rank; rank 0 prints and writes."""
    g = cfg.guards
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    say = (lambda line: print(scrub(line), file=stream, flush=True)) if is_rank0 else None
    guard = StepGuard(g.spike_factor, g.spike_window, device)
    telemetry = Telemetry(device) if g.telemetry_every > 0 else None
    straggler: List[Callback] = []
    if g.straggler_every > 0:
        report = Path(cfg.log.run_dir) / cfg.log.name / "stragglers.jsonl" if is_rank0 else None
        straggler.append(StragglerCallback(g.straggler_every, g.straggler_threshold, g.straggler_patience, guard,
                                           device, report, say, telemetry))
    guards: List[Callback] = [GuardCallback(guard, g.nonfinite, g.spike, g.spike_factor, g.max_consecutive_skips,
                                            g.max_rollbacks, say)]
    if telemetry is not None:
        guards.append(TelemetryCallback(g.telemetry_every, telemetry, say))
    return straggler, guards


DataBuilder = Callable[[JobConfig, Optional[Mesh]], Tuple[StepLoader, List[Batch]]]
ModuleBuilder = Callable[[JobConfig, torch.device, Optional[Mesh]], LMTrainModule]


def build_trainer(cfg: JobConfig, stream: TextIO = sys.stdout, data_builder: Optional[DataBuilder] = None,
                  module_builder: Optional[ModuleBuilder] = None) -> Trainer:
    """The whole run. Post-training (align/) passes its own data and module builders; the rest is shared."""
    device, mesh = setup_distributed(cfg)
    torch.manual_seed(cfg.train.seed)
    loader, eval_batches = (data_builder or build_data)(cfg, mesh)
    module = (module_builder or build_module)(cfg, device, mesh)
    # a post-training sample can be several sequences (a preference row: chosen and rejected, ...)
    sequences = cfg.data.global_batch_size * getattr(loader, "sequences_per_sample", 1)
    state = TrainState(total_steps=cfg.train.steps, tokens_per_step=sequences * cfg.data.seq_len)
    run = Path(cfg.log.run_dir) / cfg.log.name
    store = CheckpointStore(checkpoint_root(cfg.checkpoint.dir, run), cfg.checkpoint.keep_last,
                            cfg.checkpoint.verify_sample, cfg.train.seed, lineage=cfg.log.name)
    layout = {k: getattr(cfg.parallel, k) for k in ("dp_replicate", "dp_shard", "pp", "cp", "tp")}
    checkpointer = Checkpointer(store, module, loader, state, to_yaml(cfg), layout, cfg.checkpoint.async_save)
    checkpointer.model_cfg = cfg.model
    checkpointer.identity = {key: getattr(loader, key) for key in ("vocab_sha256", "rows_sha256")
                             if getattr(loader, key, None)}
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    say = (lambda line: print(scrub(line), file=stream, flush=True)) if is_rank0 else None
    # the directory is this run's (or refused, one line) before anything reads or writes it
    # a checkpoint root inside the run directory moves aside with it (the claim does that, lock and all)
    inside = run.resolve() in (store.root.resolve(), *store.root.resolve().parents)
    prepared = checkpointer.claim(cfg.checkpoint.on_foreign, cfg.checkpoint.resume, cfg.checkpoint.every > 0,
                                  run if inside else None, lambda path: move_aside(path, stream), say)
    try:
        resumed = checkpointer.resume() if cfg.checkpoint.resume == "auto" else None
        if resumed is None and cfg.data.stage_start_sample > 0:  # the loader would start at sample 0
            raise ConfigError("data.stage_start_sample", f"{cfg.data.stage_start_sample}: where a resumed recipe "
                              f"stage's data begins, but this run has no checkpoint to resume and would train "
                              f"data.stages[0]'s data from sample 0; set it to 0 or resume the run that got there")
        initialized = None
        if resumed is None and cfg.checkpoint.load_weights:
            initialized = checkpointer.load_weights(Path(cfg.checkpoint.load_weights), cfg.model,
                                                    skip=getattr(module, "fresh_parameters", ()))
        callbacks = build_callbacks(cfg, state, device, eval_batches, stream, resumed is not None or prepared)
    except BaseException:
        checkpointer.release()
        raise
    if say:  # what the data readers left out: a console line, <run>/skipped.json, the first metrics record
        report_data_skips(getattr(loader, "skips", None), run, say, callbacks)
    for note in (ignored_settings(cfg) + getattr(loader, "notes", [])) if say else []:
        say(note)
    if say and cfg.train.eval_every > 0 and not eval_batches:
        say(f"warning: train.eval_every={cfg.train.eval_every} but there is no validation data (data.valid, or "
            f"align.valid_file): no validation loss will be measured")
    if resumed is not None and say:
        say(f"resumed from {store.step_dir(resumed)} at step {resumed} "
            f"({loader.consumed_samples:,} samples consumed)")
        if resumed >= cfg.train.steps:  # a requeued finished run: fine, but a lowered train.steps should be seen
            say(f"nothing left to train: the checkpoint is at step {resumed} and train.steps={cfg.train.steps}")
    if initialized is not None and say:
        say(f"model weights loaded from {cfg.checkpoint.load_weights} (its step {initialized})")
    if cfg.checkpoint.every > 0:  # a preemption stops every rank at one step boundary; the end of fit saves
        callbacks.append(PreemptionCallback(device=device))
        callbacks.append(CheckpointCallback(checkpointer, cfg.checkpoint.every, say))
    callbacks.sort(key=lambda c: isinstance(c, RunDirLock))  # released last: after the final save and logs
    trainer = Trainer(module, loader, state, device, callbacks)
    trainer.checkpointer = checkpointer  # post-training stages load other weights through it (align/reference.py)
    return trainer


def end_rank_process(code: int) -> None:
    """The last call of a rank of a multi-process run that ended normally (or was preempted and has saved):
    wait for every rank, close the process groups, flush this process's output and leave with os._exit(code),
    skipping the interpreter's own teardown. Returns only in a process without a process group (one-process runs,
    tests calling the CLI in-process), which exits the usual way.

    Why skip the teardown: it frees the last torch objects while the interpreter is finalizing. A C++ thread
    (gloo's workers) that asks for the GIL then, to free a tensor's Python object, is ended by pthread_exit, and
    the unwinding through torch's noexcept destructors calls std::terminate: SIGABRT, "terminate called without
    an active exception" (pytorch/pytorch#190489; #179291 describes the gloo AsyncWork case). CI saw it once on
    rank 1 of a 2-rank SLURM job that had finished, saved and closed its groups (exit 134 instead of 0); 80
    local 2-rank runs like it (40 of them resumed from a checkpoint), and more under CPU contention, did not
    reproduce it, so the mechanism is the likely one, not a proven one. Nothing is left to do at that point: the
    callbacks' on_fit_end closed the metrics and TensorBoard files and the last checkpoint has committed."""
    if not dist.is_initialized():
        return
    # every rank first: a rank that closed its sockets early would fail a peer still in a collective
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train(cfg: JobConfig, stream: Optional[TextIO] = None) -> Trainer:
    trainer = build_trainer(cfg, stream or sys.stdout)
    trainer.fit()
    return trainer
