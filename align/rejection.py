"""Rejection sampling (Llama 3 paper section 4.2.2): for each prompt, sample K outputs from the latest policy, score
them with the reward model and keep the best as new SFT data.

Input: JSONL prompt rows, TRL style: {"prompt": str | [messages]} or {"messages": [...]}, the dialog so far ending
with a user turn. Every other field (an id, a test) is copied to the output row. Output: one SFT row per prompt,
{"messages": dialog + [best answer], "score", "samples": K, "mean_score", "stopped": how many of the K ended with
<|eot_id|>, ...copied fields}, in prompt-file order, written atomically by rank 0 (an existing output file is
complete by construction and is returned as it is: the stage does not run twice).

Which answer is kept: the highest-scored among those that stopped with a stop id and are not empty; a completion
cut off at max_new_tokens is kept only when none stopped (an unfinished answer teaches the model to ramble), an
empty one never (the SFT loader would drop it). A completion whose dialog does not fit data.seq_len after
re-encoding cannot be scored the way the reward model was trained and is left out.

Scoring is the reward model's training read-out exactly: the whole dialog (prompt + answer, Llama 3 chat format,
the answer re-encoded from its decoded text as the SFT data will hold it) right-padded to data.seq_len with the
end-of-text id, the scalar head read at the last token (align/preference.reward_sequence,
RewardTrainModule.rewards: summed over tp and cp).

Layouts: tp, dp (incl. FSDP) and cp; not pp (generation does not support it). Prompts are split over data-parallel
ranks (prompt i to dp rank i mod dp); tp and cp ranks of one dp rank hold the same prompts. Sample j of prompt i is
seeded by (sampling.seed, i, j), so what is drawn does not depend on the layout (up to rounding, see
align/generate.py). Under FSDP every data rank must run equally many forwards: generation rounds and scoring
forwards are counted from the largest dp share, which every rank computes alike, and a rank with less work runs
empty forwards. The policy is dropped before the reward model is built, so only one model is in memory at a time.
"""

import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint.checkpointer import Checkpointer
from engine.checkpoint.sharded import saved_shape
from engine.checkpoint.store import CheckpointError, CheckpointStore
from engine.config import JobConfig
from engine.data.loader import Batch
from engine.data.tokenizer import load_tokenizer
from engine.errors import ConfigError
from engine.files import file_problem
from engine.run import build_module, setup_distributed
from engine.secrets import scrub
from engine.train_module import LMTrainModule
from parallel.mesh import Mesh

from align.chat import ChatFormatError, ChatTokens, alternation_problem, chat_format, check_messages
from align.formats import AlignDataError, SkipCounts, blank, read_jsonl, rows_of, skip_report, write_jsonl
from align.generate import SamplingConfig, sample_k
from align.modules import RewardTrainModule
from align.preference import reward_sequence
from align.run import scalar_head

# keys the output row sets itself; a prompt row's own values for them are not copied ("prompt" becomes messages)
OUTPUT_KEYS = ("messages", "prompt", "score", "samples", "mean_score", "stopped")


@dataclass
class Prompt:
    index: int  # the row's 0-based position in the prompt file: the id its samples are seeded with
    line: int
    messages: List[Dict[str, str]]
    extra: Dict[str, Any]  # fields copied to the output row
    tokens: List[int]  # the generation prompt: the dialog plus an open assistant header


@dataclass
class Candidate:
    text: str  # decoded answer, stripped as the chat format stores it
    stopped: bool  # ended with a stop id (not cut off at max_new_tokens)
    dialog: Optional[ChatTokens]  # prompt + answer as the reward model reads it; None: too long to score
    score: Optional[float] = None
    control: bool = False  # ended in a control token other than a stop id (a header, end of text): dropped


@dataclass
class Choice:
    """The outcome for one prompt, as gathered from the data-parallel ranks."""

    index: int
    row: Optional[Dict[str, Any]]  # the output row, None when no sample was usable
    stopped: int = 0  # samples that ended with a stop id
    unscorable: int = 0  # samples too long to score
    control: int = 0  # samples that produced a control token other than a stop id (never kept)
    row_stopped: bool = False  # whether the kept answer stopped
    candidates: List[Dict[str, Any]] = field(default_factory=list)  # every sample's text, stopped, score


def _say(stream: TextIO, line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(scrub(line), file=stream, flush=True)


def _fail(path, line: int, what: str, reason: str) -> AlignDataError:
    """A malformed prompt row; `reason` is what data.on_bad_data=skip counts it under."""
    return AlignDataError(f"{path}:{line}: {' '.join(str(what).split())}", reason)


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_messages(path, line: int, row: Dict[str, Any]) -> List[Dict[str, str]]:
    """The dialog of a prompt row: a string prompt is one user message; the dialog must end with a user turn, and
    its turns alternate as an SFT row's must (its answer becomes one)."""
    if "messages" in row and "prompt" in row:  # the prompt was silently dropped
        raise _fail(path, line, "holds both 'messages' and 'prompt': give one form of the row", "bad_messages")
    if "messages" in row:
        key, value = "messages", row["messages"]
    elif "prompt" in row:
        key, value = "prompt", row["prompt"]
    else:
        raise _fail(path, line, f"expected 'prompt' or 'messages' (found keys: {', '.join(sorted(row)) or 'none'})",
                    "no_prompt")
    if isinstance(value, str):
        if key == "messages":
            raise _fail(path, line, "messages: expected a list of messages, got a string", "bad_messages")
        value = [{"role": "user", "content": value}]
    try:
        check_messages(value, key)
    except ChatFormatError as e:
        raise _fail(path, line, str(e), "bad_messages") from None
    if not value or value[-1]["role"] != "user":
        last = value[-1]["role"] if value else "nothing"
        raise _fail(path, line, f"{key}: the dialog must end with a user turn to answer, it ends with {last}",
                    "prompt_not_ending_with_user")
    problem = alternation_problem(value)  # the SFT rows this stage writes must pass the SFT reader's check
    if problem:
        raise _fail(path, line, f"{key}[{problem[0]}].role: {problem[1]}", "turns_not_alternating")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_prompts(path, tokenizer, max_prompt_tokens: int, on_bad_data: str = "error"
                 ) -> Tuple[List[Prompt], SkipCounts]:
    """Every row of the prompt file. A prompt longer than max_prompt_tokens (no room left to answer and still be
    scored within data.seq_len) is always skipped and counted; a malformed row raises with its file and line, or
    is counted and left out under on_bad_data="skip"."""
    fmt, counts = chat_format(tokenizer), SkipCounts(path=str(path))

    def parse(line: int, row: Dict[str, Any]) -> Optional[Prompt]:
        messages = prompt_messages(path, line, row)
        tokens = fmt.generation_prompt(messages).tokens
        if len(tokens) > max_prompt_tokens:
            counts.skip("prompt_too_long", line)
            return None
        return Prompt(counts.rows - 1, line, messages, {k: v for k, v in row.items() if k not in OUTPUT_KEYS},
                      tokens)

    prompts = [prompt for _, prompt in rows_of(path, on_bad_data, counts, parse) if prompt is not None]
    return prompts, counts


def skipped_file(output_file) -> Path:
    """Where rejection sampling says which prompt rows it left out and why (skipped.json's format, engine/data/
    skips.py): beside the rows it wrote, e.g. <stage>/rows.skipped.json."""
    output = Path(output_file)
    return output.with_name(output.stem + ".skipped.json")


def load_stage_prompts(cfg: JobConfig, prompts_file: str, tokenizer, max_new_tokens: int,
                       key: str = "prompts") -> Tuple[List[Prompt], SkipCounts]:
    """The prompts a stage answers: each must leave max_new_tokens of room within the reward model's training
    length (data.seq_len, within the RoPE limit); malformed rows follow data.on_bad_data. A missing file, or one
    without a usable prompt, is one line."""
    problem = file_problem(prompts_file)
    if problem:
        raise ConfigError(key, f"{prompts_file} {problem}")
    # a sample cut at max_new_tokens is scored with an <|eot_id|> appended: a prompt leaves room for both
    room = min(cfg.data.seq_len, cfg.model.max_seq_len) - max_new_tokens - 1
    if room < 1:  # said of the setting, not as "every prompt is too long"
        raise ConfigError(key.rsplit(".", 1)[0] + ".max_new_tokens" if "." in key else "max_new_tokens",
                          f"{max_new_tokens} leaves no room for a prompt within data.seq_len={cfg.data.seq_len} "
                          f"and model.max_seq_len={cfg.model.max_seq_len} (and the end-of-turn token)")
    prompts, skipped = read_prompts(prompts_file, tokenizer, room, cfg.data.on_bad_data)
    if not prompts:
        raise AlignDataError(f"{prompts_file}: no usable prompt ({skipped.summary()})")
    return prompts, skipped


# ---------------------------------------------------------------------------------------------------------------
# Models


def load_stage_module(cfg: JobConfig, device: torch.device, mesh: Optional[Mesh], root, **build_options
                      ) -> LMTrainModule:
    """The engine's module for this layout with its weights from the newest complete checkpoint under `root`
    (the path engine/run.build_trainer takes for checkpoint.load_weights), in eval mode."""
    module = build_module(cfg, device, mesh, **build_options)
    reader = Checkpointer(CheckpointStore(Path(root)), module, loader=None, train_state=None, config_yaml="",
                          layout={})
    reader.identity = {"vocab_sha256": load_tokenizer(cfg.data.tokenizer).vocab_fingerprint}  # its ids are ours
    reader.load_weights(Path(root), cfg.model)
    module.parallel.train(False)
    return module


def check_model_kind(root, reward: bool, key: str) -> None:
    """`root`'s newest checkpoint is a reward model (a 1-row scalar head) when `reward`, else a policy: the other
    kind failed with a shape error naming neither the key nor the kind, after every sample was generated (H44)."""
    try:
        shape = saved_shape(Path(root), "model.output.weight")
    except CheckpointError:  # a damaged checkpoint: its load says so, naming the file
        return
    if shape is None or (shape[0] == 1) == reward:
        return
    have, want = ("a policy", "a reward model") if reward else ("a reward model", "a policy (sft or dpo)")
    raise ConfigError(key, f"{root} holds {have} (its output head is {shape[0]} x {shape[1]}), not {want}")


def _release(module: LMTrainModule) -> None:
    """Free a model's memory before the next one is built (only one of policy and reward model at a time)."""
    module.parallel.parts.clear()
    module.optimizer = None
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@torch.no_grad()
def score_dialogs(module: RewardTrainModule, dialogs: Sequence[Optional[ChatTokens]], width: int, pad_id: int,
                  rows_per_forward: int, forwards: int = 0) -> List[Optional[float]]:
    """The reward of each dialog (None where the dialog is None), `rows_per_forward` dialogs per forward.

    forwards: run at least this many forwards, the extra ones on one padding row (FSDP: every data rank must run
    as many forwards as the busiest). Every tp and cp rank must call this with the same dialogs.
    """
    mesh = module.parallel.mesh
    cp, cp_rank = (mesh.dims.cp, mesh.rank("cp")) if mesh is not None else (1, 0)
    scores: List[Optional[float]] = []
    count = max(forwards, math.ceil(len(dialogs) / rows_per_forward))
    for begin in range(0, count * rows_per_forward, rows_per_forward):
        chunk = list(dialogs[begin:begin + rows_per_forward]) or [None]  # an empty forward for lockstep
        rows = [reward_sequence(d, width, pad_id) for d in chunk]  # (inputs [s], mask [s]) each
        inputs = torch.from_numpy(np.stack([r[0] for r in rows]))  # [n, s]
        mask = torch.from_numpy(np.stack([r[1] for r in rows]))  # [n, s]
        positions = torch.arange(width).expand(len(rows), width).contiguous()  # [n, s]
        batch = Batch(inputs, torch.zeros_like(inputs), mask, positions, None, torch.arange(len(rows)),
                      int(mask.sum()))
        if cp > 1:
            batch = batch.shard_for_cp(cp, cp_rank)
        batch = batch.to(module.device)
        with module.autocast():  # the training forward's precision (bf16 autocast or fp32)
            logits = module.parallel.model(batch.inputs, batch.position_ids, None)  # [n, s / cp, 1 (shard)]
        rewards = module.rewards(logits, batch.loss_mask).tolist()  # [n], whole on every tp and cp rank
        if begin < len(dialogs):  # a lockstep forward's padding row is not a result
            scores += [r if d is not None else None for d, r in zip(chunk, rewards)]
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Sampling and choosing


def _candidates(prompt: Prompt, completions: List[List[int]], ends: Sequence[int], halts: Sequence[int],
                tokenizer, width: int) -> List[Candidate]:
    """A prompt's K completions (token ids, a final stop id included) as decoded answers and scoring dialogs.
    `ends`: ids that end an answer (<|eot_id|>); `halts`: the other control ids, after which a sample is
    dropped, not decoded: an answer that opens the next header or ends the text is not an answer, and its control
    token would be stored as literal text in the SFT rows (a bad-input hunt, helper H44)."""
    end, halt = set(ends), set(halts) - set(ends)
    stopped = [bool(tokens) and tokens[-1] in end for tokens in completions]
    control = [bool(tokens) and tokens[-1] in halt for tokens in completions]
    texts = ["" if broken else tokenizer.decode(tokens[:-1] if ended else tokens).strip()
             for tokens, ended, broken in zip(completions, stopped, control)]
    dialogs = chat_format(tokenizer).encode_dialogs(
        [prompt.messages + [{"role": "assistant", "content": text}] for text in texts])
    return [Candidate(text, ended, dialog if len(dialog.tokens) <= width and not broken else None, control=broken)
            for text, ended, broken, dialog in zip(texts, stopped, control, dialogs)]


def generate_candidates(policy: LMTrainModule, prompts: List[Prompt], k: int, sampling: SamplingConfig, tokenizer,
                        width: int, rounds: int, per_round: int, ends: Sequence[int] = ()) -> List[List[Candidate]]:
    """K candidates for each of this rank's prompts, `per_round` prompts per generate call. `rounds` is the same
    on every data-parallel rank (FSDP runs generation in lockstep); a rank out of prompts still takes part."""
    out: List[List[Candidate]] = []
    for round_index in range(rounds):
        chunk = prompts[round_index * per_round:(round_index + 1) * per_round]
        completions = sample_k(policy.parallel, [p.tokens for p in chunk], k, sampling,
                               prompt_ids=[p.index for p in chunk])  # [prompts][k][tokens]
        out += [_candidates(p, c, ends or sampling.stop_ids, sampling.stop_ids, tokenizer, width)
                for p, c in zip(chunk, completions)]
    return out


def choose_best(candidates: Sequence[Candidate]) -> Optional[int]:
    """Index of the candidate to keep: the best score among the non-empty ones that stopped, else among all
    non-empty ones (none stopped), the first of equal scores; None if no candidate is scored and non-empty."""
    usable = [j for j, c in enumerate(candidates) if c.score is not None and not blank(c.text)]  # the SFT reader's
    # empty: an answer of zero-width characters would stop the next stage on herd's own rows (H47)
    pool = [j for j in usable if candidates[j].stopped] or usable
    if not pool:
        return None
    return max(pool, key=lambda j: (candidates[j].score, -j))


def make_choice(prompt: Prompt, candidates: List[Candidate], keep_candidates: bool = False) -> Choice:
    scores = [c.score for c in candidates]
    scored = [s for s in scores if s is not None]
    choice = Choice(prompt.index, None, sum(c.stopped for c in candidates),
                    sum(c.score is None and not c.control for c in candidates), sum(c.control for c in candidates),
                    candidates=[{"text": c.text, "stopped": c.stopped, "score": c.score, "control": c.control}
                                for c in candidates]
                    if keep_candidates else [])
    best = choose_best(candidates)
    if best is not None:
        choice.row = {"messages": prompt.messages + [{"role": "assistant", "content": candidates[best].text}],
                      "score": candidates[best].score, "samples": len(candidates),
                      "mean_score": sum(scored) / len(scored), "stopped": choice.stopped, **prompt.extra}
        choice.row_stopped = candidates[best].stopped
    return choice


def gather_choices(choices: List[Choice], mesh: Optional[Mesh]) -> List[Choice]:
    """Every data-parallel rank's choices on every rank, in prompt-file order (tp and cp ranks already agree)."""
    if mesh is not None and mesh.dims.dp > 1:
        parts: List[Any] = [None] * mesh.dims.dp
        dist.all_gather_object(parts, choices, group=mesh.dp_mesh.get_group())
        choices = [c for part in parts for c in part]
    return sorted(choices, key=lambda c: c.index)


# ---------------------------------------------------------------------------------------------------------------
# Statistics and the stage


def stats_of_rows(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What can be read off the output rows alone (so a finished output file gives the same numbers)."""
    k = int(rows[0]["samples"]) if rows else 0
    completions = sum(int(r["samples"]) for r in rows)
    return {"prompts": len(rows), "samples": k, "completions": completions,
            "mean_best_score": sum(r["score"] for r in rows) / max(1, len(rows)),
            "mean_score": sum(r["mean_score"] for r in rows) / max(1, len(rows)),
            "stopped_fraction": sum(int(r["stopped"]) for r in rows) / max(1, completions)}


def _finished_stats(output_file: str) -> Optional[Dict[str, Any]]:
    """The stats of an existing output file (written atomically, so existing means complete), or None."""
    if not Path(output_file).is_file():
        return None
    rows = [row for _, row in read_jsonl(output_file)]
    for index, row in enumerate(rows):
        missing = [k for k in ("messages", "score", "samples", "mean_score", "stopped") if k not in row]
        if missing:
            raise AlignDataError(f"{output_file}:{index + 1}: not a rejection-sampling output row "
                                 f"(missing {', '.join(missing)}); move it away to sample again")
    return {**stats_of_rows(rows), "output": str(output_file), "resumed": True}


def _agree(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _summary(stats: Dict[str, Any]) -> str:
    line = (f"rejection sampling: {stats['prompts']} prompts x {stats['samples']} samples -> {stats['output']}: "
            f"mean best score {stats['mean_best_score']:.4f}, mean score {stats['mean_score']:.4f}, "
            f"{stats['stopped_fraction']:.1%} of samples stopped")
    if stats.get("resumed"):
        return line + " (the output existed already: nothing sampled)"
    return (line + f"; {stats['best_unstopped']} kept answers did not stop, {stats['unscorable']} samples too long "
            f"to score, {stats['control_token']} dropped for a control token other than the end of turn, "
            f"{stats['no_usable_sample']} prompts without a usable sample; prompts: {stats['skipped']} "
            f"({stats['seconds']:.1f} s)")


def _check_request(cfg: JobConfig, samples: int, sampling: SamplingConfig) -> None:
    if cfg.parallel.pp > 1:
        raise ConfigError("parallel.pp", "rejection sampling runs under tp/dp/cp layouts, not pp "
                                         "(generation does not support pipeline parallelism)")
    if samples < 1:
        raise ConfigError("samples", f"expected at least 1 completion per prompt, got {samples}")
    if sampling.max_new_tokens >= min(cfg.data.seq_len, cfg.model.max_seq_len):
        raise ConfigError("max_new_tokens", f"{sampling.max_new_tokens} leaves no room for a prompt within "
                          f"data.seq_len={cfg.data.seq_len} and model.max_seq_len={cfg.model.max_seq_len}")


def _score_candidates(cfg: JobConfig, device: torch.device, mesh: Optional[Mesh], reward_root,
                      candidates: List[Candidate], pad_id: int, largest_count: int) -> None:
    """Set every candidate's score with the reward model (built here, released after). largest_count: the most
    candidates any data-parallel rank holds (FSDP: every rank runs as many forwards as that one)."""
    reward = load_stage_module(cfg, device, mesh, reward_root, adapt_model=scalar_head,
                               module_factory=RewardTrainModule)
    rows_per_forward = 3 * cfg.data.micro_batch_size  # the reward model's training forward: 3 blocks of m rows
    lockstep = math.ceil(largest_count / rows_per_forward) if reward.parallel.fsdp else 0
    scores = score_dialogs(reward, [c.dialog for c in candidates], cfg.data.seq_len, pad_id, rows_per_forward,
                           lockstep)
    for candidate, score in zip(candidates, scores):
        candidate.score = score
    _release(reward)


def run_rejection_sampling(cfg: JobConfig, policy_root: str, reward_root: str, prompts_file: str, output_file: str,
                           samples: int, sampling: SamplingConfig, stream: TextIO = sys.stdout,
                           rows_per_generate: int = 256, keep_candidates: bool = False) -> Dict[str, Any]:
    """Sample `samples` answers per prompt from the policy, keep the reward model's favourite, write SFT rows.

    policy_root, reward_root: checkpoint roots (the newest complete checkpoint is loaded, any layout).
    rows_per_generate: prompt copies per generate call (bounds the KV-cache memory).
    keep_candidates: also return, per output row, every sample's {text, stopped, score} (stats["candidates"]).
    Returns the stats on every rank; rank 0 writes output_file and prints one summary line.
    """
    started = time.perf_counter()
    _check_request(cfg, samples, sampling)
    device, mesh = setup_distributed(cfg)
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    finished = _agree(_finished_stats(output_file) if is_rank0 else None)
    if finished is not None:
        _say(stream, _summary(finished))
        return finished
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}, {tokenizer.name})")
    width = cfg.data.seq_len  # the reward model's training length: dialogs are scored padded to it
    ends = tuple(dict.fromkeys([*sampling.stop_ids, tokenizer.token_id("<|eot_id|>")]))  # an answer ends here
    # generation also halts at every other control id; such a sample is dropped (_candidates)
    sampling = replace(sampling, stop_ids=tuple(dict.fromkeys([*ends, *tokenizer.control_ids()])))
    prompts, skipped = load_stage_prompts(cfg, prompts_file, tokenizer, sampling.max_new_tokens)
    check_model_kind(policy_root, False, "init")  # before hours of sampling, not after
    check_model_kind(reward_root, True, "reward")

    dp_rank, dp_size = (mesh.dp_rank, mesh.dims.dp) if mesh is not None else (0, 1)
    mine = prompts[dp_rank::dp_size]
    largest_share = math.ceil(len(prompts) / dp_size)  # every rank computes the lockstep counts alike
    per_round = max(1, rows_per_generate // samples)
    policy = load_stage_module(cfg, device, mesh, policy_root)
    candidates = generate_candidates(policy, mine, samples, sampling, tokenizer, width,
                                     math.ceil(largest_share / per_round), per_round, ends)
    _release(policy)
    del policy
    _score_candidates(cfg, device, mesh, reward_root, [c for per_prompt in candidates for c in per_prompt],
                      tokenizer.eod_id, largest_share * samples)
    choices = gather_choices([make_choice(p, c, keep_candidates) for p, c in zip(mine, candidates)], mesh)
    rows = [c.row for c in choices if c.row is not None]
    if not rows:
        raise AlignDataError(f"{prompts_file}: no prompt got a usable sample (all empty or too long to score)")
    if is_rank0:  # what was left out first: the rows file is what marks the stage finished
        skip_report([skipped]).write(skipped_file(output_file))
        write_jsonl(output_file, rows)
    if dist.is_initialized():
        dist.barrier()  # the file exists when any rank returns
    stats = {**stats_of_rows(rows), "output": str(output_file), "resumed": False, "prompts_read": skipped.rows,
             "skipped": skipped.summary(), "skipped_file": str(skipped_file(output_file)),
             "no_usable_sample": len(choices) - len(rows),
             "best_unstopped": sum(not c.row_stopped for c in choices if c.row is not None),
             "unscorable": sum(c.unscorable for c in choices), "control_token": sum(c.control for c in choices),
             "seconds": time.perf_counter() - started}
    if keep_candidates:
        stats["candidates"] = [c.candidates for c in choices if c.row is not None]
    _say(stream, _summary(stats))
    return stats
