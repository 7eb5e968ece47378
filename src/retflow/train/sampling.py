"""Deterministic, resumable sampling: a per-epoch permutation sharded across ranks."""

from __future__ import annotations

import numpy as np
import torch


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global order (the tail that does not divide evenly is dropped)."""
    per_rank = len(order) // world
    return order[: per_rank * world][rank::world]


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's sample order for ``epoch`` (same on every run with the same seed)."""
    return shard(np.random.default_rng([seed, epoch]).permutation(n), rank, world)


def repeated_order(n: int, length: int, seed: int, epoch: int) -> np.ndarray:
    """``length`` sample indices: fresh permutations of ``n`` items back to back (one process)."""
    reps = max(1, -(-length // n))
    return np.concatenate([epoch_order(n, seed, epoch * 1000 + r, 0, 1) for r in range(reps)])[:length]


def batches(order: np.ndarray, batch_size: int, start_batch: int = 0):
    """Full batches of ``order`` starting at ``start_batch`` (the last partial batch is dropped)."""
    n_batches = len(order) // batch_size
    for b in range(start_batch, n_batches):
        yield b, order[b * batch_size : (b + 1) * batch_size]


def step_seed(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch for one step, so augmentations and masks replay identically after a resume."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0]))


def loader(dataset, order: np.ndarray, batch_size: int, start_batch: int, num_workers: int):
    """A DataLoader over the full batches of ``order`` from ``start_batch`` on."""
    batch_list = [b.tolist() for _, b in batches(order, batch_size, start_batch)]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_list, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
