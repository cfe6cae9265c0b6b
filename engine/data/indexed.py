"""Memory-mapped token files in Megatron's indexed-dataset layout (`PREFIX.bin` + `PREFIX.idx`).

`.bin` holds every document's tokens back to back (each ending with the end-of-document token). `.idx` is:

    magic  b"MMIDIDX\\x00\\x00" | version <Q = 1 | dtype code <B | n_sequences <Q | n_doc_index <Q
    sizes int32[n_sequences] | pointers int64[n_sequences] (byte offsets into .bin) | doc_index int64[n_doc_index]

herd writes one sequence per document, so doc_index is 0..n. Files written here load in Megatron-LM and the other
way round. The reader checks every field against the file sizes and fails naming the file, so a truncated or
mismatched pair is never read as garbage.
"""

import os
import struct
from pathlib import Path
from typing import List

import numpy as np

from engine.errors import DataError

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
_TOKEN_DTYPES = (np.uint16, np.int32, np.int64, np.uint8, np.int16)


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def _code_of(dtype: type) -> int:
    return next(code for code, dt in _DTYPE_CODES.items() if dt == dtype)


def _fsync_write(path: Path, chunks: List[bytes]) -> None:
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


class IndexedWriter:
    """Appends documents, then writes both files at once (temp names, fsync, rename: never a half pair)."""

    def __init__(self, prefix: str, dtype: type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).type
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.sizes: List[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sizes.append(len(tokens))

    def abort(self) -> None:
        """Drop what was written; the final file names are never touched."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * np.dtype(self.dtype).itemsize
        doc_index = np.arange(len(sizes) + 1, dtype=np.int64)
        header = _HEADER.pack(_MAGIC, 1, _code_of(self.dtype), len(sizes), len(doc_index))
        idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        _fsync_write(idx_tmp, [header, sizes.tobytes(), pointers.tobytes(), doc_index.tobytes()])
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")


class IndexedDataset:
    """Read-only view of a `.bin`/`.idx` pair: `len(ds)` documents, `ds[i]` a numpy view of document i."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.idx_path, self.bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"{path}: file not found (write it with `herd prepare-data`)")
        self._read_index()
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.total_tokens else \
            np.zeros(0, dtype=self.dtype)

    def _read_index(self) -> None:
        raw = self.idx_path.read_bytes()
        if len(raw) < _HEADER.size:
            raise DataError(f"{self.idx_path}: truncated index ({len(raw)} bytes, header needs {_HEADER.size})")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
        if magic != _MAGIC or version != 1:
            raise DataError(f"{self.idx_path}: not an indexed-dataset index (magic {magic!r}, version {version})")
        if code not in _DTYPE_CODES or _DTYPE_CODES[code] not in _TOKEN_DTYPES:
            raise DataError(f"{self.idx_path}: unsupported token dtype code {code}")
        self.dtype = _DTYPE_CODES[code]
        expected = _HEADER.size + n_seq * (4 + 8) + n_doc * 8
        if len(raw) != expected:
            raise DataError(f"{self.idx_path}: truncated or padded index ({len(raw)} bytes, expected {expected} "
                            f"for {n_seq} documents)")
        offset = _HEADER.size
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=offset)
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=n_seq, offset=offset + 4 * n_seq)
        itemsize = np.dtype(self.dtype).itemsize
        self.total_tokens = int(self.sizes.sum(dtype=np.int64))
        if n_seq == 0 or self.total_tokens == 0:
            raise DataError(f"{self.idx_path}: the dataset holds no tokens")
        if (self.sizes < 0).any() or self.pointers[0] != 0 or \
                (np.diff(self.pointers) != self.sizes[:-1].astype(np.int64) * itemsize).any():
            raise DataError(f"{self.idx_path}: document sizes and offsets disagree (corrupt index)")
        bin_bytes = self.bin_path.stat().st_size
        if bin_bytes != self.total_tokens * itemsize:
            raise DataError(f"{self.bin_path}: {bin_bytes} bytes but the index describes "
                            f"{self.total_tokens * itemsize} (truncated or mismatched pair)")

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
