"""What the step benchmarks (``bench_mae_step.py``, ``bench_mae3d_step.py``) share: the device they run
on, the peak their MFU is measured against, and running one measurement (on the CPU in a fresh process,
so that its memory peak is that measurement's alone)."""

from __future__ import annotations

import multiprocessing
import time

import torch

H100_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100 SXM


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pick_device(choice: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; on CUDA, TF32 matmuls and convolutions on."""
    device = torch.device("cuda" if choice == "auto" and torch.cuda.is_available() else
                          ("cpu" if choice == "auto" else choice))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def measured_matmul_tflops(device, dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def mfu_peak(device, given: float | None) -> tuple[float, str]:
    """The TFLOP/s that MFU divides by, and where it comes from: ``given``, an H100's bf16 spec, else a
    measured matmul (bf16 on a GPU, fp32 on the CPU)."""
    if given:
        return given, "given"
    if device.type == "cuda" and "H100" in device_name(device):
        return H100_BF16_TFLOPS, "H100 bf16 dense spec"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return measured_matmul_tflops(device, dtype), f"measured {dtype} matmul peak"


def run_measure(measure, job: tuple, device) -> dict:
    """``measure(*job)``: on the CPU in a fresh (spawned) process, on a GPU here, its cache emptied after."""
    if device.type == "cpu":
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(measure, job)
    try:
        return measure(*job)
    finally:
        torch.cuda.empty_cache()
