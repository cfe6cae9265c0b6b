"""Needle-in-a-haystack samples that herd generates itself, token by token, in the run's tokenizer.

A haystack of `length` tokens is filler text (a user's file or herd's built-in sentences) with one "needle"
sentence planted at a depth, then a question whose answer is the needle's value:

    <filler ...> The secret number of Tavo Rimsel is 48213. <filler ...> What is the secret number of Tavo
    Rimsel? The secret number of Tavo Rimsel is| 48213

The sample is exactly `length` + 1 tokens (inputs and targets of one training sequence of `length`), the answer
being the last tokens, so the evaluation runs at the exact length a context-parallel layout can cut. Depth d puts
the needle at the sentence boundary of the filler nearest to d x (filler tokens): 0 is the first token of the
sequence, 1 is right before the question (Kamradt's NIAH convention of depth as a share of the context).

Each sample carries `candidates` answers: the true value and distractors drawn to have the same number of tokens
(so a summed answer loss compares like with like), the true one at a uniformly random index among them. A model
that ignores the context therefore picks the true value with probability exactly 1 / candidates.
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from engine.data.loader import Batch
from engine.errors import ConfigError

# Built-in filler: sentences assembled from these words by a seeded generator (herd's own word lists).
_SUBJECTS = ["the farmer", "a young engineer", "the old clockmaker", "our neighbour", "the river pilot",
             "a travelling painter", "the night baker", "the harbour master", "a curious student", "the mayor",
             "the gardener", "a quiet librarian", "the ferry captain", "the weaver", "a retired teacher"]
_VERBS = ["repaired", "painted", "carried", "measured", "described", "sold", "found", "counted", "cleaned",
          "studied", "borrowed", "packed", "polished", "sketched", "weighed"]
_ADJECTIVES = ["wooden", "heavy", "narrow", "bright", "broken", "quiet", "copper", "crooked", "empty", "dusty",
               "green", "woollen", "ancient", "tiny", "painted"]
_OBJECTS = ["boat", "lantern", "fence", "cart", "bridge", "chair", "window", "barrel", "map", "bell", "ladder",
            "basket", "wheel", "kettle", "gate"]
_PLACES = ["near the mill", "by the market", "behind the chapel", "along the canal", "in the orchard",
           "at the station", "under the old oak", "beside the school", "on the hill", "across the square"]
_TIMES = ["in the morning", "before the rain", "after supper", "on a cold Tuesday", "late in the autumn",
          "during the fair", "at dawn", "that summer", "every spring", "once a week"]
_ENDINGS = ["and nobody seemed to mind.", "while the dogs slept.", "as the bells rang.", "and then went home.",
            "without saying a word.", "because it had to be done.", "with great care.", "for the third time."]
_SYLLABLES = ["ta", "vo", "rim", "sel", "ka", "dor", "mi", "len", "bra", "nu", "quo", "zan", "fe", "lis", "gor",
              "pe", "tru", "han", "vek", "os", "il", "mar", "du", "sy"]

NEEDLE = " The secret number of {name} is {value}."
QUESTION = " What is the secret number of {name}? The secret number of {name} is"
ANSWER = " {value}"


def builtin_sentences(seed: int) -> Iterator[str]:
    """An endless, seeded stream of plain English filler sentences (varied templates over the word lists)."""
    rng = random.Random(f"herd-filler-{seed}")
    while True:
        subject, verb = rng.choice(_SUBJECTS), rng.choice(_VERBS)
        thing = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)}"
        form = rng.randrange(4)
        if form == 0:
            text = f"{subject} {verb} {thing} {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        elif form == 1:
            text = f"{rng.choice(_TIMES)}, {subject} {verb} {thing} {rng.choice(_ENDINGS)}"
        elif form == 2:
            text = f"{subject} {verb} {thing}, {rng.choice(_ENDINGS)}"
        else:
            text = f"{rng.choice(_PLACES)} {subject} {verb} {thing} and {thing.replace('the', 'a', 1)}."
        yield text[0].upper() + text[1:]


def file_sentences(path: str) -> List[str]:
    """The sentences of a UTF-8 text file (split after . ! ? and at blank lines), whitespace collapsed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("long_eval.filler", f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError("long_eval.filler", f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError("long_eval.filler", f"{path}: cannot be read ({e.strerror})") from None
    pieces = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    sentences = [" ".join(p.split()) for p in pieces]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ConfigError("long_eval.filler", f"{path}: holds no text to fill a haystack with")
    return sentences


class FillerPool:
    """Tokenized filler sentences, enough for the longest haystack twice over (so trials start at different
    places); a file shorter than that is reused from its start."""

    def __init__(self, tokenizer, max_tokens: int, filler: str = "", seed: int = 0):
        source = iter(file_sentences(filler)) if filler else builtin_sentences(seed)
        self.sentences: List[List[int]] = []  # token ids of " " + sentence
        total, chunk = 0, 512
        while total < 2 * max_tokens:
            texts = [" " + s for _, s in zip(range(chunk), source)]
            if not texts:  # the file is used up
                break
            for ids in tokenizer.encode_batch(texts):
                if ids:
                    self.sentences.append(ids)
                    total += len(ids)
        if not self.sentences:
            raise ConfigError("long_eval.filler", f"{filler}: tokenizes to no tokens")

    def take(self, count: int, rng: random.Random) -> Tuple[List[int], List[int]]:
        """`count` filler tokens from a random sentence on (the last sentence cut), and the start of every
        sentence in them (0 first)."""
        index = rng.randrange(len(self.sentences))
        tokens: List[int] = []
        starts: List[int] = []
        while len(tokens) < count:
            starts.append(len(tokens))
            tokens.extend(self.sentences[index % len(self.sentences)])
            index += 1
        return tokens[:count], starts


@dataclass
class NeedleSample:
    """One haystack with its candidate answers. `prefix` is the sample's tokens up to the answer."""

    length: int  # sequence length (tokens of input)
    depth: float  # requested depth in [0, 1]
    prefix: np.ndarray  # [length + 1 - answer tokens] int64: filler, needle, filler, question
    answers: List[List[int]]  # each candidate's answer tokens (all of one length)
    true_index: int  # which candidate is the needle's value
    needle_start: int  # token position of the needle sentence in the sequence
    needle_tokens: int  # its length in tokens
    filler_tokens: int  # filler tokens in the sample (the haystack the depth is a share of)

    def tokens(self, candidate: int) -> np.ndarray:
        return np.concatenate([self.prefix, np.asarray(self.answers[candidate], dtype=np.int64)])  # [length + 1]

    def batch(self, candidate: int) -> Batch:
        """The sequence with this candidate's answer as one micro-batch of one row ([1, length] tensors), the
        loss mask on the answer's target positions only. It is one document, so it needs no document mask (the
        plain causal path: no document ids). Cut it for context parallelism with shard_for_cp."""
        tokens = torch.from_numpy(self.tokens(candidate)).unsqueeze(0)  # [1, length + 1]
        answer = len(self.answers[candidate])
        mask = torch.zeros(1, self.length, dtype=torch.bool)  # [1, length]
        mask[:, self.length - answer:] = True
        positions = torch.arange(self.length).unsqueeze(0)  # [1, length]
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask, positions, None,
                     torch.zeros(1, dtype=torch.int64), answer)


def _name(rng: random.Random) -> str:
    word = (lambda n: "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize())
    return f"{word(2)} {word(rng.randint(2, 3))}"


def _candidate_values(tokenizer, count: int, rng: random.Random) -> Tuple[List[int], List[List[int]]]:
    """`count` distinct five-digit values whose answers tokenize to the same number of tokens as the first."""
    values: List[int] = []
    answers: List[List[int]] = []
    taken = set()  # membership in O(1): a list made this quadratic in `count`
    for _ in range(200):  # many five-digit numbers share any token count a real tokenizer gives them
        drawn = [rng.randrange(10000, 100000) for _ in range(4 * count)]
        for value, ids in zip(drawn, tokenizer.encode_batch([ANSWER.format(value=v) for v in drawn])):
            if value not in taken and (not answers or len(ids) == len(answers[0])):
                taken.add(value)
                values.append(value)
                answers.append(ids)
            if len(values) == count:
                return values, answers
    raise ConfigError("long_eval.needle_candidates", f"found only {len(values)} five-digit values of "
                      f"{len(answers[0])} tokens in this tokenizer; use fewer candidates")


def _needle_parts(tokenizer, candidates: int, rng: random.Random) -> Tuple[List[List[int]], int, List[int],
                                                                         List[int]]:
    """(candidate answers' ids, the true one's index, the needle's ids, the question's ids) of one haystack."""
    name = _name(rng)
    values, answers = _candidate_values(tokenizer, candidates, rng)
    true_index = rng.randrange(candidates)
    needle, question = tokenizer.encode_batch([NEEDLE.format(name=name, value=values[true_index]),
                                               QUESTION.format(name=name)])
    return answers, true_index, needle, question


def check_needle_room(tokenizer, lengths: Sequence[int], candidates: int, seed: int = 0) -> None:
    """Before a run (a recipe's later stage): each haystack length holds a needle, its question and answer and
    some filler, for a few draws of names and values (make_sample checks each haystack again)."""
    rng = random.Random(seed)
    need = max(sum(len(p) for p in (answers[0], needle, question))
               for answers, _, needle, question in (_needle_parts(tokenizer, candidates, rng) for _ in range(8)))
    for length in lengths:
        if length + 1 - need < 1:
            raise ConfigError("long_eval.needle_lengths", f"{length} tokens cannot hold the needle, the question "
                              f"and the answer ({need} tokens) and any filler")


def make_sample(tokenizer, pool: FillerPool, length: int, depth: float, candidates: int,
                rng: random.Random) -> NeedleSample:
    """One haystack of `length` tokens with the needle at `depth`, and its candidate answers."""
    answers, true_index, needle, question = _needle_parts(tokenizer, candidates, rng)
    filler_count = length + 1 - len(needle) - len(question) - len(answers[0])
    if filler_count < 1:
        raise ConfigError("long_eval.needle_lengths", f"{length} tokens cannot hold the needle, the question and "
                          f"the answer ({length + 1 - filler_count} tokens) and any filler")
    filler, starts = pool.take(filler_count, rng)
    boundaries = starts + [filler_count]
    at = min(boundaries, key=lambda b: (abs(b - depth * filler_count), b))  # nearest sentence boundary
    prefix = np.asarray(filler[:at] + needle + filler[at:] + question, dtype=np.int64)
    return NeedleSample(length, depth, prefix, answers, true_index, at, len(needle), filler_count)


def make_samples(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, candidates: int,
                 filler: str = "", seed: int = 0, pool: Optional[FillerPool] = None) -> List[NeedleSample]:
    """trials haystacks per (length, depth), in that order; the same for a given seed on every rank and run."""
    pool = pool or FillerPool(tokenizer, max(lengths), filler, seed)
    samples = []
    for length in lengths:
        for d, depth in enumerate(depths):
            for trial in range(trials):
                rng = random.Random(f"herd-needle-{seed}-{length}-{d}-{trial}")
                samples.append(make_sample(tokenizer, pool, length, depth, candidates, rng))
    return samples
