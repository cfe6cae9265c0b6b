"""`herd average` across layouts (issue 18, item 4): a checkpoint written by one process and one written under
tp=2 on 2 gloo ranks average, bitwise, to the defined mean (float64 sums in source order, one rounding to fp32) of
the weights the ranks held, consolidated."""

import io

import torch

from engine.checkpoint.average import average_checkpoints
from engine.checkpoint.hf_export import load_weights
from engine.checkpoint.manifest import model_config_of
from engine.checkpoint.store import CheckpointStore
from engine.run import build_trainer
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus  # noqa: F401 (fixture)
from tests.distributed.test_parity_4d import layout
from tests.helpers import parity_config

SAVE = ["train.steps=2", "checkpoint.every=2"]


def test_checkpoints_of_different_layouts_average_to_the_mean_of_their_weights(corpus, tmp_path):  # noqa: F811
    one = build_trainer(parity_config(corpus, tmp_path / "one", SAVE), stream=io.StringIO())
    one.fit()
    held = [{n: p.detach().clone() for n, p in one.module.model.named_parameters()}]
    layouts = [layout(tp=2)]
    results = run_on_ranks(ranks.train_layouts, 2, str(corpus), str(tmp_path / "w2"),
                           [SAVE + lay for lay in layouts], timeout=600)[0]
    held += [result["params"] for result in results]  # what the ranks held, consolidated on rank 0
    roots = [tmp_path / "one" / "p" / "checkpoints"] + \
        [tmp_path / "w2" / f"layout{i}" / "p" / "checkpoints" for i in range(len(layouts))]
    out = average_checkpoints(roots, tmp_path / "avg")
    store = CheckpointStore(out)
    manifest = store.verify(0)
    averaged = load_weights(store, 0, manifest, model_config_of(manifest, store.step_dir(0) / "manifest.json"))
    averaged = dict(averaged.named_parameters())
    assert averaged.keys() == held[0].keys() and all(h.keys() == held[0].keys() for h in held)
    for name in held[0]:
        total = held[0][name].double()
        for other in held[1:]:
            total = total + other[name].double()
        assert torch.equal(averaged[name], (total / len(held)).float()), name
    # the layouts' weights differ (another order of sums), so the average is a mean of two different tensors
    differs = max((held[0][n] - held[1][n]).abs().max().item() for n in held[0])
    print(f"one process vs tp=2 after 2 steps: max |weight diff| {differs:.2e}")
