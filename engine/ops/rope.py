"""Rotary position embedding (Su et al. 2021) of q and k: herd::rope_ rotates both in place in one launch
(csrc/rope), on CUDA; the reference (engine/ops/reference.py apply_rope) everywhere else.

herd::rope_(q, k, cos, sin, inverse) mutates q and k; herd::rope(q, k, cos, sin, inverse) returns rotated copies
in one pass (one read, one write). Rotation is orthogonal, so its backward is the rotation by minus the angle
(inverse=True) applied to the output gradients; `_RopeQK` wires that into autograd (the forward in place, the
backward out of place: the incoming gradients may be shared and must stay unchanged).
"""

from typing import Tuple

import torch

from engine.ops import library, reference
from engine.ops.reference import apply_rope  # noqa: F401  (the public out-of-place apply_rope is the reference)

_DTYPES = (torch.bfloat16, torch.float32)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """reference.apply_rope's operations in x's compute dtype: fp32 for bf16/fp32 x (then bitwise the reference's
    result), float64 for float64 x (so gradcheck can run the op)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = x.to(acc)[..., :half], x.to(acc)[..., half:]
    c, s = cos.to(acc), sin.to(acc)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _rope_cpu_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """CPU kernel of herd::rope_: q [b, s, hq, d] and k [b, s, hk, d] rotated by the angles of cos, sin
    [b, s, 1, d/2] and written back in place; inverse=True rotates by minus the angle (sin -> -sin, exact)."""
    sin = -sin if inverse else sin
    q.copy_(_rotated(q, cos, sin))
    k.copy_(_rotated(k, cos, sin))


def _rope_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """CPU kernel of herd::rope: the rotated q and k as new contiguous tensors (the inputs are not changed)."""
    sin = -sin if inverse else sin
    return _rotated(q, cos, sin), _rotated(k, cos, sin)  # torch.cat's results: new, contiguous


library.define("rope_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, bool inverse) -> ()", _rope_cpu_)
library.define("rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool inverse) -> (Tensor, Tensor)", _rope_cpu)


@torch.library.register_fake("herd::rope_")
def _rope_fake(q, k, cos, sin, inverse):
    return None


@torch.library.register_fake("herd::rope")
def _rope_out_fake(q, k, cos, sin, inverse):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device))


class _RopeQK(torch.autograd.Function):
    """q, k rotated in place by herd::rope_ (forward) and their gradients rotated back (backward).

    Takes the tensors that own q's and k's memory (`qb`, `kb`, see _inplace_target) and the [b, s, heads, d] shapes
    to rotate them as. Autograd cannot take in-place changes to views in a custom Function that returns more than
    one tensor ("If your Function modifies inplace an input that is a view of another Tensor, your Function cannot
    return more than one Tensor"), and the model's q and k are `.view`s of a Linear's output; so the Function
    rotates and marks dirty the Linear outputs themselves (non-views) and apply_rope_qk views the results as
    [b, s, heads, d] again. Marking them dirty bumps their version counters: a node that had saved the unrotated
    tensor would fail loudly in backward ("modified by an inplace operation") rather than read rotated values.
    Linear saves its input and weight, not its output, so none does.
    """

    @staticmethod
    def forward(ctx, qb, kb, cos, sin, q_shape, k_shape):
        torch.ops.herd.rope_(qb.view(q_shape), kb.view(k_shape), cos, sin, False)
        ctx.mark_dirty(qb, kb)
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (qb.shape, kb.shape, q_shape, k_shape)
        return qb, kb

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        qb_shape, kb_shape, q_shape, k_shape = ctx.shapes
        # Out of place, never in the incoming gradients themselves: autograd may hand the same tensor to several
        # consumers (AddBackward passes one gradient to both of its inputs; dq and dk are even the same tensor for
        # q_rot + k_rot), and nothing here can see whether it is shared. herd::rope reads any layout (gradients
        # arriving through transposes or expands need not be contiguous) and writes new contiguous tensors.
        dq, dk = torch.ops.herd.rope(dq.reshape(q_shape), dk.reshape(k_shape), cos, sin, True)
        return dq.view(qb_shape), dk.view(kb_shape), None, None, None, None


def _fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The csrc/ kernel applies: CUDA kernel built, everything on one device, bf16/fp32 q and k of matching
    [b, s, heads, even d] shapes, fp32 tables that need no gradient (it computes none for them)."""
    if not (library.fused("rope_", q) and k.device == q.device == cos.device == sin.device):
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return False
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.shape[3] % 2:
        return False
    return not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))


def _inplace_target(x: torch.Tensor) -> torch.Tensor:
    """The tensor the kernel rotates in place to rotate x: x's base when x is a view of all of it in the same
    layout (the model's q, k: `.view`s of a Linear's output), else x itself when it is not a view; a contiguous
    copy (autograd records it) when neither can be changed in place: non-contiguous x, partial views, leaves that
    require grad (autograd forbids changing those in place)."""
    base = x if x._base is None else x._base
    if (x.is_contiguous() and base.is_contiguous() and base.numel() == x.numel() and base.dtype == x.dtype
            and base.storage_offset() == x.storage_offset() and not (base.is_leaf and base.requires_grad)):
        return base
    return x.clone(memory_format=torch.contiguous_format)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [b, s, hq, d] and k [b, s, hk, d] with cos, sin [b, s, 1, d/2] fp32 -> (q_rot, k_rot).

    On CUDA with the kernel built this rotates q and k IN PLACE (their memory; the results are views of it, or of
    contiguous copies when q or k could not be changed in place): callers must not use the unrotated q, k
    afterwards. Everywhere else it returns the reference's out-of-place results, bitwise what apply_rope gives.
    """
    if not _fusable(q, k, cos, sin):
        return reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
    qb, kb = _inplace_target(q), _inplace_target(k)
    if kb.untyped_storage().data_ptr() == qb.untyped_storage().data_ptr():  # e.g. both views of one fused output
        kb = k.clone(memory_format=torch.contiguous_format)
    q_rot, k_rot = _RopeQK.apply(qb, kb, cos, sin, q.shape, k.shape)
    return q_rot.view(q.shape), k_rot.view(k.shape)
