"""Environment for running transformers, DeepSpeed and vLLM here: offline, small, rebuild-free."""

from __future__ import annotations

import os
import sys

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


def apply_runtime_defaults() -> None:
    """Set each default unless the caller already chose a value, and prefer the venv's tools.

    torch JIT-builds DeepSpeed's ops with the first ``ninja`` on PATH. Run as
    ``.venv/bin/python`` without activating the venv, that is the system's ninja, which reads the
    venv ninja's build log as stale and recompiles every op (minutes); putting the interpreter's
    own bin folder first makes every entry point use the same ninja as scripts/bootstrap.sh.
    """
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    tools = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != tools:
        os.environ["PATH"] = tools + os.pathsep + path
