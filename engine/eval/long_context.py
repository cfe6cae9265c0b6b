"""Long-context evaluations of a run: has short-context quality recovered, and can the model retrieve from far
back? Llama 3 moved from one long-context stage to the next "when short-context performance had recovered and
needle-in-a-haystack was solved" (Llama 3 paper, section 3.4.2); these are the two measurements the recipe runner
(recipe/) gates on.

1. Short-context validation loss: the token-weighted mean loss on data.valid packed at long_eval.short_seq_len,
   over long_eval.short_batches fixed micro-batches (shared over the data-parallel ranks as EvalCallback's are).
2. Needle in a haystack, scored as MULTIPLE CHOICE: each haystack (engine/eval/needle.py) ends in a question; the
   true value and needle_candidates - 1 distractors are each scored by their summed answer loss, and the sample
   counts as retrieved when the true value's loss is the lowest (strictly). Chance is 1 / needle_candidates. The
   usual NIAH decodes the answer greedily; here the score is one forward per candidate through the TrainModule's
   eval_loss, which runs under every layout (tp, pp, cp, dp) while herd has no decoding under cp or pp.

Both go through TrainModule.eval_loss, which returns (summed loss, loss tokens) summed over the data ranks
(dp x cp). Under dp every data rank scores the same needle sequence, so the sum counts it dp times: the answer's
summed loss is total x answer_tokens / tokens, the same under any layout. Under cp each rank holds a share of the
sequence and of its answer tokens, and the shares sum to the whole.

LongContextEvalCallback runs both on every rank at the start of a fit (long_eval.at_start) and at its end (when the
run completed its steps, not at a preemption stop). Rank 0 appends each result as one JSON line to
<run>/long_eval.jsonl (flushed and fsynced: the recipe runner reads it after the job), prints it, and hands it to
the metrics writers through trainer.eval_records (metrics.jsonl and TensorBoard scalars long_eval/...).
"""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from engine.callbacks.base import Callback
from engine.config import JobConfig
from engine.callbacks.writers import strict_record
from engine.data.dataset import BlendedDataset
from engine.data.loader import Batch, StepLoader, build_blend
from engine.errors import ConfigError, HerdError
from engine.files import open_append
from engine.eval.needle import NeedleSample, make_samples
from engine.secrets import scrub


@dataclass
class ShardInfo:
    """Which part of the data this rank holds (as its training loader)."""

    dp_rank: int = 0
    dp_size: int = 1
    cp_rank: int = 0
    cp_size: int = 1


def eval_lengths(cfg: JobConfig) -> List[int]:
    return list(cfg.long_eval.needle_lengths) or [cfg.data.seq_len]


def short_share(cfg: JobConfig, dp: int) -> int:
    """Short-context micro-batches per data-parallel rank (long_eval.short_batches counts the whole set)."""
    count = cfg.long_eval.short_batches
    if count % dp:
        raise ConfigError("long_eval.short_batches", f"{count} micro-batches cannot be shared equally over dp={dp} "
                          f"data-parallel ranks: use a multiple of {dp}")
    return count // dp


def short_context_blend(cfg: JobConfig) -> BlendedDataset:
    """data.valid packed at long_eval.short_seq_len (the validation blend's own shuffle seed, as build_data's)."""
    data = replace(cfg.data, seq_len=cfg.long_eval.short_seq_len)
    return build_blend(cfg.data.valid, data, cfg.model.vocab_size, seed_offset=1000)


def short_context_batches(cfg: JobConfig, blend: BlendedDataset, eod_id: int, shard: ShardInfo) -> List[Batch]:
    """This rank's share of the fixed short-context validation micro-batches, cut for cp like training data."""
    data = replace(cfg.data, seq_len=cfg.long_eval.short_seq_len)
    loader = StepLoader(blend, data, eod_id, shard.dp_rank, shard.dp_size, cp_rank=shard.cp_rank,
                        cp_size=shard.cp_size)
    return loader.fixed_micro_batches(short_share(cfg, shard.dp_size))


def short_context_loss(module, batches: List[Batch], device) -> Dict[str, float]:
    total, tokens = module.eval_loss([b.to(device) for b in batches])
    return {"short_loss": total / max(1, tokens), "short_tokens": tokens}


def answer_losses(module, sample: NeedleSample, shard: ShardInfo, device) -> List[float]:
    """Each candidate's summed answer loss (nats), layout-independent (see the module docstring)."""
    losses = []
    for candidate in range(len(sample.answers)):
        batch = sample.batch(candidate)
        if shard.cp_size > 1:
            batch = batch.shard_for_cp(shard.cp_size, shard.cp_rank)
        total, tokens = module.eval_loss([batch.to(device)])
        copies = tokens / len(sample.answers[candidate])  # data ranks that scored this sequence (dp)
        losses.append(total / copies)
    return losses


def needle_accuracy(module, samples: List[NeedleSample], shard: ShardInfo, device) -> Dict[str, object]:
    """Accuracy per length and depth (keys as text: JSON), their mean, and the true answers' mean loss per token
    (a continuous view of the same retrieval)."""
    hits: Dict[int, Dict[float, List[bool]]] = {}
    true_losses = []
    for sample in samples:
        losses = answer_losses(module, sample, shard, device)
        mine = losses[sample.true_index]
        correct = all(mine < loss for i, loss in enumerate(losses) if i != sample.true_index)
        hits.setdefault(sample.length, {}).setdefault(sample.depth, []).append(correct)
        true_losses.append(mine / len(sample.answers[sample.true_index]))
    table = {str(length): {f"{depth:g}": sum(h) / len(h) for depth, h in by_depth.items()}
             for length, by_depth in hits.items()}
    cells = [acc for by_depth in table.values() for acc in by_depth.values()]
    return {"needle": table, "needle_mean": sum(cells) / len(cells),
            "needle_answer_loss": sum(true_losses) / len(true_losses)}


def flat_metrics(result: Dict) -> Dict[str, float]:
    """A result as metrics names for metrics.jsonl and TensorBoard tags: long_eval/short_loss,
    long_eval/needle/len{L}/depth{d}, long_eval/needle/mean, long_eval/needle/answer_loss."""
    out = {}
    if "short_loss" in result:
        out["long_eval/short_loss"] = result["short_loss"]
    for length, by_depth in result.get("needle", {}).items():
        for depth, accuracy in by_depth.items():
            out[f"long_eval/needle/len{length}/depth{depth}"] = accuracy
    if "needle_mean" in result:
        out["long_eval/needle/mean"] = result["needle_mean"]
        out["long_eval/needle/answer_loss"] = result["needle_answer_loss"]
    return out


def summary_line(result: Dict) -> str:
    parts = [f"long-context eval at {result['when']} (step {result['step']})"]
    if "short_loss" in result:
        parts.append(f"short-context loss {result['short_loss']:.4f} at {result['short_seq_len']} tokens")
    if "needle_mean" in result:
        cells = "; ".join(f"len {length}: " + " ".join(f"{d}={a:.2f}" for d, a in by_depth.items())
                          for length, by_depth in result["needle"].items())
        parts.append(f"needle accuracy {result['needle_mean']:.3f} (chance {result['needle_chance']:.3f}; "
                     f"depth=accuracy {cells})")
    return " | ".join(parts)


class LongContextEvalCallback(Callback):
    """The evaluations at fit start (long_eval.at_start) and fit end, on every rank (they take collectives).
    The needle samples are generated here, before training, so a bad filler or length fails the run at once."""

    def __init__(self, cfg: JobConfig, tokenizer, rank: int, run_dir: Path, stream: Optional[TextIO] = None):
        self.cfg, self.rank, self.stream = cfg, rank, stream
        self.eod_id = tokenizer.eod_id
        self.path = run_dir / "long_eval.jsonl"
        e = cfg.long_eval
        self.samples = (make_samples(tokenizer, eval_lengths(cfg), e.needle_depths, e.needle_trials,
                                     e.needle_candidates, e.filler, e.seed) if e.needle_trials > 0 else [])
        # the data is opened (and checked) now; this rank's micro-batches are cut at fit start, when its shard is known
        self.short_blend = short_context_blend(cfg) if e.short_seq_len else None
        self.short_batches: Optional[List[Batch]] = None
        self.shard = ShardInfo()
        self.results: List[Dict] = []  # every evaluation of this process, as written

    def on_fit_start(self, trainer) -> None:
        loader = trainer.loader
        self.shard = ShardInfo(getattr(loader, "dp_rank", 0), getattr(loader, "dp_size", 1),
                               getattr(loader, "cp_rank", 0), getattr(loader, "cp_size", 1))
        if self.short_blend is not None and self.short_batches is None:
            self.short_batches = short_context_batches(self.cfg, self.short_blend, self.eod_id, self.shard)
        if self.cfg.long_eval.at_start:
            self.evaluate(trainer, "start")

    def on_fit_end(self, trainer) -> None:
        if trainer.state.step >= trainer.state.total_steps:  # not at a preemption stop: that is not the end
            self.evaluate(trainer, "end")

    def evaluate(self, trainer, when: str) -> Dict:
        e = self.cfg.long_eval
        result: Dict = {"step": trainer.state.step, "when": when}
        if self.short_batches:
            result.update(short_seq_len=e.short_seq_len,
                          **short_context_loss(trainer.module, self.short_batches, trainer.device))
        if self.samples:
            result.update(needle_candidates=e.needle_candidates, needle_trials=e.needle_trials,
                          needle_chance=1.0 / e.needle_candidates,
                          **needle_accuracy(trainer.module, self.samples, self.shard, trainer.device))
        self.results.append(result)
        if self.rank == 0:
            self._record(trainer, result)
        return result

    def _record(self, trainer, result: Dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open_append(self.path, "the long-context evaluation's records") as f:
            f.write(scrub(json.dumps(strict_record(result), allow_nan=False)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        records = getattr(trainer, "eval_records", None)
        if records is not None:
            records.append({"step": result["step"], "event": f"long_eval_{result['when']}", **flat_metrics(result)})
        if self.stream is not None:
            print(scrub(summary_line(result)), file=self.stream, flush=True)


def build_long_eval(cfg: JobConfig, stream: Optional[TextIO]) -> LongContextEvalCallback:
    """The callback for engine/run.py build_callbacks (every rank; rank 0 writes)."""
    from engine.data.tokenizer import load_tokenizer
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(cfg.log.run_dir) / cfg.log.name
    return LongContextEvalCallback(cfg, load_tokenizer(cfg.data.tokenizer), rank, run_dir,
                                   stream if rank == 0 else None)
