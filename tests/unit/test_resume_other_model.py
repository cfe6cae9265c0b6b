"""Resuming a run's checkpoint with another model is refused (found by a bad-input hunt, helper H38): with fewer
layers only the layers both have were loaded, and with other head counts of the same width every tensor loaded
into the same shape but meant something else; both resumed "from step 2" without a word."""

import io

import pytest

from engine.checkpoint.store import CheckpointError
from engine.run import build_trainer
from tests.helpers import make_corpus, tiny_config

RUN = ["log.name=r", "train.steps=2", "checkpoint.every=2", "train.eval_every=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("change,key", [(["model.n_layers=1"], "model.n_layers=2, this run's has 1"),
                                        (["model.n_heads=8", "model.n_kv_heads=4"], "model.n_heads=4, this run's has 8")])
def test_a_checkpoint_of_another_model_is_not_resumed(corpus, tmp_path, change, key):
    build_trainer(tiny_config(corpus, tmp_path, RUN), io.StringIO()).fit()
    again = tiny_config(corpus, tmp_path, RUN + ["train.steps=4", *change])
    with pytest.raises(CheckpointError, match=rf"step_00000002: the checkpoint holds a model with {key}"):
        build_trainer(again, io.StringIO())
    trainer = build_trainer(tiny_config(corpus, tmp_path, RUN + ["train.steps=4"]), io.StringIO())
    assert trainer.state.step == 2  # the same model resumes as before


def test_a_checkpoint_of_another_sequence_length_is_not_resumed(corpus, tmp_path):
    """The loader resumes at a sample count; at another data.seq_len it would cut the stream elsewhere (retraining
    or skipping data). Found by helper H40's hunt; a recipe's later stage changes it through data.stages."""
    build_trainer(tiny_config(corpus, tmp_path, RUN), io.StringIO()).fit()
    cfg = tiny_config(corpus, tmp_path, RUN + ["train.steps=4"])
    other = tiny_config(corpus, tmp_path, RUN + ["train.steps=4", f"data.seq_len={cfg.data.seq_len // 2}"])
    with pytest.raises(CheckpointError, match=rf"step_00000002: the checkpoint trained at data.seq_len="
                                              rf"{cfg.data.seq_len}, this run has {cfg.data.seq_len // 2}; its "):
        build_trainer(other, io.StringIO())
    assert build_trainer(cfg, io.StringIO()).state.step == 2  # the same length resumes as before
