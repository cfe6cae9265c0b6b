"""Memory-mapped token files in Megatron's indexed-dataset layout (`PREFIX.bin` + `PREFIX.idx`).

`.bin` holds every document's tokens back to back (each ending with the end-of-document token). `.idx` is:

    magic  b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | n_sequences <Q | n_doc_index <Q
    sizes int32[n_sequences] | pointers int64[n_sequences] (byte offsets into .bin) | doc_index int64[n_doc_index]

herd writes one sequence per document, so doc_index is 0..n. Files written here load in Megatron-LM and the other
way round. The reader checks every field against the file sizes and fails naming the file, so a truncated or
mismatched pair is never read as garbage.
"""

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

import numpy as np

from engine.data.skips import SkipReport
from engine.errors import DataError
from engine.files import exclusive_temporary, file_problem

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
_TOKEN_DTYPES = (np.uint16, np.int32, np.int64, np.uint8, np.int16)
T = TypeVar("T")  # what open_checked's caller builds from a pair


class BadShard(DataError):
    """A token file pair that is there but unusable (truncated, corrupt, empty): data.on_bad_data=skip may leave it
    out of the blend, counted under `reason`. A missing file is a plain DataError: a path mistake, never skipped."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def _code_of(dtype: type) -> int:
    return next(code for code, dt in _DTYPE_CODES.items() if dt == dtype)


def _fsync_write(file, chunks: List[bytes]) -> None:
    for chunk in chunks:
        file.write(chunk)
    file.flush()
    os.fsync(file.fileno())


class IndexedWriter:
    """Appends documents, then writes both files at once (temp names, fsync, rename: never a half pair). The
    temporary files are created exclusively under fresh names, so a file or symlink the user keeps beside the
    output is never written through or removed (R21)."""

    def __init__(self, prefix: str, dtype: type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).type
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin, self._bin_tmp = exclusive_temporary(Path(f"{self.prefix}.bin"))
        self.sizes: List[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sizes.append(len(tokens))

    def abort(self) -> None:
        """Drop what was written; the final file names are never touched."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def finalize(self, sidecar: Optional[Dict[str, Any]] = None) -> None:
        """Write the index (and `sidecar` as PREFIX.json, the summary training checks the pair against), then move
        them into place: an old summary is removed first, so a crash between the renames leaves a pair without
        a summary, never a new pair described by an old one."""
        temporaries = [self._bin_tmp]
        try:
            _fsync_write(self._bin, [])
            self._bin.close()
            sizes = np.asarray(self.sizes, dtype=np.int32)
            pointers = np.zeros(len(sizes), dtype=np.int64)
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * np.dtype(self.dtype).itemsize
            doc_index = np.arange(len(sizes) + 1, dtype=np.int64)
            header = _HEADER.pack(_MAGIC, 1, _code_of(self.dtype), len(sizes), len(doc_index))
            idx, idx_tmp = exclusive_temporary(Path(f"{self.prefix}.idx"))
            temporaries.append(idx_tmp)
            with idx:
                _fsync_write(idx, [header, sizes.tobytes(), pointers.tobytes(), doc_index.tobytes()])
            if sidecar is not None:
                meta, meta_tmp = exclusive_temporary(Path(f"{self.prefix}.json"))
                temporaries.append(meta_tmp)
                with meta:
                    _fsync_write(meta, [(json.dumps(sidecar, indent=2, allow_nan=False) + "\n").encode()])
                Path(f"{self.prefix}.json").unlink(missing_ok=True)
            os.replace(self._bin_tmp, f"{self.prefix}.bin")
            os.replace(idx_tmp, f"{self.prefix}.idx")
            if sidecar is not None:
                os.replace(meta_tmp, f"{self.prefix}.json")
        finally:
            self._bin.close()
            for path in temporaries:
                path.unlink(missing_ok=True)


def require_file(path: Path, hint: str) -> None:
    """A DataError naming `path` unless it is a regular file (or a symlink to one): missing, a directory, a FIFO or
    device (which a read would block on or never finish), or a name the system refuses (too long, say)."""
    problem = file_problem(path)
    if problem == "does not exist":
        raise DataError(f"{path}: file not found ({hint})")
    if problem is not None:
        raise DataError(f"{path}: {problem} ({hint})")


class IndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair: `len(ds)` documents, `ds[i]` a numpy view of document i."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.idx_path, self.bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (self.idx_path, self.bin_path):
            require_file(path, "write it with `herd prepare-data`")
        self._read_index()
        try:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        except OSError as e:
            raise DataError(f"{self.bin_path}: cannot read ({e.strerror or e})") from None

    def _read_index(self) -> None:
        raw = _read_bytes(self.idx_path)
        if len(raw) < _HEADER.size:
            raise BadShard(f"{self.idx_path}: truncated index ({len(raw)} bytes, header needs {_HEADER.size})",
                           "shard_truncated")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
        if magic != _MAGIC or version != 1:
            raise BadShard(f"{self.idx_path}: not an indexed-dataset index (magic {magic!r}, version {version})",
                           "shard_corrupt")
        if code not in _DTYPE_CODES or _DTYPE_CODES[code] not in _TOKEN_DTYPES:
            raise BadShard(f"{self.idx_path}: unsupported token dtype code {code}", "shard_corrupt")
        self.dtype = _DTYPE_CODES[code]
        expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if len(raw) != expected:
            raise BadShard(f"{self.idx_path}: truncated or padded index ({len(raw)} bytes, expected {expected} "
                           f"for {n_seq} documents)", "shard_truncated")
        offset = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=offset)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=offset + 4 * n_seq)
        itemsize = np.dtype(self.dtype).itemsize
        if (self.sizes < 0).any():
            raise BadShard(f"{self.idx_path}: negative document sizes (corrupt index)", "shard_corrupt")
        self.total_tokens = int(self.sizes.sum(dtype=np.int64))
        if n_seq == 0 or self.total_tokens == 0:
            raise BadShard(f"{self.idx_path}: the dataset holds no tokens", "shard_empty")
        if self.pointers[0] != 0 or (np.diff(self.pointers) != self.sizes[:-1].astype(np.int64) * itemsize).any():
            raise BadShard(f"{self.idx_path}: document sizes and offsets disagree (corrupt index)", "shard_corrupt")
        # herd reads sequences, Megatron documents: its document index runs from 0 to n_seq, never decreasing
        doc_index = np.frombuffer(raw, dtype=np.int64, count=n_doc, offset=offset + 12 * n_seq)
        if n_doc < 2 or doc_index[0] != 0 or doc_index[-1] != n_seq or (np.diff(doc_index) < 0).any():
            raise BadShard(f"{self.idx_path}: the document index is not 0 .. {n_seq} in order (corrupt index)",
                           "shard_corrupt")
        bin_bytes = self.bin_path.stat().st_size
        if bin_bytes != self.total_tokens * itemsize:
            raise BadShard(f"{self.bin_path}: {bin_bytes} bytes but the index describes "
                           f"{self.total_tokens * itemsize} (truncated or mismatched pair)", "shard_truncated")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // np.dtype(self.dtype).itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def documents_with_tokens_at_or_above(self, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
        """Indices of documents holding a token id >= vocab_size (or < 0), scanning the file in chunks."""
        bad_positions = []
        for start in range(0, self.total_tokens, chunk):
            part = np.asarray(self.tokens[start:start + chunk])
            if part.size and (part.max() >= vocab_size or part.min() < 0):
                bad_positions.append(start + np.flatnonzero((part >= vocab_size) | (part < 0)))
        if not bad_positions:
            return np.zeros(0, dtype=np.int64)
        starts = self.pointers // np.dtype(self.dtype).itemsize
        return np.unique(np.searchsorted(starts, np.concatenate(bad_positions), side="right") - 1)

    def check_vocab(self, vocab_size: int, on_bad_data: str) -> np.ndarray:
        """Raise naming the first bad document (policy error) or return the bad documents to skip (policy skip)."""
        bad = self.documents_with_tokens_at_or_above(vocab_size)
        if len(bad) and on_bad_data == "error":
            doc = self[int(bad[0])]
            worst = int(doc[(doc >= vocab_size) | (doc < 0)][0])
            raise DataError(f"{self.bin_path}: document {int(bad[0])} holds token id {worst}, outside the "
                            f"model's vocabulary of {vocab_size} ({len(bad)} such documents; "
                            f"data.on_bad_data=skip leaves them out)")
        return bad


def open_checked(path: str, vocab_size: int, on_bad_data: str, skips: SkipReport,
                 build: Callable[[IndexedDataset, np.ndarray], T]) -> Optional[T]:
    """build(pair, bad documents) for the token file pair `path`, its ids checked against the vocabulary: under
    on_bad_data=skip the documents holding ids outside it are counted in `skips` (and build leaves them out),
    and a pair that is truncated, corrupt, empty or, in build, too short (BadShard) is counted and answers None.
    Under on_bad_data=error both raise. A missing file is always an error (a path mistake, never skipped)."""
    try:
        indexed = IndexedDataset(path)
        bad = indexed.check_vocab(vocab_size, on_bad_data)
        skips.add("token_id_out_of_vocab", path, len(bad), (f"document {d}" for d in bad))
        return build(indexed, bad)
    except BadShard as e:
        if on_bad_data != "skip":
            raise
        skips.add(e.reason, path, places=[str(e)])  # the place is the whole pair: say why
        return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


# PREFIX.json, written by `herd prepare-data`: the fields training relies on and their types
SIDECAR_FIELDS = {"tokenizer": str, "vocab_size": int, "eod_id": int}
_OPTIONAL_COUNTS = ("documents", "tokens")


def json_type(value: Any) -> str:
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_sidecar(prefix: str) -> Optional[Dict[str, Any]]:
    """PREFIX.json as a checked dictionary, or None when there is none (token files from elsewhere). Anything
    malformed is one DataError naming the file and the key."""
    path = Path(f"{prefix}.json")
    try:
        if not path.exists():
            return None
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    require_file(path, "expected the JSON summary that `herd prepare-data` writes")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); expected the JSON summary that "
                        f"`herd prepare-data` writes") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); expected the summary "
                        f"that `herd prepare-data` writes") from None
    except RecursionError:
        raise DataError(f"{path}: not JSON (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object (the summary `herd prepare-data` writes), "
                        f"got {json_type(meta)}")
    for key, kind in SIDECAR_FIELDS.items():
        if key not in meta:
            raise DataError(f"{path}: {key}: missing (every summary `herd prepare-data` writes has it)")
        value = meta[key]
        if type(value) is not kind:  # bool is an int subclass: true is not a vocabulary size
            raise DataError(f"{path}: {key}: expected {json_type(kind())}, got {json_type(value)} "
                            f"{json.dumps(value)[:40]}")
    for key in ("vocab_size", "eod_id") + _OPTIONAL_COUNTS:
        if key in meta and (type(meta[key]) is not int or meta[key] < 0):
            raise DataError(f"{path}: {key}: expected a non-negative integer, got {json_type(meta[key])} "
                            f"{json.dumps(meta[key])[:40]}")
    if "vocab_sha256" in meta and not (isinstance(meta["vocab_sha256"], str)
                                       and re.fullmatch("[0-9a-f]{64}", meta["vocab_sha256"])):
        raise DataError(f"{path}: vocab_sha256: expected 64 hex digits, got {json.dumps(meta['vocab_sha256'])[:70]}")
    if meta["eod_id"] >= meta["vocab_size"]:
        raise DataError(f"{path}: eod_id: {meta['eod_id']} is outside vocab_size {meta['vocab_size']}")
    return meta
