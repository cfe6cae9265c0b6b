"""benchmarks/mfu.py on CPU with a tiny shape: the child's row (numbers and their MFU arithmetic), the parent's
isolation of a failing or hanging child, the table and the saved results."""

import json
import math

import pytest

from benchmarks import mfu, report
from engine.flops import flops_per_token

TINY = ["--seq-len", "32", "--layers", "2", "--dim", "64", "--ffn-dim", "128", "--heads", "4", "--kv-heads", "2",
        "--vocab", "256", "--n-batches", "2", "--device", "cpu", "--peak-tflops", "2.5"]


def check_row(row: dict, args) -> None:
    """Finite positive numbers, and tokens/s, TFLOP/s and MFU recomputed from the row agree with engine/flops.py."""
    assert row["error"] is None, row["error"]
    tokens = args.steps * args.accum * args.batch_size * args.seq_len
    assert math.isfinite(row["seconds"]) and row["seconds"] > 0
    assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(tokens / row["seconds"])
    assert row["ms_per_step"] == pytest.approx(1000 * row["seconds"] / args.steps)
    expected_fpt = flops_per_token(mfu.model_config(args), args.seq_len, causal=False)
    assert row["flops_per_token"] == expected_fpt
    assert row["tflops"] == pytest.approx(expected_fpt * row["tokens_per_s"] / 1e12)
    assert row["peak_tflops"] == 2.5 and row["peak_dtype"] == "bf16"
    assert row["mfu"] == pytest.approx(row["tflops"] / 2.5)
    for key in ("first_loss", "last_loss"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["loss_finite"]
    assert abs(row["first_loss"] - math.log(256)) < 0.3  # near-uniform predictions at initialization
    assert row["peak_mem_gib"] is None and row["device_name"] == "cpu"


@pytest.mark.parametrize("variant", ["herd-bf16", "hf-bf16"])
def test_child_row_in_process(variant):
    if variant == "hf-bf16":
        pytest.importorskip("transformers")
    args = mfu.parse_args(["--variant", variant, "--steps", "2", "--warmup", "1", *TINY])
    row = mfu.run_child(args)
    check_row(row, args)
    if variant == "hf-bf16":
        assert row["attn_implementation"] == "sdpa" and "kernel_status" not in row
    else:
        assert isinstance(row["kernel_status"], dict)


def test_accumulation_runs_accum_micro_batches_per_optimizer_step(monkeypatch):
    """--accum 3: each optimizer step runs three micro-batches (tokens counted for all) and steps AdamW once."""
    import torch
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    args = mfu.parse_args(["--variant", "herd-bf16", "--steps", "2", "--warmup", "1", "--accum", "3", *TINY])
    row = mfu.run_child(args)
    check_row(row, args)
    assert row["accum"] == 3 and row["tokens_per_step"] == 3 * 32 and len(steps) == 3


def test_fp8_variant_with_accumulation_runs_the_engines_step_scope(monkeypatch):
    """herd-fp8 with --accum 2 on CPU: a valid row, and each FP8 weight quantized once per optimizer step (the
    engine's weight cache scope around the micro-batches), not once per micro-batch."""
    from tests.helpers import record_quantizations
    roles = record_quantizations(monkeypatch)
    args = mfu.parse_args(["--variant", "herd-fp8", "--steps", "2", "--warmup", "1", "--accum", "2", *TINY])
    row = mfu.run_child(args)
    check_row(row, args)
    assert row["fp8_layers"] == 14 and roles.count("weight") == 3 * 14  # 3 optimizer steps, 2 micro-batches each


def test_child_main_writes_error_row(tmp_path):
    out = tmp_path / "row.json"
    assert mfu.main(["--variant", "no-such-variant", "--json-out", str(out), *TINY]) == 1
    row = json.loads(out.read_text())
    assert row["variant"] == "no-such-variant" and "unknown variant" in row["error"]


def test_child_command_forwards_every_option(tmp_path):
    args = mfu.parse_args(["--steps", "3", "--warmup", "0", "--seed", "7", *TINY])
    cmd = mfu.child_command(args, "herd-bf16", tmp_path / "x.json")
    assert cmd[1:3] == ["-m", "benchmarks.mfu"]
    child = mfu.parse_args(cmd[3:])
    assert child.variant == "herd-bf16" and child.json_out == str(tmp_path / "x.json")
    for _, attr in mfu.FORWARDED:
        assert getattr(child, attr) == getattr(args, attr), attr


def test_failing_child_is_reported_and_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    args = mfu.parse_args(["--variants", "no-such-variant,herd-bf16", "--steps", "1", "--warmup", "0",
                           "--log-dir", str(tmp_path / "logs"), "--save", *TINY])
    rows = mfu.run_parent(args)
    assert [r["variant"] for r in rows] == ["no-such-variant", "herd-bf16"]
    assert "unknown variant" in rows[0]["error"]
    check_row(rows[1], mfu.parse_args(["--steps", "1", *TINY]))
    printed = capsys.readouterr().out
    assert "[mfu] no-such-variant FAILED" in printed and "unknown variant" in printed
    assert printed.rstrip().splitlines()[-1].startswith("- no-such-variant failed: ValueError: unknown variant")
    saved = json.loads((tmp_path / "results" / "mfu_cpu.json").read_text())
    assert [r["variant"] for r in saved] == ["no-such-variant", "herd-bf16"]
    assert "| herd-bf16 |" in (tmp_path / "results" / "mfu_cpu.md").read_text()


def test_hanging_child_is_killed_at_the_timeout(tmp_path):
    args = mfu.parse_args(["--timeout", "0.5", *TINY])
    row = mfu.run_variant(args, "herd-bf16", tmp_path)
    assert row["error"] == "timed out after 0.5 s (killed)"
    assert row["wall_s"] < 10


def _row(variant, tps, **extra):
    row = {"variant": variant, "error": None, "tokens_per_s": tps, "ms_per_step": 8192e3 / tps, "tflops": 400.0,
           "mfu": 400 / 989.4, "peak_tflops": 989.4, "peak_mem_gib": 40.0, "first_loss": 11.8, "last_loss": 11.5,
           "loss_finite": True}
    row.update(extra)
    return row


def test_table_ratios_kernels_and_fp8_peak_statement():
    rows = [_row("herd-bf16", 40000.0, kernel_status={"rms_norm": "cuda kernel", "swiglu": "reference (x)"}),
            _row("herd-fp8", 60000.0, fp8_layers=14, kernel_status={},
                 fp8_config={"recipe": "tensorwise", "bf16_first_last_layers": True}),
            {"variant": "herd-fp8-delayed", "error": "OutOfMemoryError: CUDA out of memory"},
            _row("hf-bf16", 20000.0)]
    table = mfu.make_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| variant | tokens/s | ms/step | TFLOP/s | MFU | peak GiB | vs hf-bf16 | vs herd-bf16")
    herd, fp8, failed, hf = lines[2:6]
    assert "| 2.00x | 1.00x | 1/2 ops (others: x) |" in herd
    assert "| 3.00x | 1.50x |" in fp8 and "40.4%*" in fp8
    assert "| failed |" in failed
    assert "| 1.00x | 0.50x | n/a (transformers) |" in hf
    assert "fp8 rows are measured against the same bf16 peak" in table and "(989.4 TFLOP/s)" in table
    assert "herd-fp8-delayed failed: OutOfMemoryError" in table
    assert "herd-fp8: 14 linear layers in fp8" in table


def test_step_profile_groups_kernels_by_category_and_ranks_them():
    from benchmarks import step_profile
    norm = "void herd::rmsnorm::bwd_kernel<float>(...)"
    launches = [(norm, 100.0), (norm, 50.0),
                ("sm90_xmma_gemm_bf16bf16_bf16f32", 4000.0), ("nvjet_hsh_256x128_2cta", 1000.0),
                ("pytorch_flash::flash_bwd_kernel<...>", 2500.0), ("void at::native::FusedAdamMathFunctor", 900.0),
                ("void at::native::direct_copy_kernel_cuda", 300.0), ("void at::native::reduce_kernel<a|b>", 20.0)]
    prof = step_profile.summarize(launches, top=3)
    assert prof["total_ms"] == pytest.approx(8.87)
    assert prof["by_category_ms"] == pytest.approx({"matmul": 5.0, "attention": 2.5, "optimizer": 0.9,
                                                    "copy/cast": 0.3, "herd kernels": 0.15, "other": 0.02})
    assert list(prof["by_category_ms"]) == ["matmul", "attention", "optimizer", "copy/cast", "herd kernels", "other"]
    assert [(k["category"], k["calls"]) for k in prof["top"]] == [("matmul", 1), ("attention", 1), ("matmul", 1)]
    text = step_profile.markdown([{"variant": "herd-bf16", "profile": step_profile.summarize(launches)},
                                  {"variant": "hf-bf16", "profile": {"error": "RuntimeError: no CUPTI"}},
                                  {"variant": "herd-fp8"}])
    assert "**herd-bf16**: 8.9 ms" in text and f"| `{norm}` | herd kernels | 0.15 | 2 |" in text
    assert "reduce_kernel<a/b>" in text  # no stray table separator
    assert "hf-bf16: profiling failed: RuntimeError: no CUPTI" in text and "herd-fp8" not in text


def test_variant_names_parse_and_typos_are_refused():
    """Every extra variant (the GPU check names them) parses into its base and options; a misspelt or misordered
    name is a ValueError in the child, not a silently different variant."""
    for variant in mfu.EXTRA_VARIANTS:
        base, opts = mfu.herd_options(variant)
        assert base in ("herd-bf16", "herd-fp8", "herd-fp8-delayed") and opts and variant == "-".join([base, *opts])
    assert mfu.herd_options("herd-fp8-delayed-fused") == ("herd-fp8-delayed", ("fused",))
    assert mfu.herd_options("herd-fp8-delayed-fused-fcast") == ("herd-fp8-delayed", ("fused", "fcast"))
    for bad in ("herd-bf16-compile-fused", "herd-bf16-fuse", "herd-bf16-gaf-compile", "herd-bf16-fused-fused",
                "herd-bf17-fused", "herd-bf16-wdelayed", "herd-fp8-fcast", "herd-fp8-delayed-fcast-compile",
                "herd-fp8-fcast-wdelayed"):
        with pytest.raises(ValueError):
            mfu.herd_options(bad)
    row = mfu.run_child(mfu.parse_args(["--variant", "herd-bf16-compiled", "--steps", "1", *TINY]))
    assert "unknown variant 'herd-bf16-compiled'" in row["error"]


@pytest.mark.parametrize("variant", ["herd-bf16-fused-compile", "herd-bf16-fused-gaf", "herd-fp8-fused-compile",
                                     "herd-fp8-wdelayed", "herd-fp8-delayed-fused-fcast"])
def test_fused_gaf_and_compile_variants_run_on_cpu(variant):
    """Each option's code path (fused projections, fused gradient accumulation, compile; with FP8) trains a tiny
    model on CPU and reports a valid row, so the GPU check cannot fail on a typo or a missing import."""
    import torch._inductor.config
    args = mfu.parse_args(["--variant", variant, "--steps", "2", "--warmup", "1", *TINY])
    with torch._inductor.config.patch(compile_threads=1):  # no compile worker pool left behind in pytest
        row = mfu.run_child(args)
    check_row(row, args)
    assert row["options"] == list(mfu.herd_options(variant)[1])
    if "gaf" in variant:
        assert row["grad_accum_fusion_layers"] == 2 * 4 + 1  # wqkv, wo, w13, w2 in each of 2 blocks, the head
    if variant.startswith("herd-fp8"):  # the switches reached the FP8 config the row reports
        fp8 = row["fp8_config"]
        assert fp8["weight_recipe"] == ("delayed" if "wdelayed" in variant else "same")
        assert fp8["fuse_norm_cast"] == fp8["fuse_swiglu_cast"] == ("fcast" in variant)
