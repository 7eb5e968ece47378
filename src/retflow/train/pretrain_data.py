"""Which images each pretraining epoch sees: the real pool, synthetic images, or a schedule of both.

``data`` (per model in the config, default ``pretrain.data``):

- ``real``: the pretraining pools (RETFound);
- ``synthetic``: generated images only;
- ``synthetic_then_real``: DERETFound's sequential schedule - the first ``synthetic_epochs``
  epochs on generated images, the rest on real ones (one lr schedule over all epochs);
- ``mixed(r)``: every epoch is all real images plus generated ones making up the share ``r``
  of the epoch (drawn afresh per epoch; with repeats when there are too few).

Orders are a pure function of (seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from retflow.train.sampling import shard

SCHEDULES = ("real", "synthetic", "synthetic_then_real", "mixed")
_MIXED = re.compile(r"^mixed\((0?\.\d+)\)$")


def parse_data(spec: str) -> tuple[str, float | None]:
    """``'mixed(0.3)'`` -> ``('mixed', 0.3)``; other schedules -> ``(name, None)``."""
    m = _MIXED.match(spec)
    if m:
        ratio = float(m.group(1))
        if not 0 < ratio < 1:
            raise ValueError(f"data: {spec!r}: the synthetic share must be in (0, 1)")
        return "mixed", ratio
    if spec not in SCHEDULES or spec == "mixed":
        raise ValueError(f"data: {spec!r} is not one of real, synthetic, synthetic_then_real, mixed(r)")
    return spec, None


class PretrainData:
    """The combined dataset (real items first, then synthetic) and each epoch's sample order."""

    def __init__(self, real, synthetic, data: str, epochs: int, synthetic_epochs: int | None, seed: int):
        self.kind, self.ratio = parse_data(data)
        if self.kind != "real" and (synthetic is None or len(synthetic) == 0):
            raise ValueError(f"data: {data!r} needs synthetic images, but no synthetic store was given")
        if self.kind != "synthetic" and (real is None or len(real) == 0):
            raise ValueError(f"data: {data!r} needs real images, but the pretraining pool is empty")
        self.n_real = 0 if real is None else len(real)
        self.n_syn = 0 if synthetic is None or self.kind == "real" else len(synthetic)
        parts = [d for d, n in ((real, self.n_real), (synthetic, self.n_syn)) if d is not None and n]
        self.dataset = torch.utils.data.ConcatDataset(parts)
        self.seed = seed
        self.synthetic_epochs = epochs // 2 if synthetic_epochs is None else int(synthetic_epochs)
        if self.kind == "synthetic_then_real" and not 0 < self.synthetic_epochs < epochs:
            raise ValueError(f"synthetic_epochs: {self.synthetic_epochs} must be between 1 and epochs - 1 ({epochs - 1})")

    def source(self, epoch: int) -> str:
        """'real', 'synthetic' or 'mixed' - what ``epoch`` trains on."""
        if self.kind == "synthetic_then_real":
            return "synthetic" if epoch < self.synthetic_epochs else "real"
        return self.kind

    def global_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        source = self.source(epoch)
        if source == "real":
            return rng.permutation(self.n_real)
        if source == "synthetic":
            return self.n_real + rng.permutation(self.n_syn)
        k = int(round(self.n_real * self.ratio / (1.0 - self.ratio)))
        reps = -(-k // self.n_syn)
        syn = np.concatenate([rng.permutation(self.n_syn) for _ in range(reps)])[:k]
        return rng.permutation(np.concatenate([np.arange(self.n_real), self.n_real + syn]))

    def order(self, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
        return shard(self.global_order(epoch), rank, world)

    def n_batches(self, epoch: int, batch_size: int, world: int = 1) -> int:
        return len(self.order(epoch, 0, world)) // batch_size
