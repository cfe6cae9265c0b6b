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
