"""Fused q/k/v (wqkv) and gate/up (w13) projections (train.fused_projections) train like the unfused model, under
tensor parallelism with shared KV heads, FSDP and pipeline stages, and their checkpoints are the unfused model's.

One GEMM computes what three (or two) did, from the same weights (a fused weight starts as its parts' unfused
initial values stacked by rows), so the forward is the same math; only the weight gradient's GEMM is blocked
differently (one [q+2kv, M] x [M, dim] product instead of three), which changes fp32 rounding at ~1e-7 relative.
Stated tolerance: losses and final parameters within 1e-5 relative of one unfused process (the parity bound); the
one-process fused run is printed beside it. On disk a fused run writes wq/wk/wv and w1/w3 (Parallelized.pieces),
so a checkpoint written fused resumes unfused under another layout and the other way round, starting from
exactly the saved parameters.
"""

import pytest
import torch

from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus, train_reference  # noqa: F401 (fixture)

FUSED = ["train.fused_projections=true"]
KV2 = ["model.n_kv_heads=2", "train.steps=6", "checkpoint.every=3"]  # tp=4 > 2 KV heads: 2 ranks share each


def rel_errors(losses, params, reference):
    loss = max(abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"]))
    param = max(((params[k] - v).norm() / v.norm()).item() for k, v in reference["params"].items())
    return loss, param


def test_fused_layouts_and_resume_across_fusion(corpus, tmp_path):  # noqa: F811
    reference = train_reference(corpus, tmp_path / "ref", KV2)
    fused_one = train_reference(corpus, tmp_path / "fused", KV2 + FUSED)
    loss_err, param_err = rel_errors(fused_one["losses"], fused_one["params"], reference)
    print(f"one fused process vs one unfused process, 6 fp32 steps: loss {loss_err:.2e}, params {param_err:.2e}")
    assert set(fused_one["params"]) == set(reference["params"])  # full parameters under the unfused names
    assert loss_err < 1e-5 and param_err < 1e-5

    ckpt = [f"checkpoint.dir={tmp_path}/ckpt-a", f"checkpoint.dir={tmp_path}/ckpt-b"]
    # written fused under tp4 (2 tp ranks share each KV head), resumed unfused under tp2 x FSDP2; written unfused
    # under tp2 x HSDP2, resumed fused under pp2 x FSDP2
    jobs = [(KV2 + FUSED + ["parallel.tp=4", ckpt[0]], 3),
            (KV2 + ["parallel.tp=2", "parallel.dp_shard=2", ckpt[0]], None),
            (KV2 + ["parallel.tp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1", ckpt[1]], 3),
            (KV2 + FUSED + ["parallel.pp=2", "parallel.dp_shard=2", ckpt[1]], None)]
    results = run_on_ranks(ranks.train_phases, 4, str(corpus), str(tmp_path / "runs"), jobs, timeout=1800)
    a1, b1, a2, b2 = results[0]
    for name, (a, b) in {"fused tp4 (shared KV heads) -> unfused tp2 x dp2": (a1, b1),
                         "unfused tp2 x hsdp2 -> fused pp2 x dp2": (a2, b2)}.items():
        assert set(b["start"]) == set(a["final"]) == set(reference["params"])
        for key, value in a["final"].items():  # the resumed run starts from exactly what was saved
            assert torch.equal(b["start"][key], value), (name, key)
        loss_err, param_err = rel_errors(a["losses"] + b["losses"], b["final"], reference)
        print(f"{name}: steps 1-6 loss {loss_err:.2e}, final params {param_err:.2e} vs one unfused process")
        assert len(a["losses"]) == len(b["losses"]) == 3
        assert loss_err < 1e-5 and param_err < 1e-5
    for rank_result in results[1:]:
        assert [r["losses"] for r in rank_result] == [r["losses"] for r in results[0]]


def _accumulation_layouts(corpus, tmp_path, layouts):  # noqa: F811
    reference = train_reference(corpus, tmp_path / "ref")
    results = run_on_ranks(ranks.train_layouts, 2, str(corpus), str(tmp_path / "runs"), layouts, timeout=1800)
    for layout, result in zip(layouts, results[0]):
        loss_err, param_err = rel_errors(result["losses"], result["params"], reference)
        print(f"{' '.join(layout)}: loss {loss_err:.2e}, params {param_err:.2e} vs one plain process")
        assert len(result["losses"]) == 5 and loss_err < 1e-5 and param_err < 1e-5


GAF = ["train.grad_accum_fusion=true"]


def test_fused_accumulation_under_a_pipeline(corpus, tmp_path):  # noqa: F811
    """train.grad_accum_fusion (engine/ops/accum_linear.py) in a two-stage 1F1B pipeline, 8 micro-batches per step
    and rank: in fp32 the layer computes what autograd does, so the run matches one plain process within the parity
    bound (1e-5). (torch's schedule runs an extra autograd.grad on the last stage: it must not accumulate.)"""
    _accumulation_layouts(corpus, tmp_path, [GAF + ["parallel.pp=2", "parallel.pp_schedule=1F1B"]])


@pytest.mark.slow
def test_fused_accumulation_under_tp_with_fused_projections(corpus, tmp_path):  # noqa: F811
    _accumulation_layouts(corpus, tmp_path, [GAF + FUSED + ["parallel.tp=2"]])
