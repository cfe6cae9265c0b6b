"""One post-training stage as a run of the engine: the job's align.kind picks the data (and, for the reward model
and DPO, the TrainModule); model, layout, optimizer, checkpoints, callbacks and logs are the engine's own."""

import hashlib
import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, TextIO, Tuple

from torch import nn

from engine.config import JobConfig
from engine.data.loader import Batch
from engine.data.tokenizer import load_tokenizer
from engine.errors import ConfigError
from engine.files import file_problem
from engine.run import build_data, build_module, build_trainer, eval_share
from engine.secrets import scrub
from engine.trainer import Trainer
from parallel.mesh import Mesh

from align.formats import AlignDataError, load_preferences, load_sft, skip_report
from align.modules import DPOTrainModule, RewardTrainModule
from align.preference import REWARD_BLOCKS, PreferenceStepLoader
from align.reference import reference_table
from align.sft import SFTStepLoader, pack_samples


def _say(stream: TextIO, line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(scrub(line), file=stream, flush=True)


def _ranks(mesh: Optional[Mesh]) -> Tuple[int, int, int, int]:
    """(dp rank, dp size, cp rank, cp size) of this process."""
    if mesh is None:
        return 0, 1, 0, 1
    return mesh.dp_rank, mesh.dims.dp, mesh.rank("cp"), mesh.dims.cp


def _tokenizer(cfg: JobConfig):
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, {tokenizer.name})")
    return tokenizer


def _read_files(cfg: JobConfig, load: Callable, what: str) -> List[Optional[tuple]]:
    """[(path, items, skip counts) or None] for align.train_file and align.valid_file; a missing file or one with
    nothing usable is a one-line error."""
    found = []
    for key in ("train_file", "valid_file"):
        path = getattr(cfg.align, key)
        if not path:
            found.append(None)
            continue
        problem = file_problem(path)
        if problem:
            raise ConfigError(f"align.{key}", f"{path} {problem}")
        items, skipped = load(path)
        if not items:
            raise AlignDataError(f"{path}: no usable {what} ({skipped.summary()})")
        found.append((path, items, skipped))
    return found


def rows_identity(cfg: JobConfig) -> str:
    """sha256 of the training rows' file (the position a resume continues is in it; the validation rows move
    nothing): saved with the checkpoints, so a resume on edited rows is refused (Checkpointer.identity); the same
    file moved elsewhere is the same rows."""
    digest = hashlib.sha256()
    with open(cfg.align.train_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identify(loader, cfg: JobConfig, tokenizer) -> None:
    loader.vocab_sha256, loader.rows_sha256 = tokenizer.vocab_fingerprint, rows_identity(cfg)


def sft_data(cfg: JobConfig, mesh: Optional[Mesh], stream: TextIO = sys.stdout) -> Tuple[SFTStepLoader, List[Batch]]:
    """The SFT loader over align.train_file and the fixed validation micro-batches from align.valid_file."""
    tokenizer = _tokenizer(cfg)
    dp_rank, dp_size, cp_rank, cp_size = _ranks(mesh)
    files = _read_files(cfg, lambda path: load_sft(path, tokenizer, cfg.data.seq_len + 1,
                                                   on_too_long=cfg.align.on_too_long,
                                                   on_bad_data=cfg.data.on_bad_data), "sample")
    loaders = []
    for role, found in zip(("train", "valid"), files):
        if found is None:
            loaders.append(None)
            continue
        path, samples, skipped = found
        rows = pack_samples([(s.tokens, s.learn) for s in samples], cfg.data.seq_len, tokenizer.eod_id,
                            cfg.data.seed + (0 if role == "train" else 1000))
        _say(stream, f"sft {role}: {path}: {rows.samples} samples, {rows.learn_tokens:,} learned tokens "
                     f"in {len(rows.tokens)} rows of {cfg.data.seq_len}; skipped: {skipped.summary()}")
        loaders.append(SFTStepLoader(rows, cfg.data, dp_rank, dp_size, cp_rank=cp_rank, cp_size=cp_size))
    train, valid = loaders
    train.skips = skip_report(found[2] for found in files if found)  # build_trainer reports and writes it
    _identify(train, cfg, tokenizer)
    eval_batches = valid.fixed_micro_batches(eval_share(cfg, dp_size)) if valid is not None else []
    return train, eval_batches


def preference_data(cfg: JobConfig, mesh: Optional[Mesh], stream: TextIO = sys.stdout
                    ) -> Tuple[PreferenceStepLoader, List]:
    """The reward-model or DPO loader over align.train_file and held-out micro-batches from align.valid_file."""
    tokenizer = _tokenizer(cfg)
    dp_rank, dp_size, cp_rank, cp_size = _ranks(mesh)
    kind = cfg.align.kind
    max_len = cfg.data.seq_len + (1 if kind == "dpo" else 0)  # DPO shifts by one token, the reward model does not
    files = _read_files(cfg, lambda path: load_preferences(path, tokenizer, max_len,
                                                           on_too_long=cfg.align.on_too_long,
                                                           on_bad_data=cfg.data.on_bad_data), "preference row")
    loaders = []
    for role, found in zip(("train", "valid"), files):
        if found is None:
            loaders.append(None)
            continue
        path, examples, skipped = found
        _say(stream, f"{kind} {role}: {path}: {len(examples)} preference rows, "
                     f"{sum(e.edited is not None for e in examples)} with an edited response; {skipped.summary()}")
        offset = len(loaders[0].examples) if loaders else 0
        loaders.append(PreferenceStepLoader(examples, kind, tokenizer.eod_id, cfg.data, dp_rank, dp_size,
                                            cp_rank, cp_size, id_offset=offset))
    train, valid = loaders
    if valid is not None and valid.blocks != train.blocks:  # one batch layout for both files: the wider one
        train.blocks = valid.blocks = REWARD_BLOCKS
    train.held_out = valid
    train.skips = skip_report(found[2] for found in files if found)  # build_trainer reports and writes it
    _identify(train, cfg, tokenizer)
    return train, valid.fixed_micro_batches(eval_share(cfg, dp_size)) if valid is not None else []


def scalar_head(model: nn.Module) -> None:
    """The reward model: the language model with its vocabulary head replaced by one output (Llama 3 paper
    section 4.1.2 trains it on top of the pre-trained checkpoint)."""
    model.output = nn.Linear(model.cfg.dim, 1, bias=False, device="meta")


def stage_data(cfg: JobConfig, mesh: Optional[Mesh], stream: TextIO = sys.stdout) -> Tuple[object, List]:
    """This rank's loader and validation micro-batches for the job's align.kind: token files (lm), chat rows (sft)
    or preference rows (rm, dpo). Also what align/inputs.py reads before a launch."""
    if cfg.align.kind == "lm":
        return build_data(cfg, mesh)
    if cfg.align.kind == "sft":
        return sft_data(cfg, mesh, stream)
    return preference_data(cfg, mesh, stream)


def build_stage_trainer(cfg: JobConfig, stream: TextIO = sys.stdout) -> Trainer:
    """The engine's trainer for the job's align.kind (lm: plain pretraining)."""
    kind = cfg.align.kind
    data = (lambda c, mesh: stage_data(c, mesh, stream))
    if kind in ("lm", "sft"):
        return build_trainer(cfg, stream, data_builder=data)
    if kind == "rm":
        trainer = build_trainer(cfg, stream, data_builder=data, module_builder=partial(
            build_module, adapt_model=scalar_head, module_factory=RewardTrainModule))
        trainer.module.blocks = trainer.loader.blocks
        return trainer
    trainer = build_trainer(cfg, stream, data_builder=data, module_builder=partial(
        build_module, module_factory=partial(DPOTrainModule, align=cfg.align)))
    run_dir = Path(cfg.log.run_dir) / cfg.log.name
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer.module.reference = reference_table(trainer, trainer.loader, run_dir, cfg.align.reference,
                                               say=lambda line: _say(stream, line))
    return trainer


def train_stage(cfg: JobConfig, stream: Optional[TextIO] = None) -> Trainer:
    trainer = build_stage_trainer(cfg, stream or sys.stdout)
    trainer.fit()
    return trainer
