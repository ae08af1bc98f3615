"""``import vllm_fairserve`` stays free of vLLM; the scheduler classes load on first access."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_package_import_does_not_import_vllm_but_names_the_schedulers():
    check = (
        "import sys, vllm_fairserve; "
        "assert {'FairScheduler', 'AsyncFairScheduler'} <= set(dir(vllm_fairserve)); "
        "assert {'FairScheduler', 'AsyncFairScheduler'} <= set(vllm_fairserve.__all__); "
        "missing = getattr(vllm_fairserve, 'NoSuchThing', None); "
        "assert missing is None; "
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
