"""`herd align`'s up-front refusals (align/pipeline.py, engine/config.py load_pipeline), checked without training:
a DONE.json is trusted only when it records this stage of this pipeline with the same job and inputs and its
outputs still exist; overrides cannot replace a stage's own fields; references that cannot resolve in round 1, a
real input file beside an "@stage" one, and inputs that are not regular files are refused before any stage runs.
Stages "run" here through a stand-in for PipelineRunner._run_stage that only leaves a checkpoint behind."""

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from align.formats import AlignDataError
from align.pipeline import Outputs, PipelineRunner
from engine.config import StageConfig, load_pipeline
from engine.data.tokenizer import train_bpe
from engine.errors import ConfigError

TEXTS = ["What is two plus two? It is four. Be brief, answer the user. " * 4, "def f(x):\n    return x\n"]


def msg(role, content):
    return {"role": role, "content": content}


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_checks")
    train_bpe(TEXTS * 4, vocab_size=400, out_path=str(root / "tok.json"))
    job = root / "job.yaml"
    job.write_text(f"""
model: {{dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, vocab_size: 512, max_seq_len: 128}}
data: {{tokenizer: {{path: {root}/tok.json}}, seq_len: 64, micro_batch_size: 2, global_batch_size: 2}}
train: {{steps: 2, dtype: fp32, device: cpu}}
log: {{tensorboard: false}}
""")
    question = "What is two plus two?"
    sft = write_rows(root / "sft.jsonl", [{"messages": [msg("user", question), msg("assistant", "Four.")]}] * 3)
    pref = write_rows(root / "pref.jsonl", [{"prompt": question, "chosen": "Four.", "rejected": "Five."}] * 3)
    prompts = write_rows(root / "prompts.jsonl", [{"prompt": "What is two plus two?"}] * 2)
    return {"job": job, "sft": sft, "pref": pref, "prompts": prompts, "root": root}


def pipeline_file(files, tmp_path: Path, stages: str, name: str = "test") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: {files['job']}\nrun_dir: {tmp_path / 'run'}\nstages:\n{stages}")
    return path


def sft_rm_stages(files) -> str:
    return (f"  - {{name: sft, kind: sft, data: {files['sft']}}}\n"
            f"  - {{name: rm, kind: rm, data: {files['pref']}}}\n")


def fake_checkpoint(root: Path) -> Path:
    """A complete checkpoint as the store recognises one: a step directory whose marker holds its manifest's hash."""
    step = root / "step_00000002"
    step.mkdir(parents=True, exist_ok=True)
    raw = b'{"lineage": ""}'
    (step / "manifest.json").write_bytes(raw)
    (step / "COMMITTED").write_text(hashlib.sha256(raw).hexdigest())
    return root


@pytest.fixture
def stand_in(monkeypatch):
    """PipelineRunner._run_stage replaced: it records which stages ran and leaves a checkpoint, trains nothing."""
    ran = []

    def run_stage(self, stage, stage_id):
        ran.append(stage_id)
        root = fake_checkpoint(self.run_dir / stage_id / "checkpoints")
        return {"stage": stage_id, "kind": stage.kind, "checkpoints": str(root), "steps": 2}

    monkeypatch.setattr(PipelineRunner, "_run_stage", run_stage)
    return ran


def run(path: Path, overrides=()):
    return PipelineRunner(load_pipeline(str(path), list(overrides)), stream=open(os.devnull, "w")).run()


def test_outputs_record_the_kind_a_stage_was_finished_as():
    outputs = Outputs()
    outputs.record(StageConfig(name="sft", kind="sft"), {"kind": "rm", "checkpoints": "/ckpt"})
    assert outputs.latest_reward == "/ckpt" and outputs.latest_policy == ""


def test_a_done_of_another_kind_or_pipeline_is_refused_before_anything_runs(files, tmp_path, stand_in):
    """Another pipeline's run_dir: its sft stage's DONE.json must not pass for this pipeline's dpo stage named sft
    (a reward model's checkpoint became the policy)."""
    run(pipeline_file(files, tmp_path, sft_rm_stages(files), name="first"))
    assert stand_in == ["r1-sft", "r1-rm"]
    swapped = pipeline_file(files, tmp_path, f"  - {{name: sft, kind: dpo, data: {files['pref']}}}\n"
                                             f"  - {{name: rm, kind: sft, data: {files['sft']}}}\n", name="second")
    with pytest.raises(ConfigError, match=r"run/r1-sft/DONE\.json: stage sft was finished as kind sft of pipeline "
                                          r"first; pipeline second runs it as kind dpo") as info:
        run(swapped)
    assert "\n" not in str(info.value) and stand_in == ["r1-sft", "r1-rm"]
    renamed = pipeline_file(files, tmp_path, sft_rm_stages(files), name="third")
    with pytest.raises(ConfigError, match=r"r1-sft/DONE\.json: stage sft was finished by pipeline first, not by third"):
        run(renamed)
    assert stand_in == ["r1-sft", "r1-rm"]


def test_a_done_whose_stage_trained_other_settings_or_inputs_is_refused(files, tmp_path, stand_in):
    data = write_rows(tmp_path / "sft.jsonl", [{"messages": [msg("user", "q"), msg("assistant", "a")]}] * 2)
    path = pipeline_file(files, tmp_path, f"  - {{name: sft, kind: sft, data: {data}}}\n")
    run(path)
    run(path)  # unchanged: skipped
    assert stand_in == ["r1-sft"]
    with pytest.raises(ConfigError, match=r"r1-sft/DONE\.json: stage sft was finished with other settings or inputs "
                                          r"\(job\.model\.dim: 32 then, 64 now; job\.model\.n_heads"):
        run(path, ["overrides=[model.dim=64,model.n_heads=4]"])
    with pytest.raises(ConfigError, match=r"\(job\.train\.steps: 2 then, 3 now\)"):
        run(path, ["stages.sft.overrides=[train.steps=3]"])
    write_rows(data, [{"messages": [msg("user", "q"), msg("assistant", "b")]}] * 2)
    with pytest.raises(ConfigError, match=r"other settings or inputs \(data: 'sha256:"):
        run(path)
    write_rows(data, [{"messages": [msg("user", "q"), msg("assistant", "a")]}] * 2)  # as it was
    run(path, ["overrides=[parallel.activation_checkpointing=full,log.every=5]"])  # layout and logs: same stage
    assert stand_in == ["r1-sft"]
    done_path = tmp_path / "run" / "r1-sft" / "DONE.json"
    done = json.loads(done_path.read_text())
    del done["trained_on"]["job.optim.lr"]  # as a herd of another version recorded it: a key added or dropped
    done["trained_on"]["job.some_removed_section.key"] = 1
    done_path.write_text(json.dumps(done))
    run(path)  # changes no finished stage
    assert stand_in == ["r1-sft"]


def test_a_done_written_before_fingerprints_is_still_accepted_but_not_one_naming_missing_checkpoints(
        files, tmp_path, stand_in):
    path = pipeline_file(files, tmp_path, sft_rm_stages(files))
    root = fake_checkpoint(tmp_path / "elsewhere")
    for stage, kind in (("sft", "sft"), ("rm", "rm")):  # as herd wrote DONE.json before this change
        (tmp_path / "run" / f"r1-{stage}").mkdir(parents=True)
        (tmp_path / "run" / f"r1-{stage}" / "DONE.json").write_text(json.dumps(
            {"stage": f"r1-{stage}", "kind": kind, "checkpoints": str(root), "steps": 2}))
    outputs = run(path)
    assert stand_in == [] and outputs.latest_policy == str(root) and outputs.latest_reward == str(root)
    done = tmp_path / "run" / "r1-rm" / "DONE.json"
    done.write_text(json.dumps({"stage": "r1-rm", "kind": "rm", "checkpoints": str(tmp_path / "gone")}))
    with pytest.raises(ConfigError, match=r"r1-rm/DONE\.json: the checkpoints .*gone it names hold no complete "
                                          r"checkpoint"):
        run(path)
    assert stand_in == []


@pytest.mark.parametrize("make, what", [
    (lambda p: p.write_text("garbage{"), "cannot be read as JSON"),
    (lambda p: p.write_text("[1, 2]"), "is not a JSON object recording stage r1-rm"),
    (lambda p: p.write_text('{"stage": "r1-other", "kind": "rm"}'), "is not a JSON object recording stage r1-rm"),
    (lambda p: p.write_bytes(b"\xff\xfe"), "cannot be read as JSON"),
    (lambda p: p.mkdir(), "is a directory, not a regular file"),
    (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a symlink to /dev/zero, a character device"),
])
def test_a_done_that_herd_did_not_write_is_one_line_naming_it_before_anything_runs(files, tmp_path, stand_in,
                                                                                   make, what):
    (tmp_path / "run" / "r1-rm").mkdir(parents=True)
    make(tmp_path / "run" / "r1-rm" / "DONE.json")
    with pytest.raises(ConfigError, match=r"run/r1-rm/DONE\.json: " + what) as info:
        run(pipeline_file(files, tmp_path, sft_rm_stages(files)))
    assert "\n" not in str(info.value) and "not a DONE.json herd wrote" in str(info.value)
    assert stand_in == []  # refused before the first stage, not after it


@pytest.mark.parametrize("where, item, key", [
    ("stage", "align.kind=rm", "align.kind"),
    ("stage", "align.train_file=/tmp/other.jsonl", "align.train_file"),
    ("stage", "align.valid_file=/tmp/other.jsonl", "align.valid_file"),
    ("stage", "checkpoint.load_weights=/tmp", "checkpoint.load_weights"),
    ("stage", "'align={kind: rm}'", "align.kind"),
    ("pipeline", "align.kind=rm", "align.kind"),
    ("pipeline", "log.name=x", "log.name"),
])
def test_overrides_that_set_a_stages_own_fields_are_refused(files, tmp_path, where, item, key):
    stages = f"  - {{name: dpo, kind: dpo, data: {files['pref']}, overrides: [train.steps=2]}}\n"
    override = f"stages.dpo.overrides=[{item}]" if where == "stage" else f"overrides=[{item}]"
    runner = PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, stages)), [override]))
    expected = "stages.dpo.overrides" if where == "stage" else "overrides"
    with pytest.raises(ConfigError, match=rf"^{expected}: '.*' sets {key}, which the pipeline sets itself"):
        runner.check()


def test_a_stage_of_another_model_shape_is_refused_up_front(files, tmp_path):
    stages = sft_rm_stages(files) + (f"  - {{name: dpo, kind: dpo, data: {files['pref']}, "
                                     f"overrides: [model.dim=64, model.n_heads=4]}}\n")
    runner = PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, stages))))
    with pytest.raises(ConfigError, match=r"^stages\.dpo: model\.dim is 64 here but 32 in stage sft"):
        runner.check()


@pytest.mark.parametrize("stages, key, what", [
    ("  - {name: a, kind: sft, data: SFT}\n  - {name: b, kind: sft, data: '@rs'}\n"
     "  - {name: rm, kind: rm, data: PREF}\n  - {name: rs, kind: rejection_sampling, prompts: PROMPTS}\n",
     "stages.b.data", "'@rs' is a later stage"),
    ("  - {name: a, kind: sft, data: SFT, init: '@b'}\n  - {name: b, kind: sft, data: SFT, init: '@a'}\n",
     "stages.a.init", "'@b' is a later stage"),
    ("  - {name: a, kind: sft, data: SFT, init: '@a'}\n", "stages.a.init", "'@a' is this stage itself"),
])
def test_references_that_cannot_resolve_in_round_one_are_refused_by_load_pipeline(files, tmp_path, stages, key,
                                                                                   what):
    for name, value in (("SFT", files["sft"]), ("PREF", files["pref"]), ("PROMPTS", files["prompts"])):
        stages = stages.replace(name, str(value))
    with pytest.raises(ConfigError, match=rf"^{key}: {what}"):
        load_pipeline(str(pipeline_file(files, tmp_path, stages)), ["rounds=2"])


def test_rejection_sampling_without_a_reward_model_or_policy_is_refused_by_load_pipeline(files, tmp_path):
    """No rm stage before it and no `reward:`; or no policy at all: refused before the sft stage trains. Named
    checkpoint roots are enough."""
    rs = f"  - {{name: rs, kind: rejection_sampling, prompts: {files['prompts']}}}\n"
    sft = f"  - {{name: a, kind: sft, data: {files['sft']}}}\n"
    rm = f"  - {{name: rm, kind: rm, data: {files['pref']}}}\n"
    with pytest.raises(ConfigError, match=r"^stages\.rs\.reward: rejection sampling needs a reward model: no rm stage "
                                          r"comes before this one"):
        load_pipeline(str(pipeline_file(files, tmp_path, sft + rs + rm)))
    with pytest.raises(ConfigError, match=r"^stages\.rs\.init: rejection sampling needs a policy"):
        load_pipeline(str(pipeline_file(files, tmp_path, rm + rs)))
    root = fake_checkpoint(tmp_path / "ckpt")
    load_pipeline(str(pipeline_file(files, tmp_path, rs.replace("}\n", f", reward: {root}, init: {root}}}\n"))))


@pytest.mark.parametrize("bad_field", ["data", "valid"])
def test_a_real_file_beside_an_at_reference_is_read_up_front(files, tmp_path, bad_field):
    bad = write_rows(tmp_path / "bad.jsonl", [{"messages": [msg("user", "q"), msg("assistant", "a")]},
                                              {"text": "not a chat row"}])
    other = {"data": "valid", "valid": "data"}[bad_field]
    stages = sft_rm_stages(files) + (f"  - {{name: rs, kind: rejection_sampling, prompts: {files['prompts']}, "
                                     f"max_new_tokens: 8}}\n  - {{name: b, kind: sft, {bad_field}: {bad}, "
                                     f"{other}: '@rs'}}\n")
    runner = PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, stages))))
    runner.check()
    with pytest.raises(AlignDataError, match=r"bad\.jsonl:2: expected 'messages'"):
        runner.check_inputs()


@pytest.mark.parametrize("field", ["data", "valid", "prompts"])
@pytest.mark.parametrize("make, what", [
    (lambda p: os.mkfifo(p), "is a FIFO, not a regular file"),
    (lambda p: p.mkdir(), "is a directory, not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a symlink to /dev/zero, a character device, not a regular file"),
])
def test_an_input_that_is_not_a_regular_file_is_named_for_what_it_is_under_the_stage_key(files, tmp_path, field,
                                                                                        make, what):
    odd = tmp_path / "odd"
    make(odd)
    stage = {"data": f"{{name: s, kind: sft, data: {odd}}}", "valid": f"{{name: s, kind: sft, data: {files['sft']}, "
                                                                     f"valid: {odd}}}",
             "prompts": f"{{name: s, kind: rejection_sampling, prompts: {odd}, init: {tmp_path}, "
                        f"reward: {tmp_path}}}"}[field]
    runner = PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, f"  - {stage}\n"))))
    runner.check()
    with pytest.raises(ConfigError, match=rf"^stages\.s\.{field}: {odd} {what}$"):
        runner.check_inputs()


def test_a_plain_run_names_a_fifo_for_what_it_is(files, tmp_path):
    """`herd train JOB align.kind=sft align.train_file=FIFO` and rejection sampling's prompt reader, outside a
    pipeline: not "does not exist"."""
    from align.inputs import check_job_inputs, check_prompts
    from engine.config import load_config
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg = load_config(str(files["job"]), ["align.kind=sft", f"align.train_file={files['sft']}",
                                          f"align.valid_file={fifo}"])
    with pytest.raises(ConfigError, match=rf"^align\.valid_file: {fifo} is a FIFO, not a regular file$"):
        check_job_inputs(cfg)
    with pytest.raises(ConfigError, match=rf"^stages\.rs\.prompts: {fifo} is a FIFO, not a regular file$"):
        check_prompts(cfg, str(fifo), 8, key="stages.rs.prompts")


@pytest.mark.parametrize("where", ["pipeline", "stage"])
def test_an_init_directory_without_a_checkpoint_is_refused_up_front(files, tmp_path, where):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    stage_init = f", init: {empty}" if where == "stage" else ""
    path = pipeline_file(files, tmp_path, f"  - {{name: sft, kind: sft, data: {files['sft']}{stage_init}}}\n")
    if where == "pipeline":
        path.write_text(path.read_text().replace("stages:\n", f"init: {empty}\nstages:\n"))
    runner = PipelineRunner(load_pipeline(str(path)), stream=open(os.devnull, "w"))
    key = "init" if where == "pipeline" else "stages.sft.init"
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*not-a-checkpoint holds no complete checkpoint"):
        runner.check_inputs()  # it used to fail when the stage began, leaving its directories behind
    fake_checkpoint(empty)
    runner.check_inputs()


@pytest.mark.parametrize("stage,key", [
    ("{name: a, kind: sft, data: DATA, prompts: DATA}", "stages[0].prompts: a sft stage does not use it"),
    ("{name: a, kind: dpo, data: DATA, reward: /some/rm}", "stages[0].reward: a dpo stage does not use it"),
    ("{name: a, kind: rejection_sampling, prompts: DATA, data: DATA, reward: /r, init: /p}",
     "stages[0].data: a rejection_sampling stage does not use it"),
])
def test_fields_a_stage_kind_does_not_use_are_refused(files, tmp_path, stage, key):
    path = pipeline_file(files, tmp_path, "  - " + stage.replace("DATA", str(files["sft"])) + "\n")
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_pipeline(str(path))  # they were silently ignored


@pytest.mark.parametrize("stage,key", [
    ("{name: a, kind: sft, data: DATA, samples: 8}", "stages[0].samples: a sft stage does not use it"),
    ("{name: a, kind: dpo, data: DATA, temperature: 0.3}", "stages[0].temperature: a dpo stage does not use it"),
    ("{name: a, kind: rejection_sampling, prompts: DATA, init: /p, reward: /r, samples: 100000}",
     "stages[0].samples: must be between 1 and 256"),
    ("{name: a, kind: rejection_sampling, prompts: DATA, init: /p, reward: /r, samples: 4, temperature: 0}",
     "stages[0].temperature: 0 (greedy) gives 4 identical samples"),
])
def test_sampling_fields_out_of_place_or_range_are_refused(files, tmp_path, stage, key):
    """Found by helper H44: sampling fields on a training stage were ignored, a huge samples ended in a
    MemoryError traceback, and greedy sampling drew K identical answers."""
    path = pipeline_file(files, tmp_path, "  - " + stage.replace("DATA", str(files["sft"])) + "\n")
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_pipeline(str(path))


def test_a_stage_with_another_tokenizer_is_refused_up_front(files, tmp_path):
    """Weights handed on read one tokenizer's ids; another of the same size trained DPO on other text (H44)."""
    train_bpe(["zebra quartz jumps over"] * 40, vocab_size=400, out_path=str(tmp_path / "other.json"))
    stages = sft_rm_stages(files) + (f"  - {{name: dpo, kind: dpo, data: {files['pref']}, "
                                     f"overrides: [data.tokenizer.path={tmp_path / 'other.json'}]}}\n")
    runner = PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, stages))))
    with pytest.raises(ConfigError, match=r"^stages\.dpo: data\.tokenizer is hf .*other\.json here but hf "
                                          r".*tok\.json in stage sft"):
        runner.check()
    import shutil  # a copy of the same tokenizer elsewhere is the same tokenizer (its mapping, not its path)
    shutil.copy(files["root"] / "tok.json", tmp_path / "copy.json")
    stages = sft_rm_stages(files) + (f"  - {{name: dpo, kind: dpo, data: {files['pref']}, "
                                     f"overrides: [data.tokenizer.path={tmp_path / 'copy.json'}]}}\n")
    PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, stages, "copy")))).check()


def test_max_new_tokens_without_room_is_said_of_the_setting(files, tmp_path):
    """It was reported as 'no usable prompt (skipped 2 prompt_too_long)' (H44); seq_len is 64 here."""
    stages = sft_rm_stages(files) + (f"  - {{name: rs, kind: rejection_sampling, prompts: {files['prompts']}, "
                                     f"max_new_tokens: 63}}\n")
    runner = PipelineRunner(load_pipeline(str(pipeline_file(files, tmp_path, stages))))
    runner.check()
    with pytest.raises(ConfigError, match=r"^stages\.rs\.max_new_tokens: 63 leaves no room for a prompt within "
                                          r"data\.seq_len=64"):
        runner.check_inputs()
