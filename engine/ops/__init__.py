"""The numerical ops the model is built from.

Each op here is its pure-torch reference (engine/ops/reference.py). The reference is the CPU path and the test
oracle of the csrc/ CUDA kernels, which plug in behind these same names when the extension is built.
"""

from engine.ops.reference import apply_rope, cross_entropy_sum, rms_norm, swiglu

__all__ = ["apply_rope", "cross_entropy_sum", "rms_norm", "swiglu"]
