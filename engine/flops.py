"""Model FLOPs per token and hardware peaks, for TFLOP/s and MFU.

MFU = achieved model FLOP/s / peak FLOP/s (PaLM, Chowdhery et al. 2022, appendix B). Model FLOPs per token for
training (forward + backward) are 6N + 12*L*H*Q*T: N the parameters that multiply (the input embedding is a
lookup and is left out; the output head counts), L layers, H heads, Q head dim, T sequence length. The attention
term counts the full T x T score matrix as PaLM does; with causal masking only half of it is needed, and
`causal=True` gives 6N + 6*L*H*Q*T, the figure closer to work actually done. herd reports the PaLM convention.
"""

from engine.config import ModelConfig

# Dense (no sparsity) peak tensor throughput per device, in TFLOP/s, from the vendors' datasheets.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp8": 1978.9},
    "H100 PCIe": {"bf16": 756.5, "fp8": 1513.0},
    "H200": {"bf16": 989.4, "fp8": 1978.9},
    "A100": {"bf16": 312.0, "fp8": 0.0},
}


def parameter_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    head_dim = cfg.dim // cfg.n_heads
    attention = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # wq, wo + wk, wv
    mlp = 3 * cfg.dim * cfg.ffn_dim
    per_layer = attention + mlp + 2 * cfg.dim  # + two RMSNorm weights
    total = cfg.n_layers * per_layer + cfg.dim + cfg.vocab_size * cfg.dim  # final norm + output head
    return total + (cfg.vocab_size * cfg.dim if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs (forward + backward) per token: 6N + 12*L*H*Q*T (halved attention term if causal)."""
    n = parameter_count(cfg, include_embedding=False)
    attention = 12 * cfg.n_layers * cfg.n_heads * (cfg.dim // cfg.n_heads) * seq_len
    return 6 * n + (attention / 2 if causal else attention)


def device_peak_tflops(device_name: str, dtype: str = "bf16") -> float:
    """Peak TFLOP/s of a CUDA device by its name, or 0.0 when unknown (MFU is then not reported)."""
    name = device_name.upper()
    if "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100 SXM"
    elif "H200" in name or "GH200" in name:
        key = "H200"
    elif "A100" in name:
        key = "A100"
    else:
        return 0.0
    return PEAK_TFLOPS[key].get(dtype, 0.0)
