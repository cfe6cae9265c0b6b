"""What a checkpoint's weights were trained on travels with it (meta.identity) and is checked where it is used
(found by a bad-input hunt, helper H44): a resumed DPO stage applied the reference log-probs of its old rows to
edited rows by index, and an SFT stage continued a replaced file at the old one's sample count; weights trained
with one tokenizer were loaded (load_weights, a DPO reference, rejection sampling's policy and reward model)
under another of the same size, reading every id as other text. All of it ran to rc 0."""

import io
import json
from pathlib import Path

import pytest

from align.run import build_stage_trainer
from engine.checkpoint.store import CheckpointError
from engine.data.tokenizer import train_bpe
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config


def msg(role, content):
    return {"role": role, "content": content}


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def preference_rows(swap: bool = False):
    rows = []
    for i in range(8):
        good, bad = f"The answer is {i}.", f"No idea about {i}."
        rows.append({"prompt": f"What is {i}?", "chosen": bad if swap else good, "rejected": good if swap else bad})
    return rows


def stage(corpus, tmp_path, kind, rows, steps, extra=()):
    return tiny_config(corpus, tmp_path / "runs", [
        f"align.kind={kind}", f"align.train_file={rows}", "data.seq_len=64", f"train.steps={steps}",
        "train.eval_every=0", "checkpoint.every=1", "log.tensorboard=false", "schedule.warmup_steps=0",
        *extra])


@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_a_stage_resumed_on_edited_rows_is_refused(corpus, tmp_path, kind):
    if kind == "dpo":
        rows, edited = preference_rows(), preference_rows(swap=True)
    else:
        rows = [{"messages": [msg("user", f"Say {i}."), msg("assistant", f"{i}.")]} for i in range(8)]
        edited = [{"messages": [msg("user", "Something else."), msg("assistant", "Yes.")]}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    build_stage_trainer(stage(corpus, tmp_path, kind, path, 2, ["train.steps=1"]), io.StringIO()).fit()
    write_rows(path, edited)
    with pytest.raises(CheckpointError, match=r"step_00000001: the checkpoint was trained on other rows "
                                              r"\(align\.train_file changed"):
        build_stage_trainer(stage(corpus, tmp_path, kind, path, 2), io.StringIO())
    write_rows(tmp_path / "moved.jsonl", rows)  # the same rows under another name resume as before
    trainer = build_stage_trainer(stage(corpus, tmp_path, kind, tmp_path / "moved.jsonl", 2), io.StringIO())
    assert trainer.state.step == 1


def test_weights_of_another_tokenizer_are_refused(corpus, tmp_path):
    """Another BPE of the same size (so every shape agrees) trained on other text: another token -> id mapping."""
    build_trainer(tiny_config(corpus, tmp_path / "runs", ["log.name=base", "train.steps=2", "train.eval_every=0",
                                                          "checkpoint.every=2"]), io.StringIO()).fit()
    ours = json.loads((corpus / "tok.json").read_text())
    other = train_bpe([f"zebra {i} quartz {i * 7} jumps" for i in range(300)], len(ours["model"]["vocab"]),
                      str(tmp_path / "other.json"))
    assert other.vocab_size <= 512
    base = tmp_path / "runs" / "base" / "checkpoints"
    rows = write_rows(tmp_path / "rows.jsonl", [{"messages": [msg("user", f"Say {i}."), msg("assistant", f"{i}.")]}
                                                for i in range(8)])
    sft = ["train.steps=2", "train.eval_every=0", "align.kind=sft", f"align.train_file={rows}", "data.seq_len=64",
           f"checkpoint.load_weights={base}"]
    with pytest.raises(CheckpointError, match=r"the checkpoint was trained with another tokenizer"):
        build_stage_trainer(tiny_config(corpus, tmp_path / "runs", [
            "log.name=other", *sft, f"data.tokenizer.path={tmp_path / 'other.json'}"]), io.StringIO())
    trainer = build_stage_trainer(tiny_config(corpus, tmp_path / "runs", ["log.name=same", *sft]), io.StringIO())
    assert trainer.state.step == 0  # the same tokenizer loads as before


def test_a_checkpoint_of_the_other_kind_is_refused_before_sampling(corpus, tmp_path):
    """A policy named as the reward model (or the other way round) failed with a shape error naming neither the
    key nor the kind, after every sample had been generated (H44); the head's shape is read from the metadata."""
    from align.rejection import check_model_kind
    from engine.errors import ConfigError
    build_trainer(tiny_config(corpus, tmp_path / "runs", ["log.name=lm", "train.steps=2", "train.eval_every=0",
                                                          "checkpoint.every=2"]), io.StringIO()).fit()
    policy = tmp_path / "runs" / "lm" / "checkpoints"
    check_model_kind(policy, False, "init")
    with pytest.raises(ConfigError, match=r"^stages\.rs\.reward: .*checkpoints holds a policy \(its output head is "
                                          r"512 x \d+\), not a reward model$"):
        check_model_kind(policy, True, "stages.rs.reward")
    rows = write_rows(tmp_path / "pref.jsonl", preference_rows())
    build_stage_trainer(stage(corpus, tmp_path, "rm", rows, 1, ["log.name=rm"]), io.StringIO()).fit()
    reward = tmp_path / "runs" / "rm" / "checkpoints"
    check_model_kind(reward, True, "reward")
    with pytest.raises(ConfigError, match=r"^init: .*holds a reward model \(its output head is 1 x \d+\), not a "
                                          r"policy"):
        check_model_kind(reward, False, "init")
    from engine.checkpoint.sharded import saved_shape
    from engine.checkpoint.store import CheckpointStore
    step = CheckpointStore(policy).step_dir(CheckpointStore(policy).latest_step())
    shard = next(p for p in step.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(bytes(len(shard.read_bytes())))  # same size, other bytes: only a full verify sees it
    assert saved_shape(policy, "model.output.weight")[0] == 512  # the look reads .metadata, not every shard (H47)
