"""Layout parity (shared/TESTING.md): every tensor/sequence/data-parallel layout trains like one process.

The reference trains the parity model (tests/helpers.py) for 5 steps on one process; each layout trains the same
global batches from the same seed on gloo ranks, with gradient accumulation of 2 or more micro-batches, and
clipping active (max norm 0.5). In fp32 the per-step losses and every final parameter must match within 1e-5
relative (parameters: per-tensor L2 norm of the difference over the norm of the reference). So must the validation
loss the run's EvalCallback logs before the first step and after the last (shared/TESTING.md R22), and the dp
ranks' shares of the validation set must add up to exactly the one-process set. The sums are taken in another
order (over ranks, over vocabulary shards), so equality is not bitwise; the figures are printed.
"""

import io

import pytest

from engine.run import build_trainer
from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.helpers import make_corpus, parity_config, parity_eval

LAYOUTS_2 = [
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=false"],
    ["parallel.dp_shard=2"],
    ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    ["parallel.dp_shard=2", "parallel.activation_checkpointing=full", "parallel.reshard_after_forward=false"],
]
LAYOUTS_4 = [
    ["parallel.tp=2", "parallel.dp_shard=2"],
    ["parallel.tp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.sequence_parallel=false",
     "parallel.activation_checkpointing=selective"],
    ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.activation_checkpointing=full"],
    ["parallel.tp=4"],
    ["parallel.dp_shard=4"],
]
LAYOUTS_8 = [
    ["parallel.tp=2", "parallel.dp_shard=2", "parallel.dp_replicate=2"],
    ["parallel.tp=4", "parallel.dp_shard=2", "parallel.sequence_parallel=false"],
    ["parallel.tp=2", "parallel.dp_shard=4", "parallel.activation_checkpointing=full"],
    ["parallel.dp_replicate=2", "parallel.dp_shard=4"],
    ["parallel.tp=4", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
]


def full_matrix(world_size: int) -> list:
    """Every layout of tp in {1,2,4} x dp_shard in {1,2,4} x dp_replicate in {1,2} with this world size, with
    sequence parallelism on and off (where tp > 1) and activation checkpointing off and full."""
    layouts = []
    for tp in (1, 2, 4):
        for shard in (1, 2, 4):
            for replicate in (1, 2):
                if tp * shard * replicate != world_size:
                    continue
                base = [f"parallel.tp={tp}", f"parallel.dp_shard={shard}", f"parallel.dp_replicate={replicate}"]
                for sp in ((True, False) if tp > 1 else (True,)):
                    for ac in ("none", "full"):
                        layouts.append(base + [f"parallel.sequence_parallel={str(sp).lower()}",
                                               f"parallel.activation_checkpointing={ac}"])
    return layouts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def train_reference(corpus, run_dir, overrides=(), evaluate=False) -> dict:
    """The single-process run every layout is compared with: per-step losses and final parameters; with
    `evaluate`, also the validation loss its EvalCallback logged and the samples it evaluated (ranks.train_layouts)."""
    overrides = list(overrides) + (parity_eval(corpus) if evaluate else [])
    trainer = build_trainer(parity_config(corpus, run_dir, overrides), stream=io.StringIO())
    recorder = ranks.Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    out = {"losses": [m["loss"] for m in recorder.steps], "params": trainer.module.parallel.full_parameters()}
    if evaluate:
        out.update(eval=ranks.logged_eval(trainer, recorder), eval_ids=ranks.eval_sample_ids(trainer))
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    return train_reference(corpus, tmp_path_factory.mktemp("ref"), evaluate=True)


def check_against_reference(name: str, result: dict, reference: dict) -> None:
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
    param_err = max(((result["params"][k] - v).norm() / v.norm()).item() for k, v in reference["params"].items())
    # the validation loss as logged (EvalCallback), before the first step and after the last
    eval_err = max(abs(a - b) / b for a, b in zip(result["eval"], reference["eval"]))
    print(f"{name}: max relative loss error {loss_err:.2e}, max relative parameter error {param_err:.2e}, "
          f"validation loss error {eval_err:.2e} ({result.get('seconds', 0):.1f} s)")
    # the dp ranks' shares of the validation set add up to the one-process set: each sample exactly once
    assert result["eval_ids"] == reference["eval_ids"] == sorted(set(reference["eval_ids"]))
    assert eval_err < 1e-5
    assert len(result["losses"]) == len(reference["losses"]) == 5
    assert set(result["params"]) == set(reference["params"])
    assert all(result["params"][k].shape == v.shape for k, v in reference["params"].items())
    assert loss_err < 1e-5, (result["losses"], reference["losses"])
    assert param_err < 1e-5


def run_world(world_size, layouts, corpus, tmp_path, reference, held_share=None):
    results = run_on_ranks(ranks.train_layouts, world_size, str(corpus), str(tmp_path), layouts, True,
                           timeout=1800)
    total = sum(v.numel() for v in reference["params"].values())
    for index, layout in enumerate(layouts):
        check_against_reference(" ".join(layout), results[0][index], reference)
        for rank_result in results[1:]:  # every rank logs the same loss and validation loss
            assert rank_result[index]["losses"] == results[0][index]["losses"]
            assert rank_result[index]["eval"] == results[0][index]["eval"]
        # each rank holds about 1/(tp * dp_shard) of the model (plus replicated norms, padding, shared KV heads)
        degrees = {o.split("=")[0]: int(o.split("=")[1]) for o in layout if o.split("=")[1].isdigit()}
        split = degrees.get("parallel.tp", 1) * degrees.get("parallel.dp_shard", 1)
        held = max(r[index]["local_numel"] for r in results)
        share = held_share(degrees) if held_share is not None else 1.1 / split
        assert held <= share * total, (layout, held, total)


def test_reference_changes_weights(reference):
    assert reference["losses"][-1] < reference["losses"][0]


def test_two_rank_layouts(corpus, tmp_path, reference):
    run_world(2, LAYOUTS_2, corpus, tmp_path, reference)


def test_four_rank_layouts(corpus, tmp_path, reference):
    run_world(4, LAYOUTS_4, corpus, tmp_path, reference)


@pytest.mark.slow
def test_eight_rank_layouts(corpus, tmp_path, reference):
    run_world(8, LAYOUTS_8, corpus, tmp_path, reference)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_full_matrix(corpus, tmp_path, reference, world_size):
    run_world(world_size, full_matrix(world_size), corpus, tmp_path, reference)


BF16_LAYOUTS = [["parallel.tp=2", "train.dtype=bf16"], ["parallel.dp_shard=2", "train.dtype=bf16"]]
# bf16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3 per operation). Under tp the partial sums of the
# row-parallel projections are rounded to bf16 before they are added, and under FSDP parameters are cast once per
# step instead of per operation by autocast, so results drift by a few roundings per step: losses are held to
# 1e-2 relative, and parameters (fp32 masters; Adam turns tiny gradient differences of rarely used rows into
# whole steps of about lr = 1e-3) to 1e-2 relative.
BF16_TOLERANCE = 1e-2


def test_bf16_layouts_within_stated_tolerance(corpus, tmp_path, tmp_path_factory):
    reference = train_reference(corpus, tmp_path_factory.mktemp("ref16"), ["train.dtype=bf16"])
    results = run_on_ranks(ranks.train_layouts, 2, str(corpus), str(tmp_path), BF16_LAYOUTS, timeout=900)[0]
    for layout, result in zip(BF16_LAYOUTS, results):
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
        param_err = max(((result["params"][k] - v).norm() / v.norm()).item()
                        for k, v in reference["params"].items())
        print(f"bf16 {' '.join(layout)}: max relative loss error {loss_err:.2e}, parameter error {param_err:.2e}")
        assert loss_err < BF16_TOLERANCE and param_err < BF16_TOLERANCE
        assert loss_err > 0 or param_err > 0  # bf16 really ran: the numbers are not the fp32 path's


KV2 = ["model.n_kv_heads=2"]  # tp=4 > 2 KV heads: each KV head is held by 2 tp ranks


def kv2_reference(corpus, tmp_path_factory):
    return train_reference(corpus, tmp_path_factory.mktemp("refkv2"), KV2, evaluate=True)


def test_kv_heads_shared_by_tp_ranks(corpus, tmp_path, tmp_path_factory):
    layouts = [KV2 + ["parallel.tp=4"], KV2 + ["parallel.tp=4", "parallel.sequence_parallel=false"]]
    run_world(4, layouts, corpus, tmp_path, kv2_reference(corpus, tmp_path_factory))


@pytest.mark.slow
def test_kv_heads_shared_by_tp_ranks_with_fsdp(corpus, tmp_path, tmp_path_factory):
    layouts = [KV2 + ["parallel.tp=4", "parallel.dp_shard=2"],
               KV2 + ["parallel.tp=4", "parallel.dp_replicate=2", "parallel.dp_shard=1"]]
    run_world(8, layouts, corpus, tmp_path, kv2_reference(corpus, tmp_path_factory))
