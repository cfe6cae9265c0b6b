"""Heuristic filters datatrove lacks (Llama 3 section 3.1.2), as datatrove filters.

- Dirty-word counting: occurrences of the user's words or phrases (whole words, case-insensitive); a document
  holding more than `max_count` is removed (the paper uses such counts to drop adult websites).
- Token-distribution KL divergence: "documents containing excessive numbers of outlier tokens compared to the
  training corpus distribution" are removed. The corpus unigram distribution q over lowercased word tokens is
  counted in a first pass (TokenCountSignature per task, TokenCountMerge over all); a document with unigram
  distribution p is removed when KL(p || q) = sum_t p(t) log(p(t) / q(t)) exceeds `max_kl` nats. q is add-one
  smoothed, q(t) = (c(t) + 1) / (N + V), so a token unseen in the corpus has a finite, large cost. Documents with
  fewer than `min_words` tokens are not scored: their p is too coarse for the divergence to mean anything.
"""

import math
import re
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def _hashes(tokens: List[str]) -> List[int]:
    return [xxhash.xxh64_intdigest(t) for t in tokens]


def read_word_list(path: str) -> List[str]:
    """One word or phrase per line; blank lines and lines starting with # are ignored."""
    words = [line.strip().lower() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [w for w in words if w and not w.startswith("#")]


class DirtyWordsFilter(BaseFilter):
    """Removes documents with more than `max_count` occurrences of the listed words or phrases."""

    name = "🔞 dirty words"

    def __init__(self, words: List[str], max_count: int, exclusion_writer: DiskWriter = None):
        super().__init__(exclusion_writer)
        self.max_count = max_count
        alternatives = "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if words else None

    def count(self, text: str) -> int:
        return 0 if self.pattern is None else sum(1 for _ in self.pattern.finditer(text))

    def filter(self, doc: Document):
        found = self.count(doc.text)
        doc.metadata["dirty_words"] = found
        return True if found <= self.max_count else (False, "dirty_words")


class TokenCountSignature(PipelineStep):
    """KL pass 1: this task's word-token counts, as (hash, count) arrays."""

    type = "📊 - STATS"
    name = "📊 corpus token counts"

    def __init__(self, output_folder: DataFolderLike):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counter: Counter = Counter()
        for doc in data:
            counter.update(_hashes(word_tokens(doc.text)))
        with self.output_folder.open(f"counts/{rank:05d}.npy", "wb") as f:
            np.save(f, np.array([list(counter.keys()), list(counter.values())], dtype=np.uint64).reshape(2, -1))
        return
        yield


class TokenCountMerge(PipelineStep):
    """KL pass 2 (one task): the corpus distribution, as sorted hashes and counts."""

    type = "📊 - STATS"
    name = "📊 corpus distribution"

    def __init__(self, folder: DataFolderLike):
        super().__init__()
        self.folder = get_datafolder(folder)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        total: Counter = Counter()
        for name in self.folder.list_files("counts"):
            with self.folder.open(name, "rb") as f:
                hashes, values = np.load(f)
            total.update(dict(zip(hashes.tolist(), values.tolist())))
        keys = np.array(sorted(total), dtype=np.uint64)
        with self.folder.open("corpus.npy", "wb") as f:
            np.save(f, np.stack([keys, np.array([total[k] for k in keys.tolist()], dtype=np.uint64)])
                    if len(keys) else np.zeros((2, 0), np.uint64))
        return
        yield


def kl_divergence(tokens: List[str], corpus: dict, corpus_total: int) -> float:
    """KL(p_doc || q_corpus) in nats with add-one smoothed q (module docstring)."""
    counts = Counter(_hashes(tokens))
    n, denominator = len(tokens), corpus_total + len(corpus)
    return sum((c / n) * math.log((c / n) / ((corpus.get(t, 0) + 1) / denominator)) for t, c in counts.items())


class KLDivergenceFilter(BaseFilter):
    """Removes documents whose word distribution diverges from the corpus's by more than `max_kl` nats."""

    name = "📐 KL token-distribution outliers"

    def __init__(self, folder: DataFolderLike, max_kl: float, min_words: int, exclusion_writer: DiskWriter = None):
        super().__init__(exclusion_writer)
        self.folder = get_datafolder(folder)
        self.max_kl, self.min_words = max_kl, min_words
        self._corpus = None

    def corpus(self):
        if self._corpus is None:
            with self.folder.open("corpus.npy", "rb") as f:
                hashes, values = np.load(f)
            self._corpus = (dict(zip(hashes.tolist(), values.tolist())), int(values.sum()))
        return self._corpus

    def filter(self, doc: Document):
        tokens = word_tokens(doc.text)
        if len(tokens) < self.min_words:
            return True
        kl = kl_divergence(tokens, *self.corpus())
        doc.metadata["kl"] = round(kl, 4)
        return True if kl <= self.max_kl else (False, "kl_outlier")
