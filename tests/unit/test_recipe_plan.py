"""The recipe's plan and its token-based LR schedule: continuous across stages whose batches differ, annealing to 0,
and the 405B recipe's stage table against the paper's numbers (shared/LLAMA3.md "Pretraining recipe")."""

import math

import pytest

from engine.config import ScheduleConfig, load_recipe
from engine.errors import ConfigError
from engine.schedule import lr_multiplier_tokens, stage_lr_multiplier
from recipe.plan import plan_table, schedule_horizon, static_plan, tokens_per_step, warmup_tokens
from recipe.runner import RecipeRunner


def _stage_lrs(schedule: ScheduleConfig, stages):
    """LR multipliers of every update of consecutive stages [(steps, tokens per step)], each seen as its own run
    (stage_start_step / stage_start_tokens set as the runner sets them), with the cumulative tokens."""
    lrs, tokens_done, step = [], [], 0
    done = 0
    for steps, per_step in stages:
        cfg = ScheduleConfig(**{**schedule.__dict__, "stage_start_step": step, "stage_start_tokens": done})
        for s in range(step, step + steps):
            lrs.append(stage_lr_multiplier(s, per_step, cfg))
            tokens_done.append(done + (s - step + 1) * per_step)
        step, done = step + steps, done + steps * per_step
    return lrs, tokens_done


def test_token_schedule_is_one_curve_across_batch_changes():
    schedule = ScheduleConfig(kind="cosine", min_lr_ratio=0.01, total_tokens=100_000, warmup_tokens=10_000)
    lrs, tokens = _stage_lrs(schedule, [(10, 500), (20, 1000), (10, 2000), (30, 1500)])
    assert lrs == [lr_multiplier_tokens(t, schedule) for t in tokens]  # the same function of tokens, any batch
    warm = [lr for lr, t in zip(lrs, tokens) if t <= 10_000]
    assert warm == pytest.approx([t / 10_000 for t in tokens[:len(warm)]]) and warm[0] > 0
    after = lrs[len(warm):]
    assert all(a >= b for a, b in zip(after, after[1:]))  # cosine never rises
    assert lr_multiplier_tokens(100_000, schedule) == pytest.approx(0.01)
    assert lr_multiplier_tokens(55_000, schedule) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_annealing_is_linear_to_zero_from_where_the_schedule_was():
    base = dict(kind="cosine", min_lr_ratio=0.1, total_tokens=50_000, warmup_tokens=5_000)
    start = 40_000
    cfg = ScheduleConfig(**base, anneal_start_tokens=start, anneal_tokens=8_000)
    at_start = lr_multiplier_tokens(start, ScheduleConfig(**base))
    values = [lr_multiplier_tokens(start + k * 1000, cfg) for k in range(0, 9)]
    assert values[0] == pytest.approx(at_start)  # continuous where annealing begins
    assert values == pytest.approx([at_start * (1 - k / 8) for k in range(9)])
    assert values[-1] == 0.0 and lr_multiplier_tokens(start + 20_000, cfg) == 0.0


def test_recipe_405b_stage_table_follows_the_paper():
    recipe = load_recipe("configs/recipes/llama3_405b.yaml")
    plans = RecipeRunner(recipe, world_size=8192).plan(check_files=False)
    kinds = [p.stage.kind for p in plans]
    assert kinds == ["pretrain"] * 3 + ["long_context"] * 6 + ["anneal"]
    first, second, third = plans[:3]
    assert (first.job.data.seq_len, tokens_per_step(first.job)) == (4096, 4 * 2**20)  # 4M tokens at 4,096
    assert (second.job.data.seq_len, tokens_per_step(second.job)) == (8192, 8 * 2**20)  # 8M at 8,192 ...
    assert 252e6 <= second.start.tokens < 252e6 + tokens_per_step(first.job)  # ... after 252M tokens
    assert tokens_per_step(third.job) == 16 * 2**20  # 16M ...
    assert 2.87e12 <= third.start.tokens < 2.87e12 + tokens_per_step(second.job)  # ... after 2.87T
    long = plans[3:9]
    assert [p.job.data.seq_len for p in long][-1] == 131072 and len({p.job.data.seq_len for p in long}) == 6
    assert all(p.stage.gate.enabled and p.job.long_eval.enabled for p in long)
    long_tokens = sum(p.steps * tokens_per_step(p.job) for p in long)
    assert 0.75e12 < long_tokens < 0.85e12  # about 800B tokens
    anneal = plans[-1]
    assert anneal.stage.average and anneal.job.data.seq_len == 131072
    assert 40e6 <= anneal.steps * tokens_per_step(anneal.job) < 40e6 + tokens_per_step(anneal.job)
    total = anneal.start.tokens + anneal.steps * tokens_per_step(anneal.job)
    assert total == pytest.approx(15.6e12, rel=0.01)
    assert first.job.optim.lr == 8e-5 and first.job.optim.lr * first.job.schedule.min_lr_ratio == pytest.approx(8e-7)
    # 8,000 warmup steps: the 4M-token steps of the first stage, then 8M-token ones
    assert warmup_tokens(recipe, plans) == first.steps * 4 * 2**20 + (8000 - first.steps) * 8 * 2**20
    assert schedule_horizon(recipe, plans) == anneal.start.tokens
    table = "\n".join(plan_table(recipe, plans))
    assert "long-128k" in table and "131072" in table and "dp4 pp16 cp16 tp8" in table


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    cases = {
        "stages: []\nconfig: configs/demo.yaml": "stages",
        "config: configs/demo.yaml\nstages: [{name: a, tokens: 0}]": "stages[0].tokens",
        "config: configs/demo.yaml\nstages: [{name: a, tokens: 10, kind: anneal}, {name: b, tokens: 10}]":
            "stages[0].kind",
        "config: configs/demo.yaml\nstages: [{name: a, tokens: 10}, {name: a, tokens: 10}]": "stages[1].name",
        "config: configs/demo.yaml\nstages: [{name: a, tokens: 10, gate: {enabled: true}}]": "stages[0].gate.enabled",
        "config: configs/demo.yaml\nstages: [{name: a, tokens: 10, average: true}]": "stages[0].average",
        "config: configs/demo.yaml\nwarmup_steps: 5\nwarmup_tokens: 5\nstages: [{name: a, tokens: 10}]":
            "warmup_steps",
    }
    for text, key in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_recipe(str(path))
        assert e.value.key == key, (text, str(e.value))


def test_a_bad_stage_override_names_the_stage(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("config: configs/demo.yaml\nstages: [{name: ok, tokens: 4096}, "
                    "{name: broken, tokens: 4096, overrides: [data.seq_len=-3]}]\n")
    with pytest.raises(ConfigError) as e:
        static_plan(load_recipe(str(path)), 1)
    assert e.value.key == "stages.broken" and "data.seq_len" in str(e.value)
    path.write_text("config: configs/demo.yaml\nwarmup_steps: 999\nstages: [{name: ok, tokens: 4096}]\n")
    recipe = load_recipe(str(path))
    with pytest.raises(ConfigError) as e:
        warmup_tokens(recipe, static_plan(recipe, 1))
    assert e.value.key == "warmup_steps"


def test_one_stage_is_overridden_from_the_command_line_by_name_or_index(tmp_path):
    """`stages.NAME.KEY=VALUE` (or `stages.INDEX.KEY=VALUE`) changes that stage alone, after the file; names with
    dots and dashes are found whole; an unknown stage, key or value is one error naming the stage as given."""
    path = tmp_path / "r.yaml"
    path.write_text("config: configs/demo.yaml\nstages: [{name: v1.0-a, tokens: 4096, overrides: [optim.lr=1e-3]},"
                    " {name: v1, tokens: 4096}, {name: end, kind: anneal, tokens: 2048}]\n")
    recipe = load_recipe(str(path), ["stages.v1.0-a.overrides=[optim.lr=2e-3]", "stages.v1.tokens=8192",
                                     "stages.2.average=true", "warmup_steps=3"])
    assert [(s.name, s.tokens, s.overrides, s.average) for s in recipe.stages] == [
        ("v1.0-a", 4096, ["optim.lr=2e-3"], False), ("v1", 8192, [], False), ("end", 2048, [], True)]
    assert recipe.warmup_steps == 3
    assert static_plan(recipe, 1)[0].job.optim.lr == 2e-3
    for override, key, words in (("stages.v2.tokens=1", "stages.v2", "names no stage (stages: v1.0-a, v1, end"),
                                 ("stages.3.tokens=1", "stages.3", "names no stage"),
                                 ("stages.v1.tokns=1", "stages.v1.tokns", "unknown key"),
                                 ("stages.end.tokens=many", "stages.end.tokens", "wrong type"),
                                 ("stages.v1.tokens=0", "stages[1].tokens", "at least 1 token"),
                                 ("stages.v1=3", "stages.v1", "sets a whole stage"),
                                 ("stages.v1.tokens", "stages.v1", "not of the form stages.NAME.KEY=VALUE"),
                                 ("stages.v1.tokens=@x", "stages.v1.tokens", "bad override 'stages.v1.tokens=@x'")):
        with pytest.raises(ConfigError) as e:
            load_recipe(str(path), [override])
        assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value), (override, str(e.value))
    path.write_text("config: configs/demo.yaml\nstages: [{name: a, tokens: 4096}, {name: b, tokens: 4096},"
                    " {name: '1', tokens: 4096}]\n")
    with pytest.raises(ConfigError) as e:  # '1' names stage 2 and indexes stage 'b'
        load_recipe(str(path), ["stages.1.tokens=8192"])
    assert "ambiguous" in str(e.value) and e.value.key == "stages.1"


def test_one_alignment_stage_is_overridden_from_the_command_line():
    from engine.config import load_pipeline
    pipeline = load_pipeline("configs/align_demo.yaml", ["stages.dpo.overrides=[optim.lr=1e-6]",
                                                         "stages.rs.samples=2"])
    stages = {s.name: s for s in pipeline.stages}
    assert stages["dpo"].overrides == ["optim.lr=1e-6"] and stages["rs"].samples == 2
    assert stages["sft"].overrides == ["train.steps=80"]  # the others as the file has them


def test_cli_refuses_in_one_line(tmp_path, capsys):
    from launch.cli import main
    bad = tmp_path / "r.yaml"
    bad.write_text("config: configs/demo.yaml\nrun_dir: " + str(tmp_path / "run") + "\nstages: [{name: a, tokens: 4096,"
                   " overrides: [parallel.cp=3]}]\n")
    for argv in (["recipe", str(tmp_path / "missing.yaml")], ["recipe", str(bad)], ["train", str(bad)],
                 ["recipe", "configs/recipes/demo.yaml", "--world-size", "2"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
    assert main(["train", "configs/recipes/demo.yaml", "--print-config", "--world-size", "2"]) == 0
    assert "long-1k" in capsys.readouterr().out


def test_stages_share_one_data_stream_and_averages_need_two_saves(tmp_path):
    path = tmp_path / "r.yaml"
    for override, key in (("data.seed=5", "data.seed"), ("data.on_bad_data=skip", "data.on_bad_data"),
                          ("model.vocab_size=8192", "model.vocab_size")):
        path.write_text(f"config: configs/demo.yaml\nstages: [{{name: a, tokens: 4096}}, "
                        f"{{name: b, tokens: 4096, overrides: [{override}]}}]\n")
        with pytest.raises(ConfigError) as e:
            RecipeRunner(load_recipe(str(path))).plan(check_files=False)
        assert e.value.key == "stages.b" and key in str(e.value)
    # checkpoint.every=0 saves only at the stage's end: one checkpoint, nothing to average
    path.write_text("config: configs/demo.yaml\nstages: [{name: a, tokens: 4096}, {name: z, kind: anneal, "
                    "tokens: 40960, average: true, overrides: [checkpoint.every=0]}]\n")
    with pytest.raises(ConfigError) as e:
        RecipeRunner(load_recipe(str(path))).plan(check_files=False)
    assert e.value.key == "stages.z.average"


def test_only_the_anneal_schedule_is_averaged():
    from recipe.averaging import anneal_steps
    assert anneal_steps(12, 16, 2) == [14, 16]
    assert anneal_steps(250, 262, 5) == [255, 260, 262]  # and the stage's end, off the interval
    assert anneal_steps(12, 16, 100) == [16]


def test_gate_verdicts(tmp_path):
    """Pass needs what was measured to pass; what was not measured does not gate."""
    import json

    from recipe.gates import measure
    recipe = load_recipe("configs/recipes/demo.yaml")
    plan = next(p for p in RecipeRunner(recipe, world_size=2).plan(check_files=False) if p.stage.kind == "long_context")
    tolerance, needed = plan.stage.gate.short_loss_tolerance, plan.stage.gate.needle_accuracy
    cases = [(3.0, 3.0 * (1 + tolerance) * 0.999, needed, True), (3.0, 3.0 * (1 + tolerance) * 1.001, needed, False),
             (3.0, 2.0, needed - 0.01, False), (None, None, needed, True), (3.0, 2.5, None, True),
             (None, None, None, False)]
    for before, after, needle, passed in cases:
        records = [{"step": 10, "when": "start", "short_loss": before, "needle_mean": 0.0},
                   {"step": 10, "when": "start", "short_loss": 99.0, "needle_mean": 0.0},  # a resumed start: later
                   {"step": 20, "when": "end", "short_loss": after, "needle_mean": needle}]
        (tmp_path / "long_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut')
        assert measure(plan, tmp_path, 10, 20)["passed"] is passed, (before, after, needle)
