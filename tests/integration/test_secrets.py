"""R17 end to end: fake credentials planted in the environment of real `herd train` / `herd launch --nproc 2` runs
(and, by value, in a checkpoint path, a run name, a bad override and a crash message) appear nowhere herd writes:
not in any byte of any file under the run and checkpoint directories (config.yaml, metrics.jsonl, TensorBoard
event files, the manifest, DCP's .metadata and .distcp shards, RNG files) nor in the captured stdout/stderr.
Directory names the user chose are the user's: only file contents and output are checked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_corpus

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "HF_TOKEN": "hf_FAKEtoken1234567890",
    "WANDB_API_KEY": "FAKEwandb0123456789abcdef0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "FAKEaws/Secret+Key9876543210",
    "MY_DB_PASSWORD": "pwFAKEckpt5678",  # also planted in checkpoint.dir
    "SERVICE_AUTH_ID": "svcFAKEauth4242",  # also planted in log.name
}


def herd(*args, extra_env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **SECRETS, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def scan(paths, outputs):
    """(files, bytes scanned, [(where, secret name)] found) over every file under `paths` and the outputs."""
    needles = {name: value.encode() for name, value in SECRETS.items()}
    files, total, found = 0, 0, []
    for root in paths:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            data = path.read_bytes()
            files, total = files + 1, total + len(data)
            found += [(str(path), name) for name, needle in needles.items() if needle in data]
    for i, text in enumerate(outputs):
        total += len(text.encode())
        found += [(f"output {i}", name) for name, needle in needles.items() if needle in text.encode()]
    return files, total, found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_planted_secrets_appear_nowhere(tmp_path, corpus):
    pw, auth = SECRETS["MY_DB_PASSWORD"], SECRETS["SERVICE_AUTH_ID"]
    runs, store = tmp_path / "runs", tmp_path / f"store-{pw}"
    common = ["configs/demo.yaml", f"data.train=[{{path: {corpus}/corpus.train}}]",
              f"data.valid=[{{path: {corpus}/corpus.valid}}]", f"data.tokenizer.path={corpus}/tok.json",
              "model.vocab_size=512", "model.n_layers=2", "model.dim=64", "model.ffn_dim=128", "data.seq_len=32",
              "data.micro_batch_size=2", "data.global_batch_size=8", "schedule.warmup_steps=1",
              "train.eval_every=2", "train.eval_batches=2", "log.every=1", "log.tensorboard=true",
              f"log.run_dir={runs}"]
    single = [*common, f"checkpoint.dir={store}", f"log.name=run-{auth}", "checkpoint.every=2"]
    outputs = []

    first = herd("train", *single, "train.steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = herd("train", *single, "train.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {store.parent}/store-***/step_00000004" in resumed.stdout
    assert "run dir" in first.stdout and f"{runs}/run-***" in first.stdout  # the header went through the filter
    printed = herd("train", *single, "--print-config")
    assert printed.returncode == 0 and "dir: " + str(store.parent) + "/store-***" in printed.stdout
    bad = herd("train", *common, f"optim.lr={SECRETS['HF_TOKEN']}")
    assert bad.returncode == 2 and "optim.lr: wrong type" in bad.stderr and "Value '***'" in bad.stderr, bad.stderr
    # an uncaught crash whose message holds a secret (HERD_FAULT's count is not a number): the traceback is shown,
    # scrubbed
    crash = herd("train", *common, "log.name=crash", "train.steps=2",
                 extra_env={"HERD_FAULT": f"after_backward:0:{SECRETS['HF_TOKEN']}"})
    assert crash.returncode == 1 and "Traceback" in crash.stderr and "'***'" in crash.stderr, crash.stderr[-2000:]
    launched = herd("launch", "--nproc", "2", *common, f"checkpoint.dir={tmp_path}/store2-{pw}",
                    f"log.name=two-{auth}", "parallel.dp_shard=2", "train.steps=2", "checkpoint.every=2")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "world size 2" in launched.stdout and "log.name=two-***" in launched.stdout
    outputs += [r.stdout + r.stderr for r in (first, resumed, printed, bad, crash, launched)]

    # the planted values did reach what herd writes, as ***: the filter ran, the secrets were not merely absent
    step4 = store / "step_00000004"
    assert "store-***" in (runs / f"run-{auth}" / "config.yaml").read_text()
    assert "store-***" in (step4 / "manifest.json").read_text()
    assert b"store-***" in (step4 / ".metadata").read_bytes()  # DCP's StorageMeta.checkpoint_id
    kinds = {"tfevents": "events.out.tfevents*", "distcp": "*.distcp", "metadata": ".metadata",
             "manifest": "manifest.json", "config": "config.yaml", "rng": "rank*.pt", "jsonl": "metrics.jsonl"}
    counts = {kind: len(list(tmp_path.rglob(pattern))) for kind, pattern in kinds.items()}
    assert all(counts.values()), counts
    assert len(list((tmp_path / f"store2-{pw}" / "step_00000002").glob("__*.distcp"))) == 2  # both ranks wrote

    files, total, found = scan([tmp_path], outputs)
    print(f"R17: {len(SECRETS)} planted secrets, {files} files ({counts}) and {len(outputs)} captured outputs, "
          f"{total:,} bytes scanned: {len(found)} found")
    assert found == []
