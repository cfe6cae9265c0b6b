"""One post-training stage as a run of the engine: the job's align.kind picks the data (and, for the reward model
and DPO, the TrainModule); model, layout, optimizer, checkpoints, callbacks and logs are the engine's own."""

import os
import sys
from typing import List, Optional, TextIO, Tuple

from engine.config import JobConfig
from engine.data.loader import Batch
from engine.data.tokenizer import load_tokenizer
from engine.errors import ConfigError
from engine.run import build_trainer
from engine.secrets import scrub
from engine.trainer import Trainer
from parallel.mesh import Mesh

from align.formats import AlignDataError, load_sft
from align.sft import SFTStepLoader, pack_samples


def _say(stream: TextIO, line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(scrub(line), file=stream, flush=True)


def _ranks(mesh: Optional[Mesh]) -> Tuple[int, int, int, int]:
    """(dp rank, dp size, cp rank, cp size) of this process."""
    if mesh is None:
        return 0, 1, 0, 1
    return mesh.dp_rank, mesh.dims.dp, mesh.rank("cp"), mesh.dims.cp


def sft_data(cfg: JobConfig, mesh: Optional[Mesh], stream: TextIO = sys.stdout) -> Tuple[SFTStepLoader, List[Batch]]:
    """The SFT loader over align.train_file and the fixed validation micro-batches from align.valid_file."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, {tokenizer.name})")
    dp_rank, dp_size, cp_rank, cp_size = _ranks(mesh)
    loaders = []
    for key in ("train_file", "valid_file"):
        path = getattr(cfg.align, key)
        if not path:
            loaders.append(None)
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"align.{key}", f"{path} does not exist")
        samples, skipped = load_sft(path, tokenizer, cfg.data.seq_len + 1, on_too_long=cfg.align.on_too_long)
        if not samples:
            raise AlignDataError(f"{path}: no sample has anything to learn ({skipped.summary()})")
        rows = pack_samples([(s.tokens, s.learn) for s in samples], cfg.data.seq_len, tokenizer.eod_id,
                            cfg.data.seed + (0 if key == "train_file" else 1000))
        _say(stream, f"sft {key.split('_')[0]}: {path}: {rows.samples} samples, {rows.learn_tokens:,} learned tokens "
                     f"in {len(rows.tokens)} rows of {cfg.data.seq_len}; skipped: {skipped.summary()}")
        loaders.append(SFTStepLoader(rows, cfg.data, dp_rank, dp_size, cp_rank=cp_rank, cp_size=cp_size))
    train, valid = loaders
    eval_batches = valid.fixed_micro_batches(cfg.train.eval_batches) if valid is not None else []
    return train, eval_batches


def build_stage_trainer(cfg: JobConfig, stream: TextIO = sys.stdout) -> Trainer:
    """The engine's trainer for the job's align.kind (lm: plain pretraining)."""
    kind = cfg.align.kind
    if kind == "lm":
        return build_trainer(cfg, stream)
    if kind == "sft":
        return build_trainer(cfg, stream, data_builder=lambda c, mesh: sft_data(c, mesh, stream))
    raise ConfigError("align.kind", f"'{kind}' is not implemented yet (lm and sft are)")


def train_stage(cfg: JobConfig, stream: Optional[TextIO] = None) -> Trainer:
    trainer = build_stage_trainer(cfg, stream or sys.stdout)
    trainer.fit()
    return trainer
