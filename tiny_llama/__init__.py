"""Deterministic, offline tiny Llama models for tests, benchmarks and the demo."""

from tiny_llama.factory import SIZES, TinyLlamaSpec, cache_root, causal_lm_batches, ensure_model

__all__ = ["SIZES", "TinyLlamaSpec", "cache_root", "causal_lm_batches", "ensure_model"]
__version__ = "0.1.0"
