"""The policy modules are plain Python: importable, and tested, without vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

POLICY_MODULES = ["config", "identity", "counters", "queue", "throttle"]


def test_policy_modules_do_not_import_vllm():
    imports = "; ".join(f"import vllm_fairserve.{name}" for name in POLICY_MODULES)
    check = "import sys; assert 'vllm' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", f"{imports}; {check}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
