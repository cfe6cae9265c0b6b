"""Nothing a user made is lost (issue 16, item 3): a checkpoint directory belongs to one run (its lineage,
`log.name`), one run at a time (an flock that a killed run does not leave stuck), and an unwritable one is
found before the first step. Each refusal is one line; the directory is left exactly as it was.

| case | what must hold |
|---|---|
| another run's checkpoints in checkpoint.dir | refused naming that run and the option, through `herd train` too (exit 2) |
| checkpoint.on_foreign=new_lineage | saves beside them in lineages/<name>, purges only its own, a requeue resumes its own (also once the other run's are deleted); the other run resumes its own and never sees these |
| checkpoint.resume=never among the run's own checkpoints | refused (its purge would delete its fresh saves) |
| a second run while one holds the directory | refused naming the holder's pid, saving or not (checkpoint.every=0), its run directory not moved aside; after SIGKILL of the holder the next run proceeds |
| a filesystem without flock | one warning, no lock file left |
| an unwritable directory | one line naming it before any step, through `herd train` (exit 2) |
| an HF import into a directory holding a run's checkpoints | refused, directory unchanged |
| 2 ranks | every rank refuses a foreign directory with the same line; new_lineage works across ranks; a Python error on rank 0 alone (claim, resume, load_weights of a manifest nested too deep) is the same line on every rank, no hang |
"""

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint.ownership import LOCK, DirectoryLock, claim_directory
from engine.checkpoint.store import CheckpointError, CheckpointStore
from engine.config import to_yaml
from engine.errors import HerdError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

ROOT = Path(__file__).resolve().parents[2]
BASE = ["train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def train(corpus, run_dir, name, steps, *extra):
    trainer = build_trainer(tiny_config(corpus, run_dir, [*BASE, f"log.name={name}", f"train.steps={steps}", *extra]),
                            stream=io.StringIO())
    trainer.fit()
    return trainer


def refused(corpus, run_dir, name, *extra) -> str:
    with pytest.raises(HerdError) as info:
        build_trainer(tiny_config(corpus, run_dir, [*BASE, f"log.name={name}", "train.steps=4", *extra]),
                      stream=io.StringIO())
    line = str(info.value)
    assert isinstance(info.value, CheckpointError) and "\n" not in line, line
    return line


def cli(argv, capsys, monkeypatch) -> str:
    """`herd ...` in-process: exit 2, one line, no traceback; returns the line."""
    from launch.cli import main
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    lines = (out + err).strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, (code, out + err)
    return lines[0]


def test_another_runs_directory_is_refused_and_left_alone(corpus, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "shared"
    train(corpus, tmp_path / "runs", "a", 2, f"checkpoint.dir={ckpt}")
    assert not (ckpt / LOCK).exists()  # a run that ended left no lock file
    before = snapshot(ckpt)
    line = refused(corpus, tmp_path / "runs", "b", f"checkpoint.dir={ckpt}")
    print(f"foreign: {line}")
    assert "of run 'a'" in line and "not of this run 'b'" in line and "checkpoint.on_foreign=new_lineage" in line
    assert snapshot(ckpt) == before
    # through the command: the same line, exit 2
    config = tmp_path / "b.yaml"
    config.write_text(to_yaml(tiny_config(corpus, tmp_path / "runs", [*BASE, "log.name=b", f"checkpoint.dir={ckpt}"])))
    assert "of run 'a'" in cli(["train", str(config)], capsys, monkeypatch)
    assert snapshot(ckpt) == before


def test_a_new_lineage_beside_another_run_never_touches_it(corpus, tmp_path):
    ckpt = tmp_path / "shared"
    train(corpus, tmp_path / "runs", "a", 2, f"checkpoint.dir={ckpt}")
    theirs = snapshot(ckpt)
    beside = [f"checkpoint.dir={ckpt}", "checkpoint.on_foreign=new_lineage"]
    train(corpus, tmp_path / "runs", "b", 6, *beside)  # saves 2, 4, 6; its purge keeps 4 and 6
    mine = CheckpointStore(ckpt / "lineages" / "b", lineage="b")
    assert mine.complete_steps() == [4, 6]
    assert {k: v for k, v in snapshot(ckpt).items() if not k.startswith("lineages")} == theirs
    requeued = train(corpus, tmp_path / "runs", "b", 8, *beside)  # the same command, longer: resumes its own
    assert mine.complete_steps() == [6, 8] and requeued.state.step == 8
    # run a continues its own lineage (step 2 -> 4), and neither resumes nor purges b's
    before_b = {k: v for k, v in snapshot(ckpt).items() if k.startswith("lineages")}
    continued = train(corpus, tmp_path / "runs", "a", 6, f"checkpoint.dir={ckpt}")
    assert CheckpointStore(ckpt, lineage="a").complete_steps() == [4, 6] and continued.state.step == 6
    assert {k: v for k, v in snapshot(ckpt).items() if k.startswith("lineages")} == before_b
    # run a's checkpoints deleted: the same command of b keeps resuming its own, beside (not from 0 at the root)
    for step in ckpt.glob("step_*"):
        shutil.rmtree(step)
    again = train(corpus, tmp_path / "runs", "b", 10, *beside)
    assert again.state.step == 10 and mine.complete_steps() == [8, 10]
    assert not list(ckpt.glob("step_*"))


def test_starting_over_among_its_own_checkpoints_is_refused(corpus, tmp_path):
    ckpt = tmp_path / "ck"
    train(corpus, tmp_path / "runs", "a", 4, f"checkpoint.dir={ckpt}")
    before = snapshot(ckpt)
    line = refused(corpus, tmp_path / "runs", "a", f"checkpoint.dir={ckpt}", "checkpoint.resume=never")
    print(f"resume=never: {line}")
    assert "checkpoint.resume=never would train over them" in line and "steps 2-4" in line
    assert snapshot(ckpt) == before


HOLDER = """
import io, sys
from pathlib import Path
from engine.run import build_trainer
from tests.helpers import tiny_config
trainer = build_trainer(tiny_config(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]), stream=io.StringIO())
print("claimed", flush=True)
sys.stdin.read()  # holds the directory until killed
"""


def _start_holder(corpus, run_dir, extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(corpus), str(run_dir), *extra], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = holder.stdout.readline()  # blocks until the run has claimed the directory (or died)
    assert line.strip() == "claimed", holder.stderr.read()[-2000:]
    return holder


def test_a_second_run_is_refused_while_one_holds_the_directory(corpus, tmp_path):
    """A run holds its (default) checkpoint directory; a second run of the same name, and one of another name
    pointed at it, are refused naming the holder; the holder's run directory is not moved aside. After the holder
    is SIGKILLed, the lock is gone with it and the next run proceeds."""
    run_dir = tmp_path / "runs"
    holder = _start_holder(corpus, run_dir, [*BASE, "log.name=a", "train.steps=4"])
    try:
        ckpt = run_dir / "a" / "checkpoints"
        before = snapshot(run_dir)
        # a run that does not save (checkpoint.every=0) would still resume from it, or move its run directory
        # aside: it tests the lock too
        for name, extra in (("a", ["checkpoint.resume=never"]), ("a", []), ("b", [f"checkpoint.dir={ckpt}"]),
                            ("a", ["checkpoint.every=0"]), ("b", [f"checkpoint.dir={ckpt}", "checkpoint.every=0"])):
            line = refused(corpus, run_dir, name, *extra)
            print(f"concurrent ({name} {extra}): {line}")
            assert f"another run is using this checkpoint directory (held by pid {holder.pid}" in line
            assert snapshot(run_dir) == before  # in particular, run a's directory was not moved aside
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    assert holder.returncode == -signal.SIGKILL
    assert (ckpt / LOCK).exists()  # the killed holder's file stays, but no lock with it
    trainer = train(corpus, run_dir, "a", 2)
    assert trainer.state.step == 2 and not (ckpt / LOCK).exists()


def test_the_lock_is_exclusive_and_released(tmp_path):
    first, second = DirectoryLock(tmp_path), DirectoryLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(CheckpointError, match=f"held by pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    assert second.acquire() is None
    second.release()
    # a run that does not save tests the lock: refused while held, and it creates, writes and removes nothing
    assert first.acquire() is None
    held = (tmp_path / LOCK).read_bytes()
    with pytest.raises(CheckpointError, match=f"held by pid {os.getpid()}"):
        DirectoryLock(tmp_path).test()
    assert (tmp_path / LOCK).read_bytes() == held
    first.release()
    assert DirectoryLock(tmp_path).test() is None and not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_bytes(b"held by pid 1 on a host that died")  # a killed holder's file: free
    assert DirectoryLock(tmp_path).test() is None and (tmp_path / LOCK).exists()
    (tmp_path / LOCK).unlink()
    os.symlink(tmp_path / "elsewhere", tmp_path / LOCK)
    with pytest.raises(CheckpointError, match="is a symlink"):
        DirectoryLock(tmp_path).acquire()
    assert not (tmp_path / "elsewhere").exists()


def _unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot write even as root (chmod does not stop root): a path under sysfs, which
    refuses new entries to everyone; as another user, a directory of mode 0500."""
    if os.geteuid() != 0:
        path = tmp_path / "readonly"
        path.mkdir()
        path.chmod(0o500)
        return path
    path = Path("/sys") / f"herd-checkpoint-test-{os.getpid()}"
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    pytest.skip("this machine lets root create directories under /sys; no unwritable directory found for root")


def test_an_unwritable_directory_is_found_before_the_first_step(corpus, tmp_path, capsys, monkeypatch):
    ckpt = _unwritable_directory(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(to_yaml(tiny_config(corpus, tmp_path / "runs", [*BASE, f"checkpoint.dir={ckpt}"])))
    line = cli(["train", str(config)], capsys, monkeypatch)
    print(f"unwritable: {line}")
    assert str(ckpt) in line and ("cannot be written" in line or "not writable" in line)
    assert not (tmp_path / "runs" / "t" / "metrics.jsonl").exists()  # no step ran
    if os.geteuid() == 0:  # the config's check (os.access) passes for root: the start-up probe is what found it
        line = refused(corpus, tmp_path / "runs", "t", f"checkpoint.dir={ckpt}")
        assert "the checkpoint directory cannot be written" in line


def test_an_import_into_a_runs_directory_is_refused(corpus, tmp_path, capsys, monkeypatch):
    from tests.integration.bad_inputs_fixture import _hf_dir
    _hf_dir(tmp_path)
    ckpt = tmp_path / "ck"
    train(corpus, tmp_path / "runs", "a", 2, f"checkpoint.dir={ckpt}")
    before = snapshot(ckpt)
    line = cli(["convert", "hf-to-herd", str(tmp_path / "hf"), str(ckpt)], capsys, monkeypatch)
    print(f"import: {line}")
    assert str(ckpt) in line
    assert snapshot(ckpt) == before


def ranks_claim(rank: int, world: int, corpus: str, run_dir: str, ckpt: str) -> list:
    """On every rank: run a saves, run b is refused (the same line everywhere), run b beside it trains."""
    from engine.errors import HerdError
    from tests.helpers import parity_config
    out = []
    for name, steps, extra in (("a", 2, []), ("b", 2, []), ("b", 2, ["checkpoint.on_foreign=new_lineage"])):
        cfg = parity_config(Path(corpus), Path(run_dir), [f"checkpoint.dir={ckpt}", "checkpoint.every=2",
                                                          f"log.name={name}", f"train.steps={steps}", *extra], world)
        try:
            trainer = build_trainer(cfg, stream=io.StringIO())
            trainer.fit()
            out.append(("ok", trainer.state.step))
        except HerdError as e:
            out.append(("refused", str(e)))
    return out


def test_every_rank_takes_rank_zeros_verdict(corpus, tmp_path):
    from parallel.multiprocess import run_on_ranks
    ckpt = tmp_path / "ck"
    results = run_on_ranks(ranks_claim, 2, str(corpus), str(tmp_path / "runs"), str(ckpt), timeout=600)
    print(results[0])
    assert results[0] == results[1]
    (a, b, beside) = results[0]
    assert a == ("ok", 2) and b[0] == "refused" and "of run 'a'" in b[1] and beside == ("ok", 2)
    assert CheckpointStore(ckpt, lineage="a").complete_steps() == [2]
    assert CheckpointStore(ckpt / "lineages" / "b", lineage="b").complete_steps() == [2]


def _deep_checkpoint(root: Path) -> None:
    """A committed checkpoint whose manifest nests too deep for Python's JSON parser (RecursionError)."""
    step = root / "step_00000002"
    step.mkdir(parents=True)
    raw = b"[" * 100000
    (step / "manifest.json").write_bytes(raw)
    (step / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())


def ranks_rank_zero_fails_alone(rank: int, world: int, root: str) -> list:
    """Rank 0 alone meets a Python error (not a CheckpointError) while the others wait for its verdict: each
    section must end with the same one line on every rank, never a hang."""
    from engine.checkpoint.checkpointer import Checkpointer

    def boom(*args):
        raise RuntimeError("rank 0 alone\nsecond line")

    out = []
    ck = Checkpointer(CheckpointStore(Path(root) / "own", lineage="t"), None, None, None, "", {})
    sections = [lambda: ck.load_weights(Path(root) / "deep"),
                lambda: ck.claim("refuse", "auto", writes=False),
                lambda: ck.resume()]
    for i, section in enumerate(sections):
        if rank == 0 and i == 1:
            ck.store.lineages = boom  # claim (and then resume) read the directory on rank 0 only
        try:
            section()
            out.append("ok")
        except CheckpointError as e:
            out.append(str(e))
    return out


def test_rank_zero_failing_alone_stops_every_rank_with_one_line(tmp_path):
    from parallel.multiprocess import run_on_ranks
    _deep_checkpoint(tmp_path / "deep")
    (tmp_path / "own").mkdir()
    results = run_on_ranks(ranks_rank_zero_fails_alone, 2, str(tmp_path), timeout=300, collective_timeout_s=60)
    print(results[0])
    assert results[0] == results[1]
    deep, claim, resume = results[0]
    assert "manifest.json: not valid JSON" in deep and "\n" not in deep
    assert claim == f"{tmp_path / 'own'}: cannot claim the checkpoint directory: RuntimeError: rank 0 alone"
    assert resume == f"{tmp_path / 'own'}: cannot resume: RuntimeError: rank 0 alone"


def test_a_filesystem_without_locks_warns_once_and_leaves_no_lock_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    for root in (tmp_path / "existing", tmp_path / "new"):
        if root.name == "existing":
            root.mkdir()
        claim = claim_directory(CheckpointStore(root, lineage="t"), "refuse", "auto", writes=True)
        assert len(claim.notes) == 1 and "cannot lock" in claim.notes[0], claim.notes
        claim.lock.release()
        assert not (root / LOCK).exists()


def _one_line_before_any_rank(argv, capsys, monkeypatch) -> str:
    """A launcher's refusal: one line, exit 2, and no rank started (the launcher never printed 'N ranks of herd',
    the line it prints just before it starts them)."""
    line = cli(argv, capsys, monkeypatch)
    assert "ranks of herd" not in line, line
    return line


def test_launchers_refuse_before_any_rank_starts(corpus, tmp_path, capsys, monkeypatch):
    """`herd launch --nproc 2` refuses another run's directory, a fresh start over the run's own checkpoints and a
    directory a live run holds, in one line from the launcher before it starts a rank; `--slurm` refuses another
    run's directory before it writes or submits a script. The directory is left as it was."""
    runs, ckpt = tmp_path / "runs", tmp_path / "shared"
    train(corpus, runs, "a", 2, f"checkpoint.dir={ckpt}")
    before = snapshot(ckpt)
    configs = {}
    for name in ("a", "b"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(to_yaml(tiny_config(corpus, runs, [*BASE, f"log.name={name}",
                                                                    f"checkpoint.dir={ckpt}"], world_size=2)))
    line = _one_line_before_any_rank(["launch", str(configs["b"]), "--nproc", "2"], capsys, monkeypatch)
    print(f"launch, foreign: {line}")
    assert "of run 'a'" in line and "not of this run 'b'" in line
    line = _one_line_before_any_rank(["launch", str(configs["a"]), "--nproc", "2", "checkpoint.resume=never"],
                                     capsys, monkeypatch)
    assert "checkpoint.resume=never would train over them" in line and "steps 2-2" in line
    script = tmp_path / "b.sbatch"
    line = cli(["launch", str(configs["b"]), "--slurm", "--cpu", "--gpus-per-node", "2", "--out", str(script)],
               capsys, monkeypatch)
    assert "of run 'a'" in line and not script.exists()
    assert snapshot(ckpt) == before
    holder = _start_holder(corpus, runs, [*BASE, "log.name=a", f"checkpoint.dir={ckpt}", "train.steps=4"])
    try:
        line = _one_line_before_any_rank(["launch", str(configs["a"]), "--nproc", "2"], capsys, monkeypatch)
        print(f"launch, held: {line}")
        assert f"another run is using this checkpoint directory (held by pid {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()


def _committed_foreign_checkpoint(root: Path, lineage: str) -> None:
    """A committed checkpoint of another run, as far as a claim reads one: its marker and its manifest's lineage."""
    step = root / "step_00000002"
    step.mkdir(parents=True)
    raw = f'{{"lineage": "{lineage}"}}'.encode()
    (step / "manifest.json").write_bytes(raw)
    (step / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())


def test_a_recipe_on_local_ranks_refuses_before_any_rank_starts(corpus, tmp_path, capsys, monkeypatch):
    """`herd recipe --nproc 2` whose stages save into another run's directory: one line naming the directory, no
    rank started, nothing of the recipe's run directory made. (A stage's own checkpoint.dir is refused by the
    recipe's loader: every stage continues one lineage; the recipe's overrides set it for all.)"""
    ckpt = tmp_path / "theirs"
    _committed_foreign_checkpoint(ckpt, "other")
    before = snapshot(ckpt)
    job = tmp_path / "job.yaml"
    job.write_text(to_yaml(tiny_config(corpus, tmp_path / "unused", ["train.eval_every=0"], world_size=2)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: tiny
config: {job}
run_dir: {tmp_path / 'recipe-run'}
overrides: [checkpoint.dir={ckpt}]
stages:
  - {{name: first, tokens: 512}}
  - {{name: second, tokens: 512}}
""")
    line = _one_line_before_any_rank(["recipe", str(recipe), "--nproc", "2"], capsys, monkeypatch)
    print(f"recipe: {line}")
    assert f"{ckpt}: holds 1 checkpoint(s) of run 'other'" in line and "not of this run 'train'" in line
    assert not (tmp_path / "recipe-run").exists() and snapshot(ckpt) == before
    # a finished stage is skipped by the runner and claims nothing: its directory is not checked
    from engine.config import load_recipe
    from recipe.command import check_stage_checkpoints
    from recipe.runner import RecipeRunner
    plans = RecipeRunner(load_recipe(str(recipe)), world_size=2).plan(check_files=False)
    check_stage_checkpoints(plans, {"stages": {"first": {"done": True}, "second": {"done": True}}})
    with pytest.raises(CheckpointError):
        check_stage_checkpoints(plans, {"stages": {"first": {"done": True}}})
