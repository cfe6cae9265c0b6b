"""Gradient-accumulation fusion (Megatron-LM's `gradient_accumulation_fusion`, Narayanan et al. 2021): a linear
layer whose weight gradient is added into the fp32 gradient of its fp32 master weight inside the backward GEMM.

herd keeps fp32 master weights and runs the forward under bf16 autocast. With a plain nn.Linear every micro-batch's
backward computes dW = dy^T x as a bf16 tensor (the GEMM accumulates in fp32, then rounds its output to bf16),
autograd casts it to fp32 (the backward of autocast's weight cast) and AccumulateGrad adds it to `weight.grad`:
a bf16 write, a read, an fp32 write and a read-modify-write of the fp32 gradient per micro-batch, plus a rounding
of every micro-batch's dW to 8 significant bits. `MainGradLinear` instead adds dy^T x straight into the fp32
`weight.grad`, the products summed in fp32 (Llama 3 accumulates gradients in fp32 across micro-batches):

- CUDA, bf16 operands: one cuBLAS GEMM with an fp32 output and beta = 1,
  torch.addmm(grad, dy^T, x, out_dtype=torch.float32, out=grad) (torch >= 2.9's `addmm.dtype_out`; the first
  micro-batch writes torch.mm(dy^T, x, out_dtype=torch.float32)). Megatron calls its own extension for this
  (fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32); torch now has the op.
- everywhere else, and as the oracle of the CUDA path: the reference, `reference_accumulate` below: the operands
  upcast to fp32 (a bf16 x bf16 product is exact in fp32) and grad += (dy^T x) in fp32. For fp32 operands this is
  exactly what autograd does (mm, then AccumulateGrad's add), so fp32 runs are bitwise unchanged.

What composes: one process, tensor parallelism (the shards are plain Parameters with fp32 grads; finish_gradients
sums them afterwards) and pipeline stages with the 1F1B-style schedules (each micro-batch's backward runs once,
weights and inputs together). What does not, refused by `check_fused_accumulation` with one line:
- FSDP2 (any dp_shard / dp_replicate / cp > 1: herd shards over dp x cp): FSDP owns the gradient. The forward sees
  the all-gathered bf16 unsharded parameter, not the fp32 master; its gradient is produced in the parameter dtype
  and reduce-scattered (reduce_dtype fp32) into the sharded grad by FSDP's post-backward, so there is no fp32
  gradient of the weight for the GEMM to accumulate into; Megatron's fusion likewise needs its own DDP buffers.
- zero-bubble pipeline schedules (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV): they split the backward into
  an input-gradient pass and a later weight-gradient pass through autograd; a gradient written as a side effect of
  the first pass defeats the split.
- torch.compile: the backward writes `weight.grad` as a side effect, which AOTAutograd cannot put in a graph.
FP8 layers (engine/fp8) are left alone: their weight-gradient GEMM already writes fp32.
Only a `loss.backward()` accumulates (as autograd would): under torch.autograd.grad for other inputs (the pipeline
schedule's shape inference runs one on the last stage) `weight.grad` is left alone, and autograd.grad asking for
the weight gets the plain gradient back (`_backward_kind`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def reference_accumulate(weight: torch.Tensor, dy2d: torch.Tensor, x2d: torch.Tensor) -> None:
    """weight.grad (fp32, created when None) += dy2d^T @ x2d with fp32 products and sums (pure torch).
    dy2d: [M, N], x2d: [M, K], weight: [N, K]."""
    dw = torch.mm(dy2d.t().float(), x2d.float())  # [N, K]
    if weight.grad is None:
        weight.grad = dw
    else:
        weight.grad.add_(dw)


def fused_accumulate(weight: torch.Tensor, dy2d: torch.Tensor, x2d: torch.Tensor) -> None:
    """reference_accumulate in one GEMM where cuBLAS can write fp32 from bf16 operands (CUDA); the reference
    otherwise."""
    if not (dy2d.is_cuda and dy2d.dtype == torch.bfloat16 and x2d.dtype == torch.bfloat16):
        return reference_accumulate(weight, dy2d, x2d)
    if weight.grad is None:
        weight.grad = torch.mm(dy2d.t(), x2d, out_dtype=torch.float32)  # [N, K] fp32
    else:
        torch.addmm(weight.grad, dy2d.t(), x2d, out_dtype=torch.float32, out=weight.grad)


def _backward_kind(weight: torch.Tensor) -> str:
    """What the running backward wants of `weight`: "accumulate" (loss.backward(): autograd would add into
    weight.grad), "return" (torch.autograd.grad asking for this weight's gradient) or "none" (autograd.grad for
    other inputs only, e.g. torch.distributed.pipelining's shape inference on the last stage: autograd would not
    touch weight.grad, so neither may this layer). Read from whether the engine will run the weight's
    AccumulateGrad node (torch._C._will_engine_execute_node, the check FSDP1 and DDP hooks rely on)."""
    with torch.enable_grad():
        node = weight.view_as(weight).grad_fn.next_functions[0][0]  # the leaf's AccumulateGrad
    try:
        return "accumulate" if torch._C._will_engine_execute_node(node) else "none"
    except RuntimeError:  # "... currently running autograd.grad()" with this leaf among its inputs
        return "return"


class _MainGradLinearFn(torch.autograd.Function):
    """y = x W^T in `dtype`; backward returns dx and, under loss.backward(), adds dW into weight.grad itself (no
    gradient for autograd to accumulate: it gets None for the weight)."""

    @staticmethod
    def forward(ctx, x, weight, dtype, accumulate):
        # x: [..., K]; weight: [N, K] fp32 master; autocast's casts, done here once
        w, xc = weight.to(dtype), x.to(dtype)
        ctx.save_for_backward(xc, w)
        ctx.weight, ctx.accumulate, ctx.x_dtype = weight, accumulate, x.dtype
        return F.linear(xc, w)  # [..., N]

    @staticmethod
    def backward(ctx, dy):
        xc, w = ctx.saved_tensors
        dy = dy.to(w.dtype)
        dx = torch.matmul(dy, w).to(ctx.x_dtype)  # [..., K]
        dw = None
        kind = _backward_kind(ctx.weight) if ctx.needs_input_grad[1] else "none"
        dy2d, x2d = dy.reshape(-1, dy.shape[-1]), xc.reshape(-1, xc.shape[-1])  # [M, N], [M, K]
        if kind == "accumulate":
            ctx.accumulate(ctx.weight, dy2d, x2d)
        elif kind == "return":  # autograd.grad(..., weight): the plain gradient, unfused
            dw = torch.mm(dy2d.t().float(), x2d.float()).to(ctx.weight.dtype)
        return dx, dw, None, None


class MainGradLinear(nn.Linear):
    """nn.Linear (no bias) whose weight gradient is accumulated into the fp32 `weight.grad` inside backward. The
    weight stays the same Parameter (names, sharding and checkpoints unchanged). `accumulate` is the fused path;
    tests set it to `reference_accumulate` to compare."""

    accumulate = staticmethod(fused_accumulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            return _MainGradLinearFn.apply(x, self.weight, dtype, type(self).accumulate)


def use_fused_accumulation(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` (block projections, fused or not, and the output head; FP8 layers
    are not plain) a MainGradLinear, in place: the class changes, the module object, its parameter, attributes
    (a fused projection's parts) and hooks stay. Call before parallelize. Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = MainGradLinear
            changed += 1
    return changed


def check_fused_accumulation(enabled: bool, parallel, compile_blocks: bool) -> None:
    """One-line ConfigError for a layout that train.grad_accum_fusion cannot run under (see the module docstring);
    `parallel` is the ParallelConfig after loading (dp_shard=-1 already resolved)."""
    if not enabled:
        return
    for key in ("dp_shard", "dp_replicate", "cp"):
        if getattr(parallel, key) > 1:
            raise ConfigError(f"parallel.{key}", f"{getattr(parallel, key)} shards gradients with FSDP, which owns "
                              "them (bf16 unsharded grads reduce-scattered into fp32 shards): train.grad_accum_fusion "
                              "needs tp/pp only layouts")
    if parallel.pp > 1 and parallel.pp_schedule in ZERO_BUBBLE:
        raise ConfigError("parallel.pp_schedule", f"{parallel.pp_schedule} splits weight gradients from input "
                          "gradients, which train.grad_accum_fusion computes together; use 1F1B, GPipe or "
                          "Interleaved1F1B")
    if compile_blocks:
        raise ConfigError("train.compile", "cannot compile train.grad_accum_fusion's backward (it writes "
                          "weight.grad as a side effect); turn one of them off")
