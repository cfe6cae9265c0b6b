"""The dedup rules datatrove lacks, written as datatrove pipeline steps.

- URL dedup keeping the newest (Llama 3 section 3.1.1: "we keep the most recent version for pages corresponding to
  each URL"): datatrove's exact-dedup stages with the URL as content and the crawl date as priority (days since
  1970, so the newest wins; a tie keeps the first read).
- Exact document dedup: the same stages with the text as content.
- Line-level dedup (Llama 3 section 3.1.1, after ccNet): documents are put into buckets by a hash of their id; a
  line (normalized: lowercased, digits to 0, punctuation and surrounding space removed, as ccNet) seen more than
  `max_repeats` times in its bucket is removed from every document of the bucket. Counting is two-pass: each task
  writes its per-bucket counts (LineCountSignature), one task per bucket sums them and keeps the hashes counted
  more than max_repeats times (LineCountMerge), then LineDedupFilter drops those lines. A document left without
  text is removed.
"""

import datetime
import re
import unicodedata
from collections import Counter
from typing import Dict, Set

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter

MAX_PRIORITY = 65535  # datatrove's exact dedup stores priority as uint16 (0 is reserved)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def url_of(doc: Document) -> str:
    """The URL dedup's content: the document's URL (its id when it has none)."""
    return str(doc.metadata.get("url") or doc.id)


def text_of(doc: Document) -> str:
    """The exact dedup's content: the whole text."""
    return doc.text


def newest_first(doc: Document) -> int:
    """Priority for URL dedup: days since 1970 of the document's date, so the newest version is kept. A date
    that does not parse ranks lowest (1)."""
    try:
        when = datetime.datetime.fromisoformat(str(doc.metadata.get("date", "")).replace("Z", "+00:00"))
    except ValueError:
        return 1
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(min(MAX_PRIORITY, max(1, (when - _EPOCH).days + 1)))


_PUNCTUATION = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")


def normalize_line(line: str) -> str:
    """ccNet's line normalization: NFD, lowercase, digits to 0, punctuation removed, whitespace collapsed."""
    line = unicodedata.normalize("NFD", line).lower()
    line = _PUNCTUATION.sub("", _DIGIT.sub("0", line))
    return " ".join(line.split())


def line_hash(line: str) -> int:
    return xxhash.xxh64_intdigest(normalize_line(line))


def bucket_of(doc: Document, buckets: int) -> int:
    return xxhash.xxh32_intdigest(str(doc.id)) % buckets


class LineCountSignature(PipelineStep):
    """Pass 1: this task's line counts per bucket, written as sorted (hash, count) arrays."""

    type = "🫂 - DEDUPS"
    name = "📏 line dedup: count"

    def __init__(self, output_folder: DataFolderLike, buckets: int):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)
        self.buckets = buckets

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts = [Counter() for _ in range(self.buckets)]
        for doc in data:
            self.stat_update("documents")
            bucket = counts[bucket_of(doc, self.buckets)]
            bucket.update(line_hash(line) for line in doc.text.splitlines() if normalize_line(line))
        for bucket, counter in enumerate(counts):
            hashes = np.fromiter(counter.keys(), dtype=np.uint64, count=len(counter))
            values = np.fromiter(counter.values(), dtype=np.uint64, count=len(counter))
            with self.output_folder.open(f"{bucket:04d}/{rank:05d}.npy", "wb") as f:
                np.save(f, np.stack([hashes, values]) if len(counter) else np.zeros((2, 0), np.uint64))
        return
        yield  # a generator: datatrove drains each step


class LineCountMerge(PipelineStep):
    """Pass 2, one task per bucket: the hashes of lines seen more than `max_repeats` times in the bucket."""

    type = "🫂 - DEDUPS"
    name = "📏 line dedup: find"

    def __init__(self, input_folder: DataFolderLike, output_folder: DataFolderLike, max_repeats: int):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.output_folder = get_datafolder(output_folder)
        self.max_repeats = max_repeats

    def run(self, data: DocumentsPipeline = None, bucket: int = 0, world_size: int = 1) -> DocumentsPipeline:
        total: Counter = Counter()
        for name in self.input_folder.list_files(f"{bucket:04d}"):
            with self.input_folder.open(name, "rb") as f:
                hashes, values = np.load(f)
            total.update(dict(zip(hashes.tolist(), values.tolist())))
        repeated = np.array(sorted(h for h, n in total.items() if n > self.max_repeats), dtype=np.uint64)
        self.stat_update("repeated_lines", value=len(repeated))
        with self.output_folder.open(f"{bucket:04d}.npy", "wb") as f:
            np.save(f, repeated)
        return
        yield


class LineDedupFilter(PipelineStep):
    """Pass 3: drop the repeated lines; removed lines are recorded (one record per document that lost some, with
    `partial`), and a document left empty is removed whole."""

    type = "🫂 - DEDUPS"
    name = "📏 line dedup: filter"

    def __init__(self, input_folder: DataFolderLike, buckets: int, removed_writer: JsonlWriter):
        super().__init__()
        self.input_folder = get_datafolder(input_folder)
        self.buckets = buckets
        self.removed_writer = removed_writer

    def _repeated(self) -> Dict[int, Set[int]]:
        repeated = {}
        for bucket in range(self.buckets):
            with self.input_folder.open(f"{bucket:04d}.npy", "rb") as f:
                repeated[bucket] = set(np.load(f).tolist())
        return repeated

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        repeated = self._repeated()
        with self.removed_writer as removed:
            for doc in data:
                drop = repeated[bucket_of(doc, self.buckets)]
                kept, gone = [], []
                for line in doc.text.splitlines(keepends=True):
                    (gone if normalize_line(line) and line_hash(line) in drop else kept).append(line)
                if not gone:
                    yield doc
                    continue
                self.stat_update("lines_removed", value=len(gone))
                text = "".join(kept)
                whole = not text.strip()
                removed.write(Document(text="".join(gone), id=doc.id, metadata=dict(
                    doc.metadata, filter_reason="duplicate_lines" if not whole else "all_lines_duplicate",
                    partial=not whole)), rank)
                if whole:
                    self.stat_update("documents_emptied")
                    continue
                doc.text = text
                yield doc
