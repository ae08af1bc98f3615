"""ds_tencache: resource-aware tensor caching and migration for DeepSpeed ZeRO-3 (10Cache)."""

__version__ = "0.1.0"
