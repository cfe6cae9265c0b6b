"""The Llama 3 decoder: a plain nn.Module with no distributed code (parallel/ applies that from outside)."""

from engine.model.init import build_meta_model, build_model, init_weights
from engine.model.llama import Transformer

__all__ = ["Transformer", "build_meta_model", "build_model", "init_weights"]
