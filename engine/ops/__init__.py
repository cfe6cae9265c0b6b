"""The numerical ops the model is built from, each a torch custom op in the `herd` namespace.

Every op has a pure-torch reference (engine/ops/reference.py): the CPU path and the test oracle of its csrc/ CUDA
kernel, which runs instead on CUDA tensors when the `herd_kernels` extension was built (engine/ops/library.py).
"""

from engine.ops.cross_entropy import cross_entropy_sum
from engine.ops.fp8_cast import *  # noqa: F401,F403  (fp8 cast ops; engine/fp8 uses them)
from engine.ops import fp8_fused  # noqa: F401  (norm and SwiGLU writing FP8; engine/fp8/fused_cast.py uses them)
from engine.ops.library import kernel_status, load_extension
from engine.ops.norm import add_rms_norm, rms_norm
from engine.ops.rope import apply_rope, apply_rope_qk
from engine.ops.swiglu import swiglu

load_extension()  # after every op module has defined its schema

__all__ = ["add_rms_norm", "apply_rope", "apply_rope_qk", "cross_entropy_sum", "kernel_status", "rms_norm",
           "swiglu"]
