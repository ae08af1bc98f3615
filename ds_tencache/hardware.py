"""The machine a step is simulated on: compute rate, memories and the links between the tiers.

Every number of a preset is either a vendor datasheet figure (cited beside it) or a stated
assumption. Link and compute rates are peak figures times a named achievable fraction, because no
real transfer or GEMM reaches the datasheet peak and the simulator should not pretend one does.
:func:`cpu_host` builds the same model for the machine this runs on (no GPU: "device" is the
CPU itself) from rates measured there, which is what the calibration against the real CPU
benchmark uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

GB = 1e9
GiB = 2**30
TFLOPS = 1e12

# Share of dense bf16 peak that large transformer training reaches (model FLOPs utilisation):
# Megatron-LM reports 52% of peak on A100 (Narayanan et al. 2021, SC'21, GPT-3 175B on 3072 GPUs)
# and PaLM 46.2% MFU (Chowdhery et al. 2022, Table 3); we take the middle, 0.5.
ACHIEVABLE_FLOP_FRACTION = 0.5
# Share of the PCIe link's per-direction peak that pinned-memory cudaMemcpy reaches: A100 on
# PCIe 4 x16 measures ~25 GB/s of 31.5 (NVIDIA bandwidthTest / nvbandwidth results); 0.8.
ACHIEVABLE_PCIE_FRACTION = 0.8
# PCIe per-direction peak of an x16 link: 16 lanes x GT/s x 128/130 encoding / 8 bits.
PCIE4_X16_GBPS = 16 * 16 * 128 / 130 / 8  # 31.5 GB/s
PCIE5_X16_GBPS = 16 * 32 * 128 / 130 / 8  # 63.0 GB/s
# CPU Adam (DeepSpeedCPUAdam, AVX-512) on a single-GPU cloud host's 12-26 vCPUs. ZeRO-Offload
# (Ren et al. 2021, Table 3) measures 1B parameters in ~0.2-0.3 s on a two-socket server; a
# single-GPU VM has a fraction of those cores, so we assume 2e9 parameters/s (an assumption).
CPU_ADAM_PARAMS_PER_S = 2e9
# Host memory needed per byte of model state kept in CPU memory: DeepSpeed's own sizing rule,
# ``estimate_zero3_model_states_mem_needs(..., additional_buffer_factor=1.5)`` in
# runtime/zero/stage3.py (0.19.8), which asks for 1.5x the offloaded bytes (the rest goes to the
# OS, the process, staging buffers and fragmentation). So the CPU tier -- pinned parameter pool
# plus cached optimizer states -- may fill host DRAM / 1.5. (Until this was checked the presets
# assumed an unsourced 3/4 of DRAM.)
HOST_BUFFER_FACTOR = 1.5
# Per sub-module cost of ZeRO-3's Python hooks and kernel launches on a GPU host (assumption:
# DeepSpeed's coordinator does tens of microseconds of Python per fetch and release).
GPU_HOOK_OVERHEAD_S = 50e-6


@dataclass(frozen=True)
class HardwareModel:
    """One accelerator and its host. Rates are achievable, not peak (see the fraction fields)."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s of the accelerator
    flop_fraction: float  # achievable share of peak_flops
    gpu_mem_bytes: int
    h2d_bytes_per_s: float  # pinned host -> device, achievable
    d2h_bytes_per_s: float  # device -> pinned host, achievable
    nvme_read_bytes_per_s: float
    nvme_write_bytes_per_s: float
    pinned_cpu_bytes: int  # host memory the CPU tier (pinned pool + cached states) may fill
    cpu_adam_params_per_s: float
    group_overhead_s: float  # fixed cost per fetch group (hooks, launches)
    # Host time to issue one parameter fetch (ZeRO-3's gather bookkeeping): the host issues
    # fetches before it runs the group, so this delays the group. Measured for this machine in
    # the calibration; on a GPU host the per-group figure already stands for the hooks' work.
    fetch_overhead_s: float = 0.0

    @property
    def flops_per_s(self) -> float:
        return self.peak_flops * self.flop_fraction

    def compute_s(self, flops: float) -> float:
        """Time of one fetch group's compute: its FLOPs at the achievable rate plus hook cost."""
        return flops / self.flops_per_s + self.group_overhead_s


def _host_tier(host_bytes: float) -> int:
    return int(host_bytes / HOST_BUFFER_FACTOR)


def _datasheet_preset(name: str, dense_tflops: float, gpu_mem: int, pcie_gbps: float,
                      nvme_read_gbps: float, nvme_write_gbps: float, host_bytes: float) -> HardwareModel:
    """A preset from datasheet figures, derated by the named achievable fractions above."""
    link = pcie_gbps * GB * ACHIEVABLE_PCIE_FRACTION
    return HardwareModel(
        name=name, peak_flops=dense_tflops * TFLOPS, flop_fraction=ACHIEVABLE_FLOP_FRACTION,
        gpu_mem_bytes=gpu_mem, h2d_bytes_per_s=link, d2h_bytes_per_s=link,
        nvme_read_bytes_per_s=nvme_read_gbps * GB, nvme_write_bytes_per_s=nvme_write_gbps * GB,
        pinned_cpu_bytes=_host_tier(host_bytes), cpu_adam_params_per_s=CPU_ADAM_PARAMS_PER_S,
        group_overhead_s=GPU_HOOK_OVERHEAD_S,
    )


# NVIDIA A100 40GB PCIe datasheet: 312 TFLOP/s dense BF16, 40 GB HBM2, PCIe Gen4 x16.
# Host: Google Cloud a2-highgpu-1g (1 x A100 40GB, 12 vCPU, 85 GB memory; GCP machine-type docs).
# NVMe: Samsung PM1733 PCIe 4 U.2 datasheet, 7.0 GB/s sequential read, 3.8 GB/s sequential write.
A100_40GB = _datasheet_preset("A100-40GB (PCIe 4)", 312, 40 * GiB, PCIE4_X16_GBPS, 7.0, 3.8, 85 * GB)

# NVIDIA L40S datasheet: 362 TFLOP/s dense BF16 (733 with sparsity), 48 GB GDDR6, PCIe Gen4 x16.
# Host: AWS g6e.4xlarge (1 x L40S, 16 vCPU, 128 GiB; EC2 instance-type docs).
# NVMe: Samsung PM1733 as above (the instance's local NVMe is of this class).
L40S = _datasheet_preset("L40S (PCIe 4)", 362, 48 * GiB, PCIE4_X16_GBPS, 7.0, 3.8, 128 * GiB)

# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1979 with sparsity), 80 GB HBM3, host link
# PCIe Gen5 x16. Host: Google Cloud a3-highgpu-1g (1 x H100 80GB, 26 vCPU, 234 GB; GCP docs).
# NVMe: Samsung PM1743 PCIe 5 datasheet, 13.0 GB/s sequential read, 6.6 GB/s sequential write.
H100 = _datasheet_preset("H100-80GB (PCIe 5)", 989, 80 * GiB, PCIE5_X16_GBPS, 13.0, 6.6, 234 * GB)

PRESETS: dict[str, HardwareModel] = {"a100-40gb": A100_40GB, "l40s": L40S, "h100": H100}

# Size of the memcpy measurement: big enough to leave the caches and amortise call overhead,
# small enough that measuring takes a second on 2 cores.
MEASURE_COPY_BYTES = 64 * 2**20
MEASURE_REPEATS = 5
# Device and pinned memory of a CPU-only host as the simulator sees it: the "device" is host
# memory, so neither limit binds (the calibrated runs' own budget is what differs).
UNBOUNDED_BYTES = 2**40


def measure_memcpy_bytes_per_s() -> float:
    """This machine's host memory copy rate, measured with torch.

    With no accelerator, DeepSpeed's "device" is host memory, so every link (H2D, D2H and, for
    lack of a separate disk measurement, NVMe) is a memcpy.
    """
    import torch

    source = torch.empty(MEASURE_COPY_BYTES, dtype=torch.uint8)
    target = torch.empty_like(source)
    return MEASURE_COPY_BYTES / _best_of(lambda: target.copy_(source))


def cpu_host(memcpy_bytes_per_s: float, flops_per_s: float, cpu_adam_params_per_s: float,
             group_overhead_s: float = 0.0, fetch_overhead_s: float = 0.0) -> HardwareModel:
    """This CPU-only machine as a hardware model: every link at the memcpy rate, and the rates
    the caller measured on the workload itself (compute, optimizer step, ZeRO-3's host costs),
    since those depend on the model and the engine, not on the hardware alone."""
    return HardwareModel(
        name="this host (measured)", peak_flops=flops_per_s, flop_fraction=1.0,
        gpu_mem_bytes=UNBOUNDED_BYTES, h2d_bytes_per_s=memcpy_bytes_per_s,
        d2h_bytes_per_s=memcpy_bytes_per_s, nvme_read_bytes_per_s=memcpy_bytes_per_s,
        nvme_write_bytes_per_s=memcpy_bytes_per_s, pinned_cpu_bytes=UNBOUNDED_BYTES,
        cpu_adam_params_per_s=cpu_adam_params_per_s, group_overhead_s=group_overhead_s,
        fetch_overhead_s=fetch_overhead_s)


def _best_of(run) -> float:
    """Fastest of a few timed runs after one warm-up: the machine's rate, not its noise."""
    run()
    times = []
    for _ in range(MEASURE_REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
