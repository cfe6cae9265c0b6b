"""curate/tokenize.py blend_yaml: the blend.yaml that `herd curate` writes loads as a herd job config fragment."""

from curate.tokenize import blend_yaml
from engine.config import load_config


def _load(tmp_path, text):
    path = tmp_path / "blend.yaml"
    path.write_text(text)
    return load_config(str(path), [])


def test_llama3_tokenizer_without_a_path_loads(tmp_path):
    # before: `path: ` (YAML null) and herd refused data.tokenizer.path: Incompatible value 'None'
    text = blend_yaml({"general": "/data/general"}, {"general": 0.5, "code": 0.17}, {"kind": "llama3", "path": ""})
    cfg = _load(tmp_path, text)
    assert (cfg.data.tokenizer.kind, cfg.data.tokenizer.path) == ("llama3", "")
    assert [(d.path, d.weight) for d in cfg.data.train] == [("/data/general", 1.0)]


def test_weights_are_the_mix_over_present_domains_and_strange_paths_survive(tmp_path):
    paths = {"general": "/runs/my curate: v1/tokens/general", "code": "/runs/x/code", "science": "/runs/x/science"}
    text = blend_yaml(paths, {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08},
                      {"kind": "hf", "path": "/runs/my curate: v1/tokens/tokenizer.json"})
    cfg = _load(tmp_path, text)
    weights = {d.path: d.weight for d in cfg.data.train}
    assert weights == {paths["general"]: round(0.50 / 0.67, 4), paths["code"]: round(0.17 / 0.67, 4)}
    assert cfg.data.tokenizer.path == "/runs/my curate: v1/tokens/tokenizer.json"
    # a tokenized domain the mix does not name is said, not silently dropped
    assert "not in tokenize.mix, so not in this blend: science" in text
    assert "no documents reached: math, multilingual" in text
