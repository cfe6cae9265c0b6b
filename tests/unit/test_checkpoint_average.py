"""`herd average` (issue 18, item 4): the checkpoints of short real runs averaged into one checkpoint that holds,
bitwise, the mean engine/checkpoint/average.py defines (float64 sums in source order, one rounding to fp32), loads
as a new run's weights and exports to a directory transformers loads; every refusal is one line with exit 2 and
leaves the disk as it was."""

import errno
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.checkpoint.average import average_checkpoints
from engine.checkpoint.hf_export import load_weights
from engine.checkpoint.manifest import model_config_of
from engine.checkpoint.store import CheckpointStore
from engine.run import build_trainer
from tests.helpers import make_corpus, run_herd, snapshot, tiny_config

STEP = "step_{:08d}"


def train(corpus: Path, run_dir: Path, name: str, extra=()) -> Path:
    """A tiny real run saving every 2 steps; returns its checkpoint root."""
    cfg = tiny_config(corpus, run_dir, ["train.eval_every=0", "checkpoint.every=2", "checkpoint.keep_last=3",
                                        f"log.name={name}", "log.tensorboard=false", *extra])
    build_trainer(cfg, stream=io.StringIO()).fit()
    return run_dir / name / "checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("average")
    corpus = make_corpus(root)
    other = make_corpus(root / "other", vocab_size=400)  # another tokenizer
    return SimpleNamespace(
        corpus=corpus,
        tok=train(other, root / "runs", "tok", ["train.steps=2"]),
        a=train(corpus, root / "runs", "a", ["train.steps=4"]),  # steps 2 and 4
        b=train(corpus, root / "runs", "b", ["train.steps=2", "optim.lr=1e-3", "train.seed=7"]),
        wide=train(corpus, root / "runs", "wide", ["train.steps=2", "model.ffn_dim=96"]),
        theta=train(corpus, root / "runs", "theta", ["train.steps=2", "model.rope_theta=10000.0"]))


def weights_of(step_dir: Path) -> dict:
    """A checkpoint's parameters read by the export's reader (not the average's)."""
    store = CheckpointStore(step_dir.parent)
    step = int(step_dir.name.split("_")[1])
    manifest = store.verify(step)
    model = load_weights(store, step, manifest, model_config_of(manifest, step_dir / "manifest.json"))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def defined_mean(step_dirs, weights=None) -> dict:
    """The definition, written out: w_1 * x_1 + ... + w_n * x_n sequentially in float64, / sum(w), fp32."""
    weights = weights or [1.0] * len(step_dirs)
    sources = [weights_of(d) for d in step_dirs]
    out = {}
    for name in sources[0]:
        total = sources[0][name].double() * weights[0]
        for source, weight in zip(sources[1:], weights[1:]):
            total = total + source[name].double() * weight
        out[name] = (total / sum(weights)).float()
    return out


def assert_equal_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name


def test_the_average_is_the_defined_mean_bitwise(runs, tmp_path, capfd):
    sources = [runs.a / STEP.format(2), runs.a / STEP.format(4), runs.b / STEP.format(2)]
    code, lines = run_herd(["average", "--all", str(runs.a), str(runs.b), "--out", str(tmp_path / "avg")], capfd)
    assert code == 0, lines
    assert [line.strip() for line in lines[1:]] == [str(s) for s in sources]  # --all: every step, oldest first
    averaged = weights_of(tmp_path / "avg" / STEP.format(0))
    assert_equal_weights(averaged, defined_mean(sources))
    first = weights_of(sources[0])
    assert all(not torch.equal(averaged[n], first[n]) for n in first)  # the runs trained: a real average
    # read one parameter at a time instead of all at once: the same bytes
    average_checkpoints(sources, tmp_path / "chunked", chunk_bytes=1)
    assert_equal_weights(weights_of(tmp_path / "chunked" / STEP.format(0)), averaged)
    manifest = json.loads((tmp_path / "avg" / STEP.format(0) / "manifest.json").read_text())
    assert [(s["path"], s["step"], s["weight"]) for s in manifest["meta"]["averaged"]] == \
        [(str(s), int(s.name[5:]), 1.0) for s in sources]


def test_two_checkpoints_average_to_the_correctly_rounded_mean(runs, tmp_path):
    """For two fp32 values the float64 sum and halving are exact: the result is the mean rounded once."""
    from fractions import Fraction
    a, b = runs.a / STEP.format(4), runs.b / STEP.format(2)
    average_checkpoints([runs.a, runs.b], tmp_path / "avg")  # roots: their newest complete checkpoints
    got = weights_of(tmp_path / "avg" / STEP.format(0))["layers.0.attention.wq.weight"].flatten()[:64]
    x = weights_of(a)["layers.0.attention.wq.weight"].flatten()[:64]
    y = weights_of(b)["layers.0.attention.wq.weight"].flatten()[:64]
    for g, p, q in zip(got.tolist(), x.tolist(), y.tolist()):
        exact = (Fraction(p) + Fraction(q)) / 2
        neighbours = [float(v) for v in torch.tensor([g]).float().nextafter(torch.tensor([-1e30, 1e30])).tolist()]
        # no fp32 value lies nearer the exact mean than the result
        assert all(abs(Fraction(g) - exact) <= abs(Fraction(n) - exact) for n in neighbours)


def test_copies_of_one_checkpoint_average_to_it_bitwise(runs, tmp_path):
    shutil.copytree(runs.b, tmp_path / "copy")
    average_checkpoints([runs.b, tmp_path / "copy"], tmp_path / "avg")
    assert_equal_weights(weights_of(tmp_path / "avg" / STEP.format(0)), weights_of(runs.b / STEP.format(2)))


def test_weights_and_steps(runs, tmp_path, capfd):
    sources = [runs.a / STEP.format(4), runs.b / STEP.format(2)]
    code, lines = run_herd(["average", "--steps", "4", str(runs.a), str(sources[1]), "--weights", "1,3",
                       "--out", str(tmp_path / "avg")], capfd)
    assert code == 0, lines
    assert_equal_weights(weights_of(tmp_path / "avg" / STEP.format(0)), defined_mean(sources, [1.0, 3.0]))


def test_the_average_loads_as_weights_and_exports_to_transformers(runs, tmp_path, capfd):
    transformers = pytest.importorskip("transformers")
    assert run_herd(["average", str(runs.a), str(runs.b), "--out", str(tmp_path / "avg")], capfd)[0] == 0
    want = defined_mean([runs.a / STEP.format(4), runs.b / STEP.format(2)])
    trainer = build_trainer(tiny_config(runs.corpus, tmp_path / "new", [
        f"checkpoint.load_weights={tmp_path / 'avg'}", "train.eval_every=0"]), stream=io.StringIO())
    loaded = {n: p.detach() for n, p in trainer.module.model.named_parameters()}
    assert_equal_weights(loaded, want)
    assert run_herd(["convert", "herd-to-hf", str(tmp_path / "avg"), str(tmp_path / "hf")], capfd)[0] == 0
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (runs.corpus / "tok.json").read_bytes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (trainer.module.model.eval()(tokens) - hf(tokens).logits).abs().max().item()
    print(f"averaged checkpoint in transformers vs herd: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_overwrite_replaces_an_earlier_average_only(runs, tmp_path, capfd):
    out = tmp_path / "avg"
    assert run_herd(["average", str(runs.a), str(runs.b), "--out", str(out)], capfd)[0] == 0
    assert run_herd(["average", "--all", str(runs.a), str(runs.b), "--out", str(out), "--overwrite"], capfd)[0] == 0
    assert len(json.loads((out / STEP.format(0) / "manifest.json").read_text())["meta"]["averaged"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg"]  # no staging or replaced directory left


def tampered_manifest(source: Path) -> None:
    """A manifest field of the wrong type, re-signed so that the marker matches (an attacker's edit)."""
    import hashlib
    step = source / STEP.format(2)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"][".metadata"]["bytes"] = "many"
    raw = json.dumps(manifest).encode()
    (step / "manifest.json").write_bytes(raw)
    (step / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())


def flipped_shard(source: Path) -> None:
    shard = source / STEP.format(2) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


# case: (argv after "average" with {a}, {b}, {wide}, {theta}, {copy}, {out} filled in; what to do to {copy} (a copy
# of b's root) first; the text the one line holds)
REFUSALS = {
    "one checkpoint": ("{a}/step_00000004 --out {out}", None, "needs at least 2 checkpoints, got 1"),
    "the same twice": ("{a} {a}/step_00000004 --out {out}", None, "step_00000004: given twice"),
    "another shape": ("{a} {wide} --out {out}",
                      None, "parameter 'layers.0.feed_forward.w1.weight' has shape (96, 64) here, shape (128, 64) in"),
    "another rope_theta": ("{a} {theta} --out {out}", None, "model.rope_theta is 10000.0, 500000.0 in"),
    "incomplete": ("{a} {copy}/step_00000002 --out {out}", lambda c: (c / STEP.format(2) / "COMMITTED").unlink(),
                   "step_00000002: incomplete checkpoint"),
    "no checkpoint": ("{a} {copy} --out {out}", lambda c: shutil.rmtree(c / STEP.format(2)),
                      "copy: no complete checkpoint"),
    "not a directory": ("{a} {copy}/nothing --out {out}", None, "nothing: not a directory"),
    "tampered manifest": ("{a} {copy} --out {out}", tampered_manifest,
                          "manifest.json: field 'files..metadata.bytes' must be a size in bytes"),
    "altered shard": ("{a} {copy} --out {out}", flipped_shard, "__0_0.distcp: sha256 differs from the manifest"),
    "missing step": ("--steps 2,3 {a} {b} --out {out}", None, "no complete checkpoint of step 3 (complete: 2, 4)"),
    "all and steps": ("--all --steps 2 {a} {b} --out {out}", None, "give one of them"),
    "bad steps": ("--steps two {a} {b} --out {out}", None, "--steps: must be a comma-separated list"),
    "weight count": ("--weights 1 {a} {b} --out {out}", None, "--weights: 1 weights for 2 checkpoints"),
    "negative weight": ("--weights 1,-1 {a} {b} --out {out}", None, "--weights: must be finite and >= 0"),
    "out exists": ("{a} {b} --out {copy}", None, "copy: exists and is not empty"),
    "out is a source": ("{a} {copy} --out {copy} --overwrite", None, "copy: holds the source"),
    "out holds a run": ("{a} {b} --out {copy} --overwrite", None, "copy: holds herd checkpoint state"),
    "another tokenizer": ("{a} {tok} --out {out}", None, "data.tokenizer (hf "),
    "out inside a source": ("{a} {b} --out {b}/step_00000002/avg", None, "is inside the source"),
    "out under a file": ("{a} {b} --out {copy}/step_00000002/manifest.json/x", None, "is a file"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_and_change_nothing(case, runs, tmp_path, capfd):
    argv, prepare, text = REFUSALS[case]
    copy = tmp_path / "copy"
    shutil.copytree(runs.b, copy)
    if prepare is not None:
        prepare(copy)
    before, runs_before = snapshot(tmp_path), snapshot(runs.a.parent.parent)
    paths = dict(a=runs.a, b=runs.b, wide=runs.wide, theta=runs.theta, tok=runs.tok, copy=copy,
                 out=tmp_path / "out")
    code, lines = run_herd(["average", *argv.format(**paths).split()], capfd)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("herd: error: "), lines
    assert text in lines[0], lines
    assert snapshot(tmp_path) == before and snapshot(runs.a.parent.parent) == runs_before


def test_a_failed_write_is_one_line_and_leaves_nothing(runs, tmp_path, capfd, monkeypatch):
    """No space (the DCP shards), no permission (a directory to make): exit 2, one line naming --out; no
    directory made, no staging left; an earlier average being replaced stays as it was."""
    import engine.checkpoint.average as average

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_permission(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    earlier = tmp_path / "earlier"
    assert run_herd(["average", str(runs.a), str(runs.b), "--out", str(earlier)], capfd)[0] == 0
    before = snapshot(tmp_path)
    for out, extra in ((tmp_path / "new" / "out", []), (earlier, ["--overwrite"])):
        for target, fake, reason in ((average, ("save_sharded", no_space), "No space left on device"),
                                     (Path, ("mkdir", no_permission), "Permission denied")):
            with monkeypatch.context() as patch:
                patch.setattr(target, *fake)
                code, lines = run_herd(["average", "--all", str(runs.a), str(runs.b), "--out", str(out), *extra], capfd)
            assert code == 2 and lines == [f"herd: error: {out}: the average could not be written ({reason})"], lines
            assert snapshot(tmp_path) == before


def save_hf(path: Path, seed: int) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=510, max_position_embeddings=256, rope_theta=500000.0, bos_token_id=3, eos_token_id=[4, 7]))
    model.save_pretrained(path, safe_serialization=True)
    return path


def with_a_nan(source: Path, root: Path) -> Path:
    """A committed copy of an import with one NaN weight (an import refuses NaN weights, so written directly)."""
    from engine.checkpoint.sharded import Box, save_sharded
    from engine.checkpoint.store import describe_files
    state = weights_of(source / STEP.format(0))
    state["norm.weight"][5] = float("nan")
    store = CheckpointStore(root)
    path = store.begin(0)
    save_sharded(path, {f"model.{n}": Box(t, (0,) * t.ndim, tuple(t.shape)) for n, t in state.items()})
    store.commit(0, describe_files(path, [f for f in path.rglob("*") if f.is_file()]),
                 CheckpointStore(source).verify(0)["meta"])
    return root


def test_imports_average_and_export_with_their_token_ids(tmp_path, capfd):
    """Imported HF models average too (their config and special ids carried to the export); a source holding a
    NaN gives a non-finite average: refused naming that source, nothing written."""
    from safetensors.torch import load_file

    from engine.hf_interop import hf_to_herd_name
    for name, seed in (("x", 0), ("y", 1)):
        save_hf(tmp_path / f"hf-{name}", seed)
        assert run_herd(["convert", "hf-to-herd", str(tmp_path / f"hf-{name}"), str(tmp_path / name)], capfd)[0] == 0
    argv = ["average", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "avg")]
    assert run_herd(argv, capfd)[0] == 0
    assert run_herd(["convert", "herd-to-hf", str(tmp_path / "avg"), str(tmp_path / "out")], capfd)[0] == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, [4, 7])
    exported = {hf_to_herd_name(k): v for k, v in load_file(str(tmp_path / "out" / "model.safetensors")).items()}
    assert_equal_weights(exported, defined_mean([tmp_path / "x" / STEP.format(0), tmp_path / "y" / STEP.format(0)]))
    bad = with_a_nan(tmp_path / "y", tmp_path / "bad")
    before = snapshot(tmp_path)
    code, lines = run_herd(["average", str(tmp_path / "x"), str(bad), "--out", str(tmp_path / "nan")], capfd)
    assert code == 2 and lines == [f"herd: error: {bad / STEP.format(0)}: parameter 'norm.weight' holds inf or "
                                   f"nan; the average would not be finite"], lines
    assert snapshot(tmp_path) == before


def test_weights_whose_sum_overflows_are_one_line():
    from engine.checkpoint.average import _check_weights
    from engine.checkpoint.store import CheckpointError
    with pytest.raises(CheckpointError, match="--weights"):
        _check_weights([1e308, 1e308], 2)


def test_flags_that_choose_nothing_and_overwriting_a_users_directory_are_refused(runs, tmp_path, capfd):
    """Found by helper H46: --overwrite deleted a directory of the user's files (a corpus), --steps was ignored
    with step-directory sources and an empty --steps=/--weights= was taken as not given; herd convert called a
    step directory 'no step_* directories'."""
    mine = tmp_path / "corpus"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious\n")
    code, lines = run_herd(["average", str(runs.a), str(runs.b), "--out", str(mine), "--overwrite"], capfd)
    assert code == 2 and "is not an earlier average (it holds files of its own)" in lines[-1], lines
    assert (mine / "notes.txt").read_text() == "precious\n"
    step = sorted(runs.a.glob("step_*"))[-1]
    for argv, text in (([str(step), str(sorted(runs.b.glob("step_*"))[-1]), "--steps", "5"], "every source is a step "
                        "directory (one checkpoint each)"),
                       ([str(runs.a), str(runs.b), "--steps="], "--steps: empty"),
                       ([str(runs.a), str(runs.b), "--weights="], "--weights: empty")):
        code, lines = run_herd(["average", *argv, "--out", str(tmp_path / "new")], capfd)
        assert code == 2 and text in lines[-1] and not (tmp_path / "new").exists(), lines
    code, lines = run_herd(["convert", "herd-to-hf", str(step), str(tmp_path / "hf")], capfd)
    assert code == 2 and f"it is a step directory itself: give its checkpoint root, {runs.a}" in lines[-1], lines
