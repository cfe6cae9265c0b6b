"""Assembling a training run from a validated JobConfig: device, data, model, optimizer, callbacks, run dir."""

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, TextIO

import torch

from engine import __version__
from engine.callbacks import (Callback, ConsoleCallback, EvalCallback, JsonlCallback, TensorBoardCallback,
                              ThroughputCallback)
from engine.config import DatasetConfig, JobConfig, grad_accum_steps, to_yaml
from engine.data.loader import StepLoader, build_blend
from engine.data.tokenizer import Tokenizer, load_tokenizer
from engine.errors import ConfigError
from engine.flops import device_peak_tflops, flops_per_token, parameter_count
from engine.model import build_model
from engine.optim import build_optimizer, build_scheduler
from engine.train_module import LMTrainModule
from engine.trainer import Trainer, TrainState


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare_run_dir(cfg: JobConfig, stream: TextIO) -> Path:
    """<run_dir>/<name>, with config.yaml. An earlier run of the same name is moved aside, never overwritten."""
    run = Path(cfg.log.run_dir) / cfg.log.name
    if run.exists() and any(run.iterdir()):
        archive = run.with_name(f"{cfg.log.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        run.rename(archive)
        print(f"an earlier run of the same name was moved to {archive}", file=stream, flush=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def check_prepared_with(datasets: List[DatasetConfig], tokenizer: Tokenizer) -> None:
    """Data tokenized by another tokenizer would train on garbage with wrong document boundaries: refuse it."""
    for ds in datasets:
        meta_path = Path(f"{ds.path}.json")
        if not meta_path.is_file():  # written by prepare-data; data from elsewhere may not have it
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("eod_id") != tokenizer.eod_id or meta.get("vocab_size") != tokenizer.vocab_size:
            raise ConfigError("data.tokenizer", f"{ds.path} was prepared with {meta.get('tokenizer')} "
                              f"(vocab {meta.get('vocab_size')}, end-of-document id {meta.get('eod_id')}) but the "
                              f"config loads {tokenizer.name} (vocab {tokenizer.vocab_size}, id {tokenizer.eod_id})")


def build_trainer(cfg: JobConfig, stream: TextIO = sys.stdout) -> Trainer:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        raise ConfigError("parallel", f"WORLD_SIZE={world_size}: this build of herd trains on one process only")
    if not cfg.data.train:
        raise ConfigError("data.train", "no training data: list at least one dataset prefix")
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, {tokenizer.name})")
    check_prepared_with(cfg.data.train + cfg.data.valid, tokenizer)
    accum = grad_accum_steps(cfg)
    loader = StepLoader(build_blend(cfg.data.train, cfg.data, cfg.model.vocab_size), cfg.data, tokenizer.eod_id)
    eval_batches = []
    if cfg.data.valid:
        valid = StepLoader(build_blend(cfg.data.valid, cfg.data, cfg.model.vocab_size, seed_offset=1000),
                           cfg.data, tokenizer.eod_id)
        eval_batches = valid.fixed_micro_batches(cfg.train.eval_batches)

    model = build_model(cfg.model, device, cfg.train.seed)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.steps)
    module = LMTrainModule(model, optimizer, scheduler, device, cfg.train.dtype, cfg.optim.grad_clip)
    state = TrainState(total_steps=cfg.train.steps, tokens_per_step=cfg.data.global_batch_size * cfg.data.seq_len)

    run = prepare_run_dir(cfg, stream)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = cfg.log.peak_tflops or (device_peak_tflops(torch.cuda.get_device_name(device))
                                   if device.type == "cuda" else 0.0)
    header = [f"herd {__version__} | model {cfg.model.name}: {parameter_count(cfg.model) / 1e6:.1f}M parameters, "
              f"{cfg.model.n_layers} layers, dim {cfg.model.dim} | device {device} | world size {world_size}",
              f"{state.tokens_per_step:,} tokens per step = {cfg.data.global_batch_size} sequences x "
              f"{cfg.data.seq_len} ({accum} micro-batch(es) of {cfg.data.micro_batch_size}) | "
              f"{cfg.train.steps} steps | {fpt / 1e6:.1f} MFLOP per token | run dir {run}"]
    footer = [f"metrics: {run / 'metrics.jsonl'}",
              f"TensorBoard: {run / 'tb'} (view with: tensorboard --logdir {run / 'tb'})"]
    callbacks: List[Callback] = [ThroughputCallback(fpt, world_size, peak)]
    if eval_batches:
        callbacks.append(EvalCallback(eval_batches, cfg.train.eval_every))
    callbacks.append(ConsoleCallback(cfg.log.every, header, footer, stream))
    if cfg.log.jsonl:
        callbacks.append(JsonlCallback(run / "metrics.jsonl"))
    if cfg.log.tensorboard:
        callbacks.append(TensorBoardCallback(run / "tb"))
    return Trainer(module, loader, state, device, callbacks)


def train(cfg: JobConfig, stream: Optional[TextIO] = None) -> Trainer:
    trainer = build_trainer(cfg, stream or sys.stdout)
    trainer.fit()
    return trainer
