"""herd prepare-data's outputs and inputs under hostile file systems (R14, R20, R21; found by a bad-input hunt,
helper H33): user files at the old temporary names, a prefix that names a directory, a file name that is not
UTF-8, an interrupt mid-way, names the system refuses, a look-alike summary, its own outputs inside an input
directory, an input named twice, FIFOs; and training on data whose tokenizer has the same size but other tokens.
Each case failed on the code before the fix (written through, traceback, silently accepted or left behind)."""

import json
import os
import stat
from pathlib import Path

import pytest

from engine.config import DatasetConfig
from engine.data.indexed import IndexedDataset, read_sidecar
from engine.data.tokenizer import HFTokenizer, train_bpe
from engine.errors import ConfigError, DataError
from tests.helpers import run_herd, snapshot

TEXTS = ["the quick brown fox jumps over the lazy dog\n", "a stitch in time saves nine\n",
         "all that glitters is not gold\n", "where there is smoke there is fire\n"]


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "in").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "in" / f"d{i}.txt").write_text(text * 3)
    train_bpe(TEXTS, 300, str(tmp_path / "tok.json"))
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.fixture(autouse=True)
def inside(corpus, monkeypatch):  # relative paths, as a user types them
    monkeypatch.chdir(corpus)


def prepare(root: Path, capfd, *args: str, out: str = "out/p"):
    return run_herd(["prepare-data", "in", "--out", out, "--tokenizer-path", "tok.json", *args], capfd)


def test_user_files_at_the_old_temporary_names_are_never_written_through_or_removed(corpus, capfd):
    victim = corpus / "victim"
    victim.write_text("USER\n")
    (corpus / "out" / "p.idx.tmp").symlink_to(victim)  # the names the writer used to open with "wb" and rename
    (corpus / "out" / "p.bin.tmp").write_text("USERDATA\n")
    (corpus / "out" / "p.json.tmp").mkdir()
    code, lines = prepare(corpus, capfd)
    assert code == 0, lines
    assert victim.read_text() == "USER\n" and (corpus / "out" / "p.bin.tmp").read_text() == "USERDATA\n"
    assert (corpus / "out" / "p.idx.tmp").is_symlink() and (corpus / "out" / "p.json.tmp").is_dir()
    for ext in (".bin", ".idx", ".json"):
        assert not (corpus / "out" / f"p{ext}").is_symlink()
    assert len(IndexedDataset(str(corpus / "out" / "p"))) == len(TEXTS)
    assert sorted(p.name for p in (corpus / "out").iterdir()) == [
        "p.bin", "p.bin.tmp", "p.idx", "p.idx.tmp", "p.json", "p.json.tmp"]  # no temporary of ours left


def test_outputs_are_readable_by_others_as_the_umask_allows(corpus, capfd):
    old = os.umask(0o022)
    try:
        assert prepare(corpus, capfd)[0] == 0
    finally:
        os.umask(old)
    for ext in (".bin", ".idx", ".json"):  # not the 0600 of an exclusive temporary file
        assert stat.S_IMODE((corpus / "out" / f"p{ext}").stat().st_mode) == 0o644


@pytest.mark.parametrize("out", ["out/", "out/.", ".", "out/.."])
def test_a_prefix_naming_a_directory_is_refused_and_the_file_beside_it_is_kept(corpus, capfd, out):
    (corpus / "out.bin").write_text("USERDATA\n")  # out/ used to be written as out.bin beside the directory
    before = snapshot(corpus)
    code, lines = prepare(corpus, capfd, out=out)
    assert code == 2 and lines == [f"herd: error: --out {out}: expected a file-name prefix (PREFIX gives "
                                   f"PREFIX.bin, PREFIX.idx and PREFIX.json), not a directory"]
    assert snapshot(corpus) == before


def test_a_file_name_that_is_not_utf8_splits_like_any_other(corpus, capfd):
    name = os.fsencode(corpus / "in") + b"/n\xff.txt"
    with open(name, "w") as f:
        f.write("a file whose name is latin-1\n")
    code, lines = prepare(corpus, capfd, "--valid-fraction", "0.5")
    assert code == 0, lines
    documents = sum(len(IndexedDataset(str(corpus / "out" / f"p.{split}"))) for split in ("train", "valid"))
    assert documents == len(TEXTS) + 1
    assert not [p for p in (corpus / "out").iterdir() if p.name.endswith(".tmp")]


def test_an_interrupt_while_tokenizing_changes_nothing_and_leaves_no_temporary(corpus, capfd, monkeypatch):
    assert prepare(corpus, capfd, "--valid-fraction", "0.5")[0] == 0  # an earlier run's outputs
    for i in range(600):  # more than one batch of 256 documents
        (corpus / "in" / f"more{i}.txt").write_text(f"document {i}\n")
    before = snapshot(corpus / "out")
    calls = []

    def interrupted(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
    monkeypatch.setattr(HFTokenizer, "encode_batch", interrupted)
    code, lines = prepare(corpus, capfd, "--valid-fraction", "0.5")
    assert code == 130 and len(calls) == 2
    assert snapshot(corpus / "out") == before  # the earlier outputs as they were, nothing beside them


@pytest.mark.parametrize("out", ["out/" + "a" * 300, "/proc/herd-prepare-test"])
def test_a_destination_the_system_refuses_is_one_line_naming_it(corpus, capfd, out):
    code, lines = prepare(corpus, capfd, out=out)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"herd: error: {out}"), lines
    assert not list((corpus / "out").iterdir())


def test_a_summary_lookalike_does_not_make_the_users_files_herds(corpus, capfd):
    (corpus / "out" / "p.json").write_text('{"tokenizer": 1, "vocab_size": 1, "eod_id": 0}')
    (corpus / "out" / "p.bin").write_text("USER\n")
    before = snapshot(corpus)
    code, lines = prepare(corpus, capfd)
    assert code == 2 and lines == ["herd: error: --out out/p: out/p.bin exists and is not a herd prepare-data "
                                   "output; choose another prefix or remove it"]
    assert snapshot(corpus) == before


def test_its_own_outputs_inside_an_input_directory_are_not_read_back(corpus, capfd):
    first = prepare(corpus, capfd, "--include", "*", "--on-bad-data", "skip", out="in/data")
    again = prepare(corpus, capfd, "--include", "*", "--on-bad-data", "skip", out="in/data")
    assert first[0] == again[0] == 0
    assert first[1][-1] == again[1][-1]  # the same documents: not in/data.idx or in/data.json as text
    assert f"all: {len(TEXTS)} documents" in again[1][-1] and "skipped: none" in again[1][-1]


@pytest.mark.parametrize("twice", [["in/d0.txt", "in"], ["in", "in/../in"]])
def test_an_input_named_twice_is_refused(corpus, capfd, twice):
    code, lines = run_herd(["prepare-data", *twice, "--out", "out/p", "--tokenizer-path", "tok.json"], capfd)
    assert code == 2 and len(lines) == 1 and "input named twice" in lines[0], lines
    assert not list((corpus / "out").iterdir())


def test_a_fifo_in_an_input_directory_is_named_or_counted_never_opened(corpus, capfd):
    os.mkfifo(corpus / "in" / "f.txt")  # opening it would block forever
    code, lines = prepare(corpus, capfd)
    assert code == 2 and lines == ["herd: error: in/f.txt: is a FIFO, not a regular file "
                                   "(--on-bad-data skip leaves such documents out)"]
    code, lines = prepare(corpus, capfd, "--on-bad-data", "skip")
    assert code == 0 and "skipped: 1 not_regular_file" in lines[-1]
    assert read_sidecar(str(corpus / "out" / "p"))["skipped"]["reasons"] == {"not_regular_file": 1}
    code, lines = run_herd(["prepare-data", "in/f.txt", "--out", "out/q", "--tokenizer-path", "tok.json"], capfd)
    assert code == 2 and lines == ["herd: error: in/f.txt: input is a FIFO, not a regular file or a "
                                   "directory"]


def test_tokenizer_errors_name_the_flag_and_say_what_is_there(corpus, capfd):
    (corpus / "tokdir").mkdir()
    missing = run_herd(["prepare-data", "in", "--out", "out/p", "--tokenizer-path", "nope.json"], capfd)
    directory = run_herd(["prepare-data", "in", "--out", "out/p", "--tokenizer-path", "tokdir"], capfd)
    assert missing == (2, ["herd: error: --tokenizer-path: nope.json: tokenizer file not found (expected a "
                           "tokenizers tokenizer.json)"])
    assert directory == (2, ["herd: error: --tokenizer-path: tokdir: is a directory, not a regular file (expected a "
                             "tokenizers tokenizer.json)"])


def test_training_refuses_data_of_a_tokenizer_with_the_same_size_but_other_tokens(corpus, capfd):
    from engine.run import check_prepared_with
    assert prepare(corpus, capfd)[0] == 0
    other = train_bpe(["completely different words: zebra yak xylophone quartz\n"] * 20, 300,
                      str(corpus / "other.json"))
    ours = HFTokenizer(str(corpus / "tok.json"))
    assert (other.vocab_size, other.eod_id) == (ours.vocab_size, ours.eod_id)  # what alone was compared before
    data = [DatasetConfig(path=str(corpus / "out" / "p"))]
    check_prepared_with(data, ours)  # its own tokenizer, also from a copy elsewhere
    (corpus / "copy.json").write_bytes((corpus / "tok.json").read_bytes())
    check_prepared_with(data, HFTokenizer(str(corpus / "copy.json")))
    with pytest.raises(ConfigError, match=r"whose tokens differ from those of hf:.*other\.json \(same vocabulary "
                                          r"size 300, another token -> id mapping"):
        check_prepared_with(data, other)


def test_token_files_that_are_not_regular_files_or_too_long_a_name_are_one_line(corpus, capfd):
    assert prepare(corpus, capfd)[0] == 0
    pairs = corpus / "pairs"
    pairs.mkdir()
    (pairs / "d.bin").write_bytes((corpus / "out" / "p.bin").read_bytes())
    (pairs / "d.idx").mkdir()
    (pairs / "z.bin").write_bytes((corpus / "out" / "p.bin").read_bytes())
    (pairs / "z.idx").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"d\.idx: is a directory, not a regular file \(write it with `herd prepare-data`\)"):
        IndexedDataset(str(pairs / "d"))
    with pytest.raises(DataError, match=r"z\.idx: is a symlink to /dev/zero, a character device, not a regular file \("):
        IndexedDataset(str(pairs / "z"))
    with pytest.raises(DataError, match="File name too long"):
        IndexedDataset(str(pairs / ("a" * 300)))
    (corpus / "out" / "p.json").unlink()
    (corpus / "out" / "p.json").mkdir()  # a summary that is a directory used to be ignored, tokenizer check and all
    with pytest.raises(DataError, match=r"p\.json: is a directory"):
        read_sidecar(str(corpus / "out" / "p"))


def test_the_summary_records_the_vocabulary_fingerprint_and_a_bad_one_is_refused(corpus, capfd):
    assert prepare(corpus, capfd)[0] == 0
    meta = json.loads((corpus / "out" / "p.json").read_text())
    assert meta["vocab_sha256"] == HFTokenizer(str(corpus / "tok.json")).vocab_fingerprint
    meta["vocab_sha256"] = "not hex"
    (corpus / "out" / "p.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"vocab_sha256: expected 64 hex digits"):
        read_sidecar(str(corpus / "out" / "p"))


def test_messages_say_what_was_left_out_and_a_bom_is_read(corpus, capfd):
    (corpus / "bad").mkdir()
    (corpus / "bad" / "x.txt").write_bytes(b"\xff\xfe not utf-8\n")
    code, lines = run_herd(["prepare-data", "bad", "--out", "out/p", "--tokenizer-path", "tok.json",
                            "--on-bad-data", "skip"], capfd)
    assert (code, lines) == (2, ["herd: error: no documents with text in bad (left out: 1 bad_utf8)"])
    rows = corpus / "rows.jsonl"  # an editor's byte-order mark before line 1; an integer past Python's limit
    rows.write_bytes(b'\xef\xbb\xbf{"text": "hello there"}\n{"text": "x", "n": ' + b"1" * 5000 + b"}\n")
    code, lines = run_herd(["prepare-data", str(rows), "--out", "out/p", "--tokenizer-path", "tok.json"], capfd)
    assert (code, lines) == (2, [f"herd: error: {rows}:2: invalid JSON: an integer of more than 4300 digits "
                                 f"(--on-bad-data skip leaves such documents out)"])
    code, lines = run_herd(["prepare-data", str(rows), "--out", "out/p", "--tokenizer-path", "tok.json",
                            "--on-bad-data", "skip"], capfd)
    assert code == 0 and "all: 1 documents" in lines[-1] and "1 bad_json" in lines[-1]


def test_a_corrupt_document_index_is_refused(corpus, capfd):
    import numpy as np
    assert prepare(corpus, capfd)[0] == 0
    idx = corpus / "out" / "p.idx"
    raw = bytearray(idx.read_bytes())
    raw[-8:] = np.int64(len(TEXTS) + 5).tobytes()  # Megatron's doc_index must end at the sequence count
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"p\.idx: the document index is not 0 \.\. 4 in order \(corrupt index\)"):
        IndexedDataset(str(corpus / "out" / "p"))
