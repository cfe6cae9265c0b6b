"""Every byte a checkpoint load reads is verified (issue 16, item 2; shared/TESTING.md R5, R15, R16).

An attacker (or an accident) controls a checkpoint directory and rewrites the manifest and marker so that the
hashes match whatever it planted. Each case of the table tampers with one thing of a copy of a real training
checkpoint: DCP's storage paths in `.metadata` (absolute, `..`, symlinks, unlisted files, byte ranges,
transforms) or one field of the manifest (malformed, wrong type, wrong shape), then loads it by every consumer
it concerns: resume (`build_trainer`), `checkpoint.load_weights` and `herd convert herd-to-hf` (through the
command, in-process). What must hold: one line naming the file and the field, a CheckpointError (the command:
exit 2, no traceback), and the checkpoint directory unchanged.
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, NamedTuple, Tuple

import pytest
import torch

from engine.checkpoint.store import CheckpointError
from engine.errors import HerdError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

STEP = "step_00000002"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory) -> Path:
    """A real training checkpoint of step 2 (run 't'), never changed: each case copies it."""
    run_dir = tmp_path_factory.mktemp("saved")
    build_trainer(tiny_config(corpus, run_dir, ["train.eval_every=0", "train.steps=2", "checkpoint.every=2"]),
                  stream=io.StringIO()).fit()
    return run_dir / "t" / "checkpoints"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else "dir" if p.is_dir()
                                       else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def sign(step_dir: Path, edit: Callable[[dict], object] = None, raw: bytes = None) -> None:
    """What an attacker who controls the directory does: the manifest's hashes and sizes match the files (those
    that exist as plain files), `edit` changes it further, and the marker holds its hash."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        file = step_dir / name
        if file.is_file() and not file.is_symlink():
            data = file.read_bytes()
            info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if edit is not None:
        edit(manifest)
    raw = raw if raw is not None else json.dumps(manifest, indent=1, sort_keys=True).encode()
    (step_dir / "manifest.json").write_bytes(raw)
    (step_dir / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())


def storage(step_dir: Path, **change) -> None:
    """Rewrite one storage entry of DCP's `.metadata` (the first shard entry of the first parameter)."""
    metadata = pickle.loads((step_dir / ".metadata").read_bytes())  # our own file: plain pickle is fine here
    index = sorted(metadata.storage_data, key=lambda i: (i.fqn, tuple(i.offset or ())))[0]
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], **change)
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))


def a_shard(step_dir: Path) -> Path:
    return next(step_dir.glob("__0_*.distcp"))


def outside_copy(step_dir: Path, where: Path) -> Path:
    """A byte-identical copy of a shard outside the step directory: without the check, DCP would read it."""
    shutil.copyfile(a_shard(step_dir), where)
    return where


def _abs_path(d: Path) -> None:
    storage(d, relative_path=str(outside_copy(d, d.parent.parent / "elsewhere.distcp")))
    sign(d)


def _dotdot(d: Path) -> None:
    outside_copy(d, d.parent / "up.distcp")
    storage(d, relative_path="../up.distcp")
    sign(d)


def _dotdot_listed(d: Path) -> None:
    outside_copy(d, d.parent / "up.distcp")
    storage(d, relative_path="../up.distcp")
    sign(d, lambda m: m["files"].update({"../up.distcp": dict(m["files"][a_shard(d).name])}))


def _symlink(d: Path) -> None:
    os.symlink(outside_copy(d, d.parent.parent / "target.distcp"), d / "link.distcp")
    storage(d, relative_path="link.distcp")
    sign(d)


def _symlink_listed(d: Path) -> None:
    _symlink(d)
    sign(d, lambda m: m["files"].update({"link.distcp": dict(m["files"][a_shard(d).name])}))


def _unlisted_file(d: Path) -> None:
    shutil.copyfile(a_shard(d), d / "planted.distcp")
    storage(d, relative_path="planted.distcp")
    sign(d)


def _metadata_unlisted(d: Path) -> None:
    sign(d, lambda m: m["files"].pop(".metadata"))


def _field(path: str, value) -> Callable[[Path], None]:
    """Set (or with value DELETE, remove) one manifest field given as a dotted path, then sign."""
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return lambda d: sign(d, edit)


def _first_file_field(key: str, value) -> Callable[[Path], None]:
    return lambda d: sign(d, lambda m: m["files"][sorted(m["files"])[0]].update({key: value}))


def _rng_not_a_state(d: Path) -> None:
    torch.save([torch.zeros(3)], d / "rng" / "rank0.pt")
    sign(d)


DELETE = object()
R, W, E = "resume", "load_weights", "export"


class Case(NamedTuple):
    id: str
    tamper: Callable[[Path], None]
    expected: str
    consumers: Tuple[str, ...] = (R, W, E)


CASES = [
    # DCP storage paths: every file DCP opens is a listed, hashed, plain file inside the step directory
    Case("storage_absolute_path", _abs_path, "which the manifest does not list"),
    Case("storage_dotdot", _dotdot, "which the manifest does not list"),
    Case("storage_dotdot_listed", _dotdot_listed, "escapes the checkpoint directory"),
    Case("storage_symlink", _symlink, "'link.distcp', which the manifest does not list"),
    Case("storage_symlink_listed", _symlink_listed, "link.distcp: is a symlink"),
    Case("storage_unlisted_file", _unlisted_file, "'planted.distcp', which the manifest does not list"),
    Case("storage_range_past_the_end", lambda d: (storage(d, length=10 ** 9), sign(d)), "reads bytes"),
    Case("storage_negative_offset", lambda d: (storage(d, offset=-1), sign(d)), "reads bytes"),
    Case("storage_transform", lambda d: (storage(d, transform_descriptors=["zstd"]), sign(d)),
         "transform_descriptors"),
    Case("storage_path_not_a_string", lambda d: (storage(d, relative_path=7), sign(d)),
         "not a storage entry with a relative path"),
    Case("metadata_not_listed", _metadata_unlisted, ".metadata: not listed in the manifest"),
    # the manifest's own fields
    Case("manifest_not_json", lambda d: sign(d, raw=b"{not json"), "manifest.json", (W, E)),
    Case("manifest_not_an_object", lambda d: sign(d, raw=b"[1, 2]"), "field '(top level)'", (W, E)),
    Case("manifest_unreadable_is_nobodys", lambda d: sign(d, raw=b"[1, 2]"), "manifest.json cannot be read", (R,)),
    # nested too deep for Python's JSON parser (RecursionError): refused in one line, never a traceback (or, on
    # several ranks, rank 0 failing alone while the others wait for its verdict)
    Case("manifest_nested_too_deep", lambda d: sign(d, raw=b"[" * 100000), "manifest.json: not valid JSON", (W, E)),
    Case("manifest_nested_too_deep_is_nobodys", lambda d: sign(d, raw=b"[" * 100000), "manifest.json cannot be read",
         (R,)),
    Case("format_a_string", _field("format", "1"), "field 'format'"),
    Case("step_not_its_directory", _field("step", 3), "field 'step'"),
    Case("files_missing", _field("files", DELETE), "field 'files' is missing"),
    Case("files_empty", _field("files", {}), "field 'files'"),
    Case("file_bytes_a_string", _first_file_field("bytes", "12"), ".bytes' must be a size in bytes"),
    Case("file_bytes_negative", _first_file_field("bytes", -4), ".bytes' must be a size in bytes"),
    Case("file_sha256_a_number", _first_file_field("sha256", 12), ".sha256' must be 64 lowercase hex digits"),
    Case("file_info_a_list", lambda d: sign(d, lambda m: m["files"].update({".metadata": [1]})),
         "field 'files..metadata' must be an object"),
    Case("meta_a_list", _field("meta", [1]), "field 'meta' must be a JSON object"),
    Case("lineage_a_number", _field("lineage", 5), "field 'lineage'", (W, E)),
    # what a resume takes from meta: the shape of this run's own loader and scheduler state
    Case("meta_step_a_string", _field("meta.step", "2"), "field 'meta.step'", (R,)),
    Case("meta_world_size_zero", _field("meta.world_size", 0), "field 'meta.world_size'", (R, E)),
    Case("meta_loader_missing", _field("meta.loader", DELETE), "field 'meta.loader' is missing", (R,)),
    Case("meta_loader_negative", _field("meta.loader.consumed_samples", -8), "meta.loader.consumed_samples", (R,)),
    Case("meta_loader_a_string", _field("meta.loader.consumed_samples", "16"), "meta.loader.consumed_samples",
         (R,)),
    Case("meta_scheduler_a_list", _field("meta.scheduler", [1]), "field 'meta.scheduler' must be an object", (R,)),
    Case("meta_scheduler_epoch_a_float", _field("meta.scheduler.last_epoch", 2.5),
         "field 'meta.scheduler.last_epoch' must be an integer", (R,)),
    Case("meta_scheduler_extra_key", _field("meta.scheduler.get_lr", 1), "'meta.scheduler.get_lr' is not part",
         (R,)),
    Case("meta_scheduler_lrs_too_many", _field("meta.scheduler.base_lrs", [0.1] * 7),
         "'meta.scheduler.base_lrs' must be a list of 2", (R,)),
    Case("weights_only_resumed", _field("meta.weights_only", True), "weights-only checkpoint", (R,)),
    Case("rng_file_not_a_state", _rng_not_a_state, "rng/rank0.pt: not an RNG state file", (R,)),
    # what load_weights and export take from meta
    Case("meta_model_dim_a_string", _field("meta.model", {"dim": "64"}), "field 'meta.model.dim'", (W, E)),
    Case("meta_model_unknown_key", _field("meta.model", {"dim": 64, "hidden": 1}), "'meta.model.hidden' is not part",
         (W, E)),
    Case("meta_model_a_list", _field("meta.model", [64]), "field 'meta.model' must be an object", (W, E)),
    Case("meta_config_a_number", _field("meta.config", 5), "field 'meta.config'", (E,)),
    Case("meta_model_dim_only", _field("meta.model", {"dim": 64}), "has shape (128, 64) in the checkpoint", (E,)),
    Case("meta_model_null", _field("meta.model", None), "field 'meta.model' must be an object", (W, E)),
    Case("meta_model_dim_zero", _field("meta.model", {"dim": 0}), "field 'meta.model' describes no valid model",
         (W, E)),
]


def consume(consumer: str, corpus: Path, root: Path, work: Path, capsys) -> str:
    """Load `root` the consumer's way; returns the one-line refusal (fails if it loads or is not one line)."""
    if consumer == E:
        from launch.cli import main
        capsys.readouterr()
        try:
            code = main(["convert", "herd-to-hf", str(root), str(work / "hf")])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        lines = (out + err).strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, out + err
        return lines[0]
    extra = ["train.eval_every=0", "train.steps=4"]
    extra += [f"checkpoint.dir={root}", "checkpoint.every=2"] if consumer == R else [
        f"checkpoint.load_weights={root}"]
    with pytest.raises(HerdError) as info:
        build_trainer(tiny_config(corpus, work / "run", extra), stream=io.StringIO())
    assert isinstance(info.value, CheckpointError), repr(info.value)
    return str(info.value)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_tampered_checkpoint_is_refused_in_one_line(case, corpus, saved, tmp_path, capsys):
    area = tmp_path / "area"  # the checkpoint and the files planted beside it
    root = area / "ckpt"
    shutil.copytree(saved, root, symlinks=True)
    case.tamper(root / STEP)
    before = snapshot(area)
    for consumer in case.consumers:
        line = consume(consumer, corpus, root, tmp_path / consumer, capsys)
        print(f"{case.id} [{consumer}]: {line}")
        assert case.expected in line and "\n" not in line, line
        assert snapshot(area) == before, f"{consumer} changed the checkpoint or what lies beside it"


def test_an_unlisted_rng_file_is_not_read(corpus, saved, tmp_path):
    """The RNG file is read only when the manifest lists (and so hashed) it: a planted one is ignored."""
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    (root / STEP / "rng" / "rank0.pt").write_bytes(b"not a torch file")
    sign(root / STEP, lambda m: m["files"].pop("rng/rank0.pt"))
    trainer = build_trainer(tiny_config(corpus, tmp_path / "run", ["train.eval_every=0", "train.steps=2",
                                                                   f"checkpoint.dir={root}", "checkpoint.every=2"]),
                            stream=io.StringIO())
    assert trainer.state.step == 2  # resumed, from the verified files only
    trainer.checkpointer.release()


def test_the_untampered_copy_loads_by_every_consumer(corpus, saved, tmp_path, capsys):
    """The table's control: the same copy, re-signed but unchanged, loads everywhere."""
    from launch.cli import main
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    sign(root / STEP)
    trainer = build_trainer(tiny_config(corpus, tmp_path / "r", ["train.eval_every=0", "train.steps=2",
                                                                 f"checkpoint.dir={root}", "checkpoint.every=2"]),
                            stream=io.StringIO())
    assert trainer.state.step == 2
    trainer.checkpointer.release()
    build_trainer(tiny_config(corpus, tmp_path / "w", ["train.eval_every=0", f"checkpoint.load_weights={root}"]),
                  stream=io.StringIO())
    assert main(["convert", "herd-to-hf", str(root), str(tmp_path / "hf")]) == 0, capsys.readouterr()
