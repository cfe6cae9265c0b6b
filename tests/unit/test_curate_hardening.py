"""`herd curate` hardening (bad-input hunt H46): files behind a setting's path changing between runs, concurrent
runs into one output_dir, models whose labels do not fit their role, settings that were silently ignored, stale
or missing reports, an empty blend, and records whose url or date cannot be used."""

import fcntl
import json
import os
import random
from pathlib import Path

import pytest

from curate.config import load
from curate.run import corpus_files
from engine.errors import ConfigError, HerdError

LOCK = ".herd-lock"  # curate/run.py LOCK
WORDS = ("apple pear plum grape melon berry cherry peach lemon lime mango kiwi fig date guava papaya orange banana "
         "hammer wrench drill saw chisel pliers clamp screw bolt nut rivet anvil file rasp vise lathe").split()


def _corpus(root: Path, n: int = 6) -> Path:
    raw = root / "raw"
    raw.mkdir()
    for i in range(n):
        rng = random.Random(i)
        (raw / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(60)) + f" doc {i}.\n")
    return raw


def _yaml(root: Path, raw: Path, **extra) -> str:
    cfg = {"name": "t", "output_dir": str(root / "out"), "input": {"paths": [str(raw)], "include": ["*.txt"]},
           "executor": {"tasks": 1, "workers": 1}, "minhash": {"enabled": False},
           "line_dedup": {"enabled": False}, "heuristics": {"kl": False},
           "tokenize": {"enabled": False}, **extra}
    path = root / "c.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def _model(root: Path, name: str, classes: dict) -> str:
    from curate.models import train_classifier
    folders = {}
    for label, words in classes.items():
        folder = root / f"{name}-{label}"
        folder.mkdir()
        for i in range(4):
            (folder / f"{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(20)))
        folders[label] = [str(folder)]
    out = root / f"{name}.bin"
    train_classifier(folders, str(out), epochs=10)
    return str(out)


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# 1: a file behind the same path changed since the run began

def test_a_changed_file_behind_a_setting_is_refused_naming_the_key(tmp_path):
    raw = _corpus(tmp_path)
    words = tmp_path / "dirty.txt"
    words.write_text("zzzz\n")
    yaml = _yaml(tmp_path, raw, heuristics={"kl": False, "dirty_words_file": str(words), "max_dirty_words": 0})
    corpus_files(load(yaml))
    corpus_files(load(yaml))  # unchanged: resumed
    words.write_text("apple\n")
    with pytest.raises(HerdError) as e:
        corpus_files(load(yaml))
    assert "heuristics.dirty_words_file" in _one_line(e) and "changed since that run" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [LOCK, "inputs.json", "pipeline.json"]


def test_a_record_without_fingerprints_still_resumes(tmp_path):
    raw = _corpus(tmp_path)
    words = tmp_path / "dirty.txt"
    words.write_text("zzzz\n")
    yaml = _yaml(tmp_path, raw, heuristics={"kl": False, "dirty_words_file": str(words)})
    corpus_files(load(yaml))
    record = tmp_path / "out" / "pipeline.json"
    old = json.loads(record.read_text())
    del old["files"]  # as herd wrote it before fingerprints
    record.write_text(json.dumps(old))
    words.write_text("apple\n")
    assert corpus_files(load(yaml))  # nothing recorded to compare with: accepted as before


# 2: one run at a time into an output_dir

def test_a_second_run_into_a_locked_output_dir_is_refused_naming_the_holder(tmp_path, capsys):
    from launch.cli import main
    raw = _corpus(tmp_path)
    yaml = _yaml(tmp_path, raw)
    corpus_files(load(yaml))
    lock = tmp_path / "out" / LOCK
    with open(lock, "a+b") as other:  # another run's open file description (this process: its pid is named)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(["curate", yaml]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another herd curate run (held by pid {os.getpid()} on " in err[0], err
        assert not (tmp_path / "out" / "data").exists()  # no pass ran
    before = lock.stat()
    assert main(["curate", yaml]) == 0  # let go: the run goes ahead
    with open(lock, "a+b") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the finished run let go of it too
    assert (lock.stat().st_mtime_ns, lock.stat().st_size) == (before.st_mtime_ns, 0)  # never written: a rerun
    #                                                                 changes no file of a finished run


# 4: a model's labels fit its role

def test_models_whose_labels_do_not_fit_their_role_are_refused(tmp_path):
    raw = _corpus(tmp_path)
    fruit, tools = WORDS[:18], WORDS[18:]
    domain = _model(tmp_path, "dom", {"code": tools, "math": fruit})
    quality = _model(tmp_path, "q", {"hq": fruit, "lq": tools})
    lid = _model(tmp_path, "lid", {"en": fruit, "fr": tools})
    yaml = _yaml(tmp_path, raw)
    cases = [([f"models.quality_model={domain}"], "models.quality_model", "no label hq"),
             ([f"models.domain_model={quality}"], "models.domain_model", "none of the domains"),
             ([f"models.domain_model={domain}", "tokenize.enabled=true", "tokenize.mix.math=0",
               "tokenize.mix.code=0"], "models.domain_model", "none of the domains general, multilingual"),
             ([f"models.language_model={lid}", "models.language=true", "models.languages=[EN]"],
              "models.languages", "EN not among the labels")]
    for overrides, key, message in cases:
        with pytest.raises(ConfigError) as e:
            load(yaml, overrides)
        assert e.value.key == key and message in _one_line(e), str(e.value)
    load(yaml, [f"models.quality_model={quality}", f"models.domain_model={domain}", f"models.language_model={lid}",
                "models.language=true", "models.languages=[en]"])  # each in its role: accepted


# 3: a document the quality classifier removes keeps its text in the removal record

def test_quality_removals_keep_their_text_and_reason(tmp_path):
    import gzip

    from datatrove.data import Document
    from datatrove.pipeline.writers import JsonlWriter

    from curate.models import LocalFastTextFilter
    fruit, tools = WORDS[:18], WORDS[18:]
    quality = _model(tmp_path, "q", {"hq": fruit, "lq": tools})
    step = LocalFastTextFilter(quality, keep_labels=("hq", 0.5), newline_replacement=" ", filter_mode="DOCUMENT",
                               exclusion_writer=JsonlWriter(str(tmp_path / "removed")))
    good, bad = " ".join(fruit * 2), " ".join(tools * 2)
    kept = list(step.run(iter([Document(text=good, id="good"), Document(text=bad, id="bad")]), 0, 1))
    assert [(d.id, d.text) for d in kept] == [("good", good)]
    removed = [json.loads(line) for f in sorted((tmp_path / "removed").glob("*.gz")) for line in gzip.open(f, "rt")]
    assert [(r["id"], r["text"], r["metadata"]["filter_reason"]) for r in removed] == [("bad", bad, "low_quality")]


# 5, 6, 7, 10 (time), 13 (pattern): settings refused when loaded

@pytest.mark.parametrize("overrides,key,message", [
    (["input.html_timeout_s=2147484"], "input.html_timeout_s", "at most 2147483"),
    (["models.language_model=LID"], "models.language", "set models.language=true"),
    (["tokenize.tokenizer=llama3", "tokenize.tokenizer_path=WORDS"], "tokenize.tokenizer_path", "llama3"),
    (["executor.kind=slurm", "executor.partition=cpu", "executor.time=forever"], "executor.time", "[D-]HH:MM:SS"),
    (["input.include=['*.txt','/abs/*.md']"], "input.include[1]", "relative"),
])
def test_settings_that_would_be_ignored_or_break_later_are_refused(tmp_path, overrides, key, message):
    raw = _corpus(tmp_path)
    words = tmp_path / "w.txt"
    words.write_text("x\n")
    lid = tmp_path / "lid.bin"
    from curate.models import FASTTEXT_MAGIC
    lid.write_bytes(FASTTEXT_MAGIC + b"\0" * 60)
    overrides = [o.replace("LID", str(lid)).replace("WORDS", str(words)) for o in overrides]
    with pytest.raises(ConfigError) as e:
        load(_yaml(tmp_path, raw), overrides)
    assert e.value.key == key and message in _one_line(e), str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_slurm_time_in_slurm_form_is_accepted(tmp_path):
    raw = _corpus(tmp_path)
    for time in ("00:30:00", "2-00:00:00", "'100:00:00'"):
        load(_yaml(tmp_path, raw), ["executor.kind=slurm", "executor.partition=cpu", f"executor.time={time}"])


# 10: no sbatch: one line before anything is written

def test_slurm_without_sbatch_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    from curate.run import submit_slurm
    raw = _corpus(tmp_path)
    cfg = load(_yaml(tmp_path, raw), ["executor.kind=slurm", "executor.partition=cpu"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(HerdError) as e:
        submit_slurm(cfg)
    assert "slurm needs sbatch on PATH" in _one_line(e) and not (tmp_path / "out").exists()


def test_a_failing_sbatch_is_one_line(tmp_path, monkeypatch):
    from curate.run import submit_slurm
    raw = _corpus(tmp_path)
    cfg = load(_yaml(tmp_path, raw), ["executor.kind=slurm", "executor.partition=cpu"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: no cluster' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(HerdError) as e:
        submit_slurm(cfg)
    assert "sbatch failed (exit status 1, its message above)" in _one_line(e)


# 13: include patterns with a directory part

def test_an_include_pattern_with_a_directory_matches_the_relative_path(tmp_path):
    from curate.read import list_corpus
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.md").write_text("b")
    (tmp_path / "sub" / "c.md").write_text("c")
    (tmp_path / "sub" / "d.md.gz").write_bytes(b"")
    found = list_corpus([str(tmp_path)], ["*.txt", "sub/*.md"])
    assert [Path(f).relative_to(tmp_path).as_posix() for f in found] == ["a.txt", "sub/c.md", "sub/d.md.gz"]


# 11: a record's url or date that cannot be used is counted, never dropped silently

def test_a_record_with_an_unusable_date_or_url_is_counted_with_file_and_line(tmp_path):
    import gzip

    from datatrove.pipeline.writers import JsonlWriter

    from curate.read import CorpusReader
    rows = [{"id": "a", "text": "page a", "url": "http://x", "date": "2023-01-01"},
            {"id": "b", "text": "page b", "url": "http://x", "date": 2024},
            {"id": "c", "text": "page c", "url": "http://x", "date": "yesterday"},
            {"id": "d", "text": "page d", "url": 12345},
            {"id": "e", "text": "page e", "url": None, "date": ""}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reader = CorpusReader([str(path)], JsonlWriter(str(tmp_path / "removed")))
    kept = list(reader.run(None, 0, 1))
    assert [d.id for d in kept] == ["a", "e"]
    removed = [json.loads(line) for f in sorted((tmp_path / "removed").glob("*.gz"))
               for line in gzip.open(f, "rt")]
    assert [(r["id"], r["metadata"]["filter_reason"]) for r in removed] == [
        (f"{path}:2", "bad_date"), (f"{path}:3", "bad_date"), (f"{path}:4", "bad_url")]


# 16: files added after the first run

def test_files_added_after_the_first_run_are_said(tmp_path, capsys):
    raw = _corpus(tmp_path)
    yaml = _yaml(tmp_path, raw)
    first = corpus_files(load(yaml))
    (raw / "new1.txt").write_text("a new file")
    (raw / "new2.txt").write_text("another")
    capsys.readouterr()
    assert corpus_files(load(yaml)) == first
    out = capsys.readouterr().out
    assert "2 files under input.paths are not in this run" in out and len(out.strip().splitlines()) == 1


# train-classifier --epochs bound

def test_train_classifier_epochs_has_an_upper_bound(tmp_path, capsys):
    from launch.cli import main
    raw = _corpus(tmp_path)
    assert main(["curate", "train-classifier", "--positive", str(raw / "d0.txt"), "--negative", str(raw / "d1.txt"),
                 "--out", str(tmp_path / "q.bin"), "--epochs", "1001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs must be between 1 and 1000, got 1001" in err[0]
    assert not (tmp_path / "q.bin").exists()


# 8, 9, 14: whole runs

def test_the_report_follows_examples_and_is_rebuilt_when_removed(tmp_path, capsys):
    from launch.cli import main
    raw = _corpus(tmp_path)
    (raw / "dup.txt").write_text((raw / "d0.txt").read_text())  # one exact duplicate: one example to show
    yaml = _yaml(tmp_path, raw)
    assert main(["curate", yaml]) == 0
    report = tmp_path / "out" / "report.md"
    assert "  - `" in report.read_text()
    assert main(["curate", yaml, "examples=0"]) == 0
    assert "  - `" not in report.read_text() and "exact_dedup" in report.read_text()
    report.unlink()
    capsys.readouterr()
    assert main(["curate", yaml]) == 0
    assert report.is_file() and "# Curation report" in capsys.readouterr().out


def test_a_curation_that_keeps_nothing_in_the_mix_says_so_and_trains_no_tokenizer(tmp_path, capsys):
    from launch.cli import main
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "blob.txt").write_bytes(b"\0\1\2binary")
    (raw / "empty.txt").write_text("")
    yaml = _yaml(tmp_path, raw, tokenize={"enabled": True})
    capsys.readouterr()
    assert main(["curate", yaml]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("herd curate: nothing to train on: no document was kept"), lines[-1]
    out = tmp_path / "out"
    assert not (out / "tokens" / "tokenizer.json").exists()
    assert "Blend for a herd job" not in (out / "report.md").read_text()
    assert "Nothing to train on" in (out / "report.md").read_text()
    # documents kept, but only in a domain the mix leaves out
    more = tmp_path / "more"
    more.mkdir()
    yaml = _yaml(more, _corpus(more),
                 tokenize={"enabled": True, "mix": {"general": 0, "math": 0.5, "code": 0.5, "multilingual": 0}})
    assert main(["curate", yaml]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "no document reached a domain of tokenize.mix (kept: general)" in last, last
    assert not (more / "out" / "tokens" / "tokenizer.json").exists()
