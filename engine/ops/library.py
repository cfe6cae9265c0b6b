"""The `herd` torch custom-op namespace: each fused op is defined here by its schema, with its pure-torch
reference as the CPU kernel and the csrc/ CUDA kernel (extension `herd_kernels`) as the CUDA kernel when that was
built. When the extension is absent (or lacks an op), the reference is registered for CUDA too, so every op runs
everywhere. Fake (meta) and autograd implementations are registered beside each op in its module, which keeps the
ops usable under torch.compile.

Order matters: the op modules define their schemas when engine.ops is imported, then `load_extension()` imports
herd_kernels (whose TORCH_LIBRARY_IMPL(herd, CUDA, m) blocks attach the CUDA kernels) and fills any gaps.
"""

import importlib
import os
from typing import Callable, Dict

import torch

LIB = torch.library.Library("herd", "DEF")
_REFERENCES: Dict[str, Callable] = {}  # op name -> its reference kernel
_STATE = {"extension": None, "reason": "not loaded yet", "cuda_ops": set()}


def define(schema: str, reference: Callable) -> str:
    """Define herd::<name> from `schema` ("name(Tensor x, ...) -> ..."), with `reference` as its CPU kernel."""
    name = schema.split("(", 1)[0].strip()
    LIB.define(schema)
    LIB.impl(name, reference, "CPU")
    _REFERENCES[name] = reference
    return name


def _has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"herd::{name}", "CUDA")


def load_extension() -> None:
    """Import herd_kernels once (HERD_KERNELS=0 skips it) and register the reference for every op lacking a
    CUDA kernel."""
    if _STATE["extension"] is not None or _STATE["reason"] != "not loaded yet":
        return
    if os.environ.get("HERD_KERNELS", "1") == "0":
        _STATE["reason"] = "disabled by HERD_KERNELS=0"
    elif not torch.cuda.is_available() and torch.version.cuda is None:
        _STATE["reason"] = "torch has no CUDA"
    else:
        try:
            _STATE["extension"] = importlib.import_module("herd_kernels")
            _STATE["reason"] = ""
        except ImportError as err:  # not built (CPU machine, no nvcc): the references serve
            _STATE["reason"] = f"herd_kernels not importable: {err}"
    for name, reference in _REFERENCES.items():
        if _STATE["extension"] is not None and _has_cuda_kernel(name):
            _STATE["cuda_ops"].add(name)
        else:
            LIB.impl(name, reference, "CUDA")


def kernel_status() -> Dict[str, str]:
    """Op name -> "cuda kernel" or "reference (<why>)", for logs and the GPU checks."""
    why = _STATE["reason"] or "op missing from herd_kernels"
    return {name: "cuda kernel" if name in _STATE["cuda_ops"] else f"reference ({why})" for name in _REFERENCES}


def fused(name: str, tensor: torch.Tensor) -> bool:
    """True when herd::<name> on `tensor` runs a csrc/ kernel. CPU tensors always take the plain reference through
    autograd (the custom op would give the same values, but the training numerics stay exactly the reference's)."""
    return tensor.is_cuda and name in _STATE["cuda_ops"]
