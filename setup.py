"""Builds the csrc/ CUDA kernels as the `herd_kernels` extension when a CUDA build of torch and nvcc are both
present; otherwise installs the pure-Python package (engine/ops falls back to its torch references)."""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def cuda_extensions():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*/*.c[up]*")
                     if p.suffix in (".cu", ".cpp"))
    if not sources or os.environ.get("HERD_NO_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return [], {}
    flags = {"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "--use_fast_math",
                                      "-Xptxas=-v", "-lineinfo"]}
    # libstdc++ must be torch's shared one: the H200 build machine's g++ links it statically by default, and a
    # TORCH_CHECK thrown by a binding then crossed two C++ runtimes and segfaulted (found there; a CPU repro with
    # -static-libstdc++ mangled the error text). Naming the shared library first makes the linker resolve to it.
    link = ["-Wl,--no-as-needed", "-l:libstdc++.so.6", "-Wl,--as-needed"]
    ext = CUDAExtension("herd_kernels", sources, include_dirs=[str(ROOT / "csrc" / "common")],
                        extra_compile_args=flags, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
