"""``python -m vllm_fairserve MODEL [vllm serve flags]``: the same as ``python -m vllm_fairserve.launch``."""

from vllm_fairserve.launch import main

if __name__ == "__main__":
    main()
