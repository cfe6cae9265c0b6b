"""Saving and resuming a training run: sharded model/optimizer state (DCP), per-rank RNG, LR schedule, data
position and step, committed through CheckpointStore so a checkpoint is complete or absent.

Files of one checkpoint: DCP's `__<rank>_<n>.distcp` shards and `.metadata` (model.* and optim.* boxes, layout
free), `rng/rank<r>.pt` (tensors only, read with weights_only), and the manifest's `meta` (JSON: step, samples
consumed, scheduler state, layout, the resolved config). Every rank hashes the files it wrote; rank 0 commits.
On resume rank 0 picks the newest complete checkpoint and verifies it before any rank parses a byte of it.
"""

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from engine.callbacks.guards import assert_finite_state
from engine.checkpoint.manifest import check_train_meta, model_config_of, saved_model_config, saved_section
from engine.checkpoint.ownership import Claim, check_before_launch, claim_directory, probe_writable
from engine.checkpoint.sharded import Box, load_sharded, param_key, save_sharded, sharded_state
from engine.checkpoint.store import MANIFEST, CheckpointError, CheckpointStore, describe_files
from engine.config_schema import MODEL_SHAPE_KEYS

_IDENTITY_CHANGED = {
    "vocab_sha256": "the checkpoint was trained with another tokenizer (another token -> id mapping than this run's "
                    "data.tokenizer): its weights would read every id as other text; use the tokenizer it was "
                    "trained with",
    "rows_sha256": "the checkpoint was trained on other rows (align.train_file changed since it was saved): a "
                   "resume would continue another dataset at this one's position; put the file back, or start the "
                   "stage over in a new run directory",
}


def _rank_world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(value, group=None):
    """Rank 0's value on every rank (an object broadcast; identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(value, group=None) -> List:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _failure(where, e: BaseException) -> str:
    """The one line every rank raises when rank 0 alone failed (they wait for its verdict, never hang)."""
    if isinstance(e, CheckpointError):
        return str(e)
    lines = str(e).strip().splitlines()
    return f"{where}: {type(e).__name__}" + (f": {lines[0]}" if lines else "")


def _raise_agreed(verdict) -> tuple:
    """Rank 0's verdict on every rank: ("error", line) raises that line everywhere; anything else is returned."""
    first, second = _agree(verdict)
    if first == "error":
        raise CheckpointError(second)
    return first, second


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state at the first step; a resume needs it to exist (zeros) to load into."""
    for group in optimizer.param_groups:
        fused = group.get("fused") or False
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: module (model, optimizer, scheduler),
    loader position, train state, RNG."""

    def __init__(self, store: CheckpointStore, module, loader, train_state, config_yaml: str, layout: dict,
                 async_save: bool = False):
        self.store, self.module, self.loader, self.train_state = store, module, loader, train_state
        self.config_yaml, self.layout, self.async_save = config_yaml, layout, async_save
        self._writer: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_blocking_s = 0.0
        # a background write runs its collectives on a group of its own, never interleaved with training's
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.claimed: Optional[Claim] = None
        self.model_cfg = None  # this run's ModelConfig: a resume refuses a checkpoint of another model
        # what the weights were trained on, saved in meta.identity: vocab_sha256 (the tokenizer's token -> id
        # mapping; a resume or a load refuses another) and rows_sha256 (align's training rows; a resume refuses others)
        self.identity: Dict[str, str] = {}

    def claim(self, on_foreign: str, resume: str, writes: bool, run_dir: Optional[Path] = None,
              move_aside=None, say=None) -> bool:
        """Before the resume: rank 0 claims the checkpoint directory for this run (engine/checkpoint/ownership.py)
        and every rank takes its verdict, so all stop with the same line or all use the same root; then every rank
        that writes probes the root (a node whose filesystem is read-only fails here, not at the first save).
        Returns whether an earlier run directory was moved aside (the run directory is then prepared)."""
        rank, world = _rank_world()
        verdict = None
        if rank == 0:
            try:
                self.claimed = claim_directory(self.store, on_foreign, resume, writes, run_dir, move_aside)
                verdict = (str(self.claimed.root), self.claimed.run_dir_prepared)
                for note in self.claimed.notes:
                    if say is not None:
                        say(note)
            except Exception as e:  # noqa: BLE001 - unreadable directory, failed move: all ranks stop, none waits
                verdict = ("error", _failure(f"{self.store.root}: cannot claim the checkpoint directory", e))
        root, prepared = _raise_agreed(verdict)
        self.store.root = Path(root)
        if writes and world > 1:
            problem = None
            try:
                probe_writable(self.store.root, f"rank{rank}-")
            except CheckpointError as e:
                problem = str(e)
            failures = [p for p in _gather(problem) if p]
            if failures:
                self.release()
                raise CheckpointError(failures[0])
        return prepared

    def release(self) -> None:
        """Give up the directory's lock (the end of the run; the process's death does it as well)."""
        if self.claimed is not None and self.claimed.lock is not None and (self._writer is None
                                                                            or not self._writer.is_alive()):
            self.claimed.lock.release()

    def save(self, step: int) -> Path:
        """Save step `step`. Training is blocked while the previous save finishes and the state is copied to host
        memory; with async_save the writing, hashing and commit then run in a background thread."""
        started = time.perf_counter()
        self.wait()
        device = self.module.parallel.parameters()[0].device
        assert_finite_state(self.module.parallel.named_parameters(), self.module.optimizer, step, device)
        rank, world = _rank_world()
        path = self.store.step_dir(step)
        problem = None
        if rank == 0:
            try:
                self.store.begin(step)
            except Exception as e:  # noqa: BLE001 - every rank stops with rank 0's line, none waits
                problem = _failure(f"{path}: cannot begin the checkpoint", e)
        _raise_agreed(("error", problem) if problem else (None, None))  # the directory exists before any write
        init_optimizer_state(self.module.optimizer)
        state = sharded_state(self.module.parallel, self.module.optimizer)
        if self.async_save:  # a snapshot: training goes on changing the live tensors
            state = {k: Box(b.tensor.detach().to("cpu", copy=True), b.offsets, b.full_shape) for k, b in state.items()}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        meta = json.loads(json.dumps(self._meta(step, world)))  # a snapshot, as the tensors are
        if self.async_save:
            self._writer = threading.Thread(target=self._write_guarded, args=(path, state, rng, meta, rank),
                                            name=f"herd-checkpoint-{step}", daemon=True)
            self._writer.start()
        else:
            self._write(path, state, rng, meta, rank)
        self.last_blocking_s = time.perf_counter() - started
        return path

    def wait(self) -> None:
        """Block until the background save (if any) has committed; re-raise its error here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_guarded(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread at the next wait()
            self._error = e

    def _write(self, path: Path, state: dict, rng: dict, meta: dict, rank: int) -> None:
        save_sharded(path, state, process_group=self._group)
        rng_file = path / "rng" / f"rank{rank}.pt"
        rng_file.parent.mkdir(exist_ok=True)
        torch.save(rng, rng_file)
        mine = [rng_file] + sorted(path.glob(f"__{rank}_*.distcp"))
        if rank == 0:
            mine.append(path / ".metadata")
        files: Dict[str, dict] = {}
        for part in _gather(describe_files(path, mine), self._group):
            files.update(part)
        if rank == 0:
            self.store.commit(meta["step"], files, meta)
        _agree(None, self._group)  # nobody continues (or exits) before the commit

    def _meta(self, step: int, world: int) -> dict:
        return {"step": step, "loader": self.loader.state_dict(), "scheduler": self.module.scheduler.state_dict(),
                "world_size": world, "layout": self.layout, "config": self.config_yaml,
                **({"identity": dict(self.identity)} if self.identity else {})}

    def resume(self) -> Optional[int]:
        """Load the newest complete checkpoint, if any; returns its step. Rank 0 chooses and verifies."""
        rank, world = _rank_world()
        choice = None
        if rank == 0:
            try:
                step = self.store.latest_step()
                choice = (step, self.store.verify(step)) if step is not None else (None, None)
            except Exception as e:  # noqa: BLE001 - the other ranks wait for this verdict: they raise it too
                choice = ("error", _failure(f"{self.store.root}: cannot resume", e))
        step, manifest = _raise_agreed(choice)
        if step is None:
            return None
        path = self.store.step_dir(step)
        check_train_meta(manifest, path / MANIFEST, self.loader.state_dict(), self.module.scheduler.state_dict())
        self._check_same_model(manifest, path / MANIFEST)
        self._check_same_stream(manifest, path / MANIFEST)
        self._check_identity(manifest, path / MANIFEST, ("vocab_sha256", "rows_sha256"))
        self._load(path, manifest, rank, world)
        return step

    def _check_same_model(self, manifest: dict, file: Path) -> None:
        """A checkpoint of another model is refused: fewer layers loaded only the ones both have, and other head
        counts of the same total width loaded tensors that mean something else; both trained on, silently."""
        if self.model_cfg is None or not isinstance(manifest.get("meta", {}).get("config"), str):
            return
        saved = saved_section(manifest["meta"]["config"], "model")  # {}: the load itself refuses what cannot be read
        for key in MODEL_SHAPE_KEYS:
            theirs, ours = saved.get(key, getattr(self.model_cfg, key)), getattr(self.model_cfg, key)
            if theirs != ours:
                raise CheckpointError(f"{file.parent}: the checkpoint holds a model with model.{key}={theirs}, this "
                                      f"run's has {ours}; resume with the same model, or start it elsewhere "
                                      f"(log.name or checkpoint.dir)")

    def _check_same_stream(self, manifest: dict, file: Path) -> None:
        """The loader resumes at a sample count: at another data.seq_len those counts cut the token stream
        elsewhere, so the run would retrain or skip data silently. A recipe's later stage says where its earlier
        ones were cut (data.stages, engine/data/stages.py) and may change it; a plain resume may not."""
        if not self.config_yaml or not isinstance(manifest.get("meta", {}).get("config"), str):
            return
        saved, ours = saved_section(manifest["meta"]["config"], "data"), saved_section(self.config_yaml, "data")
        theirs, mine = saved.get("seq_len"), ours.get("seq_len")
        if theirs is not None and mine is not None and theirs != mine and not ours.get("stages"):
            raise CheckpointError(f"{file.parent}: the checkpoint trained at data.seq_len={theirs}, this run has "
                                  f"{mine}; its {manifest['meta']['loader'].get('consumed_samples')} samples "
                                  f"would cut the data elsewhere. Resume at data.seq_len={theirs}, or describe the "
                                  f"earlier stage in data.stages (docs/data_stages.md; herd recipe does it)")

    def _check_identity(self, manifest: dict, file: Path, keys) -> None:
        """Weights trained with another tokenizer read every id as other text; a resume on other rows continues
        another dataset at this one's position. Both ran silently (a bad-input hunt, helper H44). Checkpoints
        written before meta.identity existed, and imports, carry none and are not checked."""
        saved = manifest.get("meta", {}).get("identity")
        if not isinstance(saved, dict):
            return
        for key in keys:
            theirs, ours = saved.get(key), self.identity.get(key)
            if isinstance(theirs, str) and ours and theirs != ours:
                raise CheckpointError(f"{file.parent}: {_IDENTITY_CHANGED[key]}")

    def load_weights(self, root: Path, model_cfg=None, skip=()) -> int:
        """Initialize the model (only) from the newest complete checkpoint under `root` (an imported HF model or
        another run's checkpoint, any layout); the optimizer, schedule and data start fresh. Returns its step.
        Parameters named in `skip` keep their values (a reward model's new scalar head over a language model)."""
        rank, _ = _rank_world()
        choice = None
        if rank == 0:
            try:
                source = CheckpointStore(root)
                step = source.latest_step()
                if step is None:
                    raise CheckpointError(f"{root}: no complete checkpoint to load weights from "
                                          f"({source.why_none_complete()})")
                choice = (step, source.verify(step))
            except Exception as e:  # noqa: BLE001 - the other ranks wait for this verdict: they raise it too
                choice = ("error", _failure(f"{root}: cannot load weights", e))
        step, manifest = _raise_agreed(choice)
        self._check_identity(manifest, CheckpointStore(root).step_dir(step) / MANIFEST, ("vocab_sha256",))
        saved = saved_model_config(manifest, CheckpointStore(root).step_dir(step) / MANIFEST)
        if saved is not None:  # an imported model: a valid one (one line if not), and this run's
            model_config_of(manifest, CheckpointStore(root).step_dir(step) / MANIFEST)
        if saved is not None and model_cfg is not None:
            ours = dataclasses.asdict(model_cfg)
            for key in sorted(set(saved) - {"name"}):
                if saved[key] != ours.get(key):
                    raise CheckpointError(f"{root}: the checkpoint's model.{key} is {saved[key]}, this run's is "
                                          f"{ours.get(key)}; set model.{key}={saved[key]}")
        with torch.no_grad():
            skipped = {f"model.{name}" for name in skip}
            state = {k: v for k, v in sharded_state(self.module.parallel, None).items() if k not in skipped}
            for name, p in self.module.parallel.named_parameters():
                if f"model.{param_key(name)}" not in skipped:
                    (p.to_local() if hasattr(p, "to_local") else p).zero_()
            load_sharded(CheckpointStore(root).step_dir(step), state, manifest["files"])
        return step

    @torch.no_grad()
    def _load(self, path: Path, manifest: dict, rank: int, world: int) -> None:
        meta = manifest["meta"]
        init_optimizer_state(self.module.optimizer)
        state = sharded_state(self.module.parallel, self.module.optimizer)
        for p in self.module.parallel.parameters():  # padding rows (vocab) are not in the checkpoint: zero
            (p.to_local() if hasattr(p, "to_local") else p).zero_()
        load_sharded(path, state, manifest["files"])
        scheduler = self.module.scheduler
        own_peak = list(scheduler.base_lrs)
        scheduler.load_state_dict(meta["scheduler"])
        # the peak LR is this run's optim.lr, not the saved one's (a recipe stage may change it; so may a resumed run)
        scheduler.base_lrs = own_peak
        # the learning rate of the next step comes from this run's schedule at the saved step (the same value
        # unless the config changed, e.g. a run extended to more steps)
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(self.module.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
        self.loader.load_state_dict(meta["loader"])
        self.train_state.step = int(meta["step"])
        rng_name = f"rng/rank{rank}.pt"
        if meta["world_size"] == world and rng_name in manifest["files"]:  # the same ranks: each its own RNG back
            _restore_rng(path / rng_name)


def _restore_rng(rng_file: Path) -> None:
    """A verified RNG file (listed in the manifest, hashed): tensors only, and of the shape torch expects."""
    try:
        rng = torch.load(rng_file, weights_only=True)
        if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
            raise TypeError("no 'torch' state tensor")
        torch.set_rng_state(rng["torch"])
        if isinstance(rng.get("cuda"), torch.Tensor) and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except Exception as e:  # noqa: BLE001 - weights-only unpickling refuses anything but tensors
        raise CheckpointError(f"{rng_file}: not an RNG state file ({type(e).__name__})") from None


def checkpoint_root(checkpoint_dir: str, run_dir: Path) -> Path:
    return Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoints"


def check_job_checkpoints(cfg, test_lock: bool = True, saves: Optional[bool] = None) -> None:
    """A launcher's check of the job's checkpoint directory before any rank starts (ownership.check_before_launch):
    the root and lineage as engine/run.py's build_trainer claims them. `saves`: whether the run will save, where a
    runner makes every stage save whatever checkpoint.every says (default: checkpoint.every > 0)."""
    c = cfg.checkpoint
    store = CheckpointStore(checkpoint_root(c.dir, Path(cfg.log.run_dir) / cfg.log.name), c.keep_last,
                            lineage=cfg.log.name)
    check_before_launch(store, c.on_foreign, c.resume, c.every > 0 if saves is None else saves, bool(c.dir),
                        test_lock)
