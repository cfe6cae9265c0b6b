"""Every bad config is a one-line ConfigError naming its key; presets carry the paper's shapes."""

from pathlib import Path

import pytest

from engine.config import CONFIGS_DIR, load_config
from engine.errors import ConfigError
from engine.flops import parameter_count


def error_of(overrides, path=None, world_size=1) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides,expected", [
    (["optim.lrr=1e-3"], "optim.lrr: unknown key (command line) (did you mean 'optim.lr'?)"),
    (["model.n_layer=2"], "model.n_layer: unknown key (command line) (did you mean 'model.n_layers'?)"),
    (["trian.steps=2"], "trian: unknown key (command line) (did you mean 'train'?)"),
    (["data.train=[{path: a, wieght: 2}]"], "data.train[0].wieght: unknown key in a DatasetConfig entry (command "
                                            "line) (did you mean 'weight'?)"),
    (["data.train=[{path: a}, {path: b, weight: abc}]"], "data.train[1].weight: wrong type (command line): Value "
                                                         "'abc' of type 'str' could not be converted to Float"),
    (["data.valid=[{path: a, weight: true}]"], "data.valid[0].weight: wrong type"),
    (["optim.lr=fast"], "optim.lr: wrong type (command line): Value 'fast' of type 'str' could not be "
                        "converted to Float"),
    (["train.steps=1.5"], "train.steps: wrong type"),
    (["model.n_kv_heads=3"], "model.n_heads: n_heads=8 is not divisible by n_kv_heads=3"),
    (["model.dim=100", "model.n_heads=8"], "model.dim: dim=100 is not divisible by n_heads=8"),
    (["data.seq_len=4096", "model.max_seq_len=2048"], "data.seq_len: 4096 exceeds model.max_seq_len=2048 (the RoPE"),
    (["schedule.kind=cosin"], "schedule.kind: 'cosin' is not one of cosine, wsd, linear, constant"),
    (["checkpoint.keep_last=1"], "checkpoint.keep_last: must be at least 2"),
    (["log.name=../../etc"], "log.name: '../../etc' must be a plain directory name"),
    (["data.tokenizer.path=${oc.env:HF_TOKEN}"], "data.tokenizer.path: resolver calls like"),
    (["data.global_batch_size=12", "data.micro_batch_size=8"], "data.global_batch_size: 12 is not divisible"),
    (["schedule.warmup_steps=500", "train.steps=100"], "schedule.warmup_steps: must be between 0 and"),
    (["optim.lr"], "override 'optim.lr' is not of the form section.key=value"),
    (["parallel.tp=3"], "parallel.dp_shard: world size 1 is not divisible by dp_replicate*pp*cp*tp=3"),
])
def test_bad_overrides(overrides, expected):
    assert expected in error_of(overrides)


def test_world_size_mismatch():
    assert "dp_replicate*dp_shard*pp*cp*tp = 2 but the world size is 4" in error_of(["parallel.dp_shard=2"],
                                                                                       world_size=4)
    cfg = load_config(None, ["parallel.tp=2", "data.global_batch_size=32"], world_size=8)
    assert cfg.parallel.dp_shard == 4


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  betas: [0.9]\n")
    assert f"optim.betas: unknown key ({bad})" in error_of([], str(bad))
    bad.write_text("optim: [unclosed\n")
    assert f"{bad}:2:1: not valid YAML" in error_of([], str(bad))
    bad.write_text("include: [../secrets.yaml]\n")
    assert "must be a relative path without '..'" in error_of([], str(bad))
    bad.write_text("data:\n  seed: ${oc.decode:'1'}\n")
    assert "data.seed: resolver calls" in error_of([], str(bad))
    assert "config file not found" in error_of([], str(tmp_path / "missing.yaml"))


def test_include_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("include: [models/llama3_8b.yaml]\noptim: {lr: 1.0e-4}\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\noptim: {weight_decay: 0.0}\n")
    cfg = load_config(str(tmp_path / "run.yaml"), ["optim.lr=5e-5"])
    assert (cfg.model.dim, cfg.optim.lr, cfg.optim.weight_decay) == (4096, 5e-5, 0.0)
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    assert "include cycle" in error_of([], str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("preset,dim,layers,heads,ffn,billions", [
    ("llama3_8b", 4096, 32, 32, 14336, 8.0), ("llama3_70b", 8192, 80, 64, 28672, 70.6),
    ("llama3_405b", 16384, 126, 128, 53248, 405.9)])
def test_paper_presets(tmp_path, preset, dim, layers, heads, ffn, billions):
    cfg = load_config(str(CONFIGS_DIR / "models" / f"{preset}.yaml"))
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == \
        (dim, layers, heads, 8, ffn, 128256)
    assert m.rope_theta == 500000.0 and m.rope_scaling.enabled and m.rope_scaling.factor == 8.0
    assert abs(parameter_count(m) / 1e9 - billions) < 0.1  # the paper's sizes, counted from the shapes


def test_every_shipped_config_loads():
    """Job configs as jobs (for the world size their parallel section names: the 405B config is an 8,192-GPU
    layout); alignment pipelines (a top-level `stages:`) as pipelines, with every stage's job; hardware profiles
    (configs/hardware, for `herd plan`) as profiles."""
    import math

    import yaml

    from align.pipeline import PipelineRunner
    from engine.config import load_pipeline
    from plan.hardware import load_hardware
    from engine.config import load_recipe
    from recipe.runner import RecipeRunner
    pipelines = profiles = recipes = 0
    for path in sorted(Path(CONFIGS_DIR).rglob("*.yaml")):
        if path.parent.name == "hardware":
            load_hardware(path.stem)
            profiles += 1
        elif path.parent.name == "recipes":  # every stage's job, for the world size the recipe is written for
            recipe = load_recipe(str(path))
            RecipeRunner(recipe, world_size=RECIPE_WORLD.get(path.stem, 1)).plan(check_files=False)
            recipes += 1
        elif path.parent.name == "scaling":  # an IsoFLOP sweep (herd scaling): every run's job, from the repo root
            from engine.config import load_scaling
            from scaling.plan import load_job, plan_runs
            sweep = load_scaling(str(path))
            for run in plan_runs(sweep, load_job(sweep)):
                load_config(sweep.job, list(sweep.overrides) + run.overrides(sweep))
        elif path.parent.name == "curate":  # a curation pipeline (herd curate), its values checked
            if path.suffix == ".yaml":
                from curate.config import load as load_curation
                load_curation(str(path))
        elif "\nstages:" in "\n" + path.read_text():
            PipelineRunner(load_pipeline(str(path))).check()  # loads each stage's job from the repo root
            pipelines += 1
        else:
            parallel = (yaml.safe_load(path.read_text()) or {}).get("parallel") or {}
            world = math.prod(parallel.get(k, 1) for k in ("dp_replicate", "dp_shard", "pp", "cp", "tp"))
            load_config(str(path), world_size=world)
    assert pipelines >= 1 and profiles >= 1 and recipes >= 1


RECIPE_WORLD = {"demo": 2, "llama3_405b": 8192}  # the ranks each shipped recipe runs on
