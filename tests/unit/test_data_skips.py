"""Nothing dropped silently, nothing malformed read as data (issue 15, TESTING.md R14/R20): what prepare-data and
training-time token reading skip under on_bad_data=skip is counted by reason, per file with line numbers or
document ids, printed, written to PREFIX.json / <run>/skipped.json and the first metrics.jsonl record; otherwise
the reader stops with one line naming the file (and line or key). metrics.jsonl is strict JSON, NaN included."""

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.callbacks.base import Callback
from engine.callbacks.writers import JsonlCallback, strict_record
from engine.config import DataConfig, DatasetConfig, TokenizerConfig
from engine.data.indexed import IndexedDataset, IndexedWriter, read_sidecar
from engine.data.loader import build_blend
from engine.data.prepare import prepare_data
from engine.data.tokenizer import load_tokenizer, train_bpe
from engine.errors import DataError
from engine.run import build_trainer, check_prepared_with
from launch.cli import main as herd
from tests.helpers import make_corpus, tiny_config

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. " * 5,
         "import os\nprint(os.getcwd())\n"]


def strict_loads(line: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as any RFC 8259 parser does."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    train_bpe(TEXTS * 4, vocab_size=300, out_path=str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(TokenizerConfig(kind="hf", path=str(tokenizer_path)))


# ---------------------------------------------------------------- prepare-data


def write_mixed_corpus(root: Path) -> Path:
    """Good documents between one of every kind of bad JSONL line, plus an empty and a non-UTF-8 text file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": TEXTS[0]}),                   # 1 good
             "{not json",                                       # 2 bad_json
             json.dumps({"txt": "wrong key"}),                  # 3 missing_field
             json.dumps({"text": None}),                        # 4 bad_field (null)
             json.dumps([{"text": "a list, not an object"}]),   # 5 not_an_object
             '{"text": "ab\\ud800cd"}',                         # 6 lone_surrogate (json.loads accepts it)
             json.dumps({"text": "   "}),                       # 7 empty (always skipped)
             '{"text": "pair \\ud83c\\udf89 is fine"}',         # 8 good: a valid surrogate pair is one emoji
             "[" * 100_000,                                     # 9 bad_json (nested too deeply)
             json.dumps({"text": TEXTS[1]})]                    # 10 good
    (root / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')  # 11 bad_utf8
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes(b"good line\nsecond \xff line\n")
    (root / "ok.txt").write_text(TEXTS[2])
    return root


def test_prepare_skip_counts_every_reason_per_file_and_line(tmp_path, tokenizer):
    src = write_mixed_corpus(tmp_path / "src")
    report = prepare_data([str(src)], str(tmp_path / "out"), tokenizer, on_bad_data="skip",
                          patterns=("*.jsonl", "*.txt"))
    expected = {"bad_json": 2, "missing_field": 1, "bad_field": 1, "not_an_object": 1, "lone_surrogate": 1,
                "empty": 2, "bad_utf8": 2}
    assert dict(report.skipped) == expected
    assert report.documents == {"all": 4}  # lines 1, 8, 10 and ok.txt
    assert len(IndexedDataset(str(tmp_path / "out"))) == 4
    meta = json.loads((tmp_path / "out.json").read_text())
    skipped = meta["skipped"]
    assert skipped["total"] == 10 and skipped["reasons"] == expected
    jsonl = skipped["files"][str(src / "a.jsonl")]
    assert jsonl["reasons"] == {"bad_json": 2, "missing_field": 1, "bad_field": 1, "not_an_object": 1,
                                "lone_surrogate": 1, "empty": 1, "bad_utf8": 1}
    assert jsonl["examples"]["bad_json"] == ["line 2", "line 9"]
    assert jsonl["examples"]["lone_surrogate"] == ["line 6"] and jsonl["examples"]["bad_utf8"] == ["line 11"]
    assert skipped["files"][str(src / "latin1.txt")] == {"reasons": {"bad_utf8": 1},
                                                         "examples": {"bad_utf8": ["line 2"]}}
    assert skipped["files"][str(src / "empty.txt")]["examples"] == {"empty": ["whole file"]}
    assert report.summary() == (f"all: 4 documents, {report.tokens['all']:,} tokens; skipped: 1 bad_field, "
                                f"2 bad_json, 2 bad_utf8, 2 empty, 1 lone_surrogate, 1 missing_field, "
                                f"1 not_an_object (per file and line in {tmp_path / 'out'}.json)")


@pytest.mark.parametrize("line, message", [
    ('{"text": "ab\\ud800cd"}', r"d\.jsonl:2: 'text' holds a lone surrogate \\ud800 at character 2"),
    ('{"text": null}', r"d\.jsonl:2: 'text': expected a string, got null"),
    ('["text"]', r"d\.jsonl:2: expected a JSON object with a string field 'text', got a list"),
    ('{"body": "x"}', r"d\.jsonl:2: missing field 'text' \(found: \"body\"\)"),
    ("[" * 100_000, r"d\.jsonl:2: invalid JSON: nested too deeply"),
    ('{"text": "x", "n": ' + "1" * 5000 + "}", r"d\.jsonl:2: invalid JSON: an integer of more than 4300 digits"),
])
def test_prepare_error_names_file_and_line(tmp_path, tokenizer, line, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message) as info:
        prepare_data([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), tokenizer)
    assert "\n" not in str(info.value) and "--on-bad-data skip" in str(info.value)
    assert not (tmp_path / "out.bin").exists()


def test_prepare_counts_a_line_of_unicode_whitespace_as_an_empty_document(tmp_path, tokenizer):
    """A line that bytes.strip() keeps but str.strip() empties (no-break space, information separator, U+2028) is
    an empty document: counted, never an error (it had been a TypeError traceback)."""
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "fine"}\n' + "\u00a0".encode() + b"\n\x1c\n"
                                       + "\u2028".encode() + b'\n{"text": "also fine"}\n')
    report = prepare_data([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), tokenizer)
    assert report.documents == {"all": 2} and dict(report.skipped) == {"empty": 3}


def test_prepare_cli_prints_one_error_line_or_the_skip_counts(tmp_path, tokenizer_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": "x\\udfff"}\n{"text": "also fine"}\n')
    base = ["prepare-data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "out"), "--tokenizer", "hf",
            "--tokenizer-path", str(tokenizer_path)]
    assert herd(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"herd: error: {tmp_path / 'd.jsonl'}:2: 'text' holds a lone "
                                                   f"surrogate \\udfff at character 1")
    assert herd(base + ["--on-bad-data", "skip"]) == 0
    out = capsys.readouterr().out
    assert "all: 2 documents" in out and "skipped: 1 lone_surrogate (per file and line in" in out


# ---------------------------------------------------------------- token files at training time


def write_pair(prefix: Path, docs, dtype=np.uint16) -> Path:
    writer = IndexedWriter(str(prefix), dtype)
    for doc in docs:
        writer.add_document(np.asarray(doc))
    writer.finalize()
    return prefix


def data_config(on_bad_data: str) -> DataConfig:
    return DataConfig(seq_len=8, on_bad_data=on_bad_data)


def bad_shards(root: Path) -> dict:
    """One good pair and one of each kind of bad pair; prefix by name."""
    good = [list(range(1, 20)) + [0], list(range(30, 50)) + [0]]
    shards = {"good": write_pair(root / "good", good),
              "vocab": write_pair(root / "vocab", [list(range(1, 20)) + [0], [5, 600, 0], list(range(1, 12)) + [0],
                                                   [70000 % 65536, 1, 0]]),
              "truncated": write_pair(root / "truncated", good),
              "empty": root / "empty",
              "garbage": write_pair(root / "garbage", good),
              "short": write_pair(root / "short", [[1, 2, 0]])}
    data = (root / "truncated.bin").read_bytes()
    (root / "truncated.bin").write_bytes(data[:-3])
    IndexedWriter(str(root / "empty"), np.uint16).finalize()
    (root / "garbage.idx").write_bytes(b"\x00garbage bytes, not an index, long enough for a header\xff" * 2)
    return {name: str(prefix) for name, prefix in shards.items()}


def test_token_file_skips_are_counted_by_reason_file_and_document(tmp_path):
    shards = bad_shards(tmp_path)
    datasets = [DatasetConfig(path=p) for p in shards.values()]
    blend = build_blend(datasets, data_config("skip"), vocab_size=512)
    assert len(blend.datasets) == 2  # good, and vocab without its two bad documents
    assert blend.datasets[1].documents.tolist() == [0, 2]
    report = blend.skips.as_dict()
    assert report["reasons"] == {"token_id_out_of_vocab": 2, "shard_truncated": 1, "shard_empty": 1,
                                 "shard_corrupt": 1, "shard_too_short": 1}
    assert report["files"][shards["vocab"]]["examples"] == {"token_id_out_of_vocab": ["document 1", "document 3"]}
    assert report["files"][shards["truncated"]]["examples"]["shard_truncated"] == [
        f"{shards['truncated']}.bin: 79 bytes but the index describes 82 (truncated or mismatched pair)"]
    assert blend.skips.metrics() == {"data_skipped": 6, "data_skipped_shard_corrupt": 1, "data_skipped_shard_empty": 1,
                                     "data_skipped_shard_too_short": 1, "data_skipped_shard_truncated": 1,
                                     "data_skipped_token_id_out_of_vocab": 2}


@pytest.mark.parametrize("name, message", [
    ("vocab", r"vocab\.bin: document 1 holds token id 600, outside the model's vocabulary of 512 \(2 such"),
    ("truncated", r"truncated\.bin: 79 bytes but the index describes 82"),
    ("empty", r"empty\.idx: the dataset holds no tokens"),
    ("garbage", r"garbage\.idx: not an indexed-dataset index"),
    ("short", r"short\.bin: 3 tokens, fewer than one sample of data\.seq_len \+ 1 = 9"),
])
def test_token_file_errors_name_the_file(tmp_path, name, message):
    shards = bad_shards(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        build_blend([DatasetConfig(path=shards["good"]), DatasetConfig(path=shards[name])], data_config("error"),
                    vocab_size=512)
    assert "\n" not in str(info.value)


def test_nothing_left_to_blend_and_a_missing_file_are_errors_under_skip(tmp_path):
    shards = bad_shards(tmp_path)
    with pytest.raises(DataError, match=r"no usable data in .*truncated, .*empty: every dataset was left out under "
                                        r"data.on_bad_data=skip \(2 skipped \(1 shard_empty, 1 shard_truncated\)\)"):
        build_blend([DatasetConfig(path=shards["truncated"]), DatasetConfig(path=shards["empty"])],
                    data_config("skip"), vocab_size=512)
    with pytest.raises(DataError, match=r"nope\.idx: file not found"):
        build_blend([DatasetConfig(path=shards["good"]), DatasetConfig(path=str(tmp_path / "nope"))],
                    data_config("skip"), vocab_size=512)


def header(n_seq: int, n_doc: int, magic=b"MMIDIDX\x00\x00", version=1, code=8) -> bytes:
    return struct.pack("<9sQBQQ", magic, version, code, n_seq, n_doc)


@pytest.mark.parametrize("content, message", [
    (b"", r"x\.idx: truncated index \(0 bytes, header needs 34\)"),
    (header(2, 3)[:20], r"x\.idx: truncated index \(20 bytes"),
    (header(2, 3, magic=b"NOTANIDX\x00"), r"x\.idx: not an indexed-dataset index"),
    (header(2, 3, version=7), r"x\.idx: not an indexed-dataset index \(magic .*, version 7\)"),
    (header(2, 3, code=6), r"x\.idx: unsupported token dtype code 6"),
    (header(2, 3, code=99), r"x\.idx: unsupported token dtype code 99"),
    (header(2**60, 3), r"x\.idx: truncated or padded index \(34 bytes, expected"),
    (header(2, 3) + np.asarray([5, -9], np.int32).tobytes() + np.zeros(2, np.int64).tobytes()
     + np.arange(3, dtype=np.int64).tobytes(), r"x\.idx: negative document sizes"),
    (header(2, 3) + np.asarray([5, 5], np.int32).tobytes() + np.asarray([0, 3], np.int64).tobytes()
     + np.arange(3, dtype=np.int64).tobytes(), r"x\.idx: document sizes and offsets disagree"),
])
def test_truncated_or_garbage_idx_is_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / "x.idx").write_bytes(content)
    (tmp_path / "x.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match=message) as info:
        IndexedDataset(str(tmp_path / "x"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- PREFIX.json sidecar


@pytest.mark.parametrize("content, message", [
    ("{not json", r"p\.json: not JSON \(Expecting property name enclosed in double quotes at line 1 column 2\)"),
    ("[1, 2]", r"p\.json: expected a JSON object \(the summary `herd prepare-data` writes\), got a list"),
    ('{"tokenizer": "t", "vocab_size": 300, "eod_id": "3"}', r"p\.json: eod_id: expected an integer, got a string "
                                                             r"\"3\""),
    ('{"tokenizer": "t", "vocab_size": true, "eod_id": 3}', r"p\.json: vocab_size: expected an integer, got a "
                                                            r"boolean true"),
    ('{"tokenizer": "t", "vocab_size": 300}', r"p\.json: eod_id: missing"),
    ('{"tokenizer": null, "vocab_size": 300, "eod_id": 3}', r"p\.json: tokenizer: expected a string, got null"),
    ('{"tokenizer": "t", "vocab_size": 300, "eod_id": -1}', r"p\.json: eod_id: expected a non-negative integer"),
    ('{"tokenizer": "t", "vocab_size": 300, "eod_id": 300}', r"p\.json: eod_id: 300 is outside vocab_size 300"),
    ('{"tokenizer": "t", "vocab_size": 300, "eod_id": 3, "tokens": 1.5}', r"p\.json: tokens: expected a "
                                                                          r"non-negative integer, got a number 1.5"),
])
def test_malformed_sidecar_is_one_line_naming_file_and_key(tmp_path, tokenizer, content, message):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        check_prepared_with([DatasetConfig(path=str(tmp_path / "p"))], tokenizer)
    assert "\n" not in str(info.value)


def test_sidecar_not_utf8_and_prepared_sidecar_reads_back(tmp_path, tokenizer):
    (tmp_path / "p.json").write_bytes(b'{"tokenizer": "\xff"}')
    with pytest.raises(DataError, match=r"p\.json: not UTF-8"):
        read_sidecar(str(tmp_path / "p"))
    assert read_sidecar(str(tmp_path / "absent")) is None
    (tmp_path / "doc.txt").write_text(TEXTS[0])
    prepare_data([str(tmp_path / "doc.txt")], str(tmp_path / "ok"), tokenizer)
    meta = read_sidecar(str(tmp_path / "ok"))
    assert meta["eod_id"] == tokenizer.eod_id and meta["skipped"]["total"] == 0


# ---------------------------------------------------------------- metrics.jsonl and the run's report


def test_jsonl_writes_nonfinite_metrics_as_null(tmp_path):
    writer = JsonlCallback(tmp_path / "m.jsonl")
    trainer = type("T", (), {})()
    trainer.state = type("S", (), {"step": 3})()
    writer.on_fit_start(trainer)
    writer.once = {"data_skipped": 2}
    writer.on_step_end(trainer, {"loss": float("nan"), "lr": 1e-3, "val_ppl": float("inf"),
                                 "grad_norm": np.float32("-inf"), "tokens": np.int64(7)})
    trainer.state.step = 4
    writer.on_step_end(trainer, {"loss": 2.5})
    writer.on_fit_end(trainer)
    first, second = [strict_loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert first == {"step": 3, "loss": None, "lr": 1e-3, "val_ppl": None, "grad_norm": None, "tokens": 7,
                     "data_skipped": 2, "nonfinite": {"loss": "nan", "val_ppl": "inf", "grad_norm": "-inf"}}
    assert second == {"step": 4, "loss": 2.5}  # the once fields went into the first record only
    assert strict_record({"ok": 1.0, "flag": True}) == {"ok": 1.0, "flag": True}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


class PoisonWeights(Callback):
    """Before step `at`, one NaN in a norm weight: from then on the loss is NaN and the guard skips the updates."""

    def __init__(self, at: int):
        self.at = at

    def on_step_start(self, trainer) -> None:
        if trainer.state.step + 1 == self.at:
            weight = next(p for n, p in trainer.module.model.named_parameters() if n.endswith("norm.weight"))
            with torch.no_grad():
                weight.view(-1)[0] = float("nan")


def test_training_run_reports_skips_and_keeps_metrics_strict_through_a_nan_step(corpus, tmp_path):
    """A blend with a pair holding out-of-vocabulary documents and a truncated validation pair, under skip, and a
    NaN loss from step 3 on (the guard skips those updates): one console line, skipped.json, data_skipped fields in
    the first record, and every metrics.jsonl line strict JSON with the NaN loss as null."""
    clean = IndexedDataset(f"{corpus}/corpus.train")
    docs = [np.asarray(clean[i]) for i in range(6)]
    docs[1] = docs[1].copy()
    docs[1][0] = 9999  # outside model.vocab_size=512
    write_pair(tmp_path / "mixed", docs)
    write_pair(tmp_path / "cut", docs[:1])
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:-2])
    cfg = tiny_config(corpus, tmp_path / "runs", [
        f"data.train=[{{path: {corpus}/corpus.train}}, {{path: {tmp_path}/mixed, weight: 0.5}}]",
        f"data.valid=[{{path: {corpus}/corpus.valid}}, {{path: {tmp_path}/cut}}]", "data.on_bad_data=skip",
        "train.steps=4", "train.eval_every=0", "log.tensorboard=false"])
    out = io.StringIO()
    trainer = build_trainer(cfg, stream=out)
    trainer.callbacks.insert(0, PoisonWeights(at=3))
    trainer.fit()
    run = tmp_path / "runs" / "t"
    report = json.loads((run / "skipped.json").read_text())
    assert report["reasons"] == {"shard_truncated": 1, "token_id_out_of_vocab": 1}
    assert report["files"][f"{tmp_path}/mixed"]["examples"] == {"token_id_out_of_vocab": ["document 1"]}
    lines = [line for line in out.getvalue().splitlines() if line.startswith("data: ")]
    assert lines == [f"data: 2 skipped (1 shard_truncated, 1 token_id_out_of_vocab); per file and line in "
                     f"{run / 'skipped.json'}"]
    records = [strict_loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["data_skipped"] == 2 and records[0]["data_skipped_token_id_out_of_vocab"] == 1
    assert all("data_skipped" not in r for r in records[1:])
    assert [r["loss"] is None for r in records] == [False, False, True, True]
    assert records[2]["nonfinite"]["loss"] == "nan" and "nonfinite" not in records[1]
    assert records[2]["guard_skipped"] == 1.0 and records[3]["skipped_steps"] == 2.0
    assert "guards: non-finite loss or gradients at step 3 on every rank: update skipped" in out.getvalue()
