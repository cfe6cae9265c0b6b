"""`herd convert` (issue 16): import refuses, in one line naming config.json's key, every HF Llama config herd
cannot compute exactly, creating nothing; each supported variant round-trips HF -> herd -> HF with equal logits;
an export replaces only its own earlier export unless asked to overwrite, and a refused export changes nothing;
the Llama 3 tokenizer exports as a tokenizer.json that encodes as herd does."""

import errno
import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint.sharded import Box, load_sharded
from engine.checkpoint.store import CheckpointStore
from tests.helpers import run_herd, snapshot

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=510, max_position_embeddings=256, rope_theta=500000.0,
            bos_token_id=3, eos_token_id=[4, 7])
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "gqa_plain_rope": {},
    "mha_llama3_rope": {"num_key_value_heads": 8, "rope_parameters": LLAMA3_ROPE},
    "tied_embeddings": {"tie_word_embeddings": True},
}


def save_hf(path: Path, **overrides) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def plain_hf(tmp_path_factory):
    return save_hf(tmp_path_factory.mktemp("hf") / "plain")


def _rope(kind: str, **extra):
    return lambda c: c.update(rope_parameters={"rope_type": kind, "rope_theta": 500000.0, "factor": 2.0, **extra})


REFUSALS = {  # case: (edit of config.json, key the message names)
    "hidden_act": (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    "attention_bias": (lambda c: c.update(attention_bias=True), "attention_bias"),
    "mlp_bias": (lambda c: c.update(mlp_bias=True), "mlp_bias"),
    "rope_linear": (_rope("linear"), "rope_parameters"),
    "rope_dynamic": (_rope("dynamic"), "rope_parameters"),
    "rope_yarn": (_rope("yarn", original_max_position_embeddings=64), "rope_parameters"),
    "rope_longrope": (_rope("longrope", short_factor=[1.0] * 4, long_factor=[1.0] * 4), "rope_parameters"),
    "rope_scaling_4x_linear": (lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={
        "type": "linear", "factor": 2.0})), "rope_scaling"),
    "partial_rotary": (lambda c: c["rope_parameters"].update(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "head_dim": (lambda c: c.update(head_dim=16), "head_dim"),
    "model_type": (lambda c: c.update(model_type="mistral"), "model_type"),
    "architectures": (lambda c: c.update(architectures=["MistralForCausalLM"]), "architectures"),
    "quantized": (lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}),
                  "quantization_config"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_inexact_configs_are_refused_in_one_line(case, plain_hf, tmp_path, capfd):
    import shutil
    hf = Path(shutil.copytree(plain_hf, tmp_path / "hf"))
    config = json.loads((hf / "config.json").read_text())
    edit, key = REFUSALS[case]
    edit(config)
    (hf / "config.json").write_text(json.dumps(config))
    before = snapshot(tmp_path)
    code, lines = run_herd(["convert", "hf-to-herd", str(hf), str(tmp_path / "ck")], capfd)
    assert code == 2 and len(lines) == 1, lines
    assert f"{hf / 'config.json'}: '{key}' is " in lines[0] and "cannot be converted exactly" in lines[0], lines
    assert snapshot(tmp_path) == before  # nothing created


def herd_logits(ckpt_root: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The one-process herd model of an imported checkpoint (read here with load_sharded, not by the export)."""
    from engine.checkpoint.manifest import model_config_of
    from engine.model import build_model
    store = CheckpointStore(ckpt_root)
    manifest = store.verify(store.latest_step())
    model = build_model(model_config_of(manifest, store.step_dir(store.latest_step()) / "manifest.json"),
                        torch.device("cpu"), seed=0)
    boxes = {f"model.{n}": Box(p.data, (0,) * p.ndim, tuple(p.shape)) for n, p in model.named_parameters()}
    load_sharded(store.step_dir(store.latest_step()), boxes, manifest["files"])
    with torch.no_grad():
        return model.eval()(tokens)


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_supported_variants_round_trip_with_equal_logits(variant, tmp_path, capfd):
    hf = save_hf(tmp_path / "hf", **VARIANTS[variant])
    tokens = torch.randint(0, 510, (2, 48), generator=torch.Generator().manual_seed(1))  # past 16: scaled rope
    assert run_herd(["convert", "hf-to-herd", str(hf), str(tmp_path / "ck")], capfd)[0] == 0
    ours, theirs = herd_logits(tmp_path / "ck", tokens), hf_logits(hf, tokens)
    imported = (ours - theirs).abs().max().item()
    assert run_herd(["convert", "herd-to-hf", str(tmp_path / "ck"), str(tmp_path / "out")], capfd)[0] == 0
    exported = (hf_logits(tmp_path / "out", tokens) - ours).abs().max().item()
    print(f"{variant}: import vs transformers {imported:.2e}, export in transformers vs herd {exported:.2e}")
    assert imported < 1e-5 and exported < 1e-5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # the source's special ids, not transformers' defaults (1, 2)
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, [4, 7])
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([4, 7], 4)


@pytest.fixture()
def imported(plain_hf, tmp_path, capfd):
    assert run_herd(["convert", "hf-to-herd", str(plain_hf), str(tmp_path / "ck")], capfd)[0] == 0
    return tmp_path / "ck"


def test_export_into_a_users_directory_needs_overwrite(imported, tmp_path, capfd):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    code, lines = run_herd(["convert", "herd-to-hf", str(imported), str(mine)], capfd)
    assert code == 2 and len(lines) == 1 and "--overwrite" in lines[0], lines
    assert snapshot(tmp_path) == before
    code, lines = run_herd(["convert", "herd-to-hf", str(imported), str(mine), "--overwrite"], capfd)
    assert code == 0, lines
    assert not (mine / "notes.txt").exists() and "herd_export" in json.loads((mine / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]  # no staging or replaced dir left


def test_an_earlier_export_is_replaced_whole(imported, tmp_path, capfd):
    out = tmp_path / "out"
    assert run_herd(["convert", "herd-to-hf", str(imported), str(out)], capfd)[0] == 0
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")  # as a bigger earlier export left
    assert run_herd(["convert", "herd-to-hf", str(imported), str(out)], capfd)[0] == 0
    assert not (out / "model-00001-of-00009.safetensors").exists()


def test_refused_exports_change_nothing(imported, tmp_path, capfd):
    (tmp_path / "ck" / "mine.txt").write_text("x\n")
    cases = [  # (argv, what the one line names)
        (["convert", "herd-to-hf", str(imported), str(tmp_path), "--overwrite"], "the checkpoint being exported"),
        (["convert", "herd-to-hf", str(tmp_path / "nock"), str(tmp_path / "new" / "out")], "no complete checkpoint"),
        (["convert", "hf-to-herd", str(imported), str(tmp_path / "x"), "--overwrite"], "herd-to-hf only"),
    ]
    before = snapshot(tmp_path)
    for argv, named in cases:
        code, lines = run_herd(argv, capfd)
        assert code == 2 and len(lines) == 1 and named in lines[0], (argv, lines)
        assert snapshot(tmp_path) == before, argv


def test_llama3_tokenizer_exports_as_herd_encodes(tmp_path):
    import dataclasses

    from align.chat import ChatFormat
    from engine.checkpoint.hf_export import export_tokenizer
    from engine.config_schema import ModelConfig, TokenizerConfig
    from engine.data.tokenizer import Llama3Tokenizer
    done = export_tokenizer(TokenizerConfig(kind="llama3"), {}, dataclasses.replace(ModelConfig(), vocab_size=128256))
    assert (done.bos, done.eos, done.stop) == (128000, 128001, [128001, 128009])
    for name, data in done.files.items():
        (tmp_path / name).write_bytes(data)
    tok, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), Llama3Tokenizer()
    texts = [Path(json.__file__).read_text(), Path(dataclasses.__file__).read_text()[:20000],
             "ünïcode 日本語 😀 123456789  \n\n\t x", "   leading and trailing   "]
    assert [tok(t, add_special_tokens=False).input_ids for t in texts] == ours.encode_batch(texts)
    assert tok.decode(ours.encode_batch(texts[2:3])[0]) == texts[2]
    dialog = [{"role": "user", "content": "Name a json function."}, {"role": "assistant", "content": "loads"}]
    chat = tok.apply_chat_template(dialog, tokenize=True, return_dict=True)["input_ids"]
    assert chat == ChatFormat(ours).encode_dialogs([dialog])[0].tokens


def test_a_missing_or_foreign_tokenizer(tmp_path):
    import dataclasses

    from engine.checkpoint.hf_export import export_tokenizer
    from engine.checkpoint.store import CheckpointError
    from engine.config_schema import ModelConfig, TokenizerConfig
    from engine.data.tokenizer import train_bpe
    small = dataclasses.replace(ModelConfig(), vocab_size=100)
    done = export_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "gone.json")), {}, small)
    assert (done.files, done.bos, done.eos, done.stop) == ({}, None, None, None)  # null, never 1 and 2
    assert "gone.json is not there" in done.notes[0]
    train_bpe(["def f(x):\n    return x\n" * 50], 400, str(tmp_path / "big.json"))  # 256 bytes at least
    with pytest.raises(CheckpointError, match="more than the model's vocab_size 100: not this model's tokenizer"):
        export_tokenizer(TokenizerConfig(kind="hf", path=str(tmp_path / "big.json")), {}, small)


def test_a_failed_export_write_leaves_no_directory_it_made(tmp_path):
    """A write that fails (here: the weights) removes the staging directory and every parent the export made."""
    from engine.checkpoint.hf_export import _install

    from engine.checkpoint.store import CheckpointError

    def fail(staging):
        assert staging.is_dir()
        raise OSError(errno.ENOSPC, "No space left on device")
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(CheckpointError) as info:
        _install({"config.json": b"{}"}, fail, out)
    assert str(info.value) == f"{out}: the export could not be written (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_write_is_one_line(imported, tmp_path, capfd, monkeypatch):
    """Through the command: no space (the weights), no permission (a directory to make): exit 2, one line naming
    the destination, no traceback; nothing made."""
    import engine.checkpoint.hf_export as hf_export

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_permission(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    before = snapshot(tmp_path)
    for target, fake, reason in ((hf_export, ("write_weights", no_space), "No space left on device"),
                                 (Path, ("mkdir", no_permission), "Permission denied")):
        with monkeypatch.context() as patch:
            patch.setattr(target, *fake)
            code, lines = run_herd(["convert", "herd-to-hf", str(imported), str(tmp_path / "a" / "out")], capfd)
        assert code == 2 and lines == [f"herd: error: {tmp_path / 'a' / 'out'}: the export could not be written "
                                       f"({reason})"], lines
        assert snapshot(tmp_path) == before


def test_overwrite_never_replaces_a_runs_checkpoints(imported, tmp_path, capfd):
    """--overwrite replaces a user's directory, but never one holding herd checkpoint state: a live run's
    locked directory, a checkpoint directory, a run directory or one above it."""
    from engine.checkpoint.ownership import DirectoryLock
    live = tmp_path / "runs" / "a" / "checkpoints"
    live.mkdir(parents=True)
    lock = DirectoryLock(live)
    assert lock.acquire() is None
    try:
        before = snapshot(tmp_path)
        for dest in (live, live.parent, live.parent.parent, imported.parent / "copy"):
            if dest.name == "copy":  # a complete checkpoint (no lock): a run's that is not running
                import shutil
                shutil.copytree(imported, dest)
                before = snapshot(tmp_path)
            code, lines = run_herd(["convert", "herd-to-hf", str(imported), str(dest), "--overwrite"], capfd)
            assert code == 2 and len(lines) == 1 and f"{dest}: holds herd checkpoint state" in lines[0], lines
            assert snapshot(tmp_path) == before, dest
    finally:
        lock.release()
