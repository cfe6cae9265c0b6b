"""Bad inputs to `herd convert` and `herd average` (the findings of the bad-input report of 2026-12-07): each is
one line naming the key, tensor, file or field, exit 2, and the disk unchanged; a failed import write leaves
nothing; a user's files are never replaced as an export's."""

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.checkpoint.store import CheckpointStore
from tests.helpers import run_herd, snapshot

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=3, eos_token_id=4)
STEP0 = "step_00000000"


def save_hf(path: Path, seed: int = 0, **save) -> Path:
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path, **save)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny transformers Llama (one model.safetensors), and the same model in shards with their index."""
    root = tmp_path_factory.mktemp("hf")
    return save_hf(root / "one"), save_hf(root / "shards", max_shard_size="100KB")


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf):
    """Two imports (of different weights), for the export and average cases."""
    from engine.checkpoint.convert import import_hf
    root = tmp_path_factory.mktemp("ck")
    import_hf(hf[0], root / "ck0")
    import_hf(save_hf(root / "hf1", seed=1), root / "ck1")
    return root / "ck0", root / "ck1"


def copy_hf(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "hf"))


def edit_config(hf_dir: Path, edit) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    edit(config)
    (hf_dir / "config.json").write_text(json.dumps(config))


def edit_tensors(file: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def refused(argv, tmp_path, capfd, *named):
    """`herd ARGV` gives exit 2 and one line holding every text in `named`, and changes nothing under tmp_path."""
    before = snapshot(tmp_path)
    code, lines = run_herd(argv, capfd)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("herd: error: "), lines
    for text in named:
        assert text in lines[0], (text, lines)
    assert snapshot(tmp_path) == before
    return lines[0]


def import_refused(hf_dir: Path, tmp_path, capfd, *named):
    return refused(["convert", "hf-to-herd", str(hf_dir), str(tmp_path / "ck")], tmp_path, capfd, *named)


# F1: the import is staged; a failed write is one line and leaves nothing

def _torch_write_fails(*args, **kwargs):
    """What DCP's writer does on a full disk: its OSError surfaces as the context of torch's RuntimeError."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")


def test_a_failed_import_write_is_one_line_and_leaves_nothing(hf, tmp_path, capfd, monkeypatch):
    import torch.distributed.checkpoint.filesystem as filesystem
    written = []

    def half_then_full(transforms, stream, data, *args, **kwargs):  # some bytes reach the file, then no space
        stream.write(b"x" * 1000)
        written.append(1)
        _torch_write_fails()
    monkeypatch.setattr(filesystem, "_write_item", half_then_full)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path / "empty"):
        line = refused(["convert", "hf-to-herd", str(hf[0]), str(out)], tmp_path, capfd)
        assert line == f"herd: error: {out}: the import could not be written (No space left on device)"
    assert written  # the failure happened while writing, not before


def test_an_import_is_written_whole(hf, tmp_path, capfd):
    code, lines = run_herd(["convert", "hf-to-herd", str(hf[1]), str(tmp_path / "a" / "ck")], capfd)
    assert code == 0, lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging directory left
    store = CheckpointStore(tmp_path / "a" / "ck")
    assert store.latest_step() == 0 and store.verify(0)["meta"]["hf_token_ids"] == {"bos_token_id": 3,
                                                                                    "eos_token_id": 4}


# F2: what transformers would read differently is refused

def _both_rope_keys(c):
    c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}


CONFIGS = {  # case: (edit of config.json, texts the line holds)
    "rope_scaling and rope_parameters": (_both_rope_keys, ("'rope_scaling'", "'rope_parameters'", "disagree")),
    "rope_theta disagrees": (lambda c: c.update(rope_theta=500000.0),
                             ("'rope_theta' (500000.0)", "'rope_parameters.rope_theta' (10000.0)")),
    "transformers_weights": (lambda c: c.update(transformers_weights="other.safetensors"),
                             ("'transformers_weights'",)),
    "tie_word_embeddings string": (lambda c: c.update(tie_word_embeddings="no"),  # F8
                                   ("'tie_word_embeddings' must be true or false, got 'no'",)),
    "tie_word_embeddings null": (lambda c: c.update(tie_word_embeddings=None), ("'tie_word_embeddings'",)),
    "max_position_embeddings huge": (lambda c: c.update(max_position_embeddings=10**400),  # F5
                                     ("'max_position_embeddings'", "(401 digits)")),
    "rms_norm_eps huge": (lambda c: c.update(rms_norm_eps=10**400), ("'rms_norm_eps' must be a positive number",)),
    "hidden_size huge": (lambda c: (c.pop("head_dim", None), c.update(hidden_size=10**400)),
                         ("'hidden_size' must be a positive integer",)),
    "vocab_size 2**62": (lambda c: c.update(vocab_size=2**62), ("'vocab_size' is 4611686018427387904",
                                                                "at most 16777216")),
    "num_hidden_layers 10**7": (lambda c: c.update(num_hidden_layers=10**7), ("'num_hidden_layers'", "at most 4096")),
    "too many parameters": (lambda c: c.update(hidden_size=2**20, intermediate_size=2**22, head_dim=2**18),
                            ("parameters; herd converts models of at most 2**40",)),
    "hidden_size negative": (lambda c: c.update(hidden_size=-64), ("'hidden_size' must be a positive integer",)),  # F11
    "hidden_size zero": (lambda c: c.update(hidden_size=0), ("'hidden_size' must be a positive integer",)),
    "bos_token_id string": (lambda c: c.update(bos_token_id="<s>"), ("'bos_token_id' must be a token id",)),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_configs_read_otherwise_or_too_big_are_refused(case, hf, tmp_path, capfd):
    hf_dir = copy_hf(hf[0], tmp_path)
    edit, named = CONFIGS[case]
    edit_config(hf_dir, edit)
    import_refused(hf_dir, tmp_path, capfd, str(hf_dir / "config.json"), *named)


def test_agreeing_rope_keys_are_accepted(hf, tmp_path, capfd):
    hf_dir = copy_hf(hf[0], tmp_path)
    edit_config(hf_dir, lambda c: c.update(rope_theta=10000.0, rope_scaling=dict(c["rope_parameters"])))
    assert run_herd(["convert", "hf-to-herd", str(hf_dir), str(tmp_path / "ck")], capfd)[0] == 0


def test_one_file_beside_an_index_is_refused(hf, tmp_path, capfd):
    hf_dir = copy_hf(hf[1], tmp_path)
    shutil.copy(hf[0] / "model.safetensors", hf_dir)
    import_refused(hf_dir, tmp_path, capfd, "both model.safetensors and model.safetensors.index.json")


# F3, F4: every tensor is one of the model's, once, in the file the index names, finite and of a float type

def _shard_of(hf_dir: Path, tensor: str) -> Path:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    return hf_dir / index[tensor]


def _other_shard(hf_dir: Path, tensor: str) -> Path:
    return next(p for p in sorted(hf_dir.glob("model-*.safetensors")) if p != _shard_of(hf_dir, tensor))


Q = "model.layers.0.self_attn.q_proj.weight"
TENSORS = {  # case: (edit of the tensors of model.safetensors, tensor named)
    "a layer beyond num_hidden_layers": (lambda d: d.update({"model.layers.7.self_attn.q_proj.weight":
                                                             torch.zeros(64, 64)}),
                                         "'model.layers.7.self_attn.q_proj.weight' is not a parameter"),
    "nan": (lambda d: d[Q].__setitem__((0, 0), float("nan")), f"'{Q}' holds inf or nan"),
    "inf": (lambda d: d["model.norm.weight"].__setitem__(3, float("inf")), "'model.norm.weight' holds inf or nan"),
    "int8": (lambda d: d.update({Q: d[Q].to(torch.int8)}), f"'{Q}' is int8"),
    "bool": (lambda d: d.update({Q: d[Q] > 0}), f"'{Q}' is bool"),
    "float8": (lambda d: d.update({Q: d[Q].to(torch.float8_e4m3fn)}), f"'{Q}' is float8_e4m3fn"),
    "complex": (lambda d: d.update({Q: d[Q].to(torch.complex64)}), f"'{Q}' is complex64"),
}


@pytest.mark.parametrize("case", sorted(TENSORS))
def test_foreign_tensors_are_refused_naming_them(case, hf, tmp_path, capfd):
    hf_dir = copy_hf(hf[0], tmp_path)
    edit, named = TENSORS[case]
    edit_tensors(hf_dir / "model.safetensors", edit)
    import_refused(hf_dir, tmp_path, capfd, str(hf_dir / "model.safetensors"), named)


def test_a_tensor_in_two_shards_is_refused(hf, tmp_path, capfd):
    hf_dir = copy_hf(hf[1], tmp_path)
    other = _other_shard(hf_dir, "lm_head.weight")
    edit_tensors(other, lambda d: d.update({"lm_head.weight": torch.zeros(512, 64)}))
    import_refused(hf_dir, tmp_path, capfd, f"{other}: holds tensor 'lm_head.weight'",
                   f"index.json lists it in '{_shard_of(hf_dir, 'lm_head.weight').name}'")


# F5 (manifests), F7: a re-signed manifest's sizes and token ids are checked before anything is built or written

def resign(step: Path, edit) -> None:
    manifest = json.loads((step / "manifest.json").read_text())
    edit(manifest)
    raw = json.dumps(manifest).encode()
    (step / "manifest.json").write_bytes(raw)
    (step / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())


MANIFESTS = {  # case: (edit of the manifest, texts the line holds)
    "vocab_size 2**62": (lambda m: m["meta"]["model"].update(vocab_size=2**62),
                         ("field 'meta.model' has model.vocab_size 4611686018427387904",)),
    "n_layers 10**7": (lambda m: m["meta"]["model"].update(n_layers=10**7), ("model.n_layers 10000000", "4096")),
    "max_seq_len 10**400": (lambda m: m["meta"]["model"].update(max_seq_len=10**400),
                            ("model.max_seq_len 100000000000... (401 digits)",)),
    "token ids a list": (lambda m: m["meta"].update(hf_token_ids=[1, 2]), ("field 'meta.hf_token_ids'",)),
    "token ids garbage": (lambda m: m["meta"].update(hf_token_ids={"bos_token_id": "<script>",
                                                                   "eos_token_id": [1e300]}),
                          ("field 'meta.hf_token_ids'",)),
}


@pytest.mark.parametrize("command", ["export", "average"])
@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_resigned_manifests_are_refused_before_building(case, command, imported, tmp_path, capfd):
    ck = Path(shutil.copytree(imported[0], tmp_path / "ck"))
    edit, named = MANIFESTS[case]
    resign(ck / STEP0, edit)
    argv = ["convert", "herd-to-hf", str(ck), str(tmp_path / "out")] if command == "export" else \
        ["average", str(ck), str(imported[1]), "--out", str(tmp_path / "out")]
    refused(argv, tmp_path, capfd, str(ck / STEP0 / "manifest.json"), *named)


# F6, F15: paths

def test_path_errors_are_one_line(hf, imported, tmp_path, capfd):
    long = tmp_path / ("x" * 300)
    refused(["convert", "hf-to-herd", str(hf[0]), str(long)], tmp_path, capfd, "File name too long")
    refused(["convert", "hf-to-herd", str(long), str(tmp_path / "ck")], tmp_path, capfd, "File name too long")
    refused(["convert", "hf-to-herd", str(hf[0]), ""], tmp_path, capfd, "dest: is empty")
    hf_dir = copy_hf(hf[0], tmp_path)
    refused(["convert", "hf-to-herd", str(hf_dir), str(hf_dir / "ck")], tmp_path, capfd,
            "is inside the HF directory being imported")


# F9: an export never goes inside the checkpoint it exports

def test_an_export_inside_its_checkpoint_is_refused(imported, tmp_path, capfd):
    ck = Path(shutil.copytree(imported[0], tmp_path / "ck"))
    for dest in (ck / STEP0 / "hf", ck / "hf"):
        refused(["convert", "herd-to-hf", str(ck), str(dest)], tmp_path, capfd,
                f"{dest}: is inside the checkpoint being exported")


# F10: only an export's own files are replaced without --overwrite; --overwrite never deletes a run, however deep

def test_a_directory_with_a_users_file_is_not_an_earlier_export(imported, tmp_path, capfd):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"herd_export": 1}')
    (fake / "thesis.tex").write_text("years of work\n")
    refused(["convert", "herd-to-hf", str(imported[0]), str(fake)], tmp_path, capfd, "--overwrite")
    real = tmp_path / "real"
    assert run_herd(["convert", "herd-to-hf", str(imported[0]), str(real)], capfd)[0] == 0
    (real / "notes.md").write_text("mine\n")
    refused(["convert", "herd-to-hf", str(imported[0]), str(real)], tmp_path, capfd, "--overwrite")
    (real / "notes.md").unlink()
    assert run_herd(["convert", "herd-to-hf", str(imported[0]), str(real)], capfd)[0] == 0  # its own: replaced


def test_overwrite_never_deletes_a_deep_checkpoint(imported, tmp_path, capfd):
    mine = tmp_path / "mine"
    shutil.copytree(imported[1], mine / "a" / "b" / "c" / "d" / "e" / "ck")
    refused(["convert", "herd-to-hf", str(imported[0]), str(mine), "--overwrite"], tmp_path, capfd,
            "holds herd checkpoint state")
    refused(["average", str(imported[0]), str(imported[1]), "--out", str(mine), "--overwrite"], tmp_path, capfd,
            "holds herd checkpoint state")


# F12, F13, F15: average

def _weights(root: Path) -> dict:
    from engine.checkpoint.hf_export import load_weights
    from engine.checkpoint.manifest import model_config_of
    store = CheckpointStore(root)
    manifest = store.verify(0)
    model = load_weights(store, 0, manifest, model_config_of(manifest, store.step_dir(0) / "manifest.json"))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tiny_or_huge_weights_give_the_defined_mean(imported, tmp_path, capfd):
    for weights in ("1e-320,0", "1e300,1e300"):
        out = tmp_path / weights.replace(",", "_")
        assert run_herd(["average", str(imported[0]), str(imported[1]), "--out", str(out), "--weights", weights],
                        capfd)[0] == 0
        got, first, second = _weights(out), _weights(imported[0]), _weights(imported[1])
        w1, w2 = map(float, weights.split(","))
        for name, value in got.items():  # the definition, with the weights as given (1e-320 x underflows)
            want = first[name] if w2 == 0 else ((first[name].double() * w1 + second[name].double() * w2) /
                                                (w1 + w2)).float()
            assert torch.equal(value, want), (weights, name)


def test_a_failed_average_write_names_the_cause(imported, tmp_path, capfd, monkeypatch):
    import torch.distributed.checkpoint.filesystem as filesystem
    monkeypatch.setattr(filesystem, "_write_item", _torch_write_fails)
    out = tmp_path / "out"
    line = refused(["average", str(imported[0]), str(imported[1]), "--out", str(out)], tmp_path, capfd)
    assert line == f"herd: error: {out}: the average could not be written (No space left on device)"


def test_average_names_the_source_of_a_nan_and_a_symlinked_step(imported, tmp_path, capfd):
    from engine.checkpoint.sharded import Box, save_sharded
    from engine.checkpoint.store import describe_files
    state = _weights(imported[1])
    state["norm.weight"][5] = float("nan")
    store = CheckpointStore(tmp_path / "bad")
    path = store.begin(0)
    save_sharded(path, {f"model.{n}": Box(t, (0,) * t.ndim, tuple(t.shape)) for n, t in state.items()})
    store.commit(0, describe_files(path, [f for f in path.rglob("*") if f.is_file()]),
                 CheckpointStore(imported[1]).verify(0)["meta"])
    refused(["average", str(imported[0]), str(tmp_path / "bad"), "--out", str(tmp_path / "out")], tmp_path, capfd,
            f"{path}: parameter 'norm.weight' holds inf or nan")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / STEP0).symlink_to(imported[1] / STEP0)
    refused(["average", str(imported[0]), str(tmp_path / "links" / STEP0), "--out", str(tmp_path / "out")],
            tmp_path, capfd, "is a symbolic link")
