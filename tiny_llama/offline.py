"""Environment for running transformers, DeepSpeed and vLLM with no network and small footprints."""

from __future__ import annotations

import os

# No hub exists here: fail fast instead of retrying a download, and send no usage reports.
# The KV cache of a vLLM CPU engine defaults to several GiB; the tiny models need far less.
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_defaults() -> None:
    """Set each default unless the caller already chose a value."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
