"""megamu.runtime, the one device policy: the peak FLOP/s table looked up by the names torch reports
(no GPU needed: the name is passed in), the measured fallback, and the CPU choices (gloo, fp32 by
default, bf16 on request, no fused AdamW or pinned memory)."""
from __future__ import annotations

import math

import pytest
import torch

from megamu import runtime
from megamu.config import load_config
from megamu.training.ds_config import build_ds_config
from megamu.training.metrics import mfu


@pytest.mark.parametrize("name,entry,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA H100 NVL", "H100 NVL", 835),
    ("NVIDIA H200", "H200 SXM", 989),
    ("NVIDIA H200 NVL", "H200 NVL", 835),
    ("NVIDIA GH200 480GB", "GH200", 989),
    ("NVIDIA B200", "B200", 2250),
    ("NVIDIA GB200", "GB200", 2500),
    ("NVIDIA A100-SXM4-80GB", "A100", 312),
    ("NVIDIA A100-SXM4-40GB", "A100", 312),
    ("NVIDIA A100 80GB PCIe", "A100", 312),
    ("NVIDIA A100-PCIE-40GB", "A100", 312),
    ("NVIDIA A10", "A10", 125),
    ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L40", "L40", 181.05),
    ("NVIDIA L4", "L4", 121),
    ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", "RTX 3090", 71),
    ("AMD Instinct MI300X", "MI300X", 1307.4),
])
def test_table_finds_the_dense_bf16_peak_by_torch_device_name(name, entry, tflops):
    peak = runtime.table_peak(name)
    assert peak is not None, name
    assert peak.source == f"table:{entry}"
    assert peak.flops == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 3090 Ti",
                                  "NVIDIA GeForce RTX 4090 D", "NVIDIA H800", "Tesla T4"])
def test_devices_without_a_sourced_figure_are_not_guessed(name):
    assert runtime.table_peak(name) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_peak_is_positive_finite_and_cached(dtype):
    runtime.measured_peak_flops.cache_clear()
    first = runtime.measured_peak_flops(dtype, "cpu")
    assert math.isfinite(first) and first > 0
    assert runtime.measured_peak_flops(dtype, "cpu") == first
    assert runtime.measured_peak_flops.cache_info().hits == 1


@pytest.fixture
def no_cuda(monkeypatch):
    """This process as a CPU-only machine, also where a GPU is present."""
    monkeypatch.setattr(runtime, "on_cuda", lambda: False)


def test_cpu_peak_is_measured_in_the_run_dtype(no_cuda):
    peak = runtime.peak_flops("bf16")
    assert peak.source == "measured"
    assert peak.flops == runtime.measured_peak_flops(torch.bfloat16, "cpu")


def test_mfu_is_model_flops_over_the_peak_of_every_device():
    assert mfu(tokens_per_s=1000.0, flops_per_token=6e9, world_size=4, peak_flops=1e12) == pytest.approx(1.5)


def test_cpu_policy(no_cuda):
    assert runtime.device() == torch.device("cpu")
    assert runtime.backend() == "gloo"
    assert runtime.train_dtype("auto") == "fp32"
    assert runtime.train_dtype("bf16") == "bf16"  # DeepSpeed's bf16 mode runs on its CPU accelerator
    assert not runtime.fused_adamw() and not runtime.pin_memory()


def test_cuda_policy(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runtime.device() == torch.device("cuda", 3)
    assert runtime.backend() == "nccl"
    assert runtime.train_dtype("auto") == "bf16"
    assert runtime.train_dtype("fp32") == "fp32"
    assert runtime.fused_adamw() and runtime.pin_memory()


def test_compile_problem_names_the_missing_compiler(monkeypatch):
    monkeypatch.setattr(runtime.shutil, "which", lambda _: None)
    assert "C++ compiler" in runtime.compile_problem()


def test_bf16_on_cpu_builds_a_bf16_deepspeed_config():
    cfg = load_config(None, ["train.dtype=bf16", "train.micro_batch_size=2", "train.global_batch_size=8"])
    ds = build_ds_config(cfg, dp_size=1)
    # ZeRO 1 even at DP=1: DeepSpeed accumulates micro-batch gradients in fp32 only from ZeRO 1 on.
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 1
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_an_fp32_run_on_a_known_gpu_measures_its_peak_rather_than_take_the_bf16_table(monkeypatch):
    monkeypatch.setattr(runtime, "device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _dev=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(runtime, "measured_peak_flops", lambda dtype, name: 51e12 if dtype == torch.float32 else 0.0)
    assert runtime.peak_flops("bf16").source == "table:H100 SXM"
    assert runtime.peak_flops("fp32") == runtime.PeakFlops(51e12, "measured")
