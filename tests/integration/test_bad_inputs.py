"""R20/R21: a table of malformed inputs through every `herd` command. Each case breaks one thing in its own copy
of a valid workspace (bad_inputs_fixture.py) and runs the command in-process, from the workspace. What must hold
for every case: exit code 2, exactly one line of output (`herd: error: ...`), no traceback, the key, file or line
named, no file in the workspace created, changed or removed, and no process started (a child process or a
process group would fail the case at once)."""

import json
import os
import subprocess
from pathlib import Path
from typing import List

import pytest

from tests.integration.bad_inputs_fixture import (Case, build_workspace, copy_workspace, refused_cleanly,
                                                  snapshot as _snapshot)
from tests.integration.bad_inputs_fixture import (chain as _chain, edit_json as _edit_json, replace as _replace,
                                                  truncate as _truncate, write as _write, write_bytes as _write_bytes)


def train(*overrides: str) -> List[str]:
    return ["train", "job.yaml", *overrides]


BIG = "99999999999999999999"  # beyond int64
LONG_NAME = "r" * 300  # beyond a file name's 255 bytes

CONFIG_VALUES = [
    Case("lr_nan", train("optim.lr=nan"), "optim.lr"),
    Case("lr_inf", train("optim.lr=inf"), "optim.lr"),
    Case("lr_overflow_literal", train("optim.lr=1e400"), "optim.lr"),
    Case("lr_negative", train("optim.lr=-1"), "optim.lr"),
    Case("beta1_above_one", train("optim.beta1=1.5"), "optim.beta1"),
    Case("beta1_negative", train("optim.beta1=-0.1"), "optim.beta1"),
    Case("beta2_one", train("optim.beta2=1.0"), "optim.beta2"),
    Case("beta2_nan", train("optim.beta2=nan"), "optim.beta2"),
    Case("eps_zero", train("optim.eps=0"), "optim.eps"),
    Case("eps_negative", train("optim.eps=-1e-8"), "optim.eps"),
    Case("weight_decay_negative", train("optim.weight_decay=-0.1"), "optim.weight_decay"),
    Case("weight_decay_inf", train("optim.weight_decay=inf"), "optim.weight_decay"),
    Case("grad_clip_nan", train("optim.grad_clip=nan"), "optim.grad_clip"),
    Case("init_std_zero", train("model.init_std=0"), "model.init_std"),
    Case("init_std_negative", train("model.init_std=-0.02"), "model.init_std"),
    Case("init_std_nan", train("model.init_std=nan"), "model.init_std"),
    Case("norm_eps_nan", train("model.norm_eps=nan"), "model.norm_eps"),
    Case("rope_theta_inf", train("model.rope_theta=inf"), "model.rope_theta"),
    Case("rope_factor_nan", train("model.rope_scaling.enabled=true", "model.rope_scaling.factor=nan"),
         "model.rope_scaling.factor"),
    Case("seed_negative", train("train.seed=-1"), "train.seed"),
    Case("seed_beyond_int64", train(f"train.seed={BIG}"), "train.seed"),
    Case("data_seed_negative", train("data.seed=-5"), "data.seed"),
    Case("data_seed_beyond_int64", train(f"data.seed={BIG}"), "data.seed"),
    Case("steps_beyond_int64", train(f"train.steps={BIG}"), "train.steps"),
    Case("seq_len_beyond_int64", train(f"data.seq_len={BIG}"), "data.seq_len"),
    Case("micro_batch_beyond_int64", train(f"data.micro_batch_size={BIG}"), "data.micro_batch_size"),
    Case("dim_beyond_int64", train(f"model.dim={BIG}"), "model.dim"),
    Case("blend_weight_inf", train("data.train=[{path: data/c.train, weight: .inf}]"), "data.train[0].weight"),
    Case("blend_weight_nan", train("data.train=[{path: data/c.train, weight: .nan}]"), "data.train[0].weight"),
    Case("blend_weights_overflow", train("data.train=[{path: data/c.train, weight: 1e308}, "
                                         "{path: data/c.valid, weight: 1e308}]"), "data.train:"),
    Case("blend_dataset_twice", train("data.train=[{path: data/c.train}, {path: data/./c.train}]"),
         "data.train[1].path: 'data/./c.train' is listed twice in the blend (as 'data/c.train')"),
    Case("tokenizer_llama3_with_a_path", train("data.tokenizer.kind=llama3"), "data.tokenizer.path"),
    Case("slurm_time_zero", train("slurm.time=00:00:00"), "slurm.time: '00:00:00' gives the job no time"),
    Case("slurm_time_sixty_minutes", train("slurm.time=01:60:00"), "slurm.time"),
    Case("signal_after_the_time_limit", train("slurm.time=00:05:00", "slurm.signal_seconds=300"),
         "slurm.signal_seconds: 300 s is not before the end"),
    Case("signal_beyond_sbatch", train("slurm.signal_seconds=70000"), "slurm.signal_seconds: must be at most 65535"),
    Case("bool_given_a_number", train("data.document_mask=2"), "data.document_mask: must be true or false, got 2"),
    Case("bool_given_a_string", train("train.compile='yes'"), "train.compile: must be true or false"),
    Case("needle_depth_twice", train("long_eval.enabled=true", "long_eval.needle_trials=1",
                                     "long_eval.needle_depths=[0.5,0.5]"), "long_eval.needle_depths[1]"),
    Case("blend_weights_sum_to_nothing", train("data.train=[{path: data/c.train, weight: 1e-320}]"),
         "data.train[0].weight"),
    Case("blend_weight_negative", train("data.valid=[{path: data/c.valid, weight: -1}]"), "data.valid[0].weight"),
    Case("run_name_too_long", train(f"log.name={LONG_NAME}"), "log.name"),
    Case("job_name_too_long", train(f"slurm.job_name={LONG_NAME}"), "slurm.job_name"),
    Case("run_dir_is_a_file", train("log.run_dir=job.yaml"), "log.run_dir"),
    Case("run_dir_under_a_file", train("log.run_dir=job.yaml/runs"), "log.run_dir"),
    Case("checkpoint_dir_is_a_file", train("checkpoint.dir=job.yaml", "checkpoint.every=1"), "checkpoint.dir"),
    Case("checkpoint_dir_under_a_file", train("checkpoint.dir=job.yaml/ck"), "checkpoint.dir"),
    Case("eval_batches_zero", train("train.eval_batches=0"), "train.eval_batches"),
    Case("eval_every_negative", train("train.eval_every=-1"), "train.eval_every"),
    Case("checkpoint_every_negative", train("checkpoint.every=-1"), "checkpoint.every"),
    Case("verify_sample_negative", train("checkpoint.verify_sample=-1"), "checkpoint.verify_sample"),
    Case("amax_history_zero", train("fp8.amax_history_len=0"), "fp8.amax_history_len"),
    Case("peak_tflops_negative", train("log.peak_tflops=-1"), "log.peak_tflops"),
    Case("peak_tflops_nan", train("log.peak_tflops=nan"), "log.peak_tflops"),
    Case("straggler_threshold_inf", train("guards.straggler_threshold=inf"), "guards.straggler_threshold"),
    Case("watchdog_timeout_nan", train("watchdog.timeout=nan"), "watchdog.timeout"),
    Case("signal_seconds_beyond_int64", train(f"slurm.signal_seconds={BIG}"), "slurm.signal_seconds"),
    Case("pp_layers_negative", train("parallel.pp_layers=[3,-1]"), "parallel.pp_layers"),
    Case("tokenizer_path_is_a_directory", train("data.tokenizer.path=data"), "data.tokenizer.path"),
    Case("train_prefix_is_a_directory", train("data.train=[{path: data}]"), "data.idx"),
    Case("load_weights_missing", train("checkpoint.load_weights=nowhere"), "checkpoint.load_weights"),
    Case("align_train_file_missing", train("align.kind=sft", "align.train_file=rows/nope.jsonl"),
         "rows/nope.jsonl"),
    Case("align_rows_under_lm", train("align.train_file=rows/sft.jsonl"),
         "align.train_file: 'rows/sft.jsonl' is read by align.kind sft, rm or dpo; this job has align.kind=lm"),
    Case("ipo_with_label_smoothing", train("align.kind=dpo", "align.train_file=rows/pref.jsonl", "align.dpo_loss=ipo",
                                           "align.dpo_label_smoothing=0.1"),
         "align.dpo_label_smoothing: 0.1: label smoothing applies to dpo_loss=sigmoid only"),
    Case("dpo_beta_huge", train("align.kind=dpo", "align.train_file=rows/pref.jsonl", "align.dpo_beta=1e308"),
         "align.dpo_beta: must be in (0, 1000]"),
    Case("ipo_beta_tiny", train("align.kind=dpo", "align.train_file=rows/pref.jsonl", "align.dpo_loss=ipo",
                                "align.dpo_beta=1e-20"), "align.dpo_beta: 1e-20 sets IPO's target margin"),
    Case("dpo_reference_missing", train("align.kind=dpo", "align.train_file=rows/pref.jsonl",
                                        "align.reference=nowhere"), "align.reference"),
    Case("tokenizer_vocab_above_model", train("model.vocab_size=200"), "model.vocab_size"),
]

YAML_FILES = [
    Case("yaml_duplicate_key", train(), "duplicate key 'optim'",
         _write("job.yaml", "optim: {lr: 1.0e-3}\noptim: {lr: 2.0e-3}\n")),
    Case("yaml_duplicate_nested_key", ["train", "b.yaml"], "duplicate key 'lr'",
         _write("b.yaml", "include: [job.yaml]\noptim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")),
    Case("yaml_syntax_line_column", ["train", "b.yaml"], "b.yaml:4:6: not valid YAML: did not find expected ',' or "
         "']' (while parsing a flow sequence at line 3)",
         _write("b.yaml", "include: [job.yaml]\noptim:\n  lr: [1.0e-3\ntrain: {}\n")),
    Case("yaml_tab_indent", ["train", "b.yaml"], "b.yaml:3", _write("b.yaml", "optim:\n  lr: 1\n\tbeta1: 2\n")),
    Case("yaml_top_level_list", ["train", "b.yaml"], "b.yaml", _write("b.yaml", "- 1\n- 2\n")),
    Case("yaml_section_scalar", ["train", "b.yaml"], "optim", _write("b.yaml", "include: [job.yaml]\noptim: 3\n")),
    Case("yaml_section_list", ["train", "b.yaml"], "model", _write("b.yaml", "include: [job.yaml]\nmodel: [1, 2]\n")),
    Case("yaml_include_number", ["train", "b.yaml"], "include", _write("b.yaml", "include: 5\n")),
    Case("yaml_include_missing", ["train", "b.yaml"], "nope.yaml", _write("b.yaml", "include: [nope.yaml]\n")),
    Case("yaml_include_cycle", ["train", "b.yaml"], "include cycle",
         _chain(_write("b.yaml", "include: [c.yaml]\n"), _write("c.yaml", "include: [b.yaml]\n"))),
    Case("yaml_binary_garbage", ["train", "b.yaml"], "b.yaml", _write_bytes("b.yaml", b"\xff\xfe\x00garbage\x80")),
    Case("yaml_config_is_directory", ["train", "data"], "data"),
    Case("yaml_unknown_section", ["train", "b.yaml"], "foo",
         _write("b.yaml", "include: [job.yaml]\nfoo: {a: 1}\n")),
    Case("yaml_list_field_is_mapping", ["train", "b.yaml"], "data.train",
         _write("b.yaml", "include: [job.yaml]\ndata:\n  train: {path: data/c.train}\n")),
    Case("yaml_list_element_scalar", ["train", "b.yaml"], "data.train",
         _write("b.yaml", "include: [job.yaml]\ndata:\n  train: [5]\n")),
    Case("yaml_python_tag", ["train", "b.yaml"], "b.yaml",
         _write("b.yaml", "optim: !!python/object/apply:os.system [\"touch pwned\"]\n")),
    Case("yaml_wrong_type_in_file", ["train", "b.yaml"], "train.steps",
         _write("b.yaml", "include: [job.yaml]\ntrain: {steps: many}\n")),
]

OVERRIDES = [
    Case("override_without_value", train("optim.lr"), "optim.lr"),
    Case("override_without_key", train("=3"), "=3"),
    Case("override_list_for_float", train("optim.lr=[1,2]"), "optim.lr"),
    Case("override_section_scalar", train("optim=3"), "optim"),
    Case("override_list_field_scalar", train("data.train=notalist"), "data.train"),
    Case("override_unbalanced", train("data.train=[{path: x"), "data.train"),
    Case("override_unknown_nested", train("data.tokenizer.kindd=hf"), "data.tokenizer.kindd"),
    Case("override_bool_garbage", train("log.tensorboard=maybe"), "log.tensorboard"),
]


def prep(*args: str) -> List[str]:
    return ["prepare-data", *args]


PREPARE = [
    Case("prep_out_is_user_file", prep("corpus", "--out", "notes", "--tokenizer-path", "data/tok.json"),
         "notes.bin", _write("notes.bin", "my notes\n")),
    Case("prep_out_over_sidecar_of_user", prep("corpus", "--out", "notes", "--tokenizer-path", "data/tok.json"),
         "notes.json", _write("notes.json", "{\"mine\": 1}\n")),
    Case("prep_tokenizer_over_user_file", prep("corpus", "--out", "data/new", "--train-tokenizer",
                                               "--tokenizer-path", "job.yaml"), "job.yaml"),
    Case("prep_tokenizer_over_one_in_use", prep("corpus", "--out", "data/new", "--train-tokenizer",
                                                "--tokenizer-path", "data/tok.json"), "data/tok.json"),
    Case("prep_vocab_zero", prep("corpus", "--out", "o", "--train-tokenizer", "--tokenizer-path", "t.json",
                                 "--vocab-size", "0"), "--vocab-size"),
    Case("prep_vocab_huge", prep("corpus", "--out", "o", "--train-tokenizer", "--tokenizer-path", "t.json",
                                 "--vocab-size", BIG), "--vocab-size"),
    Case("prep_vocab_size_of_a_loaded_tokenizer", prep("corpus", "--out", "o", "--tokenizer-path", "data/tok.json",
                                                       "--vocab-size", "8000"), "--vocab-size 8000: only a tokenizer"),
    Case("prep_llama3_with_a_path", prep("corpus", "--out", "o", "--tokenizer", "llama3", "--tokenizer-path",
                                         "data/tok.json"), "--tokenizer-path data/tok.json: --tokenizer llama3"),
    Case("prep_valid_fraction_above_one", prep("corpus", "--out", "o", "--tokenizer-path", "data/tok.json",
                                               "--valid-fraction", "1.5"), "--valid-fraction"),
    Case("prep_valid_fraction_nan", prep("corpus", "--out", "o", "--tokenizer-path", "data/tok.json",
                                         "--valid-fraction", "nan"), "--valid-fraction"),
    Case("prep_input_missing", prep("nowhere", "--out", "o", "--tokenizer-path", "data/tok.json"), "nowhere"),
    Case("prep_jsonl_missing_key", prep("d.jsonl", "--out", "o", "--tokenizer-path", "data/tok.json"),
         "d.jsonl:2", _write("d.jsonl", '{"text": "a b"}\n{"body": "c"}\n')),
    Case("prep_jsonl_line_is_list", prep("d.jsonl", "--out", "o", "--tokenizer-path", "data/tok.json"),
         "d.jsonl:1", _write("d.jsonl", '["text", "a b"]\n')),
    Case("prep_jsonl_text_null", prep("d.jsonl", "--out", "o", "--tokenizer-path", "data/tok.json"),
         "d.jsonl:1", _write("d.jsonl", '{"text": null}\n')),
    Case("prep_jsonl_text_number", prep("d.jsonl", "--out", "o", "--tokenizer-path", "data/tok.json"),
         "d.jsonl:2", _write("d.jsonl", '{"text": "a"}\n{"text": 5}\n')),
    Case("prep_jsonl_lone_surrogate", prep("d.jsonl", "--out", "o", "--tokenizer-path", "data/tok.json"),
         "d.jsonl:2", _write("d.jsonl", '{"text": "a"}\n{"text": "x\\ud800y"}\n')),
    Case("prep_text_bad_utf8", prep("bad.txt", "--out", "o", "--tokenizer-path", "data/tok.json"),
         "bad.txt", _write_bytes("bad.txt", b"hello\n\xff\xfe world\n")),
    Case("prep_tokenizer_missing", prep("corpus", "--out", "o", "--tokenizer-path", "nope.json"), "nope.json"),
    Case("prep_tokenizer_garbage", prep("corpus", "--out", "o", "--tokenizer-path", "t.json"), "t.json",
         _write("t.json", "{not json")),
    Case("prep_tokenizer_not_given", prep("corpus", "--out", "o"), "tokenizer"),
    Case("prep_out_under_a_file", prep("corpus", "--out", "job.yaml/o", "--tokenizer-path", "data/tok.json"),
         "job.yaml"),
    Case("prep_empty_corpus", prep("empty", "--out", "o", "--tokenizer-path", "data/tok.json"), "empty",
         lambda ws: (ws / "empty").mkdir()),
    Case("prep_include_matches_nothing", prep("corpus", "--include", "*.zzz", "--out", "o", "--tokenizer-path",
                                              "data/tok.json"), "corpus"),
    Case("prep_bad_flag_value", prep("corpus", "--out", "o", "--vocab-size", "many"), "--vocab-size"),
]

TOKEN_FILES = [
    Case("idx_truncated", train(), "data/c.train.idx", _truncate("data/c.train.idx", 10)),
    Case("idx_garbage", train(), "data/c.train.idx", _write_bytes("data/c.train.idx", b"\x00" * 200)),
    Case("bin_truncated", train(), "data/c.train.bin", _truncate("data/c.train.bin", -3)),
    Case("bin_missing", train(), "data/c.train.bin", lambda ws: (ws / "data/c.train.bin").unlink()),
    Case("sidecar_not_json", train(), "data/c.train.json", _write("data/c.train.json", "{oops")),
    Case("sidecar_is_list", train(), "data/c.train.json", _write("data/c.train.json", "[1, 2]")),
    Case("sidecar_eod_string", train(), "eod_id",
         _edit_json("data/c.train.json", lambda d: d.update(eod_id="1"))),
    Case("sidecar_other_tokenizer", train(), "data.tokenizer",
         _edit_json("data/c.train.json", lambda d: d.update(vocab_size=999))),
    Case("token_id_outside_vocab", train("model.vocab_size=300", "data.train=[{path: data/big}]",
                                         "data.valid=[]"), "data/big.bin",
         lambda ws: _big_token_file(ws)),
]


def _big_token_file(ws: Path) -> None:
    import numpy as np

    from engine.data.indexed import IndexedWriter
    writer = IndexedWriter(str(ws / "data" / "big"), np.uint16)
    writer.add_document(np.asarray([1, 2, 400, 3], dtype=np.int64))
    writer.finalize()


def launch(*args: str) -> List[str]:
    return ["launch", *args]


LAUNCH = [
    Case("launch_nproc_zero", launch("--nproc", "0", "job.yaml"), "--nproc"),
    Case("launch_nproc_negative", launch("--nproc", "-2", "job.yaml"), "--nproc"),
    Case("launch_nproc_text", launch("--nproc", "abc", "job.yaml"), "--nproc"),
    Case("launch_without_mode", launch("job.yaml"), "--nproc"),
    Case("launch_data_missing", launch("--nproc", "2", "job.yaml", "data.train=[{path: data/nope}]"),
         "data/nope.idx"),
    Case("launch_tokenizer_missing", launch("--nproc", "2", "job.yaml", "data.tokenizer.path=nope.json"),
         "nope.json"),
    Case("launch_idx_corrupt", launch("--nproc", "2", "job.yaml"), "data/c.valid.idx",
         _truncate("data/c.valid.idx", 30)),
    Case("launch_sidecar_mismatch", launch("--nproc", "2", "job.yaml"), "data.tokenizer",
         _edit_json("data/c.valid.json", lambda d: d.update(eod_id=7))),
    Case("launch_tp_not_dividing", launch("--nproc", "3", "job.yaml", "parallel.tp=3"), "parallel.tp"),
    Case("launch_world_mismatch", launch("--nproc", "2", "job.yaml", "parallel.dp_shard=1"), "parallel"),
    Case("launch_align_rows_missing", launch("--nproc", "2", "job.yaml", "align.kind=sft",
                                             "align.train_file=rows/nope.jsonl"), "rows/nope.jsonl"),
    Case("launch_load_weights_missing", launch("--nproc", "2", "job.yaml", "checkpoint.load_weights=nowhere"),
         "checkpoint.load_weights"),
    Case("slurm_out_is_the_config", launch("--slurm", "--cpu", "--nodes", "1", "--gpus-per-node", "2",
                                           "--out", "job.yaml", "job.yaml"), "job.yaml"),
    Case("slurm_out_is_user_file", launch("--slurm", "--cpu", "--nodes", "1", "--gpus-per-node", "2", "--out",
                                          "notes.txt", "job.yaml"), "notes.txt", _write("notes.txt", "mine\n")),
    Case("slurm_out_under_a_file", launch("--slurm", "--cpu", "--gpus-per-node", "2", "--out", "job.yaml/x",
                                          "job.yaml"), "job.yaml"),
    Case("slurm_nodes_zero", launch("--slurm", "--cpu", "--nodes", "0", "job.yaml"), "slurm.nodes"),
    Case("slurm_data_missing", launch("--slurm", "--cpu", "--gpus-per-node", "2", "--out", "j.sbatch",
                                      "job.yaml", "data.valid=[{path: data/nope}]"), "data/nope.idx"),
    Case("slurm_sidecar_garbage", launch("--slurm", "--cpu", "--gpus-per-node", "2", "--out", "j.sbatch",
                                         "job.yaml"), "data/c.train.json", _write("data/c.train.json", "][")),
]


def align(*args: str) -> List[str]:
    return ["align", *args]


def _stage_line(old: str, new: str):
    return _replace("pipeline.yaml", old, new)


ALIGN = [
    Case("align_pipeline_missing", align("nope.yaml"), "nope.yaml"),
    Case("align_stage_data_missing", align("pipeline.yaml"), "rows/nope.jsonl",
         _stage_line("data: rows/sft.jsonl", "data: rows/nope.jsonl")),
    Case("align_rows_from_rm", align("pipeline.yaml"), "stages[3].data",
         _stage_line("data: '@rs'", "data: '@rm'")),
    Case("align_init_from_rejection", align("pipeline.yaml"), "stages[4].init",
         _stage_line("kind: dpo, data", "kind: dpo, init: '@rs', data")),
    Case("align_reward_from_sft", align("pipeline.yaml"), "stages[2].reward",
         _stage_line("samples: 2", "reward: '@sft', samples: 2")),
    Case("align_stage_bad_override", align("pipeline.yaml"), "optim.lrr",
         _stage_line("overrides: [train.steps=1]}\n  - {name: rm",
                     "overrides: [optim.lrr=1]}\n  - {name: rm")),
    Case("align_pipeline_bad_override", align("pipeline.yaml", "overrides=[train.stepz=3]"), "train.stepz"),
    Case("align_stage_override_bad_value", align("pipeline.yaml"), "optim.lr",
         _stage_line("overrides: [train.steps=1]}\n  - {name: dpo", "overrides: [optim.lr=nan]}\n  - {name: dpo")),
    Case("align_nproc_zero", align("pipeline.yaml", "--nproc", "0"), "--nproc"),
    Case("align_nproc_data_missing", align("pipeline.yaml", "--nproc", "2"), "rows/nope.jsonl",
         _stage_line("data: rows/pref.jsonl, overrides: [train.steps=1]}\n  - {name: rs",
                     "data: rows/nope.jsonl, overrides: [train.steps=1]}\n  - {name: rs")),
    Case("align_nproc_tokenizer_missing", align("pipeline.yaml", "--nproc", "2"), "data/nope.json",
         _replace("align_job.yaml", "path: data/tok.json", "path: data/nope.json")),
    Case("align_sft_null_content", align("pipeline.yaml"), "rows/sft.jsonl:2",
         _write("rows/sft.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                '"content": "b"}]}\n{"messages": [{"role": "user", "content": null}]}\n')),
    Case("align_pref_null_chosen", align("pipeline.yaml"), "rows/pref.jsonl:1",
         _write("rows/pref.jsonl", '{"prompt": "a", "chosen": null, "rejected": "c"}\n')),
    Case("align_row_is_list", align("pipeline.yaml"), "rows/sft.jsonl:1", _write("rows/sft.jsonl", '[1, 2]\n')),
    Case("align_prompts_bad_json", align("pipeline.yaml"), "rows/prompts.jsonl:2",
         _write("rows/prompts.jsonl", '{"prompt": "a"}\n{"prompt": \n')),
    Case("align_config_missing", align("pipeline.yaml"), "nope.yaml",
         _stage_line("config: align_job.yaml", "config: nope.yaml")),
    Case("align_unknown_kind", align("pipeline.yaml"), "stages[0].kind", _stage_line("kind: sft", "kind: sftt")),
    Case("align_rounds_zero", align("pipeline.yaml", "rounds=0"), "rounds"),
    Case("align_samples_zero", align("pipeline.yaml"), "stages[2].samples", _stage_line("samples: 2", "samples: 0")),
    Case("align_temperature_negative", align("pipeline.yaml"), "stages[2].temperature",
         _stage_line("samples: 2", "samples: 2, temperature: -1")),
    Case("align_top_p_above_one", align("pipeline.yaml"), "stages[2].top_p",
         _stage_line("samples: 2", "samples: 2, top_p: 1.5")),
    Case("align_max_new_tokens_zero", align("pipeline.yaml"), "stages[2].max_new_tokens",
         _stage_line("max_new_tokens: 4", "max_new_tokens: 0")),
    Case("align_unknown_stage_key", align("pipeline.yaml"), "dat",
         _stage_line("{name: sft, kind: sft, data:", "{name: sft, kind: sft, dat:")),
    Case("align_duplicate_yaml_key", align("pipeline.yaml"), "duplicate key 'rounds'",
         _write("pipeline.yaml", "rounds: 1\nrounds: 2\n")),
    Case("align_run_dir_is_a_file", align("pipeline.yaml", "run_dir=job.yaml"), "run_dir"),
]


def convert(*args: str) -> List[str]:
    return ["convert", *args]


def _index(ws: Path, weight_map) -> None:
    (ws / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


CONVERT = [
    Case("hf_source_missing", convert("hf-to-herd", "nohf", "ck"), "nohf"),
    Case("hf_config_not_json", convert("hf-to-herd", "hf", "ck"), "hf/config.json",
         _write("hf/config.json", "{not json")),
    Case("hf_config_is_list", convert("hf-to-herd", "hf", "ck"), "hf/config.json", _write("hf/config.json", "[]")),
    Case("hf_config_hidden_size_string", convert("hf-to-herd", "hf", "ck"), "hidden_size",
         _edit_json("hf/config.json", lambda d: d.update(hidden_size="32"))),
    Case("hf_config_missing_key", convert("hf-to-herd", "hf", "ck"), "num_hidden_layers",
         _edit_json("hf/config.json", lambda d: d.pop("num_hidden_layers"))),
    Case("hf_config_heads_zero", convert("hf-to-herd", "hf", "ck"), "num_attention_heads",
         _edit_json("hf/config.json", lambda d: d.update(num_attention_heads=0))),
    Case("hf_config_rope_scaling_list", convert("hf-to-herd", "hf", "ck"), "rope_scaling",
         _edit_json("hf/config.json", lambda d: d.update(rope_scaling=[1, 2], rope_parameters=None))),
    Case("hf_index_not_json", convert("hf-to-herd", "hf", "ck"), "model.safetensors.index.json",
         _write("hf/model.safetensors.index.json", "nope")),
    Case("hf_index_weight_map_list", convert("hf-to-herd", "hf", "ck"), "weight_map",
         lambda ws: _index(ws, ["model.safetensors"])),
    Case("hf_index_file_not_string", convert("hf-to-herd", "hf", "ck"), "weight_map",
         lambda ws: _index(ws, {"lm_head.weight": 5})),
    Case("hf_safetensors_truncated", convert("hf-to-herd", "hf", "ck"), "hf/model.safetensors",
         _truncate("hf/model.safetensors", 100)),
    Case("hf_safetensors_garbage", convert("hf-to-herd", "hf", "ck"), "hf/model.safetensors",
         _write_bytes("hf/model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}" + b"\0" * 64)),
    Case("hf_dest_is_user_dir", convert("hf-to-herd", "hf", "mine"), "mine", _write("mine/notes.txt", "mine\n")),
    Case("hf_dest_is_file", convert("hf-to-herd", "hf", "job.yaml"), "job.yaml"),
    Case("export_source_missing", convert("herd-to-hf", "nock", "out"), "nock"),
    Case("export_dest_is_user_dir", convert("herd-to-hf", "nock", "mine"), "mine", _write("mine/notes.txt", "x\n")),
    Case("convert_bad_direction", convert("sideways", "hf", "ck"), "direction"),
]

CASES = CONFIG_VALUES + YAML_FILES + OVERRIDES + PREPARE + TOKEN_FILES + LAUNCH + ALIGN + CONVERT


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("bad-inputs") / "ws")


def test_cases_are_many_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 100, len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert commands == {"train", "prepare-data", "launch", "align", "convert"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case, template, tmp_path, monkeypatch, capfd):
    print(refused_cleanly(case, template, tmp_path, monkeypatch, capfd))


@pytest.mark.parametrize("argv,expected,setup", [
    (launch("--nproc", "2", "job.yaml", "data.train=[{path: data/nope}]"), "data/nope.idx", None),
    (align("pipeline.yaml", "--nproc", "2"), "rows/pref.jsonl:1",
     _write("rows/pref.jsonl", '{"prompt": "a", "chosen": null, "rejected": "c"}\n')),
    (launch("--slurm", "--cpu", "--gpus-per-node", "2", "--out", "job.yaml", "job.yaml"), "job.yaml", None),
], ids=["launch_nproc", "align_nproc", "slurm_out"])
def test_the_real_command_refuses_before_any_rank(argv, expected, setup, template, tmp_path):
    """The same promise through the installed entry point in its own process: torchrun is never started (its
    command line would be printed first), and the one line is all there is."""
    import sys
    ws = copy_workspace(template, tmp_path / "ws")
    if setup is not None:
        setup(ws)
    before = _snapshot(ws)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    # the timeout only turns a hang into a failure
    result = subprocess.run([sys.executable, "-m", "launch", *argv], cwd=ws, env=env, capture_output=True,
                            text=True, timeout=600)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith("herd: error: ") and expected in lines[0], lines[0]
    assert _snapshot(ws) == before
