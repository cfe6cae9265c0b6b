"""The alignment demo's task: every preference is objectively right (chosen compiles, rejected does not), held-out
rows come from modules that training never sees, and the files are what the pipeline's loaders read."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from align.demo_data import broken, build, compiles

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")
    for package in ("json", "email", "http", "logging"):  # a real slice of the standard library
        shutil.copytree(STDLIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("task")
    counts = build(out, root, held_out=0.3, max_prompts=10, max_pairs=50)
    read = (lambda name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()])
    return counts, {name: read(name) for name in counts}


def test_every_pair_is_objectively_ordered(task):
    counts, rows = task
    pairs = rows["pref.train"] + rows["pref.valid"]
    assert counts["pref.train"] == 50 and counts["pref.valid"] > 0
    assert all(compiles(p["chosen"]) and not compiles(p["rejected"]) for p in pairs)
    assert all(p["chosen"].splitlines()[0] == p["rejected"].splitlines()[0] for p in pairs)  # same first line


def test_held_out_modules_never_reach_training(task):
    _, rows = task
    module_of = (lambda prompt: prompt.split("from ", 1)[1].split(":", 1)[0])
    train = {module_of(r["messages"][0]["content"]) for r in rows["sft"]}
    held = {module_of(r["prompt"]) for r in rows["pref.valid"]} | {r["module"] for r in rows["prompts"]}
    assert train and held and not train & held
    assert len(rows["prompts"]) == 10
    assert all(r["prompt"].endswith(r["first_line"]) for r in rows["prompts"])


def test_broken_never_compiles():
    body = "def f(x):\n    y = x + 1\n    return y"
    assert compiles(body) and not compiles(broken(body))
