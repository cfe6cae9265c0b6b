"""R20/R21 for the commands beside training (test_bad_inputs.py holds train, prepare-data, launch, align, convert):
`herd recipe` (and `herd train` / `herd launch` given a recipe), `herd average`, `herd plan`, `herd scaling` and
`herd curate` (and `herd curate train-classifier`). Each case breaks one thing in its own copy of a valid workspace
(bad_inputs_fixture.build_tools_workspace) and runs the command in-process, from the workspace; each must end with
exit code 2 and one line `herd...error...` naming the key, file or line at fault, no traceback, nothing in the
workspace created, changed or removed, and no process started. The valid inputs are accepted (the first tests),
so that every refusal below is the broken thing's."""

import hashlib
import json
from pathlib import Path
from typing import List

import pytest

from tests.integration.bad_inputs_fixture import (Case, build_tools_workspace, chain, copy_workspace, edit_json,
                                                  no_processes, refused_cleanly, replace, snapshot, write, write_bytes)


def recipe(*args: str) -> List[str]:
    return ["recipe", "recipe.yaml", *args]


def _recipe_line(old: str, new: str):
    return replace("recipe.yaml", old, new)


A, B = "ckpt/a", "ckpt/b"  # two imports of hf/ (bad_inputs_fixture.build_tools_workspace)
STEP = "step_00000000"
STATE = "runs/recipe/recipe_state.json"
_DONE_SHORT = {"start": {"step": 0, "tokens": 0, "samples": 0}, "end": {"step": 2, "tokens": 128, "samples": 8},
               "chunks": [{"end_step": 2, "gate": None}], "done": True, "tokens_per_step": 64, "seq_len": 16}


def _state(stages: object, name: str = "tiny-recipe"):
    return write(STATE, json.dumps({"recipe": name, "stages": stages}))


def _copy(src: str, dest: str):
    def setup(ws: Path) -> None:
        import shutil
        shutil.copytree(ws / src, ws / dest)
    return setup


RECIPE = [
    Case("recipe_missing", ["recipe", "nope.yaml"], "nope.yaml"),
    Case("recipe_is_a_directory", ["recipe", "data"], "data"),
    Case("recipe_binary_garbage", recipe(), "recipe.yaml", write_bytes("recipe.yaml", b"\xff\xfe\x00garbage\x80")),
    Case("recipe_yaml_syntax", recipe(), "recipe.yaml:7:", _recipe_line("tokens: 256, overrides: [data.seq_len=32]}",
                                                                        "tokens: 256, overrides: [data.seq_len=32}")),
    Case("recipe_duplicate_key", recipe(), "duplicate key 'run_dir'",
         _recipe_line("run_dir: runs/recipe\n", "run_dir: runs/recipe\nrun_dir: runs/other\n")),
    Case("recipe_unknown_top_key", recipe(), "stagez", _recipe_line("warmup_steps: 1", "stagez: 1")),
    Case("recipe_unknown_stage_key", recipe(), "tokenz",
         _recipe_line("{name: short, tokens:", "{name: short, tokenz:")),
    Case("recipe_tokens_zero", recipe(), "stages[0].tokens", _recipe_line("tokens: 128", "tokens: 0")),
    Case("recipe_tokens_negative", recipe(), "stages[1].tokens",
         _recipe_line("tokens: 256, overrides: [data.seq_len=32]", "tokens: -256, overrides: [data.seq_len=32]")),
    Case("recipe_tokens_text", recipe(), "tokens", _recipe_line("tokens: 128", "tokens: many")),
    Case("recipe_tokens_beyond_int64", recipe("stages.short.tokens=1e30"),
         "stages[0].tokens: must be at least 1 token and below 2**62, got 1e+30"),
    Case("recipe_stage_sets_resume", recipe("stages.long.overrides=[data.seq_len=32,checkpoint.resume=never]"),
         "stages.long.overrides: 'checkpoint.resume=never' sets checkpoint.resume, which the recipe sets itself"),
    Case("recipe_stage_sets_steps", recipe("stages.short.overrides=[data.seq_len=16,train.steps=100]"),
         "stages.short.overrides: 'train.steps=100' sets train.steps, which the recipe sets itself; use "
         "stages[i].tokens"),
    Case("recipe_sets_log_name", recipe("overrides=[log.name=mine]"), "overrides: 'log.name=mine' sets log.name"),
    Case("recipe_stage_own_checkpoint_dir", recipe("stages.long.overrides=[data.seq_len=32,checkpoint.dir=ck2]"),
         "stages.long.overrides: 'checkpoint.dir=ck2' sets checkpoint.dir, which the recipe sets itself; use the "
         "recipe's overrides"),
    Case("recipe_needle_haystack_too_short", recipe(
        "stages.long.kind=long_context", "stages.long.overrides=[data.seq_len=32,long_eval.enabled=true,"
        "long_eval.short_seq_len=16,long_eval.short_batches=1,long_eval.needle_trials=1,"
        "long_eval.needle_candidates=2,'long_eval.needle_depths=[0.5]']",
        "stages.long.gate={enabled: true, check_every_tokens: 128, needle_accuracy: 0.0, short_loss_tolerance: 10}"),
        "stages.long: long_eval.needle_lengths: 32 tokens cannot hold the needle"),
    Case("recipe_warmup_tokens_outlast", recipe("warmup_steps=0", "warmup_tokens=100000"),
         "warmup_tokens: 100000 warmup tokens outlast the recipe's"),
    Case("recipe_horizon_below_warmup_steps", recipe("total_tokens=10"), "total_tokens: 10 is shorter than the "
         "warmup ("),
    Case("recipe_horizon_below_warmup", recipe("warmup_steps=0", "warmup_tokens=64", "total_tokens=10"),
         "total_tokens: 10 is shorter than the warmup (64 tokens)"),
    Case("recipe_tokens_nan", recipe(), "tokens", _recipe_line("tokens: 128", "tokens: .nan")),
    Case("recipe_unknown_kind", recipe(), "stages[1].kind",
         _recipe_line("{name: long, tokens", "{name: long, kind: warmup, tokens")),
    Case("recipe_anneal_not_last", recipe(), "stages[0].kind",
         _recipe_line("{name: short, tokens", "{name: short, kind: anneal, tokens")),
    Case("recipe_average_outside_anneal", recipe(), "stages[0].average",
         _recipe_line("{name: short, tokens", "{name: short, average: true, tokens")),
    Case("recipe_gate_on_pretrain", recipe(), "stages[1].gate.enabled",
         _recipe_line("{name: long, tokens", "{name: long, gate: {enabled: true}, tokens")),
    Case("recipe_gate_unknown_metric", recipe(), "perplexity",
         _recipe_line("{name: long, tokens", "{name: long, kind: long_context, gate: {perplexity: 3}, tokens")),
    Case("recipe_gate_accuracy_above_one", recipe(), "stages[1].gate.needle_accuracy",
         _recipe_line("{name: long, tokens", "{name: long, kind: long_context, gate: {needle_accuracy: 1.5}, tokens")),
    Case("recipe_gate_without_long_eval", recipe(), "stages.long.gate.enabled",
         _recipe_line("{name: long, tokens", "{name: long, kind: long_context, gate: {enabled: true}, tokens")),
    Case("recipe_duplicate_stage_name", recipe(), "stages[1].name",
         _recipe_line("{name: long,", "{name: short,")),
    Case("recipe_stage_name_with_space", recipe(), "stages[0].name", _recipe_line("name: short", "name: 'a b'")),
    Case("recipe_no_stages", recipe("stages=[]"), "stages"),
    Case("recipe_config_missing", recipe("config=nope.yaml"), "nope.yaml"),
    Case("recipe_config_empty", recipe(), "config", _recipe_line("config: job.yaml", "config: ''")),
    Case("recipe_run_dir_is_a_file", recipe("run_dir=job.yaml"), "run_dir"),
    Case("recipe_total_tokens_negative", recipe("total_tokens=-1"), "total_tokens"),
    Case("recipe_warmup_both", recipe("warmup_tokens=100"), "warmup_steps"),
    Case("recipe_warmup_outlasts", recipe("warmup_steps=1000"), "warmup_steps"),
    Case("recipe_bad_override_form", recipe("=3"), "=3"),
    Case("recipe_override_unknown_key", recipe("warmup_stepz=3"), "warmup_stepz"),
    Case("recipe_override_names_no_stage", recipe("stages.nope.tokens=5"), "stages.nope: override"),
    Case("recipe_override_stage_key_unknown", recipe("stages.short.tokenz=5"), "stages.short.tokenz"),
    Case("recipe_override_stage_tokens_zero", recipe("stages.short.tokens=0"), "stages[0].tokens"),
    Case("recipe_override_whole_stage", recipe("stages.0=5"), "sets a whole stage"),
    Case("recipe_stage_override_unknown", recipe(), "optim.lrr",
         _recipe_line("overrides: [data.seq_len=16]", "overrides: [optim.lrr=1]")),
    Case("recipe_stage_override_nan", recipe(), "stages.long",
         _recipe_line("overrides: [data.seq_len=32]", "overrides: [optim.lr=nan]")),
    Case("recipe_stage_data_missing", recipe(), "data/nope.bin",
         _recipe_line("overrides: [data.seq_len=32]", "overrides: ['data.train=[{path: data/nope}]']")),
    Case("recipe_stage_changes_data_seed", recipe(), "data.seed",
         _recipe_line("overrides: [data.seq_len=32]", "overrides: [data.seed=7]")),
    Case("recipe_average_saves_once", recipe(), "stages.anneal.average",
         _recipe_line("checkpoint.every=1", "checkpoint.every=100")),
    Case("recipe_nproc_zero", recipe("--nproc", "0"), "--nproc"),
    Case("recipe_world_size_alone", recipe("--world-size", "2"), "--world-size"),
    Case("recipe_print_world_not_dividing", recipe("--print-config", "--world-size", "3"), "stages.short"),
    Case("recipe_state_not_json", recipe(), "recipe_state.json", write(STATE, "{not json")),
    Case("recipe_state_stages_list", recipe(), "recipe_state.json", _state([1, 2])),
    Case("recipe_state_other_recipe", recipe(), "'other'", _state({}, name="other")),
    Case("recipe_state_stage_record_number", recipe(), "recipe_state.json", _state({"short": 5})),
    Case("recipe_state_stage_without_start", recipe(), "recipe_state.json", _state({"short": {"done": False}})),
    Case("recipe_state_start_not_mapping", recipe("--nproc", "2"), "recipe_state.json",
         _state({"short": {**_DONE_SHORT, "start": [0, 0, 0]}})),
    Case("recipe_edited_after_stage_ran", recipe(), "stages.short",
         chain(_state({"short": _DONE_SHORT}), _recipe_line("data.seq_len=16", "data.seq_len=32"))),
    Case("recipe_stage_budget_shrunk", recipe(), "stages.short.tokens",
         chain(_state({"short": _DONE_SHORT}), _recipe_line("tokens: 128", "tokens: 64"))),
    Case("recipe_earlier_stage_moved", recipe(), "stages.long",
         _state({"short": _DONE_SHORT, "long": {"start": {"step": 5, "tokens": 1, "samples": 1}, "chunks": [],
                                                "done": False}})),
    Case("recipe_checkpoints_of_an_import", recipe(), "no recipe_state.json: not this recipe's run",
         _copy(A, "runs/recipe/train/checkpoints")),
    Case("recipe_train_dir_is_a_file", recipe(), "runs/recipe/train", write("runs/recipe/train", "mine\n")),
    Case("train_recipe_dry_run", ["train", "recipe.yaml", "--dry-run", "--world-size", "2"], "--print-config"),
    Case("train_recipe_bad_override", ["train", "recipe.yaml", "total_tokens=-5"], "total_tokens"),
    Case("launch_recipe_data_missing", ["launch", "--nproc", "2", "recipe.yaml"], "data/nope.bin",
         _recipe_line("overrides: [data.seq_len=16]", "overrides: ['data.valid=[{path: data/nope}]']")),
    Case("launch_recipe_slurm_flags", ["launch", "--slurm", "--nodes", "2", "recipe.yaml"], "--nodes"),
    Case("launch_recipe_slurm_out_user_file", ["launch", "--slurm", "--out", "notes.txt", "recipe.yaml",
                                               "overrides=[slurm.gpus_per_node=2,train.device=cpu]"], "notes.txt",
         write("notes.txt", "mine\n")),
]


def average(*args: str) -> List[str]:
    return ["average", *args]


def _marked(step_dir: str, edit):
    """Edits a checkpoint's manifest and re-commits it (a valid checkpoint of another model)."""
    def setup(ws: Path) -> None:
        manifest = ws / step_dir / "manifest.json"
        data = json.loads(manifest.read_text())
        edit(data)
        raw = json.dumps(data).encode()
        manifest.write_bytes(raw)
        (ws / step_dir / "COMMITTED").write_bytes(hashlib.sha256(raw).hexdigest().encode())
    return setup



AVERAGE = [
    Case("avg_one_checkpoint", average(A, "--out", "avg"), "at least 2"),
    Case("avg_source_missing", average(A, "nowhere", "--out", "avg"), "nowhere"),
    Case("avg_source_is_file", average(A, "job.yaml", "--out", "avg"), "job.yaml"),
    Case("avg_source_not_checkpoint", average(A, "data", "--out", "avg"), "data: no complete checkpoint"),
    Case("avg_same_twice", average(A, f"{A}/{STEP}", "--out", "avg"), "given twice"),
    Case("avg_weights_text", average(A, B, "--out", "avg", "--weights", "1,x"), "--weights"),
    Case("avg_weights_count", average(A, B, "--out", "avg", "--weights", "1"), "--weights"),
    Case("avg_weights_zero_sum", average(A, B, "--out", "avg", "--weights", "0,0"), "--weights"),
    Case("avg_weights_negative", average(A, B, "--out", "avg", "--weights=-1,2"), "--weights: must be"),
    Case("avg_weights_negative_as_option", average(A, B, "--out", "avg", "--weights", "-1,2"), "--weights"),
    Case("avg_weights_nan", average(A, B, "--out", "avg", "--weights", "nan,1"), "--weights"),
    Case("avg_weights_overflow", average(A, B, "--out", "avg", "--weights", "1e308,1e308"), "--weights"),
    Case("avg_steps_text", average(A, B, "--out", "avg", "--steps", "last"), "--steps"),
    Case("avg_steps_negative", average(A, B, "--out", "avg", "--steps", "-1"), "--steps"),
    Case("avg_steps_missing", average(A, B, "--out", "avg", "--steps", "5"), "step 5"),
    Case("avg_all_and_steps", average(A, B, "--out", "avg", "--all", "--steps", "0"), "--all"),
    Case("avg_without_out", average(A, B), "--out"),
    Case("avg_out_is_user_file", average(A, B, "--out", "job.yaml"), "job.yaml"),
    Case("avg_out_under_a_file", average(A, B, "--out", "job.yaml/avg"), "job.yaml"),
    Case("avg_out_is_user_dir", average(A, B, "--out", "mine"), "mine", write("mine/notes.txt", "mine\n")),
    Case("avg_overwrite_checkpoint_state", average(A, B, "--out", "ckpt/c", "--overwrite"), "ckpt/c",
         _copy(A, "ckpt/c")),
    Case("avg_out_is_a_source", average(A, B, "--out", A, "--overwrite"), A),
    Case("avg_out_inside_a_source", average(A, B, "--out", f"{A}/{STEP}/avg"), A),
    Case("avg_out_is_cwd", average(A, B, "--out", ".", "--overwrite"), ".: holds"),
    Case("avg_manifest_altered", average(A, B, "--out", "avg"), "ckpt/b: no complete checkpoint",
         write(f"{B}/{STEP}/manifest.json", "{}")),
    Case("avg_manifest_edited", average(A, f"{B}/{STEP}", "--out", "avg"), f"{B}/{STEP}/manifest.json",
         edit_json(f"{B}/{STEP}/manifest.json", lambda m: m["meta"].update(step=3))),
    Case("avg_shard_truncated", average(A, B, "--out", "avg"), f"{B}/{STEP}",
         lambda ws: _truncate_largest(ws / B / STEP)),
    Case("avg_other_model", average(A, B, "--out", "avg"), "model.rope_theta",
         _marked(f"{B}/{STEP}", lambda m: m["meta"]["model"].update(rope_theta=10000.0))),
]


def _truncate_largest(step_dir: Path) -> None:
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:-8])


def plan(*args: str) -> List[str]:
    return ["plan", "--model", "debug", "--gpus", "8", *args]


def plan_config(*args: str) -> List[str]:
    return ["plan", "--config", "job.yaml", "--gpus", "2", "--gpus-per-node", "2", "--seq-len", "32",
            "--global-batch-tokens", "128", *args]


PLAN = [
    Case("plan_gpus_zero", ["plan", "--model", "debug", "--gpus", "0"], "--gpus"),
    Case("plan_gpus_text", ["plan", "--model", "debug", "--gpus", "eight"], "--gpus"),
    Case("plan_without_model", ["plan", "--gpus", "8"], "--model"),
    Case("plan_unknown_preset", ["plan", "--model", "13b", "--gpus", "8"], "--model 13b"),
    Case("plan_preset_with_overrides", plan("model.dim=64"), "overrides"),
    Case("plan_gpus_per_node_zero", plan("--gpus-per-node", "0"), "--gpus-per-node"),
    Case("plan_partial_nodes", plan("--gpus-per-node", "3"), "--gpus 8"),
    Case("plan_config_missing", ["plan", "--config", "nope.yaml", "--gpus", "2"], "nope.yaml"),
    Case("plan_config_override_unknown", plan_config("optim.lrr=1"), "optim.lrr"),
    Case("plan_hardware_unknown", plan("--hardware", "tpu_v9"), "--hardware tpu_v9"),
    Case("plan_hardware_yaml_syntax", plan("--hardware", "hw.yaml"), "hw.yaml",
         write("hw.yaml", "name: x\nlinks: [1, 2\n")),
    Case("plan_hardware_list", plan("--hardware", "hw.yaml"), "hw.yaml", write("hw.yaml", "- 1\n- 2\n")),
    Case("plan_batch_tokens_zero", plan("--global-batch-tokens", "0"), "--global-batch-tokens"),
    Case("plan_batch_tokens_text", plan("--global-batch-tokens", "lots"), "--global-batch-tokens"),
    Case("plan_batch_not_multiple", plan("--seq-len", "1000", "--global-batch-tokens", "1M"),
         "--global-batch-tokens"),
    Case("plan_seq_len_zero", plan("--seq-len", "0"), "--seq-len"),
    Case("plan_seq_len_above_model", plan_config("--seq-len", "128"), "--seq-len 128"),
    Case("plan_memory_negative", plan("--memory-limit", "-1"), "--memory-limit"),
    Case("plan_memory_nan", plan("--memory-limit", "nan"), "--memory-limit"),
    Case("plan_schedules_unknown", plan("--schedules", "GPipe,Zigzag"), "Zigzag"),
    Case("plan_top_zero", plan("--top", "0"), "--top"),
    Case("plan_out_is_user_file", plan_config("--out", "job.yaml"), "job.yaml"),
    Case("plan_out_is_directory", plan_config("--out", "data"), "data"),
    Case("plan_out_under_a_file", plan_config("--out", "job.yaml/plan.yaml"), "job.yaml"),
    Case("plan_out_dir_missing", plan_config("--out", "nowhere/plan.yaml"), "nowhere"),
]


def scaling(*args: str) -> List[str]:
    return ["scaling", "sweep.yaml", *args]


def _sweep_line(old: str, new: str):
    return replace("sweep.yaml", old, new)


SWEEP_DIR = "runs/tiny-sweep"

SCALING = [
    Case("sweep_missing", ["scaling", "nope.yaml"], "nope.yaml"),
    Case("sweep_yaml_syntax", scaling(), "sweep.yaml:5:5", _sweep_line("budgets: [1.0e9, 2.0e9]", "budgets: [1.0e9")),
    Case("sweep_unknown_key", scaling("budget=[1e9]"), "budget"),
    Case("sweep_budgets_empty", scaling("budgets=[]"), "budgets"),
    Case("sweep_budget_negative", scaling("budgets=[1e9,-2e9]"), "budgets[1]"),
    Case("sweep_budget_twice", scaling("budgets=[1e9,1e9]"), "budgets"),
    Case("sweep_budget_text", scaling(), "budgets", _sweep_line("2.0e9]", "lots]")),
    Case("sweep_budget_overflow", scaling("budgets=[1e9,1e400]"), "budgets"),
    Case("sweep_budget_too_small", scaling("budgets=[1e3]"), "budgets[0]"),
    Case("sweep_dims_empty", scaling("dims=[]"), "empty grid"),
    Case("sweep_dims_two", scaling("dims=[16,32]"), "dims"),
    Case("sweep_dim_not_multiple", scaling("dims=[16,32,40]"), "dims[2]"),
    Case("sweep_head_dim_odd", scaling("head_dim=3"), "head_dim"),
    Case("sweep_kv_group_zero", scaling("kv_group=0"), "kv_group"),
    Case("sweep_batch_sizes_count", scaling("batch_sizes=[4]"), "batch_sizes"),
    Case("sweep_batch_not_micro_multiple", scaling("batch_sizes=[4,5]"), "batch_sizes[1]"),
    Case("sweep_lr_negative", scaling("lrs=[1e-3,-1e-3,1e-3]"), "lrs[1]"),
    Case("sweep_warmup_fraction_one", scaling("warmup_fraction=1"), "warmup_fraction"),
    Case("sweep_min_lr_ratio_above_one", scaling("min_lr_ratio=2"), "min_lr_ratio"),
    Case("sweep_weight_decay_negative", scaling("weight_decay=-0.1"), "weight_decay"),
    Case("sweep_target_negative", scaling("targets=[-1e20]"), "targets[0]"),
    Case("sweep_downstream_one_choice", scaling("downstream.choices=1"), "downstream.choices"),
    Case("sweep_jobs_zero", scaling("jobs=0"), "jobs"),
    Case("sweep_name_climbs", scaling("name=.."), "name"),
    Case("sweep_run_dir_is_a_file", scaling("run_dir=job.yaml"), "run_dir"),
    Case("sweep_job_missing", scaling("job=nope.yaml"), "nope.yaml"),
    Case("sweep_job_override_unknown", scaling("overrides=[optim.lrr=1]"), "optim.lrr"),
    Case("sweep_data_missing", scaling("overrides=['data.train=[{path: data/nope}]']"), "data/nope"),
    Case("sweep_bad_override_form", scaling("budgets"), "budgets"),
    Case("sweep_flags_exclusive", scaling("--plan-only", "--fit-only"), "--plan-only"),
    Case("sweep_max_parallel_negative", scaling("--slurm", "--max-parallel", "-1"), "--max-parallel"),
    Case("sweep_time_malformed", scaling("--slurm", "--time", "1h"), "--time"),
    Case("sweep_partition_shell", scaling("--slurm", "--partition", "gpu;rm -rf"), "--partition"),
    Case("sweep_out_without_slurm", scaling("--out", "a.sbatch"), "--out"),
    Case("sweep_plan_not_json", scaling("--plan-only"), "plan.json", write(f"{SWEEP_DIR}/plan.json", "{oops")),
    Case("sweep_plan_wrong_shape", scaling("--plan-only"), "plan.json",
         write(f"{SWEEP_DIR}/plan.json", json.dumps({"job": "job.yaml", "overrides": 5, "runs": [7]}))),
    Case("sweep_plan_changed", scaling("--plan-only", "weight_decay=0.2"), "plan.json",
         lambda ws: _planned(ws)),
    Case("sweep_plan_is_directory", scaling("--plan-only"), "plan.json", write(f"{SWEEP_DIR}/plan.json/x", "")),
    Case("sweep_dir_is_a_file", scaling("--plan-only"), SWEEP_DIR, write(SWEEP_DIR, "mine\n")),
    Case("sweep_fit_only_untrained", scaling("--fit-only"), "not finished"),
    Case("sweep_slurm_out_user_file", scaling("--slurm", "--out", "notes.txt"), "notes.txt",
         write("notes.txt", "mine\n")),
    Case("sweep_slurm_out_under_a_file", scaling("--slurm", "--out", "job.yaml/a.sbatch"), "job.yaml"),
]


def _planned(ws: Path) -> None:
    """The sweep's plan.json as `herd scaling --plan-only` writes it (in the copy, before the snapshot)."""
    from engine.config import load_scaling
    from scaling.plan import load_job, plan_runs, sweep_dir
    from scaling.runs import write_plan
    import os
    here = Path.cwd()
    os.chdir(ws)
    try:
        cfg = load_scaling("sweep.yaml")
        runs = plan_runs(cfg, load_job(cfg))
        write_plan(Path(sweep_dir(cfg)), {"job": cfg.job, "overrides": list(cfg.overrides),
                                          "runs": [{**r.as_dict(), "overrides": r.overrides(cfg)} for r in runs]})
    finally:
        os.chdir(here)


def curate(*args: str) -> List[str]:
    return ["curate", "curate.yaml", *args]


def classifier(*args: str) -> List[str]:
    return ["curate", "train-classifier", *args]


GOOD, BAD = "examples/good.txt", "examples/bad.txt"
CURATE_OUT = "runs/curate"

CURATE = [
    Case("curate_missing", ["curate", "nope.yaml"], "nope.yaml"),
    Case("curate_yaml_syntax", curate(), "curate.yaml:3:", replace("curate.yaml", '"*.jsonl"]}', '"*.jsonl"}')),
    Case("curate_unknown_key", curate("minhash.bucketz=3"), "bucketz"),
    Case("curate_wrong_type", curate("executor.tasks=many"), "executor.tasks"),
    Case("curate_input_missing", curate("input.paths=[nowhere]"), "input.paths[0]"),
    Case("curate_input_empty", curate("input.paths=[]"), "input.paths"),
    Case("curate_include_matches_nothing", curate("input.include=['*.zzz']"), "input.paths"),
    Case("curate_executor_unknown", curate("executor.kind=k8s"), "executor.kind"),
    Case("curate_tasks_zero", curate("executor.tasks=0"), "executor.tasks"),
    Case("curate_workers_zero", curate("executor.workers=0"), "executor.workers"),
    Case("curate_slurm_no_partition", curate("executor.kind=slurm"), "executor.partition"),
    Case("curate_slurm_venv_missing", curate("executor.kind=slurm", "executor.partition=cpu",
                                             "executor.venv_path=nope/activate"), "executor.venv_path"),
    Case("curate_minhash_buckets_zero", curate("minhash.buckets=0"), "minhash.buckets"),
    Case("curate_line_repeats_zero", curate("line_dedup.max_repeats=0"), "line_dedup.max_repeats"),
    Case("curate_dirty_words_missing", curate("heuristics.dirty_words_file=nope.txt"), "heuristics.dirty_words_file"),
    Case("curate_dirty_words_binary", curate("heuristics.dirty_words_file=data/c.train.bin"),
         "heuristics.dirty_words_file"),
    Case("curate_max_dirty_negative", curate("heuristics.max_dirty_words=-1"), "heuristics.max_dirty_words"),
    Case("curate_max_kl_zero", curate("heuristics.max_kl=0"), "heuristics.max_kl"),
    Case("curate_max_kl_nan", curate("heuristics.max_kl=nan"), "heuristics.max_kl"),
    Case("curate_language_without_model", curate("models.language=true"), "models.language_model"),
    Case("curate_quality_model_missing", curate("models.quality_model=nope.bin"), "models.quality_model"),
    Case("curate_quality_model_garbage", curate("models.quality_model=job.yaml"), "models.quality_model"),
    Case("curate_domain_model_garbage", curate("models.domain_model=dirty.txt"), "models.domain_model"),
    Case("curate_quality_threshold_above_one", curate("models.quality_threshold=1.5"), "models.quality_threshold"),
    Case("curate_languages_empty", curate("models.languages=[]"), "models.languages"),
    Case("curate_tokenizer_unknown", curate("tokenize.tokenizer=spm"), "tokenize.tokenizer"),
    Case("curate_tokenizer_path_missing", curate("tokenize.tokenizer_path=nope.json"), "tokenize.tokenizer_path"),
    Case("curate_tokenizer_not_json", curate("tokenize.tokenizer_path=job.yaml"), "tokenize.tokenizer_path"),
    Case("curate_vocab_small", curate("tokenize.vocab_size=100"), "tokenize.vocab_size"),
    Case("curate_mix_negative", curate("tokenize.mix.code=-0.1"), "tokenize.mix.code"),
    Case("curate_mix_all_zero", curate("tokenize.mix.general=0", "tokenize.mix.math=0", "tokenize.mix.code=0",
                                       "tokenize.mix.multilingual=0"), "tokenize.mix"),
    Case("curate_examples_negative", curate("examples=-1"), "examples"),
    Case("curate_bad_override_form", curate("=3"), "=3"),
    Case("curate_output_is_a_file", curate("output_dir=job.yaml"), "output_dir"),
    Case("curate_output_is_user_dir", curate("output_dir=corpus"), "corpus"),
    Case("curate_output_other_pipeline", curate("minhash.n_grams=4"), "minhash.n_grams",
         lambda ws: _claimed(ws)),
    Case("curate_output_record_garbage", curate(), "pipeline.json", write(f"{CURATE_OUT}/pipeline.json", "{oops")),
    Case("curate_output_listing_garbage", curate(), "inputs.json",
         chain(lambda ws: _claimed(ws), write(f"{CURATE_OUT}/inputs.json", "[oops"))),
    Case("curate_output_inside_input", curate("output_dir=raw/out"), "output_dir: 'raw/out' lies inside input.paths[0]"),
    Case("curate_input_inside_output", curate("input.paths=[runs/curate/raw]"), "input.paths[0]",
         write("runs/curate/raw/page.txt", "a page")),
    Case("curate_classifier_flags_without_command", curate("--positive", GOOD), "train-classifier"),
    Case("classifier_examples_under_both_labels", classifier("--positive", "examples", "--negative", BAD, "--out",
                                                             "q.bin"), "--negative: 'examples/bad.txt' overlaps"),
    Case("classifier_quality_and_domain", classifier("--positive", GOOD, "--negative", BAD, "--class", f"code={GOOD}",
                                                     "--out", "q.bin"), "not both"),
    Case("classifier_one_label_twice", classifier("--class", f"a={GOOD}", "--class", f"a={BAD}", "--out", "q.bin"),
         "got only label 'a'"),
    Case("classifier_without_out", classifier("--positive", GOOD, "--negative", BAD), "--out"),
    Case("classifier_positive_only", classifier("--positive", GOOD, "--out", "q.bin"), "--negative"),
    Case("classifier_positive_missing", classifier("--positive", "nope.txt", "--negative", BAD, "--out", "q.bin"),
         "--positive: 'nope.txt'"),
    Case("classifier_class_missing", classifier("--class", f"code={GOOD}", "--class", "math=nope", "--out", "q.bin"),
         "--class math: 'nope'"),
    Case("classifier_positive_empty", classifier("--positive", "examples/empty.txt", "--negative", BAD, "--out",
                                                 "q.bin"), "--positive: no example text"),
    Case("classifier_one_class", classifier("--class", f"code={GOOD}", "--out", "q.bin"), "--class"),
    Case("classifier_bad_label", classifier("--class", f"a b={GOOD}", "--class", f"c={BAD}", "--out", "q.bin"),
         "--class a b="),
    Case("classifier_epochs_zero", classifier("--positive", GOOD, "--negative", BAD, "--out", "q.bin", "--epochs",
                                              "0"), "--epochs"),
    Case("classifier_out_is_directory", classifier("--positive", GOOD, "--negative", BAD, "--out", "data"), "data"),
    Case("classifier_out_dir_missing", classifier("--positive", GOOD, "--negative", BAD, "--out", "no/q.bin"),
         "no/q.bin"),
    Case("classifier_out_is_user_file", classifier("--positive", GOOD, "--negative", BAD, "--out", "job.yaml"),
         "job.yaml"),
    Case("classifier_with_overrides", classifier("a=1", "--positive", GOOD, "--negative", BAD, "--out", "q.bin"),
         "overrides"),
]


def _claimed(ws: Path) -> None:
    """runs/curate as an earlier `herd curate curate.yaml` left it (pipeline.json and inputs.json)."""
    import os

    from curate.config import load
    from curate.run import corpus_files
    here = Path.cwd()
    os.chdir(ws)
    try:
        corpus_files(load("curate.yaml"))
    finally:
        os.chdir(here)


CASES = RECIPE + AVERAGE + PLAN + SCALING + CURATE


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_tools_workspace(tmp_path_factory.mktemp("bad-inputs-tools") / "ws")


def test_cases_are_many_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 150, len(CASES)
    assert {c.argv[0] for c in CASES} == {"recipe", "train", "launch", "average", "plan", "scaling", "curate"}
    assert any(c.argv[:2] == ["curate", "train-classifier"] for c in CASES)


@pytest.mark.parametrize("argv", [recipe("--print-config"), scaling("--plan-only"), average(A, B, "--out", "avg"),
                                  plan_config("--out", "plan.yaml")], ids=["recipe", "scaling", "average", "plan"])
def test_the_valid_workspace_is_accepted(argv, template, tmp_path, monkeypatch, capfd):
    """The unbroken inputs pass, so that each refusal of the table is the broken thing's."""
    from launch.cli import main
    ws = copy_workspace(template, tmp_path / "ws")
    monkeypatch.chdir(ws)
    no_processes(monkeypatch)
    assert main(argv) == 0, capfd.readouterr()


def test_the_valid_curation_pipeline_loads(template, tmp_path, monkeypatch):
    """curate.yaml passes every check (running it is tests/integration/test_curate*'s business)."""
    from curate.config import load
    ws = copy_workspace(template, tmp_path / "ws")
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    cfg = load("curate.yaml")
    assert cfg.name == "tiny-curate" and cfg.heuristics.dirty_words_file == "dirty.txt"
    assert snapshot(ws) == before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case, template, tmp_path, monkeypatch, capfd):
    print(refused_cleanly(case, template, tmp_path, monkeypatch, capfd))


def test_a_retrain_replaces_its_own_model_only(template, tmp_path, monkeypatch, capfd):
    """R21 for train-classifier --out: a fastText model herd wrote may be replaced (retraining to the same file),
    a user's file may not (classifier_out_is_user_file above)."""
    from curate.models import FASTTEXT_MAGIC
    from launch.cli import main
    ws = copy_workspace(template, tmp_path / "ws")
    monkeypatch.chdir(ws)
    argv = classifier("--positive", GOOD, "--negative", BAD, "--out", "q.bin", "--epochs", "2")
    assert main(argv) == 0 and (ws / "q.bin").read_bytes()[:4] == FASTTEXT_MAGIC
    first = (ws / "q.bin").read_bytes()
    assert main(argv[:-1] + ["3"]) == 0, capfd.readouterr()  # another epoch count: another model
    second = (ws / "q.bin").read_bytes()
    assert second != first and second[:4] == FASTTEXT_MAGIC
