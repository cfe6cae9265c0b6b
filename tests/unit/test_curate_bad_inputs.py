"""Malformed curation inputs are counted and reported, never a crash or a hang (issue 19; found by a bad-input hunt,
helper H30): a JSONL string with a lone surrogate escape, a file name that is not UTF-8, a FIFO and a symlink to
/dev/zero inside an input directory; and `herd curate train-classifier` leaves out the same inputs, and refuses to
overwrite a fastText model of other labels."""

import gzip
import json
import os

import pytest
from datatrove.pipeline.writers import JsonlWriter

from curate.read import CorpusReader, list_corpus
from engine.errors import HerdError

WORDS = "a document with enough plain words in it to be a document"


def _bad_corpus(root):
    root.mkdir()
    (root / "good.txt").write_text(WORDS + " one")
    (root / "rows.jsonl").write_text('{"text": "lone \\ud800 surrogate"}\n' + json.dumps({"text": WORDS + " two"}) +
                                     "\n" + '{"text": "' + WORDS + '", "url": "https://x.org/\\udfff"}\n')
    os.mkfifo(root / "pipe.txt")  # reading it would block forever
    os.symlink("/dev/zero", root / "zero.txt")  # reading it would never end
    (root / "named.txt").write_text(WORDS + " three")
    os.rename(root / "named.txt", os.fsencode(root) + b"/bad\xffname.txt")
    return root


def test_malformed_inputs_are_counted_by_reason_and_the_rest_is_read(tmp_path):
    files = list_corpus([str(_bad_corpus(tmp_path / "in"))], ["*.txt", "*.jsonl"])
    reader = CorpusReader(files, JsonlWriter(str(tmp_path / "removed")))
    docs = list(reader.run(None, 0, 1))
    assert sorted(d.text for d in docs) == [WORDS + " one", WORDS + " two"]
    stats = {k: v.total for k, v in reader.stats.stats.items() if k.startswith("malformed_")}
    assert stats == {"malformed_bad_utf8": 2, "malformed_not_regular_file": 2, "malformed_bad_file_name": 1}, stats
    removed = [json.loads(line) for path in (tmp_path / "removed").rglob("*.jsonl*")
               for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    # the records name the file (its undecodable byte escaped) and the line
    assert {r["id"] for r in removed} == {str(tmp_path / "in" / "bad\\xffname.txt"), str(tmp_path / "in" / "pipe.txt"),
                                          "/dev/zero", str(tmp_path / "in" / "rows.jsonl:1"),
                                          str(tmp_path / "in" / "rows.jsonl:3")}


def test_classifier_examples_leave_out_what_the_reader_would_count(tmp_path):
    from curate.models import _examples
    root = _bad_corpus(tmp_path / "in")
    (root / "binary.txt").write_bytes(b"\x00\x01binary")
    (root / "deep.jsonl").write_text("[" * 200000 + "\n" + json.dumps({"text": WORDS + " four"}) + "\n")
    texts = _examples([str(root)])
    # the record whose URL holds a surrogate still gives its text (a classifier reads nothing else)
    assert sorted(texts) == [WORDS, WORDS + " four", WORDS + " one", WORDS + " two"]


def test_a_retrain_replaces_only_a_model_of_the_same_labels(tmp_path, capsys):
    from launch.cli import main
    for name in ("good", "bad", "code", "prose"):
        (tmp_path / name).mkdir()
        for i in range(6):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} example number {i} " * 5)
    out = tmp_path / "model.bin"
    assert main(["curate", "train-classifier", "--class", f"code={tmp_path / 'code'}", "--class",
                 f"prose={tmp_path / 'prose'}", "--out", str(out)]) == 0
    before = out.read_bytes()
    quality = ["curate", "train-classifier", "--positive", str(tmp_path / "good"), "--negative", str(tmp_path / "bad")]
    capsys.readouterr()
    assert main(quality + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a fastText model of other labels (code, prose)" in err, err
    assert out.read_bytes() == before  # the other model is left as it was
    assert main(["curate", "train-classifier", "--class", f"code={tmp_path / 'code'}", "--class",
                 f"prose={tmp_path / 'prose'}", "--out", str(out), "--epochs", "3"]) == 0  # its own retrain


def test_an_output_inside_an_input_directory_is_refused(tmp_path):
    from curate.config import load
    (tmp_path / "raw").mkdir()
    with pytest.raises(HerdError) as e:
        load("configs/curate/demo.yaml", [f"input.paths=[{tmp_path / 'raw'}]", f"output_dir={tmp_path / 'raw' / 'o'}"])
    assert "lies inside input.paths[0]" in str(e.value) and e.value.key == "output_dir"
