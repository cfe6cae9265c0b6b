"""benchmarks/plots.py on fixture results files: which charts each file gets, the kernel percentages behind the
bars (eager, torch.compile and Liger from the same minimum bytes), failed rows drawn rather than dropped, and the
command's one-line error on a malformed file."""

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _mfu_rows(profile=True):
    def row(variant, tps, mfu, prof):
        r = {"variant": variant, "error": None, "tokens_per_s": tps, "mfu": mfu, "layers": 4, "accum": 1,
             "batch_size": 1, "seq_len": 8192, "device_name": "NVIDIA H100 80GB HBM3"}
        if profile:
            r["profile"] = {"total_ms": sum(prof.values()), "by_category_ms": prof, "top": []}
        return r
    return [row("herd-bf16", 53560.0, 0.541, {"matmul": 91.7, "optimizer": 21.8, "herd kernels": 7.3}),
            row("hf-bf16", 42618.0, 0.431, {"matmul": 89.0, "copy/cast": 32.2, "a new category": 1.0}),
            {"variant": "herd-fp8", "error": "OutOfMemoryError: CUDA out of memory", "device_name": "x"}]


def _kernel_rows():
    return [{"op": "swiglu fwd", "shape": "8192x14336 bf16", "fused_ms": 1.0, "pct_of_copy": 90.0, "eager_ms": 3.0,
             "compiled_ms": 2.0, "card": "NVIDIA H100 80GB HBM3"},
            {"op": "rope fwd (in place)", "shape": "q", "fused_ms": 0.5, "pct_of_copy": 80.0, "eager_ms": 5.0,
             "compiled_ms": float("nan"), "card": "NVIDIA H100 80GB HBM3"}]


def test_kernel_percentages_put_every_implementation_on_the_copy_bandwidth_scale():
    liger = [{"op": "swiglu fwd", "shape": "8192x14336 bf16", "liger_ms": 1.2, "liger_pct_of_copy": 75.0},
             {"op": "not in the kernels file", "shape": "-", "liger_ms": 1.0, "liger_pct_of_copy": 10.0}]
    swiglu, rope = plots.kernel_percentages(_kernel_rows(), liger)
    assert swiglu["herd csrc/"] == 90.0
    assert swiglu["torch.compile"] == pytest.approx(45.0) and swiglu["eager PyTorch"] == pytest.approx(30.0)
    assert swiglu["Liger-Kernel (Triton)"] == 75.0
    assert rope["torch.compile"] is None  # a failed compile (NaN ms) has no bar, not a zero-time one
    assert rope["eager PyTorch"] == pytest.approx(8.0) and rope["Liger-Kernel (Triton)"] is None


def test_each_results_file_gets_its_charts(tmp_path):
    (tmp_path / "mfu_nvidia_h100_80gb_hbm3.json").write_text(json.dumps(_mfu_rows()))
    (tmp_path / "peers_nvidia_h100_80gb_hbm3_accum8.json").write_text(json.dumps(_mfu_rows(profile=False)))
    (tmp_path / "kernels_nvidia_h100_80gb_hbm3.json").write_text(json.dumps(_kernel_rows()))
    (tmp_path / "kernels_liger_nvidia_h100_80gb_hbm3.json").write_text(json.dumps(
        [{"op": "swiglu fwd", "shape": "8192x14336 bf16", "liger_ms": 1.2, "liger_pct_of_copy": 75.0}]))
    (tmp_path / "cpu_overhead.json").write_text(json.dumps({"not": "rows"}))  # not a kind plots knows
    assert plots.main(["--results", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["kernels_nvidia_h100_80gb_hbm3.png", "mfu_nvidia_h100_80gb_hbm3_steps.png",
                     "mfu_nvidia_h100_80gb_hbm3_throughput.png", "peers_nvidia_h100_80gb_hbm3_accum8_throughput.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_same_results_draw_the_same_bytes(tmp_path):
    path = tmp_path / "mfu_x.json"
    path.write_text(json.dumps(_mfu_rows()))
    first = [p.read_bytes() for p in plots.plot_file(path)]
    second = [p.read_bytes() for p in plots.plot_file(path)]
    assert first == second and len(first) == 2


def test_step_breakdown_needs_a_profile_and_failed_rows_stay_in_the_throughput_chart(tmp_path, monkeypatch):
    drawn = []
    real = plots.throughput_chart
    monkeypatch.setattr(plots, "throughput_chart", lambda rows, *a: (drawn.append(rows), real(rows, *a))[1])
    path = tmp_path / "mfu_x_accum8.json"
    path.write_text(json.dumps(_mfu_rows(profile=False)))
    written = plots.plot_file(path)
    assert [p.name for p in written] == ["mfu_x_accum8_throughput.png"]
    assert [r["variant"] for r in drawn[0]] == ["herd-bf16", "hf-bf16", "herd-fp8"]


def test_malformed_results_file_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "mfu_bad.json"
    bad.write_text(json.dumps({"variant": "not a list"}))
    assert plots.main([str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "expected a JSON list" in err


def test_committed_h100_results_have_their_charts():
    """The committed H100 results files each have the PNGs plots.py draws for them (re-run plots after a run)."""
    for stem in ("mfu_nvidia_h100_80gb_hbm3", "mfu_nvidia_h100_80gb_hbm3_8layers"):
        for kind in ("throughput", "steps"):
            assert (plots.RESULTS / f"{stem}_{kind}.png").read_bytes()[:8] == PNG
    assert (plots.RESULTS / "kernels_nvidia_h100_80gb_hbm3.png").read_bytes()[:8] == PNG
