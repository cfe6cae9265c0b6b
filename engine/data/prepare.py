"""`herd prepare-data`: raw text files or JSONL into indexed token files, document boundaries kept.

A raw text file is one document; each line of a `.jsonl` file is one document (its `text` field by default).
Every document gets the end-of-document token appended. Problems are named by file and line: with
on_bad_data=error the first one stops the run, with skip the document is left out and counted. Empty documents
(an empty `__init__.py`, a blank JSONL text) hold nothing to learn and are always skipped and counted. The counts,
by reason and by file with the first line numbers, are printed and written into PREFIX.json (engine/data/skips.py).
With valid_fraction > 0 each document goes to PREFIX.train or PREFIX.valid by a hash of its name, so the split
is stable when files are added.
"""

import fnmatch
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from engine.data.indexed import IndexedWriter, json_type, token_dtype
from engine.data.jsonl import BadLine, json_object
from engine.data.skips import SkipReport
from engine.data.tokenizer import Tokenizer
from engine.errors import DataError
from engine.files import file_problem

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py", "*.jsonl")


@dataclass
class Document:
    source: str  # "path" or "path:line", used in messages and for the split hash
    text: str


@dataclass
class PrepareReport:
    documents: Dict[str, int] = field(default_factory=dict)  # per output split
    tokens: Dict[str, int] = field(default_factory=dict)
    skips: SkipReport = field(default_factory=SkipReport)  # by reason and file, with the first places
    outputs: List[str] = field(default_factory=list)

    @property
    def skipped(self) -> Counter:
        """reason -> documents (or files) left out."""
        return self.skips.reasons

    def summary(self) -> str:
        parts = [f"{split}: {self.documents[split]:,} documents, {self.tokens[split]:,} tokens"
                 for split in self.documents]
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        where = f" (per file and line in {self.outputs[0]}.json)" if self.skipped and self.outputs else ""
        return "; ".join(parts) + f"; skipped: {skipped}{where}"


def output_prefixes(out_prefix: str, valid_fraction: float) -> List[str]:
    """The pairs a run writes: PREFIX, or PREFIX.train and PREFIX.valid."""
    return [f"{out_prefix}.train", f"{out_prefix}.valid"] if valid_fraction > 0 else [out_prefix]


def output_files(out_prefix: str, valid_fraction: float) -> Tuple[str, ...]:
    return tuple(f"{prefix}{ext}" for prefix in output_prefixes(out_prefix, valid_fraction)
                 for ext in (".bin", ".idx", ".json"))


def list_inputs(inputs: List[str], patterns=DEFAULT_PATTERNS, exclude: Tuple[str, ...] = (),
                outputs: Tuple[str, ...] = ()) -> List[Path]:
    """Files named directly, plus files under named directories matching `patterns`; sorted, deterministic. A
    FIFO, device or socket under a directory is listed too (read_documents counts it, never opens it); the files
    of `outputs` (the run's own PREFIX.bin/.idx/.json, e.g. from an earlier run into an input directory) are left
    out; a file named twice (also through its directory) is refused, as it would be tokenized twice."""
    files: List[Path] = []
    named: Dict[str, int] = {}  # a file's real path -> the index of the input that named it
    skip = {os.path.abspath(out) for out in outputs}
    for index, item in enumerate(inputs):
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if not p.is_dir() and os.path.abspath(p) not in skip
                           and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
                           and not any(fnmatch.fnmatch(str(p.relative_to(path)), ex) for ex in exclude))
        elif path.exists():
            raise DataError(f"{path}: input {file_problem(path)} or a directory")
        else:
            raise DataError(f"{path}: input not found")
        for file in found:
            first = named.setdefault(os.path.realpath(file), index)
            if first != index:
                raise DataError(f"{file}: input named twice (by {inputs[first]} and by {item}); its documents "
                                f"would be tokenized twice")
        files += found
    if not files:
        raise DataError(f"no input files matching {', '.join(patterns)} under {', '.join(inputs)}")
    return files


def _bad(message: str, on_bad_data: str, report: PrepareReport, reason: str, file: Path, line: int = 0) -> None:
    if on_bad_data == "error":
        raise DataError(message + " (--on-bad-data skip leaves such documents out)")
    report.skips.add(reason, str(file), places=[f"line {line}"] if line else ["whole file"])


def _first_bad_line(raw: bytes, error: UnicodeDecodeError) -> int:
    return raw.count(b"\n", 0, error.start) + 1


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is a lone one


def lone_surrogate(text: str) -> Optional[int]:
    """Index of the first lone surrogate (a JSON "\\ud800" escape: valid to json.loads, not encodable as UTF-8,
    fatal to a tokenizer), or None."""
    found = _SURROGATE.search(text)
    return found.start() if found else None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_documents(files: List[Path], text_key: str, on_bad_data: str, report: PrepareReport) -> Iterator[Document]:
    for path in files:
        problem = file_problem(path)  # found under a directory: reading a FIFO would block, a device never end
        if problem:
            _bad(f"{path}: {problem}", on_bad_data, report, "not_regular_file", path)
            continue
        raw = _read(path)
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, raw, text_key, on_bad_data, report)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = _first_bad_line(raw, e)
            _bad(f"{path}:{line}: invalid UTF-8 at byte {e.start}", on_bad_data, report, "bad_utf8", path, line)
            continue
        if text.strip():
            yield Document(str(path), text)
        else:
            report.skips.add("empty", str(path), places=["whole file"])


def _jsonl_record(where: str, line: bytes, text_key: str) -> Tuple[Optional[str], str, str]:
    """(the document's text, "", "") or (None, reason, message) for a line that holds no usable document."""
    try:
        record = json_object(line, f"a JSON object with a string field '{text_key}'")
    except BadLine as e:
        return None, e.reason, f"{where}: {e}"
    if record is None:  # only whitespace bytes.strip() keeps (a no-break space, U+2028, ...): an empty document
        return "", "", ""
    if text_key not in record:
        return None, "missing_field", f"{where}: missing field '{text_key}' (found: " \
                                      f"{', '.join(json.dumps(k) for k in sorted(record)[:8]) or 'no fields'})"
    text = record[text_key]
    if not isinstance(text, str):
        return None, "bad_field", f"{where}: '{text_key}': expected a string, got {json_type(text)}"
    at = lone_surrogate(text)
    if at is not None:
        return None, "lone_surrogate", (f"{where}: '{text_key}' holds a lone surrogate \\u{ord(text[at]):04x} at "
                                        f"character {at} (not valid Unicode text)")
    return text, "", ""


def _jsonl_documents(path: Path, raw: bytes, text_key: str, on_bad_data: str,
                     report: PrepareReport) -> Iterator[Document]:
    if not raw.strip():
        _bad(f"{path}: empty JSONL file", on_bad_data, report, "empty_file", path)
        return
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        text, reason, message = _jsonl_record(where, line, text_key)
        if text is None:
            _bad(message, on_bad_data, report, reason, path, line_no)
        elif text.strip():
            yield Document(where, text)
        else:
            report.skips.add("empty", str(path), places=[f"line {line_no}"])


def split_of(source: str, valid_fraction: float) -> str:
    """'valid' for a stable ~valid_fraction share of documents (by CRC of their name), else 'train'."""
    if valid_fraction <= 0:
        return ""
        # a file name that is not UTF-8 arrives with surrogate escapes (its raw bytes, as os.fsencode gives them)
    name = source.encode("utf-8", "surrogateescape")
    return "valid" if zlib.crc32(name) % 100_000 < valid_fraction * 100_000 else "train"


def write_indexed(documents: List[Document], out_prefix: str, tokenizer: Tokenizer, valid_fraction: float,
                  report: PrepareReport, batch_size: int = 256,
                  sidecar: Optional[Callable[[str], Dict[str, Any]]] = None) -> None:
    """Tokenize into PREFIX (or PREFIX.train/.valid) with `sidecar(split)` as each pair's PREFIX.json. Any failure,
    an interrupt included, leaves none of the outputs changed and no temporary file behind."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers: Dict[str, IndexedWriter] = {}
    try:
        for start in range(0, len(documents), batch_size):
            batch = documents[start:start + batch_size]
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                split = split_of(doc.source, valid_fraction)
                if split not in writers:
                    writers[split] = IndexedWriter(f"{out_prefix}.{split}" if split else out_prefix, dtype)
                if not ids and doc.text.strip():  # text the tokenizer has no tokens for would vanish silently
                    raise DataError(f"{doc.source}: its text encodes to no tokens with {tokenizer.name} (a "
                                    f"tokenizer without tokens for it, such as one holding only special tokens)")
                tokens = np.asarray(ids + [tokenizer.eod_id], dtype=np.int64)
                writers[split].add_document(tokens)
                report.documents[split or "all"] = report.documents.get(split or "all", 0) + 1
                report.tokens[split or "all"] = report.tokens.get(split or "all", 0) + len(tokens)
        if valid_fraction > 0 and set(writers) != {"train", "valid"}:
            raise DataError(f"{out_prefix}: the split left '{'train' if 'train' not in writers else 'valid'}' "
                            f"empty; use more documents or another --valid-fraction")
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for split, writer in sorted(writers.items()):
        writer.finalize(sidecar(split or "all") if sidecar is not None else None)
        report.outputs.append(str(writer.prefix))


def no_documents(inputs: List[str], report: PrepareReport) -> str:
    """Why nothing is left to tokenize, with what the readers left out (all of it, under --on-bad-data skip)."""
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items()))
    return f"no documents with text in {', '.join(inputs)}" + (f" (left out: {skipped})" if skipped else "")


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
        files = list_inputs(inputs, patterns, exclude, output_files(out_prefix, valid_fraction))
        documents = list(read_documents(files, text_key, on_bad_data, report))
    if not documents:
        raise DataError(no_documents(inputs, report))

    def sidecar(split: str) -> Dict[str, Any]:  # one summary per pair; training checks the tokenizer against it
        return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "vocab_sha256": tokenizer.vocab_fingerprint, "documents": report.documents[split], "tokens": report.tokens[split],
                "skipped": report.skips.as_dict(), "inputs": list(inputs)}
    write_indexed(documents, out_prefix, tokenizer, valid_fraction, report, sidecar=sidecar)
    return report
