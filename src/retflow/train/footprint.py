"""What a training run cost, for its ``train_summary.json``: parameter counts and peak memory.

``trainable_params`` / ``total_params``: the parameters the optimizer updates (``requires_grad``)
and all of them, in the model as it trained (a ``lora`` run: the frozen base + its adapters).
``peak_mem_mb``: on a GPU the peak CUDA memory allocated by tensors since :func:`reset_peak`
(``peak_mem_kind: "cuda"``); on the CPU the peak resident memory of the whole process
(``"rss"``, from :func:`resource.getrusage`; it cannot be reset, so it includes the imports and
anything the process ran before).
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


def param_counts(model: nn.Module) -> dict:
    """``{"trainable_params", "total_params"}`` of ``model``."""
    params = list(model.parameters())
    return {"trainable_params": int(sum(p.numel() for p in params if p.requires_grad)),
            "total_params": int(sum(p.numel() for p in params))}


def reset_peak(device: torch.device) -> None:
    """Start counting the CUDA peak afresh (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """``{"peak_mem_mb", "peak_mem_kind"}``: the CUDA peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "peak_mem_kind": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_mem_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1), "peak_mem_kind": "rss"}
