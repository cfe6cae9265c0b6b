"""`herd curate` end to end through the CLI: a hand-built corpus (planted duplicates, URL versions, malformed
inputs, HTML) through every stage on the local executor, a run killed mid-way (SIGKILL of its process group once
a task has written its outputs) that resumes without redoing finished tasks, the same pipeline on the real SLURM
test cluster, and one-line errors for bad pipelines."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster, wait_until  # noqa: F401 (the session fixture)

ROOT = Path(__file__).resolve().parents[2]


def herd(*args, env=None, new_session=False, cwd=ROOT):
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch", "curate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, start_new_session=new_session)


def sentences(rng: random.Random, count: int) -> list:
    """Lines of random pseudo-words (letters only) from a 400-word vocabulary: distinct, not repetitive."""
    return [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(10, 16))).capitalize() + "."
            for _ in range(count)]


VOCABULARY = ["".join(random.Random(i).choice("abcdefghijklmnoprstuvwy") for _ in range(3 + i % 7))
              for i in range(400)]


def build_corpus(root: Path) -> Path:
    """24 distinct documents, 3 exact copies, 2 near copies, 3 versions of one URL, 8 documents sharing a
    boilerplate line (line dedup), an HTML page, and malformed inputs of each kind."""
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(24):
        lines = sentences(rng, 12)
        if i < 8:
            lines.insert(3, "Subscribe to our newsletter for weekly updates.")
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    for copy in range(3):
        (corpus / f"copy{copy}.txt").write_text((corpus / "doc05.txt").read_text())
    for near in range(2):
        lines = (corpus / "doc06.txt").read_text().splitlines()
        lines[5] = f"This line was changed in copy {near}."
        text = "\n".join(lines) + "\n"
        (corpus / f"near{near}.txt").write_text(text)
    page = " ".join(sentences(rng, 8))
    versions = [{"text": f"Version {v} of the page. {page}",
                 "url": "http://example.org/page", "date": f"202{v}-06-01"} for v in (1, 3, 2)]
    rows = [json.dumps(v) for v in versions] + ["{not json", '{"text": ""}']
    (corpus / "web.jsonl").write_text("\n".join(rows) + "\n")
    article = " ".join(sentences(rng, 10))
    (corpus / "page.html").write_text(f"<html><body><nav>Home | Menu</nav><article><h1>News</h1><p>{article}</p>"
                                      f"</article><footer>Footer</footer></body></html>")
    (corpus / "bad.txt").write_bytes(b"text with a bad byte \xff here\n")
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "binary.txt").write_bytes(b"\x00\x01\x02binary" * 20)
    return corpus


def pipeline(root: Path, corpus: Path, name: str, **executor) -> list:
    """The demo pipeline's YAML with this corpus and output, and executor overrides."""
    out = root / name
    return [str(ROOT / "configs/curate/demo.yaml"), f"input.paths=[{corpus}]", f"output_dir={out}",
            "input.include=['*.txt','*.jsonl','*.html']", "heuristics.kl_min_words=30",
            *[f"executor.{k}={v}" for k, v in executor.items()]]


def stage_table(out: Path):
    report = json.loads((out / "report.json").read_text())
    return [(r["stage"], r["documents_in"], r["documents_kept"], r["bytes_kept"]) for r in report["stages"]], report


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted local run with 2 tasks on 2 worker processes."""
    root = tmp_path_factory.mktemp("curate")
    corpus = build_corpus(root)
    result = herd(*pipeline(root, corpus, "ref", tasks=2, workers=2))
    assert result.returncode == 0, result.stderr[-3000:]
    return root, corpus, stage_table(root / "ref")


def test_local_run_removes_what_was_planted(reference):
    root, _, (table, report) = reference
    stages = {row[0]: row for row in table}
    read = next(r for r in report["stages"] if r["stage"] == "read")
    reasons = read["removed_by_reason"]
    assert {k: v["documents"] for k, v in reasons.items()} == {"bad_json": 1, "no_text": 1, "bad_utf8": 1,
                                                               "empty_file": 1, "binary_file": 1}
    assert stages["read"][2] == 24 + 3 + 2 + 3 + 1  # every good document, the HTML page's main content
    assert stages["url_dedup"][1] - stages["url_dedup"][2] == 2  # two older versions of the page
    kept_page = [json.loads(line)["text"] for line in _lines(root / "ref" / "data" / "url_dedup")
                 if "Version" in line]
    assert len(kept_page) == 1 and kept_page[0].startswith("Version 3")  # the newest (2023)
    assert stages["exact_dedup"][1] - stages["exact_dedup"][2] == 3  # doc05 and its 3 copies: one kept
    assert stages["minhash"][1] - stages["minhash"][2] == 2  # doc06 and its 2 near copies: one kept
    line = next(r for r in report["stages"] if r["stage"] == "line_dedup")
    assert line["removed_by_reason"]["duplicate_lines"]["partial"] == 8  # the newsletter line, in 8 documents
    assert report["tokens"] and (root / "ref" / "blend.yaml").is_file()
    assert (root / "ref" / "report.md").read_text().startswith("# Curation report")


def _lines(folder: Path):
    import gzip
    for path in sorted(folder.glob("*.jsonl.gz")):
        yield from gzip.open(path, "rt")


def test_killed_run_resumes_without_redoing_finished_tasks(reference):
    root, corpus, (table, _) = reference
    args = pipeline(root, corpus, "killed", tasks=2, workers=1)
    env = {**os.environ, "HERD_CURATE_FAULT": "line_dedup_filter:1"}
    killed = herd(*args, env=env, new_session=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = root / "killed"
    assert (out / "logs/line_dedup_filter/completions/00000").is_file()
    assert not (out / "logs/line_dedup_filter/completions/00001").exists()
    assert not (out / "report.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in [*(out / "data" / "read").iterdir(),
                                                  out / "data" / "line_dedup" / "00000.jsonl.gz"]}
    resumed = herd(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished tasks were not redone
    assert (out / "logs/line_dedup_filter/completions/00001").is_file()
    assert stage_table(out)[0] == table  # the same result as the uninterrupted run


def test_pipeline_runs_on_the_slurm_cluster(reference, slurm_cluster):  # noqa: F811
    root, corpus, (table, _) = reference
    out = root / "slurm"
    result = herd(*pipeline(root, corpus, "slurm", kind="slurm", partition="debug", tasks=2, workers=2,
                            mem_per_cpu_gb=0), env=slurm_cluster.env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted" in result.stdout

    def failed_job() -> str:
        squeue = slurm_cluster.run("squeue", "-h", "-o", "%i %T %r").stdout
        return next((line for line in squeue.splitlines() if "DependencyNeverSatisfied" in line), "")

    wait_until(lambda: (out / "report.json").is_file() or bool(failed_job()),
               lambda: f"the report of the SLURM run in {out} (queue: {slurm_cluster.run('squeue').stdout})")
    assert not failed_job(), failed_job()
    assert stage_table(out)[0] == table
    assert all((out / "logs" / name / "launch_script.slurm").is_file() for name in ("read", "minhash_filter"))


def jobs_named(cluster, prefix: str) -> list:
    """(array job id, state, reason) of every job in the queue whose name starts with prefix."""
    rows = [line.split("|") for line in cluster.run("squeue", "-h", "-o", "%F|%j|%T|%r").stdout.splitlines()]
    return [(job, state, reason) for job, name, state, reason in rows if name.startswith(prefix)]


def files_under(out: Path) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}


@pytest.mark.slow  # two SLURM submissions of 20 and 7 job arrays: minutes on the 2-core machine
def test_cancelled_slurm_run_resumes_without_redoing_finished_tasks(reference, slurm_cluster):  # noqa: F811
    """Every job of a SLURM run is cancelled (scancel) once task 0 of the line-dedup filter has finished while its
    task 1 still runs (held by HERD_CURATE_FAULT=line_dedup_filter:1:hold after writing its outputs, before its
    completion); herd curate run again submits only task 1 of that pass and the passes after it, rewrites no file
    of a finished task, and ends with the uninterrupted run's report."""
    root, corpus, (table, _) = reference
    out, prefix = root / "slurm-cancelled", "curate-cancel-"
    args = pipeline(root, corpus, "slurm-cancelled", kind="slurm", partition="debug", tasks=2, workers=2,
                    mem_per_cpu_gb=0) + [f"name={prefix[:-1]}"]
    held = herd(*args, env={**slurm_cluster.env, "HERD_CURATE_FAULT": "line_dedup_filter:1:hold"})
    assert held.returncode == 0, held.stderr[-3000:]
    filter_logs = out / "logs" / "line_dedup_filter"

    def failed() -> list:
        return [job for job in jobs_named(slurm_cluster, prefix) if job[2] == "DependencyNeverSatisfied"]

    wait_until(lambda: ((filter_logs / "completions/00000").is_file() and (filter_logs / "held/00001").is_file())
               or bool(failed()), lambda: f"task 0 of line_dedup_filter done and task 1 held in {out}")
    assert not failed(), failed()
    assert not (filter_logs / "completions/00001").exists()
    slurm_cluster.run("scancel", *sorted({job for job, _, _ in jobs_named(slurm_cluster, prefix)}))
    wait_until(lambda: not jobs_named(slurm_cluster, prefix),
               lambda: f"the cancelled jobs to leave the queue ({jobs_named(slurm_cluster, prefix)})")
    assert not (filter_logs / "completions/00001").exists() and not (out / "report.json").exists()
    unfinished = [d for d in (out / "logs").iterdir() if not (d / "completions").is_dir()
                  or len(list((d / "completions").iterdir())) < len(json.loads((d / "ranks_to_run.json").read_text()))]
    assert sorted(d.name for d in unfinished) == sorted(["line_dedup_filter", "heuristics_token_counts",
                                                         "heuristics_distribution", "heuristics_filter", "models",
                                                         "tokenize", "report"])
    finished = {p: v for p, v in files_under(out).items()
                if not any(d in p.parents and "completions" not in p.parts for d in unfinished)
                and not (p.parent.name == "line_dedup" and p.name.startswith("00001"))}  # task 1's outputs

    resumed = herd(*args, env=slurm_cluster.env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "submitted 7 job arrays" in resumed.stdout and "13 passes already complete" in resumed.stdout
    wait_until(lambda: (out / "report.json").is_file() or bool(failed()),
               lambda: f"the report of the resumed SLURM run in {out}")
    assert not failed(), failed()
    assert {p: v for p, v in files_under(out).items() if p in finished} == finished  # nothing finished redone
    assert json.loads((filter_logs / "ranks_to_run.json").read_text()) == [1]  # only task 1 ran again
    assert stage_table(out)[0] == table


def comparable(report: dict) -> dict:
    """A report without its paths: per stage documents and bytes in, kept and removed by reason, and per domain
    documents and tokens."""
    stages = []
    for row in report["stages"]:
        reasons = {reason: {k: v for k, v in counts.items() if k != "examples"}
                   for reason, counts in row["removed_by_reason"].items()}
        stages.append({**{k: v for k, v in row.items() if k != "removed_by_reason"}, "reasons": reasons})
    return {"stages": stages, "domains": report["domains"],
            "tokens": {d: (t["documents"], t["tokens"]) for d, t in report["tokens"].items()}}


@pytest.mark.slow  # the demo corpus (about 1,500 Debian documentation files) twice: about 15 minutes on 2 cores
def test_demo_corpus_on_slurm_gives_the_local_report(tmp_path, slurm_cluster):  # noqa: F811
    """configs/curate/demo.yaml end to end on this machine's /usr/share/doc, once on the local executor and once
    as SLURM job arrays on the test cluster: the same documents and bytes kept and removed per stage and reason,
    the same domains and token counts."""
    local = herd(str(ROOT / "configs/curate/demo.yaml"), f"output_dir={tmp_path / 'local'}")
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm"
    submitted = herd(str(ROOT / "configs/curate/demo.yaml"), f"output_dir={out}", "executor.kind=slurm",
                     "executor.partition=debug", "executor.mem_per_cpu_gb=0", "name=curate-demo-slurm",
                     env=slurm_cluster.env)
    assert submitted.returncode == 0 and "submitted 20 job arrays" in submitted.stdout, submitted.stderr[-3000:]

    def failed() -> list:
        return [job for job in jobs_named(slurm_cluster, "curate-demo-slurm-")
                if job[2] == "DependencyNeverSatisfied"]

    wait_until(lambda: (out / "report.json").is_file() or bool(failed()),
               lambda: f"the report of the SLURM run in {out}")
    assert not failed(), failed()
    expected = comparable(json.loads((tmp_path / "local" / "report.json").read_text()))
    assert expected["stages"][0]["documents_in"] > 100  # the demo corpus, not an empty folder
    assert comparable(json.loads((out / "report.json").read_text())) == expected


@pytest.mark.parametrize("overrides,expected", [
    (["models.language=true"], "models.language_model: language identification needs a fastText language-id "
                               "model you supply"),
    (["executor.kind=ray"], "executor.kind: 'ray' is not one of local, slurm"),
    (["minhash.buckets=0"], "minhash.buckets: must be at least 1"),
    (["input.paths=[/no/such/dir]"], "input.paths[0]: '/no/such/dir' does not exist"),
    (["tokenize.mix.prose=1.0"], "tokenize.mix.prose"),
    (["tokenize.mix.code=-1"], "tokenize.mix.code: must be >= 0"),
    (["minhash.bands=3"], "minhash.bands"),
    (["input.html_timeout_s=0"], "input.html_timeout_s: must be a positive number of seconds, got 0.0"),
])
def test_bad_pipeline_is_one_line(tmp_path, overrides, expected):
    result = herd(str(ROOT / "configs/curate/demo.yaml"), f"output_dir={tmp_path / 'out'}", *overrides)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herd: error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_train_classifier_cli(tmp_path):
    rng = random.Random(3)
    for label, words in (("good", VOCABULARY[:40]), ("bad", VOCABULARY[200:240])):
        (tmp_path / label).mkdir()
        for i in range(25):
            (tmp_path / label / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(30)))
    out = tmp_path / "quality.bin"
    result = herd("train-classifier", "--positive", str(tmp_path / "good"), "--negative", str(tmp_path / "bad"),
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 labels (hq, lq) on 45 examples; held-out accuracy 1.000" in result.stdout and out.is_file()
    missing = herd("train-classifier", "--positive", str(tmp_path / "good"), "--out", str(tmp_path / "x.bin"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "herd: error: a quality classifier needs both --positive and --negative examples"]
    assert not (tmp_path / "x.bin").exists()


def test_output_dir_of_other_files_or_another_pipeline_is_refused(tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one document")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("the user's")
    base = [str(ROOT / "configs/curate/demo.yaml"), f"input.paths=[{corpus}]", "input.include=['*.txt']"]
    refused = herd(*base, f"output_dir={user}")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"herd: error: output_dir {user} exists and is not a herd curate output; choose another or remove it"]
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    out = tmp_path / "out"
    (out / "pipeline.json").parent.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"minhash": {"buckets": 7}}))
    changed = herd(*base, f"output_dir={out}")
    assert changed.returncode == 2 and "holds a run of another pipeline" in changed.stderr, changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and sorted(p.name for p in out.iterdir()) == ["pipeline.json"]
