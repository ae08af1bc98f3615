"""Build DeepSpeed's JIT ops that ds_tencache and its tests use, once per machine.

DeepSpeed compiles cpu_adam (CPU optimizer offload) and async_io (NVMe offload) with the host
compiler the first time they are loaded, which takes minutes on two cores; doing it here, with a
message, keeps that cost out of the first test or demo that happens to need them. Later loads hit
torch's extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR) and take seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Builder class -> typical first-build time on a 2-core machine (for the message only).
# CPUAdam: optimizer offload; FusedAdam: Adam without optimizer offload; AsyncIO: NVMe offload;
# PinMemory and ShareMemComm: what DeepSpeed's CPU accelerator loads for pinned buffers and
# collectives.
OPS = {
    "CPUAdamBuilder": "~1 min",
    "FusedAdamBuilder": "~40 s",
    "AsyncIOBuilder": "~2-5 min",
    "PinMemoryBuilder": "~20 s",
    "ShareMemCommBuilder": "~20 s",
}


def extensions_root() -> Path:
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(explicit) if explicit else Path.home() / ".cache" / "torch_extensions"


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for class_name, estimate in OPS.items():
        builder = accelerator.create_op_builder(class_name)
        if builder is None:  # this accelerator has no such op (e.g. no shm comm on CUDA)
            continue
        name = builder.name
        if not builder.is_compatible(verbose=True):
            print(f"error: DeepSpeed op {name} cannot be built on this machine (see above)", file=sys.stderr)
            return 1
        cached = any(extensions_root().glob(f"*/{name}/{name}.so"))
        if not cached:
            print(f"==> building DeepSpeed op {name} once for this machine ({estimate})", flush=True)
        start = time.perf_counter()
        builder.load(verbose=False)
        status = "ready" if cached else "built"
        print(f"==> DeepSpeed op {name} {status} ({time.perf_counter() - start:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
