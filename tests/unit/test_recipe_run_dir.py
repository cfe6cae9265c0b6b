"""What `herd recipe` refuses in its run directory before any stage runs (found by a bad-input hunt, helper H34):
a user's `averaged`/`hf` directory there (the recipe's end used to delete it), another run's checkpoints without
the recipe's state (they were resumed as the first stage), a state file that is a directory, FIFO or device, a
state naming a stage the recipe no longer has (a rename started over on the old checkpoints), a finished stage's
blend edited (later stages replay its data), a model shape that changes between stages; and a stage budget of
1e13 tokens is planned without a set of every step (it hung). The recipe's own outputs are still replaced."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.config import load_recipe
from engine.errors import ConfigError
from recipe.plan import tokens_per_step
from recipe.runner import STATE, RecipeRunner

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "recipes" / "demo.yaml")


def runner_for(run_dir: Path, *overrides: str) -> RecipeRunner:
    return RecipeRunner(load_recipe(DEMO, [f"run_dir={run_dir}", *overrides]), world_size=2)


def finished_state(runner: RecipeRunner, plans, done: int) -> dict:
    """The state the runner writes after `done` stages, as save_state would."""
    stages, position = {}, plans[0].start
    for plan in plans[:done]:
        end = position.after(plan.steps, plan.job)
        stages[plan.stage.name] = {"start": asdict(position), "end": asdict(end), "done": True,
                                   "chunks": [{"end_step": end.step, "gate": None}],
                                   "tokens_per_step": tokens_per_step(plan.job), "seq_len": plan.job.data.seq_len,
                                   "blend": [[ds.path, ds.weight] for ds in plan.job.data.train]}
        position = end
    return {"recipe": runner.recipe.name, "stages": stages}


def write_state(runner: RecipeRunner, state: dict) -> None:
    runner.run_dir.mkdir(parents=True, exist_ok=True)
    runner.state_path.write_text(json.dumps(state))


def check(runner: RecipeRunner) -> dict:
    return runner.check_state(runner.plan(check_files=False))


@pytest.mark.parametrize("name", ["averaged", "hf"])
def test_a_users_directory_where_the_recipe_writes_its_end_is_refused_before_any_stage(tmp_path, name):
    runner = runner_for(tmp_path / "run")
    (runner.run_dir / name).mkdir(parents=True)
    (runner.run_dir / name / "notes.txt").write_text("precious\n")
    with pytest.raises(ConfigError, match=rf"run_dir: .*/run/{name} exists and this recipe did not write it"):
        check(runner)
    assert (runner.run_dir / name / "notes.txt").read_text() == "precious\n"


def test_the_recipes_own_unfinished_average_is_still_its_to_replace(tmp_path):
    runner = runner_for(tmp_path / "run")
    plans = runner.plan(check_files=False)
    state = finished_state(runner, plans, len(plans))
    state["writing"] = "averaged"  # killed while averaging: the rerun replaces it
    write_state(runner, state)
    (runner.run_dir / "averaged").mkdir()
    check(runner)
    runner.mark_writing(state, "averaged")  # and the end of the recipe takes it again
    state.pop("writing")
    with pytest.raises(ConfigError, match="averaged exists and this recipe did not write it"):
        runner.mark_writing(state, "averaged")  # one that appeared without the mark is not


def test_checkpoints_without_the_recipes_state_are_not_resumed(tmp_path):
    from engine.run import build_trainer
    from tests.helpers import make_corpus, tiny_config
    corpus = make_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    import io
    build_trainer(tiny_config(corpus, run_dir, ["log.name=train", "train.steps=2", "checkpoint.every=2",
                                                "train.eval_every=0"]), io.StringIO()).fit()  # named as the recipe's
    with pytest.raises(ConfigError, match=r"run_dir: .*/run/train/checkpoints holds checkpoints \(step 2\) but "
                                          r".*/run has no recipe_state.json: not this recipe's run"):
        check(runner_for(run_dir))


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_a_state_file_that_is_not_a_file_is_refused_without_reading_it(tmp_path, kind):
    import os
    runner = runner_for(tmp_path / "run")
    runner.run_dir.mkdir(parents=True)
    {"directory": runner.state_path.mkdir, "fifo": lambda: os.mkfifo(runner.state_path),
     "device": lambda: runner.state_path.symlink_to("/dev/zero")}[kind]()
    with pytest.raises(ConfigError, match=rf"run_dir: .*/{STATE} is not a recipe state file herd wrote"):
        check(runner)


def test_a_renamed_finished_stage_is_refused(tmp_path):
    runner = runner_for(tmp_path / "run")
    write_state(runner, finished_state(runner, runner.plan(check_files=False), 2))
    check(runner)  # as it was: fine
    renamed = runner_for(tmp_path / "run", "stages.ramp-128.name=first")
    with pytest.raises(ConfigError, match=r"stages: .* records stage\(s\) ramp-128, which the recipe no longer "
                                          r"names"):
        check(renamed)


def test_a_finished_stages_blend_edited_is_refused(tmp_path):
    runner = runner_for(tmp_path / "run")
    write_state(runner, finished_state(runner, runner.plan(check_files=False), 2))
    edited = runner_for(tmp_path / "run", "stages.ramp-256.overrides=[data.seq_len=256, data.global_batch_size=16, "
                                          "'data.train=[{path: data/stdlib.train, weight: 0.5}, "
                                          "{path: data/licenses.train, weight: 0.5}]']")
    with pytest.raises(ConfigError, match=r"stages\.ramp-256\.overrides: finished on the blend "
                                          r"\[\['data/stdlib.train', 0.9\], \['data/licenses.train', 0.1\]\]"):
        check(edited)


def test_a_model_shape_change_between_stages_is_refused_when_planned(tmp_path):
    runner = runner_for(tmp_path / "run", "stages.mix.overrides=[data.seq_len=256, data.global_batch_size=32, "
                                          "model.ffn_dim=512]")
    with pytest.raises(ConfigError, match=r"stages\.mix: model\.ffn_dim=512 differs from stage ramp-128's \d+: "
                                          r"every stage of a recipe trains one model"):
        runner.plan(check_files=False)


def test_a_huge_stage_budget_is_planned_without_listing_its_steps(tmp_path):
    runner = runner_for(tmp_path / "run", "stages.anneal.tokens=1e15", "stages.anneal.overrides=[data.seq_len=1024, "
                        "data.global_batch_size=4, data.micro_batch_size=2, parallel.cp=2, parallel.dp_shard=1, "
                        "checkpoint.every=100000000000]")
    plans = runner.plan(check_files=False)  # used to build a set of every one of its ~2.4e11 steps
    assert plans[-1].steps > 10 ** 11


def test_print_config_refuses_what_the_run_would_refuse(tmp_path, capfd):
    from tests.helpers import run_herd
    assert run_herd(["recipe", DEMO, "--print-config", "--world-size", "0"], capfd) == (
        2, ["herd: error: --world-size must be at least 1, got 0"])  # was taken as 1
    code, lines = run_herd(["recipe", DEMO, "--print-config", "--world-size", "2",
                                "stages.mix.overrides=['data.train=[]']"], capfd)
    assert (code, lines) == (2, ["herd: error: stages.mix: data.train is empty: the stage has nothing to train on"])


def test_errors_name_the_key_at_fault(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: config file not found: nope\.yaml$"):
        load_recipe(DEMO, ["config=nope.yaml"])  # was blamed on the first stage
    with pytest.raises(ConfigError, match=r"^total_tokens: must be a finite number, got nan$"):
        load_recipe(DEMO, ["total_tokens=nan"])  # was "must be >= 0"
    runner = runner_for(tmp_path / "run")
    state = finished_state(runner, runner.plan(check_files=False), 1)
    state["stages"]["ramp-128"]["end"]["samples"] = -99  # tampered: the error names the state file, not a job key
    write_state(runner, state)
    with pytest.raises(ConfigError, match=rf"run_dir: .*/{STATE} is not a recipe state file herd wrote"):
        check(runner)


def test_a_dataset_listed_twice_in_a_stage_blend_is_refused_when_planned(tmp_path):
    runner = runner_for(tmp_path / "run", "stages.mix.overrides=[data.seq_len=256, data.global_batch_size=32, "
                                          "'data.train=[{path: data/stdlib.train}, {path: data/stdlib.train}]']")
    with pytest.raises(ConfigError, match=r"^stages\.mix: data\.train\[1\]\.path: 'data/stdlib\.train' is listed "
                                          r"twice in the blend"):
        runner.plan(check_files=False)  # found only when the next stage replayed it (a staged blend refuses it)


def _with_records(runner: RecipeRunner, plans, **fields) -> dict:
    state = finished_state(runner, plans, 1)
    state["stages"][plans[0].stage.name].update(fields)
    return state


def test_a_finished_stages_data_keys_are_kept_on_a_rerun(tmp_path):
    """A rerun with another data.seed continued the finished stage's stream shuffled otherwise (helper H43)."""
    runner = runner_for(tmp_path / "run")
    plans = runner.plan(check_files=False)
    fixed = {"data.seed": plans[0].job.data.seed, "data.on_bad_data": plans[0].job.data.on_bad_data,
             "data.tokenizer.kind": plans[0].job.data.tokenizer.kind,
             "data.tokenizer.path": plans[0].job.data.tokenizer.path, "model.vocab_size": plans[0].job.model.vocab_size}
    write_state(runner, _with_records(runner, plans, fixed=fixed))
    check(runner)  # the same recipe goes on
    other = runner_for(tmp_path / "run", f"overrides=[{','.join(runner.recipe.overrides)},data.seed=7]")
    with pytest.raises(ConfigError, match=rf"^data\.seed: stage ramp-128 finished with data\.seed="
                                          rf"{plans[0].job.data.seed}; the recipe now says 7"):
        check(other)


def test_a_finished_stages_schedule_is_kept_on_a_rerun(tmp_path):
    """A stage added to a finished recipe stretched the cosine under the finished stages: the LR jumped (H43)."""
    runner = runner_for(tmp_path / "run")
    plans = runner.plan(check_files=False)
    from recipe.plan import schedule_horizon, warmup_tokens
    horizon, warmup = schedule_horizon(runner.recipe, plans), warmup_tokens(runner.recipe, plans)
    write_state(runner, _with_records(runner, plans, schedule={"horizon": horizon, "warmup": warmup}))
    check(runner)
    write_state(runner, _with_records(runner, plans, schedule={"horizon": horizon - 1024, "warmup": warmup}))
    with pytest.raises(ConfigError, match=rf"^total_tokens: stage ramp-128 finished on a schedule of "
                                          rf"{horizon - 1024} tokens .* set total_tokens={horizon - 1024}"):
        check(runner)


def test_an_export_of_an_earlier_end_is_replaced(tmp_path, monkeypatch):
    """A stage added after the export left <run_dir>/hf the earlier model, without a word (H43)."""
    import recipe.averaging as averaging
    runner = runner_for(tmp_path / "run", "stages.anneal.average=false")
    plans = runner.plan(check_files=False)
    state = finished_state(runner, plans, len(plans))
    end = state["stages"][plans[-1].stage.name]["end"]["step"]
    exports = []
    monkeypatch.setattr(averaging, "export_final", lambda run_dir, averaged, root: exports.append(root) or "hf")
    monkeypatch.setattr("recipe.gates.summary", lambda plans, state, run: [])
    write_state(runner, state)
    runner.finish(plans, {**state, "hf": "hf", "hf_step": end})
    assert exports == []  # exported at this end already
    runner.finish(plans, {**state, "hf": "hf", "hf_step": end - 1})
    assert len(exports) == 1


def test_the_anneal_save_count_is_the_schedules_saves():
    """It counted from the stage's start, not the global multiples of checkpoint.every the stage saves at: a stage
    of steps 5-7 with every=3 saves 6 and 7, and was refused as saving once (H43)."""
    from recipe.averaging import anneal_save_count, anneal_steps
    for start in range(0, 9):
        for steps in range(1, 9):
            for every in range(1, 6):
                assert anneal_save_count(start, start + steps, every) == len(anneal_steps(start, start + steps, every))
    assert anneal_save_count(4, 7, 3) == 2


def test_a_preempted_stage_edited_on_the_rerun_is_refused(tmp_path):
    """A stage preempted midway and edited (its blend, its length) was continued on the new settings and recorded
    as if it had run on them whole; later stages replayed that false record (H43)."""
    from recipe.runner import stream_record
    runner = runner_for(tmp_path / "run")
    plans = runner.plan(check_files=False)
    begun = {"start": asdict(plans[0].start), "chunks": [], "done": False, **stream_record(plans[0].job)}
    write_state(runner, {"recipe": runner.recipe.name, "stages": {plans[0].stage.name: begun}})
    check(runner)  # the same recipe resumes it
    blend = "'data.train=[{{path: data/stdlib.train, weight: {}}}, {{path: data/licenses.train, weight: {}}}]'"
    other = runner_for(tmp_path / "run", "stages.ramp-128.overrides=[data.seq_len=128,data.global_batch_size=16,"
                                         f"{blend.format(0.5, 0.5)}]")
    with pytest.raises(ConfigError, match=r"^stages\.ramp-128\.overrides: began on the blend "):
        check(other)
    longer = runner_for(tmp_path / "run", "stages.ramp-128.overrides=[data.seq_len=256,data.global_batch_size=16,"
                                          f"{blend.format(0.9, 0.1)}]")
    with pytest.raises(ConfigError, match=r"^stages\.ramp-128: began with 2048 tokens per step at sequence length "
                                          r"128; the recipe now says 4096 at 256"):
        check(longer)


def test_after_a_gated_stage_the_average_needs_two_saves_from_any_start():
    """An early gate moves the anneal stage's start: 3 steps at every=3 save twice from step 4 (steps 6 and 7),
    once from step 3 (step 6 only), so after a gated stage the worst start is counted (H47)."""
    from types import SimpleNamespace
    from recipe.plan import Position
    from recipe.runner import check_average_saves
    plan = SimpleNamespace(steps=3, start=Position(step=4, tokens=0, samples=0),
                           job=SimpleNamespace(checkpoint=SimpleNamespace(every=3)),
                           stage=SimpleNamespace(name="anneal"))
    check_average_saves(plan, gated_before=False)
    with pytest.raises(ConfigError, match=r"^stages\.anneal\.average: the stage saves 1 checkpoint\(s\) in its 3 "
                                          r"steps for any start \(a gated stage before it may end early\)"):
        check_average_saves(plan, gated_before=True)
