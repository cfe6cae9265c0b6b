"""`herd prepare-data`: raw text files or JSONL into indexed token files, document boundaries kept.

A raw text file is one document; each line of a `.jsonl` file is one document (its `text` field by default).
Every document gets the end-of-document token appended. Problems are named by file and line: with
on_bad_data=error the first one stops the run, with skip the document is left out and counted. Empty documents
(an empty `__init__.py`, a blank JSONL text) hold nothing to learn and are always skipped and counted.
With valid_fraction > 0 each document goes to PREFIX.train or PREFIX.valid by a hash of its name, so the split
is stable when files are added.
"""

import fnmatch
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from engine.data.indexed import IndexedWriter, token_dtype
from engine.data.tokenizer import Tokenizer
from engine.errors import DataError

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py", "*.jsonl")


@dataclass
class Document:
    source: str  # "path" or "path:line", used in messages and for the split hash
    text: str


@dataclass
class PrepareReport:
    documents: Dict[str, int] = field(default_factory=dict)  # per output split
    tokens: Dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    outputs: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{split}: {self.documents[split]:,} documents, {self.tokens[split]:,} tokens"
                 for split in self.documents]
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return "; ".join(parts) + f"; skipped: {skipped}"


def list_inputs(inputs: List[str], patterns=DEFAULT_PATTERNS, exclude: Tuple[str, ...] = ()) -> List[Path]:
    """Files named directly, plus files under named directories matching `patterns`; sorted, deterministic."""
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
                            and not any(fnmatch.fnmatch(str(p.relative_to(path)), ex) for ex in exclude))
        else:
            raise DataError(f"{path}: input not found")
    if not files:
        raise DataError(f"no input files matching {', '.join(patterns)} under {', '.join(inputs)}")
    return files


def _bad(message: str, on_bad_data: str, report: PrepareReport, reason: str) -> None:
    if on_bad_data == "error":
        raise DataError(message + " (--on-bad-data skip leaves such documents out)")
    report.skipped[reason] += 1


def _first_bad_line(raw: bytes, error: UnicodeDecodeError) -> int:
    return raw.count(b"\n", 0, error.start) + 1


def read_documents(files: List[Path], text_key: str, on_bad_data: str, report: PrepareReport) -> Iterator[Document]:
    for path in files:
        raw = path.read_bytes()
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, raw, text_key, on_bad_data, report)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad(f"{path}:{_first_bad_line(raw, e)}: invalid UTF-8 at byte {e.start}", on_bad_data, report,
                 "bad utf-8")
            continue
        if text.strip():
            yield Document(str(path), text)
        else:
            report.skipped["empty"] += 1


def _jsonl_documents(path: Path, raw: bytes, text_key: str, on_bad_data: str,
                     report: PrepareReport) -> Iterator[Document]:
    if not raw.strip():
        _bad(f"{path}: empty JSONL file", on_bad_data, report, "empty file")
        return
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            _bad(f"{where}: invalid UTF-8 at column {e.start + 1}", on_bad_data, report, "bad utf-8")
            continue
        except json.JSONDecodeError as e:
            _bad(f"{where}: invalid JSON ({e.msg} at column {e.colno})", on_bad_data, report, "bad json")
            continue
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            _bad(f"{where}: expected an object with a string field '{text_key}'", on_bad_data, report,
                 "missing field")
            continue
        if record[text_key].strip():
            yield Document(where, record[text_key])
        else:
            report.skipped["empty"] += 1


def split_of(source: str, valid_fraction: float) -> str:
    """'valid' for a stable ~valid_fraction share of documents (by CRC of their name), else 'train'."""
    if valid_fraction <= 0:
        return ""
    return "valid" if zlib.crc32(source.encode()) % 100_000 < valid_fraction * 100_000 else "train"


def write_indexed(documents: List[Document], out_prefix: str, tokenizer: Tokenizer, valid_fraction: float,
                  report: PrepareReport, batch_size: int = 256) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    writers: Dict[str, IndexedWriter] = {}
    for start in range(0, len(documents), batch_size):
        batch = documents[start:start + batch_size]
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
            split = split_of(doc.source, valid_fraction)
            if split not in writers:
                writers[split] = IndexedWriter(f"{out_prefix}.{split}" if split else out_prefix, dtype)
            tokens = np.asarray(ids + [tokenizer.eod_id], dtype=np.int64)
            writers[split].add_document(tokens)
            report.documents[split or "all"] = report.documents.get(split or "all", 0) + 1
            report.tokens[split or "all"] = report.tokens.get(split or "all", 0) + len(tokens)
    if valid_fraction > 0 and set(writers) != {"train", "valid"}:
        for writer in writers.values():
            writer.abort()
        raise DataError(f"{out_prefix}: the split left '{'train' if 'train' not in writers else 'valid'}' empty; "
                        f"use more documents or another --valid-fraction")
    for split, writer in sorted(writers.items()):
        writer.finalize()
        report.outputs.append(str(writer.prefix))


def prepare_data(inputs: List[str], out_prefix: str, tokenizer: Tokenizer, *, text_key: str = "text",
                 valid_fraction: float = 0.0, on_bad_data: str = "error",
                 patterns=DEFAULT_PATTERNS, exclude: Tuple[str, ...] = (),
                 documents: Optional[List[Document]] = None,
                 report: Optional[PrepareReport] = None) -> PrepareReport:
    """Tokenize `inputs` into `out_prefix` (or `.train`/`.valid`) and write a JSON summary beside it.

    `documents` (with the `report` that counted their reading) lets a caller that already read the corpus, to
    train a tokenizer on it, skip reading it twice.
    """
    report = report or PrepareReport()
    if documents is None:
        documents = list(read_documents(list_inputs(inputs, patterns, exclude), text_key, on_bad_data, report))
    if not documents:
        raise DataError(f"no documents with text in {', '.join(inputs)}")
    write_indexed(documents, out_prefix, tokenizer, valid_fraction, report)
    for prefix in report.outputs:  # one summary beside each pair; training checks the tokenizer against it
        split = prefix[len(out_prefix) + 1:] or "all"
        meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "documents": report.documents[split], "tokens": report.tokens[split],
                "skipped_while_reading": dict(report.skipped), "inputs": list(inputs)}
        Path(f"{prefix}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return report
