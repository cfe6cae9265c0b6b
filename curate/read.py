"""Reading a raw corpus into datatrove Documents: text files, JSONL and HTML (main content by trafilatura).

datatrove's JsonlReader warns and drops a bad JSON line without counting it, and stops reading a file at its first
invalid UTF-8 byte; herd's reader instead counts every malformed input by reason (bad_utf8, bad_json, no_text,
empty_file, binary_file, bad_gzip, unreadable, not_regular_file, bad_file_name; bad_url and bad_date for a JSONL
record whose url is not a string or whose date is not an ISO 8601 string) and writes one record per problem to
the stage's removed/ folder, so the report names the file and line. Every document carries `url`, `date` (ISO
8601) and `source` metadata: from the JSONL record's keys when present, else file://PATH and the file's
modification time.
"""

import datetime
import fnmatch
import gzip
import json
import os
import stat
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.writers import JsonlWriter

BINARY_PROBE = 8192  # a NUL byte in the first 8 KiB marks a binary file (git's and grep's rule)
SNIPPET = 200  # characters of a malformed input kept in its removal record


def list_corpus(paths: List[str], include: List[str]) -> List[str]:
    """Files named directly, plus files under named directories whose name matches an `include` pattern (a
    pattern holding '/' matches the path relative to the named directory instead, e.g. sub/*.md; a `.gz` file
    matches by its name without `.gz`); sorted, so that every task sees the same list."""
    files = []
    for entry in paths:
        path = Path(entry)
        if path.is_file():
            files.append(str(path.resolve()))
            continue
        for root, _, names in os.walk(path):
            for name in names:
                relative = (Path(root) / name).relative_to(path).as_posix()
                if any(_matches(relative if "/" in pattern else name, pattern) for pattern in include):
                    files.append(str((Path(root) / name).resolve()))
    return sorted(set(files))


def _matches(name: str, pattern: str) -> bool:
    plain = name[:-3] if name.endswith(".gz") else name
    return fnmatch.fnmatch(plain, pattern) or fnmatch.fnmatch(name, pattern)


def _format_of(path: str) -> str:
    plain = path[:-3] if path.endswith(".gz") else path
    suffix = Path(plain).suffix.lower()
    return "jsonl" if suffix == ".jsonl" else "html" if suffix in (".html", ".htm", ".xhtml") else "text"


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()


class CorpusReader(BaseReader):
    """Reads task `rank`'s share (every world_size-th file) of `files`; malformed inputs go to `malformed_writer`."""

    name = "📖 herd corpus reader"

    def __init__(self, files: List[str], malformed_writer: JsonlWriter, text_key: str = "text",
                 id_key: str = "id", url_key: str = "url", date_key: str = "date"):
        super().__init__(text_key=text_key, id_key=id_key)
        self.files = files
        self.malformed_writer = malformed_writer
        self.url_key, self.date_key = url_key, date_key

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        with self.malformed_writer as malformed:
            for path in self.files[rank::world_size]:
                self.stat_update("input_files")
                for document, problem in self._read_file(path):
                    if problem is not None:
                        reason, where, snippet, size = problem
                        self.stat_update(f"malformed_{reason}")
                        malformed.write(Document(text=snippet, id=where, metadata={
                            "filter_reason": reason, "bytes": size, "source": printable(path)}), rank)
                        continue
                    self.update_doc_stats(document)
                    yield document

    def _read_file(self, path: str) -> Iterator[Tuple[Optional[Document], Optional[tuple]]]:
        if printable(path) != path:  # a name that is not UTF-8: no record could carry it as the document's source
            yield None, ("bad_file_name", printable(path), "", _size(path))
            return
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the task, /dev/zero never end
                yield None, ("not_regular_file", path, "a FIFO, device or socket, not a file", 0)
                return
            raw = Path(path).read_bytes()
            if path.endswith(".gz"):
                raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            reason = "bad_gzip" if isinstance(e, (EOFError, gzip.BadGzipFile)) else "unreadable"
            yield None, (reason, path, str(e)[:SNIPPET], _size(path))
            return
        if not raw.strip():
            yield None, ("empty_file", path, "", len(raw))
            return
        if b"\0" in raw[:BINARY_PROBE]:
            yield None, ("binary_file", path, repr(raw[:SNIPPET // 4]), len(raw))
            return
        meta = {"source": path, "url": Path(path).as_uri(), "date": _iso(os.stat(path).st_mtime),
                "format": _format_of(path)}
        if meta["format"] == "jsonl":
            yield from self._jsonl(path, raw, meta)
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            yield None, ("bad_utf8", f"{path}:{line}", repr(raw[max(0, e.start - 40):e.start + 40]), len(raw))
            return
        yield Document(text=text, id=path, metadata=dict(meta)), None

    def _jsonl(self, path: str, raw: bytes, meta: dict) -> Iterator[Tuple[Optional[Document], Optional[tuple]]]:
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield None, ("bad_utf8", where, repr(line[:SNIPPET // 4]), len(line))
                continue
            except (ValueError, RecursionError):
                yield None, ("bad_json", where, line[:SNIPPET].decode("utf-8", "replace"), len(line))
                continue
            text = record.get(self.text_key) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                problem = "bad_json" if not isinstance(record, dict) else "no_text"
                yield None, (problem, where, line[:SNIPPET].decode("utf-8", "replace"), len(line))
                continue
            kept = [text] + [record.get(k) for k in (self.url_key, self.date_key, self.id_key)]
            if any(isinstance(v, str) and printable(v) != v for v in kept):  # a lone surrogate escape (\ud800)
                yield None, ("bad_utf8", where, line[:SNIPPET].decode("utf-8", "replace"), len(line))
                continue
            # a record's URL and date are its own: the file's URL would make every URL-less record of the file one
            # URL for URL dedup (all but one removed), and the file's mtime would rank an undated record newest
            metadata = {"source": meta["source"], "format": "jsonl"}
            problem = _url_and_date(record, self.url_key, self.date_key, metadata)
            if problem:  # a year or an unparsable date would rank the record as undated in URL dedup: counted
                yield None, (problem, where, line[:SNIPPET].decode("utf-8", "replace"), len(line))
                continue
            doc_id = record.get(self.id_key)
            yield Document(text=text, id=str(doc_id) if doc_id is not None else where, metadata=metadata), None


def _url_and_date(record: dict, url_key: str, date_key: str, metadata: dict) -> Optional[str]:
    """Copy a record's url and date into `metadata`; a reason (bad_url, bad_date) when one is present (not
    null or "") but not a string, or the date is not ISO 8601."""
    url, date = record.get(url_key), record.get(date_key)
    if url is not None and url != "":
        if not isinstance(url, str):
            return "bad_url"
        metadata["url"] = url
    if date is not None and date != "":
        if not isinstance(date, str):
            return "bad_date"
        try:
            datetime.datetime.fromisoformat(date.replace("Z", "+00:00"))
        except ValueError:
            return "bad_date"
        metadata["date"] = date
    return None


def printable(text: str) -> str:
    """`text` if it encodes as UTF-8; else with its undecodable bytes (a file name's, os.fsdecode's surrogate
    escapes) or lone surrogates (a JSON \\ud800 escape) written as backslash escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _escaped_bytes(text) else "backslashreplace").decode(
            "utf-8", "backslashreplace")


def _escaped_bytes(text: str) -> bool:
    """Whether every surrogate in `text` is one of os.fsdecode's escapes of a byte (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class HtmlMainContent(Trafilatura):
    """datatrove's trafilatura extractor (in its timeout sandbox), applied to HTML documents only; the others pass
    through. A page without main content, or whose extraction fails or times out, is removed with that reason."""

    name = "⛏ herd HTML main content"

    def __init__(self, removed_writer: JsonlWriter, timeout: float = 5.0):
        super().__init__(favour_precision=True, timeout=timeout, deduplicate=False)
        self.removed_writer = removed_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with ExtractorSandbox(timeout=self.timeout, warmup_text="") as sandbox, self.removed_writer as removed:
            for doc in data:
                if doc.metadata.get("format") != "html":
                    yield doc
                    continue
                self.stat_update("html_pages")
                reason = None
                try:
                    text = sandbox.process_document(doc.text, self.extract)
                except TimeoutError:
                    text, reason = "", "html_timeout"
                except Exception:  # noqa: BLE001 - a page trafilatura cannot parse is counted, never a crash
                    text, reason = "", "html_error"
                if not text or not text.strip():
                    doc.metadata["filter_reason"] = reason or "html_no_main_content"
                    doc.metadata["bytes"] = len(doc.text.encode("utf-8", "replace"))
                    self.stat_update(doc.metadata["filter_reason"])
                    removed.write(doc, rank)
                    continue
                doc.text = text
                yield doc
