"""The one device policy: every choice that depends on the machine is made here, from the machine.

CUDA when present (cuda:LOCAL_RANK, NCCL, bf16 by default, fused AdamW, pinned host memory), else the
CPU (gloo, fp32 by default; bf16 on request, which DeepSpeed runs on its CPU accelerator). MFU is
measured against `peak_flops`: the dense bf16 tensor-core peak of a known GPU, else what a timed matmul
achieves on this device.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def on_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """This rank's compute device: cuda:LOCAL_RANK on a CUDA machine, else the CPU."""
    if on_cuda():
        # Modulo: a cluster that binds one GPU per task shows each task a single device 0.
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        return torch.device("cuda", local_rank % visible if visible else local_rank)
    return torch.device("cpu")


def bind_device() -> torch.device:
    """Make this rank's device the current one (NCCL and new CUDA tensors use it); returns it."""
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def backend() -> str:
    return "nccl" if on_cuda() else "gloo"


def train_dtype(requested: str) -> str:
    """train.dtype resolved to "bf16" or "fp32": "auto" is bf16 on CUDA and fp32 on CPU."""
    if requested == "auto":
        return "bf16" if on_cuda() else "fp32"
    return requested


def fused_adamw() -> bool:
    return on_cuda()


def pin_memory() -> bool:
    """Pinned host memory only speeds up host-to-GPU copies."""
    return on_cuda()


def loader_workers(requested: Optional[int]) -> int:
    """Batch-preparing worker processes: as requested, else one on CUDA (it overlaps the GPU's step) and none
    on the CPU, where a worker would take a core from the step."""
    if requested is not None:
        return requested
    return 1 if on_cuda() else 0


FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper (H100/H200) onwards have FP8 tensor cores


def fp8_problem() -> Optional[str]:
    """Why FP8 training (train.fp8) cannot run here, or None when it can."""
    if not on_cuda():
        return "FP8 matmuls need an NVIDIA GPU with FP8 tensor cores (H100/H200 class) and this machine has none"
    capability = torch.cuda.get_device_capability(device())
    if capability < FP8_COMPUTE_CAPABILITY:
        return (f"FP8 matmuls need compute capability {FP8_COMPUTE_CAPABILITY[0]}.{FP8_COMPUTE_CAPABILITY[1]} or "
                f"newer (H100/H200 class); {torch.cuda.get_device_name(device())} has "
                f"{capability[0]}.{capability[1]}")
    if importlib.util.find_spec("torchao") is None:
        return "FP8 matmuls come from torchao, which is not installed (pip install 'megamu[fp8]')"
    return None


def compile_problem() -> Optional[str]:
    """Why torch.compile (inductor) cannot run here, or None when it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version or platform"
    if on_cuda():
        if importlib.util.find_spec("triton") is None:
            return "inductor needs Triton for CUDA kernels and it is not installed (pip install triton)"
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        return "inductor needs a C++ compiler for CPU kernels and none was found (set CXX or install g++)"
    return None


# ---- peak FLOP/s for MFU ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PeakFlops:
    flops: float  # FLOP/s of one device
    source: str  # "table:<entry>" or "measured"


# Dense (no sparsity) bf16 tensor-core peaks per GPU from the vendors' data sheets; NVIDIA's data-centre
# sheets print the sparse figure, twice the dense one. Rows: (regex on the upper-cased
# torch.cuda.get_device_name(), entry name, FLOP/s); the first match wins, so variants precede their base.
_PEAK_TABLE: tuple[tuple[str, str, float], ...] = (
    # NVIDIA H100 data sheet: BF16 1,979 (SXM), 1,671 (NVL) TFLOPS with sparsity; H100 PCIe product
    # brief: 1,513 with sparsity. torch names the SXM part "NVIDIA H100 80GB HBM3".
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835e12),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe", 756e12),
    (r"\bH100\b", "H100 SXM", 989e12),
    # NVIDIA GH200 data sheet: BF16 1,979 TFLOPS with sparsity.
    (r"\bGH200\b", "GH200", 989e12),
    # NVIDIA H200 data sheet: BF16 1,979 (SXM), 1,671 (NVL) TFLOPS with sparsity.
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835e12),
    (r"\bH200\b", "H200 SXM", 989e12),
    # NVIDIA Blackwell (HGX B200 / GB200 NVL72) data sheet: FP16/BF16 4.5 / 5 PFLOPS per GPU with sparsity.
    (r"\bGB200\b", "GB200", 2.5e15),
    (r"\bB200\b", "B200", 2.25e15),
    # NVIDIA A100 data sheet: BF16 312 TFLOPS dense (624 with sparsity), SXM4 and PCIe alike.
    (r"\bA100\b", "A100", 312e12),
    # NVIDIA A10 data sheet: BF16 125 TFLOPS dense (250 with sparsity). AWS's A10G is another part with no
    # public data sheet: it is measured.
    (r"\bA10\b", "A10", 125e12),
    # NVIDIA L40S / L40 data sheets: BF16 362.05 / 181.05 TFLOPS dense (733 / 362.1 with sparsity).
    (r"\bL40S\b", "L40S", 362.05e12),
    (r"\bL40\b", "L40", 181.05e12),
    # NVIDIA L4 data sheet: BF16 242 TFLOPS with sparsity.
    (r"\bL4\b", "L4", 121e12),
    # NVIDIA Ada Lovelace architecture white paper (appendix): RTX 4090 BF16 with FP32 accumulate, dense.
    (r"\bRTX 4090\b(?! D\b)", "RTX 4090", 165.2e12),  # the 4090 D has fewer SMs
    # NVIDIA Ampere GA102 white paper (appendix): RTX 3090 BF16 with FP32 accumulate, dense.
    (r"\bRTX 3090\b(?! TI)", "RTX 3090", 71e12),
    # AMD Instinct MI300X data sheet: peak BF16 1,307.4 TFLOPS dense (torch reports ROCm devices via cuda).
    (r"\bMI300X\b", "MI300X", 1307.4e12),
)


def table_peak(device_name: str) -> Optional[PeakFlops]:
    """The table's dense bf16 peak for a device name as torch reports it; None for a device not in it."""
    name = device_name.upper()
    for pattern, entry, flops in _PEAK_TABLE:
        if re.search(pattern, name):
            return PeakFlops(flops, f"table:{entry}")
    return None


# Square matmul sizes for the measurement: 1024 takes tens of milliseconds per product on one CPU core;
# 8192 keeps a GPU's tensor cores busy long enough to time.
_MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
_MATMUL_REPS = {"cpu": 4, "cuda": 20}


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: torch.dtype, device_name: str = "cpu") -> float:
    """FLOP/s of the fastest of a few square matmuls after a warm-up, on `device_name` in `dtype`.

    Cached per process: every later MFU uses the same denominator.
    """
    dev = torch.device(device_name)
    n, reps = _MATMUL_SIZE[dev.type], _MATMUL_REPS[dev.type]
    gen = torch.Generator(device=dev).manual_seed(0)  # not the global generator: training's RNG stays put
    a, b = (torch.randn(n, n, generator=gen, device=dev, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(dtype: str) -> PeakFlops:
    """The per-device peak MFU is measured against: a known GPU's table entry (dense bf16, so for bf16 runs
    only), else a measured matmul in the run's dtype ("bf16" or "fp32") on this rank's device (the CPU, a
    GPU missing from the table, or an fp32 run, whose matmuls use no bf16 tensor cores)."""
    dev = device()
    if dev.type == "cuda" and dtype == "bf16":
        known = table_peak(torch.cuda.get_device_name(dev))
        if known is not None:
            return known
    return PeakFlops(measured_peak_flops(TORCH_DTYPES[dtype], str(dev)), "measured")
