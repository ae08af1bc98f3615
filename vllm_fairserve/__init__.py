"""vllm_fairserve: fair multi-tenant scheduling for vLLM (FairServe)."""

__version__ = "0.1.0"
