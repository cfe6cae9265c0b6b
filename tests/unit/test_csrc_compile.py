"""Every csrc/ kernel compiles for sm_90a without register spills, and every torch binding compiles, on a machine
with nvcc and no GPU (skipped without nvcc). The GPU checks (tests/gpu) then run them against their references."""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
KERNELS = sorted(CSRC.glob("*/*.cu"))
BINDINGS = sorted(CSRC.glob("*/*.cpp"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def cuda_include() -> Path:
    """The CUDA toolkit's include folder (nvcc may be a wrapper script outside the toolkit, as here)."""
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    candidates += [Path(NVCC).resolve().parents[1] / "include", Path("/usr/local/cuda/include")]
    return next((c for c in candidates if (c / "cuda_runtime.h").exists()), candidates[-1])


CUDA_INCLUDE = cuda_include() if NVCC else None
# ptxas -v: "Used 40 registers, used 0 barriers, 8 bytes stack frame" / "0 bytes spill stores, 0 bytes spill loads"
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
FUNCTION = re.compile(r"Compiling entry function '([^']+)'")


def ptxas_report(source: Path, tmp_path: Path) -> str:
    out = subprocess.run([NVCC, "-gencode=arch=compute_90a,code=sm_90a", "-O3", "--use_fast_math", "-std=c++17",
                          "-Xptxas=-v", "-cubin", f"-I{CSRC / 'common'}", "-o", str(tmp_path / "k.cubin"),
                          str(source)], capture_output=True, text=True)
    assert out.returncode == 0, f"{source.relative_to(ROOT)} does not compile:\n{out.stderr[-3000:]}"
    return out.stderr


def test_every_op_has_a_kernel_binding_and_readme():
    ops = [d for d in CSRC.iterdir() if d.is_dir() and d.name != "common"]
    assert ops, "csrc/ has no kernels"
    for op in ops:
        assert list(op.glob("*.cu")) and list(op.glob("*.cpp")) and (op / "README.md").exists(), op.name


@needs_nvcc
@pytest.mark.parametrize("source", KERNELS, ids=[p.parent.name for p in KERNELS])
def test_kernel_compiles_for_sm90a_without_spills(source, tmp_path):
    report = ptxas_report(source, tmp_path)
    functions = FUNCTION.findall(report)
    spills = SPILLS.findall(report)
    assert functions and len(spills) >= len(functions), report
    spilled = [(fn, s) for fn, s in zip(functions, spills) if s != ("0", "0")]
    assert not spilled, f"register spills in {source.name}: {spilled}"


@needs_nvcc
def test_bindings_compile_against_torch_headers():
    """All bindings at once, as parallel g++ processes (parsing torch/extension.h costs ~20 s per file)."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CUDA_INCLUDE}", f"-I{CSRC / 'common'}",
                                                                   f"-I{sysconfig.get_paths()['include']}"]
    jobs = {source: subprocess.Popen(["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=herd_kernels",
                                      "-D_GLIBCXX_USE_CXX11_ABI=1", *includes, str(source)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for source in BINDINGS}
    failures = {}
    for source, job in jobs.items():
        _, err = job.communicate()
        if job.returncode != 0:
            failures[str(source.relative_to(ROOT))] = err[-3000:]
    assert len(BINDINGS) >= 6 and not failures, failures
