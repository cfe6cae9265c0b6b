"""The Llama 3 dense decoder (paper section 3.2): RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head.

No distributed code lives here. Parameter names follow Meta's reference (wq/wk/wv/wo, w1/w2/w3) and blocks sit in
a ModuleDict keyed by layer index, so pipeline stages can drop blocks while every parameter keeps its name.
A module set to None (tok_embeddings, norm, output) is skipped, which is how a pipeline stage holds a slice.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from engine import ops
from engine.config import ModelConfig
from engine.model.attention import causal_attention, document_mask
from engine.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.fp8_output = None  # engine/fp8/fused_cast.py (fp8.fuse_norm_cast): the output only in FP8

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """norm(x), or with `residual`: (norm(residual + x), residual + x) in one fused pass."""
        if self.fp8_output is not None:
            return self.fp8_output(x, self.weight, self.eps, residual)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def fused_linear(in_features: int, parts: Tuple[Tuple[str, int], ...]) -> nn.Linear:
    """One nn.Linear (no bias) that computes several projections of the same input in one GEMM: its weight is the
    parts' weights stacked along the output rows, in order. `fused_parts` names each part as the unfused model does
    (wq/wk/wv, w1/w3: the names checkpoints and exports use, parallel/parallelize.py maps them) with its full rows;
    `split_sizes` are the rows of each part in this module's weight (a tensor-parallel shard holds a slice of
    every part, so parallel/tensor_parallel.py rewrites them)."""
    linear = nn.Linear(in_features, sum(rows for _, rows in parts), bias=False)
    linear.fused_parts = tuple(parts)
    linear.split_sizes = [rows for _, rows in parts]
    return linear


class Attention(nn.Module):
    """Grouped-query attention; n_heads / n_kv_heads query heads share each K/V head.

    `core` computes attention from the rotated q, k, v and the mask object that Transformer.attention_mask made;
    context parallelism replaces both from outside (parallel/context_parallel.py). With `fused` the q/k/v
    projections are one GEMM (wqkv, rows [q; k; v]) instead of three.
    """

    def __init__(self, cfg: ModelConfig, fused: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        q_rows, kv_rows = cfg.n_heads * self.head_dim, cfg.n_kv_heads * self.head_dim
        self.fused = fused
        if fused:
            self.wqkv = fused_linear(cfg.dim, (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)))
        else:
            self.wq = nn.Linear(cfg.dim, q_rows, bias=False)
            self.wk = nn.Linear(cfg.dim, kv_rows, bias=False)
            self.wv = nn.Linear(cfg.dim, kv_rows, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        b, s, _ = x.shape  # x: [b, s, dim]
        if self.fused:  # [b, s, (h + 2 kv) d] -> q [b, s, h d], k, v [b, s, kv d] (views)
            q, k, v = self.wqkv(x).split(self.wqkv.split_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        # heads are read from the projection width so a tensor-parallel shard (fewer local heads) works as is
        q = q.view(b, s, -1, self.head_dim)  # [b, s, h, d]
        k = k.view(b, s, -1, self.head_dim)  # [b, s, kv, d]
        v = v.view(b, s, -1, self.head_dim)  # [b, s, kv, d]
        q, k = ops.apply_rope_qk(q, k, cos, sin)  # in place on CUDA (csrc/rope)
        out = self.core(q, k, v, mask)  # [b, s, h, d]
        return self.wo(out.reshape(b, s, -1))  # [b, s, h*d] -> [b, s, dim]


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x); with `fused`, w1 and w3 are one GEMM (w13, rows [gate; up])."""

    def __init__(self, cfg: ModelConfig, fused: bool = False):
        super().__init__()
        self.fused = fused
        if fused:
            self.w13 = fused_linear(cfg.dim, (("w1", cfg.ffn_dim), ("w3", cfg.ffn_dim)))
        else:
            self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
            self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.fp8_activation = None  # engine/fp8/fused_cast.py (fp8.fuse_swiglu_cast): SwiGLU written in FP8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # [b, s, 2 ffn] -> gate, up [b, s, ffn] (views)
            gate, up = self.w13(x).split(self.w13.split_sizes, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        activation = ops.swiglu if self.fp8_activation is None else self.fp8_activation
        return self.w2(activation(gate, up))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_id: int, fused_projections: bool = False):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, fused_projections)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg, fused_projections)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, mask)
        normed, h = self.ffn_norm(attended, residual=x)  # h = x + attended, added inside the fused norm
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    """`fused_projections`: q/k/v and gate/up as one GEMM each (wqkv, w13); checkpoints keep the unfused names."""

    def __init__(self, cfg: ModelConfig, fused_projections: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i, fused_projections)
                                     for i in range(cfg.n_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.attention_mask = document_mask  # (position_ids, doc_ids) -> what Attention.core takes (attention.py)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: [b, s] ids (or [b, s, dim] hidden states on a later pipeline stage) -> logits [b, s, vocab].
        A pipeline stage or sharded sequence passes position_ids always (hidden states may be split along s).

        position_ids: [b, s], restarting at 0 in each packed document (default 0..s-1).
        doc_ids: [b, s] document index of each token; None means one causal sequence.
        """
        if position_ids is None:
            b, s = tokens.shape[:2]
            position_ids = torch.arange(s, device=tokens.device).expand(b, s)
        cos, sin = self.rope(position_ids)
        mask = self.attention_mask(position_ids, doc_ids)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # [b, s, dim]
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h
