"""Stop and resume on one process (shared/TESTING.md R1, R7, R8): bitwise equal to a run that never stopped."""

import io

import pytest
import torch

from engine.checkpoint.store import CheckpointError
from engine.run import build_trainer
from tests.distributed.ranks import Recorder
from tests.helpers import make_corpus, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


class SampleRecorder(Recorder):
    """Also keeps the sample ids each step consumed."""

    def __init__(self):
        super().__init__()
        self.samples = []

    def on_step_start(self, trainer):
        start = trainer.loader.consumed_samples - trainer.loader.data.global_batch_size
        self.samples.append([i for mb in trainer.loader.step_sample_ids(start) for i in mb])


class StopAt(Recorder):
    """Stops the run at the end of step `step` (as a preemption would), before the checkpoint callback runs."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.state.step == self.step:
            trainer.state.stop_requested = True


def run(corpus, run_dir, steps=6, extra=(), stop_at=None):
    trainer = build_trainer(tiny_config(corpus, run_dir, ["train.eval_every=0", "checkpoint.every=2",
                                                           f"train.steps={steps}", *extra]), stream=io.StringIO())
    recorder = SampleRecorder()
    trainer.callbacks.insert(0, recorder)
    if stop_at is not None:
        trainer.callbacks.insert(0, StopAt(stop_at))
    trainer.fit()
    return trainer, recorder


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stop_and_resume_is_bitwise_equal(corpus, tmp_path, mode):
    extra = ["checkpoint.async_save=true"] if mode == "async" else []
    reference, ref_rec = run(corpus, tmp_path / "ref")
    stopped, _ = run(corpus, tmp_path / "split", extra=extra, stop_at=3)  # checkpoint at the end of fit
    rng_at_stop = torch.get_rng_state()
    saved = torch.load(tmp_path / "split/t/checkpoints/step_00000003/rng/rank0.pt", weights_only=True)
    resumed, rec = run(corpus, tmp_path / "split", extra=extra)  # same run name: resumes from step 3
    print("reference losses", [m["loss"] for m in ref_rec.steps])
    print("resumed losses  ", [m["loss"] for m in rec.steps])
    assert [m["loss"] for m in rec.steps] == [m["loss"] for m in ref_rec.steps[3:]]
    for (name, a), (_, b) in zip(reference.module.model.named_parameters(), resumed.module.model.named_parameters()):
        assert torch.equal(a, b), name
    # R7: the resumed run consumed exactly the samples the reference did after step 3: no duplicates, no skips
    assert rec.samples == ref_rec.samples[3:]
    assert resumed.loader.consumed_samples == reference.loader.consumed_samples
    # R8: the RNG state saved at step 3 is the one the resumed run started from
    assert torch.equal(saved["torch"], rng_at_stop)


def test_resume_never_starts_fresh_and_keeps_old_run(corpus, tmp_path):
    run(corpus, tmp_path / "r", 3)
    trainer, rec = run(corpus, tmp_path / "r", 3, ["checkpoint.resume=never"])
    assert trainer.state.step == 3
    assert len(rec.steps) == 3  # trained from step 0 again
    assert any(p.name.startswith("t.") for p in (tmp_path / "r").iterdir())  # the earlier run was moved aside


def test_corrupt_checkpoint_stops_the_resume_with_the_file_named(corpus, tmp_path):
    run(corpus, tmp_path / "c", 3)
    shard = next((tmp_path / "c" / "t" / "checkpoints" / "step_00000003").glob("__0_*.distcp"))
    assert (tmp_path / "c" / "t" / "checkpoints" / "step_00000002").is_dir()  # every=2, and the end of fit
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__0_0.distcp: sha256 differs"):
        run(corpus, tmp_path / "c", 6)


def _rewrite_manifest(step_dir):
    """What an attacker who controls the directory would do: make the manifest and marker match the files."""
    import hashlib
    import json
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        data = (step_dir / name).read_bytes()
        info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (step_dir / "manifest.json").write_bytes(raw)
    (step_dir / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())


@pytest.mark.parametrize("target", [".metadata", "rng/rank0.pt"])
def test_a_malicious_pickle_with_matching_hashes_never_runs(corpus, tmp_path, target):
    """R15: even with the manifest rewritten to match, a pickle planted in a file the load reads is refused."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'payload-ran'}",))

    run(corpus, tmp_path / "m", 2)
    step_dir = tmp_path / "m" / "t" / "checkpoints" / "step_00000002"
    if target == ".metadata":
        (step_dir / target).write_bytes(pickle.dumps(Payload()))
    else:
        torch.save({"torch": Payload()}, step_dir / target)
    _rewrite_manifest(step_dir)
    with pytest.raises(CheckpointError, match=target.replace('.', r'\.')) as info:
        run(corpus, tmp_path / "m", 4)
    print(f"{target}: {str(info.value).splitlines()[0][:160]}")
    assert not (tmp_path / "payload-ran").exists()


ASYNC_RUN = """
import io, sys
from pathlib import Path
from engine.run import build_trainer
from tests.helpers import tiny_config
trainer = build_trainer(tiny_config(Path(sys.argv[1]), Path(sys.argv[2]), ["train.eval_every=0", "train.steps=6",
                        "checkpoint.every=2", "checkpoint.async_save=true"]), stream=io.StringIO())
trainer.fit()
"""


def test_kill_during_an_async_save_leaves_the_previous_checkpoint(corpus, tmp_path):
    """R4: the process dies while a background save of step 4 commits (after its manifest): step 2 stays the
    newest complete checkpoint and verifies, and the rerun resumes from it and finishes."""
    import os
    import subprocess
    import sys

    from engine.checkpoint.store import CheckpointStore
    from tests.unit.test_checkpoint_store import ROOT
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HERD_CHECKPOINT_KILL_AT": "after_manifest@4"}
    code = subprocess.run([sys.executable, "-c", ASYNC_RUN, str(corpus), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True).returncode
    assert code == -9
    store = CheckpointStore(tmp_path / "t" / "checkpoints")
    print(f"killed during the async save of step 4: complete checkpoints {store.complete_steps()}")
    assert store.latest_step() == 2 and (tmp_path / "t" / "checkpoints" / "latest").read_text() == "step_00000002"
    store.verify(2)
    env.pop("HERD_CHECKPOINT_KILL_AT")
    again = subprocess.run([sys.executable, "-c", ASYNC_RUN, str(corpus), str(tmp_path)], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert store.complete_steps() == [4, 6]
