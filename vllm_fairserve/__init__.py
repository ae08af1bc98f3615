"""vllm_fairserve: fair multi-tenant scheduling for vLLM (FairServe).

``FairScheduler`` and ``AsyncFairScheduler`` (``vllm_fairserve.scheduler``) are loaded on first
access, so ``import vllm_fairserve`` and the pure policy modules never import vLLM, while
``--scheduler-cls vllm_fairserve.FairScheduler`` still resolves.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_SCHEDULER_CLASSES = ("FairScheduler", "AsyncFairScheduler")

__all__ = ["__version__", *_SCHEDULER_CLASSES]


def __getattr__(name: str) -> Any:
    if name in _SCHEDULER_CLASSES:
        from vllm_fairserve import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SCHEDULER_CLASSES])
