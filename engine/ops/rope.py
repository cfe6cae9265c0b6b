"""Placeholder: being written (issue 6)."""
from engine.ops.reference import apply_rope


def apply_rope_qk(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
