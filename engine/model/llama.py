"""The Llama 3 dense decoder (paper section 3.2): RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head.

No distributed code lives here. Parameter names follow Meta's reference (wq/wk/wv/wo, w1/w2/w3) and blocks sit in
a ModuleDict keyed by layer index, so pipeline stages can drop blocks while every parameter keeps its name.
A module set to None (tok_embeddings, norm, output) is skipped, which is how a pipeline stage holds a slice.
"""

from typing import Optional

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

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """norm(x), or with `residual`: (norm(residual + x), residual + x) in one fused pass."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention; n_heads / n_kv_heads query heads share each K/V head.

    `core` computes attention from the rotated q, k, v and the mask object that Transformer.attention_mask made;
    context parallelism replaces both from outside (parallel/context_parallel.py).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = causal_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        b, s, _ = x.shape  # x: [b, s, dim]
        # heads are read from the projection width so a tensor-parallel shard (fewer local heads) works as is
        q = self.wq(x).view(b, s, -1, self.head_dim)  # [b, s, h, d]
        k = self.wk(x).view(b, s, -1, self.head_dim)  # [b, s, kv, d]
        v = self.wv(x).view(b, s, -1, self.head_dim)  # [b, s, kv, d]
        q, k = ops.apply_rope_qk(q, k, cos, sin)  # in place on CUDA (csrc/rope)
        out = self.core(q, k, v, mask)  # [b, s, h, d]
        return self.wo(out.reshape(b, s, -1))  # [b, s, h*d] -> [b, s, dim]


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, mask)
        normed, h = self.ffn_norm(attended, residual=x)  # h = x + attended, added inside the fused norm
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
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
