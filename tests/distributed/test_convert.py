"""`herd convert` (issue 5): a HF Llama made by transformers in the test imports into a herd checkpoint that
loads under any layout with the same logits; a herd training checkpoint exports to a directory transformers loads
with the same logits."""

import io

import pytest
import torch

from engine.checkpoint.convert import import_hf
from engine.checkpoint.hf_export import export_hf
from engine.checkpoint.store import CheckpointError
from engine.hf_interop import hf_to_herd_name
from engine.run import build_trainer
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)
from tests.helpers import parity_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama in the parity model's shape, saved by transformers in several safetensors shards."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=510,
                                      max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()  # really sharded
    return path


def hf_logits(path, tokens):
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_import_loads_under_any_layout_with_hf_logits(corpus, hf_dir, tmp_path):  # noqa: F811
    import_hf(hf_dir, tmp_path / "imported")
    load = [f"checkpoint.load_weights={tmp_path}/imported", "checkpoint.resume=never"]
    with pytest.raises(CheckpointError, match="model.norm_eps is 1e-06, this run's is 1e-05; set model.norm_eps"):
        build_trainer(parity_config(corpus, tmp_path / "bad", load), stream=io.StringIO())
    load.append("model.norm_eps=1e-6")  # transformers' default
    trainer = build_trainer(parity_config(corpus, tmp_path / "one", load), stream=io.StringIO())
    tokens = torch.randint(0, 510, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = trainer.module.model.eval()(tokens)
    diff = (ours - hf_logits(hf_dir, tokens)).abs().max().item()
    print(f"imported model vs transformers: max |logit difference| {diff:.2e}")
    assert diff < 1e-4
    from safetensors.torch import load_file
    hf = {hf_to_herd_name(k): v for f in hf_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for layout in (["parallel.tp=2"], ["parallel.pp=2"]):
        result = run_on_ranks(ranks.loaded_weights, 2, str(corpus), str(tmp_path / layout[0]), layout + load,
                              timeout=600)[0]
        for name, value in hf.items():  # each rank holds its cut; consolidated, they are HF's tensors exactly
            assert torch.equal(result["params"][name], value), (layout, name)


def test_export_of_a_training_checkpoint_loads_in_transformers(corpus, tmp_path):  # noqa: F811
    cfg = parity_config(corpus, tmp_path / "run", ["train.steps=2", "checkpoint.every=2"])
    trainer = build_trainer(cfg, stream=io.StringIO())
    trainer.fit()
    export_hf(tmp_path / "run" / "p" / "checkpoints", tmp_path / "hf-out", max_shard_bytes=60_000)
    assert (tmp_path / "hf-out" / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 510, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = trainer.module.model.eval()(tokens)
    diff = (ours - hf_logits(tmp_path / "hf-out", tokens)).abs().max().item()
    print(f"exported model in transformers vs herd: max |logit difference| {diff:.2e}")
    assert diff < 1e-4


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="config.json: missing key 'hidden_size'"):
        import_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, '
                                          '"intermediate_size": 128, "vocab_size": 510}')
    with pytest.raises(CheckpointError, match="only pickle-based .bin weights found"):
        import_hf(tmp_path, tmp_path / "out")
