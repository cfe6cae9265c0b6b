"""An offline downstream task for Llama 3's two-step prediction (section 3.2.1): multiple-choice next-line
prediction on the held-out documents of the sweep's validation data (data.valid; for the demo, Python source files
of the standard library that no run trained on).

A question: the last `context_tokens` tokens of a document up to the end of a line, and `choices` candidate next
lines: the true one and lines drawn from other held-out documents, given the true line's indentation (so the
choice is about content, not whitespace). Lines shorter than `min_line_chars` (stripped) are never asked or drawn.
A model answers with the candidate of lowest normalized NLL: the summed negative log-likelihood of the candidate's
tokens (the line and its newline) after the context, divided by the candidate's length in characters (nats per
character: it does not depend on how the tokenizer splits the line, as in the paper's normalized NLL of the
correct answer). Reported per model: mean normalized NLL of the correct answer and accuracy (chance 1 / choices).
"""

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from engine.config import DownstreamTaskConfig, JobConfig
from engine.errors import HerdError
from engine.files import write_atomic


@dataclass
class Question:
    context: List[int]  # token ids before the line
    candidates: List[str]  # candidate lines, each ending in a newline
    answer: int  # index of the true next line


def _documents(job: JobConfig, tokenizer) -> List[str]:
    """The text of every held-out document of data.valid (end-of-document tokens dropped)."""
    from engine.data.indexed import IndexedDataset
    if not job.data.valid:
        raise HerdError("downstream: the sweep's job has no data.valid (the task is built from held-out documents); "
                        "set one or downstream.enabled=false")
    texts = []
    for ds in job.data.valid:
        data = IndexedDataset(ds.path)
        for i in range(len(data)):
            ids = [int(t) for t in data[i] if int(t) != tokenizer.eod_id]
            texts.append(tokenizer.decode(ids))
    return texts


def build_task(texts: List[str], tokenizer, cfg: DownstreamTaskConfig) -> List[Question]:
    """`cfg.items` questions drawn with cfg.seed from lines that have at least context_tokens tokens before them."""
    rng = random.Random(cfg.seed)
    pool = [(d, line) for d, text in enumerate(texts) for line in text.split("\n")
            if len(line.strip()) >= cfg.min_line_chars]
    places = []
    for d, text in enumerate(texts):
        offset = 0
        for line in text.split("\n"):
            if len(line.strip()) >= cfg.min_line_chars and offset > 4 * cfg.context_tokens:  # enough text before
                places.append((d, offset, line))
            offset += len(line) + 1
    if len(places) < cfg.items or len({d for d, _ in pool}) < 2:
        raise HerdError(f"downstream.items: the held-out documents have {len(places)} lines to ask about, fewer than "
                        f"{cfg.items} (or a single document); lower downstream.items or min_line_chars")
    distinct = _distinct_lines(pool)
    questions = []
    for d, offset, line in rng.sample(places, cfg.items):
        # the draws below end only when the other documents hold choices - 1 distinct lines besides this one
        available = distinct(d, line.strip())
        if available < cfg.choices - 1:
            raise HerdError(f"downstream.choices: the held-out documents other than the one asked about hold "
                            f"{available} distinct lines of at least min_line_chars={cfg.min_line_chars} "
                            f"characters besides its answer, fewer than choices - 1 = {cfg.choices - 1}; lower "
                            f"downstream.choices or min_line_chars, or hold out more documents (data.valid)")
        before = texts[d][max(0, offset - 8 * cfg.context_tokens):offset]  # enough characters for the context's tokens
        context = tokenizer.encode_batch([before])[0][-cfg.context_tokens:]
        indent = line[:len(line) - len(line.lstrip())]
        others = set()
        while len(others) < cfg.choices - 1:
            other_doc, other = pool[rng.randrange(len(pool))]
            if other_doc != d and other.strip() != line.strip():
                others.add(indent + other.strip())
        candidates = [line] + sorted(others)
        rng.shuffle(candidates)
        questions.append(Question(context, [c + "\n" for c in candidates], candidates.index(line)))
    return questions


def _distinct_lines(pool: List[tuple]):
    """A function (document d, stripped line) -> how many distinct stripped lines of the pool lie in a document
    other than d and differ from that line: the distractors a question of d can get."""
    owners: dict = {}  # stripped line -> the documents holding it
    for d, line in pool:
        owners.setdefault(line.strip(), set()).add(d)
    only_in: dict = {}  # document -> lines no other document holds
    for docs in owners.values():
        if len(docs) == 1:
            only_in[next(iter(docs))] = only_in.get(next(iter(docs)), 0) + 1

    def count(d: int, line: str) -> int:
        elsewhere = bool(owners.get(line, set()) - {d})  # the answer's own text in another document is no distractor
        return len(owners) - only_in.get(d, 0) - elsewhere
    return count


def task_fingerprint(questions: List[Question]) -> str:
    """Identifies the question set (a cached score is reused only for the same questions)."""
    return hashlib.sha256(json.dumps([asdict(q) for q in questions]).encode()).hexdigest()[:16]


@torch.no_grad()
def score_model(model: torch.nn.Module, questions: List[Question], tokenizer, batch_rows: int = 32) -> dict:
    """Mean normalized NLL (nats per character) of the correct answer, and accuracy, of a plain (unparallelized)
    model. Rows are context + candidate, right-padded; the loss counts the candidate's tokens only."""
    model.eval()
    rows, owners = [], []
    room = getattr(getattr(model, "cfg", None), "max_seq_len", 1 << 62)  # a line longer than the context left (rare: one huge line) is scored on its start
    for q, question in enumerate(questions):
        for c, text in enumerate(question.candidates):
            ids = tokenizer.encode_batch([text])[0][:max(1, room - len(question.context))]
            rows.append((question.context, ids, len(text)))
            owners.append((q, c))
    nll = np.zeros((len(questions), len(questions[0].candidates)))  # [items, choices] nats per character
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        for (q, c), value in zip(owners[start:start + batch_rows], _candidate_nll(model, chunk)):
            nll[q, c] = value
    answers = np.array([q.answer for q in questions])
    correct = nll[np.arange(len(questions)), answers]
    return {"nll_correct": float(correct.mean()), "accuracy": float((nll.argmin(axis=1) == answers).mean()),
            "items": len(questions), "choices": len(questions[0].candidates)}


def _candidate_nll(model: torch.nn.Module, chunk: list) -> List[float]:
    """Summed NLL of each row's candidate tokens after its context, divided by the candidate's characters."""
    length = max(len(ctx) + len(cand) for ctx, cand, _ in chunk)
    tokens = torch.zeros(len(chunk), length, dtype=torch.long)  # [rows, s]; padding on the right, never attended
    target_mask = torch.zeros(len(chunk), length, dtype=torch.bool)  # [rows, s]: position predicts a candidate token
    for r, (ctx, cand, _) in enumerate(chunk):
        tokens[r, :len(ctx) + len(cand)] = torch.tensor(ctx + cand)
        target_mask[r, len(ctx) - 1:len(ctx) + len(cand) - 1] = True
    logits = model(tokens).float()  # [rows, s, vocab]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # [rows, s-1, vocab]
    picked = logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [rows, s-1]
    summed = -(picked * target_mask[:, :-1]).sum(dim=1)  # [rows]
    return [float(summed[r]) / chars for r, (_, _, chars) in enumerate(chunk)]


def load_final_model(checkpoint_root: Path) -> torch.nn.Module:
    """The newest complete checkpoint under the root as a plain model on CPU (any layout it was saved in)."""
    from engine.checkpoint.hf_export import load_weights
    from engine.checkpoint.manifest import configs_of
    from engine.checkpoint.store import CheckpointStore
    store = CheckpointStore(checkpoint_root, keep_last=2)
    step = store.latest_step()
    if step is None:
        raise HerdError(f"{checkpoint_root}: no complete checkpoint")
    manifest = store.verify(step)
    model_cfg, _ = configs_of(manifest, store.step_dir(step) / "manifest.json")
    model = load_weights(store, step, manifest, model_cfg)
    for module in model.modules():  # RoPE tables are buffers, not saved
        if hasattr(module, "reset_tables"):
            module.reset_tables()
    return model


def score_run(checkpoint_root: Path, questions: List[Question], tokenizer, cache: Path) -> dict:
    """The run's score, from its cache file when it was scored on the same questions before."""
    from scaling.runs import check_regular_file
    check_regular_file(cache, "a downstream score cache", "move it away (herd caches the run's score there)")
    fingerprint = task_fingerprint(questions)
    cached = _read_cache(cache)
    if cached is not None and cached.get("task") == fingerprint and _is_score(cached, questions):
        return cached
    result = {**score_model(load_final_model(checkpoint_root), questions, tokenizer), "task": fingerprint}
    write_atomic(cache, json.dumps(result) + "\n")
    return result


def _read_cache(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # cut, or nested too deeply: herd's own cache, scored again
        return None
    return value if isinstance(value, dict) else None


def _is_score(cached: dict, questions: List[Question]) -> bool:
    """A cached score as score_model writes it for these questions: a finite NLL >= 0 (nats per character), an
    accuracy in [0, 1], and the questions' count and choices. Anything else (fields missing, text, nan, an edited
    value) is a stale cache: the run is scored again, never fitted as it stands or a traceback."""
    values = [cached.get(k) for k in ("nll_correct", "accuracy", "items", "choices")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return False
    nll, accuracy, items, choices = values
    return nll >= 0 and 0 <= accuracy <= 1 and items == len(questions) and choices == len(questions[0].candidates)


def prepare_task(job: JobConfig, cfg: DownstreamTaskConfig):
    """(questions, tokenizer) of the sweep's job."""
    from engine.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(job.data.tokenizer)
    return build_task(_documents(job, tokenizer), tokenizer, cfg), tokenizer
