"""Seeded, deterministic weighted sampling across the datasets of a mixture.

Choice: an epoch is a *pre-drawn index list* of ``num_samples`` indices into the concatenation of
the datasets' training samples, a pure function of ``(sizes, weights, num_samples, seed, epoch)``:

* dataset *d* gets exactly ``round(num_samples * w_d / sum(w))`` draws (largest-remainder
  rounding, so the counts add up to ``num_samples``): weights are respected exactly per epoch,
  not just in expectation;
* within a dataset, draws go through a random permutation of its samples (without replacement),
  then a fresh permutation when a dataset is up-sampled past its size;
* the draws of all datasets are then shuffled together.

The same arguments always give the same list (``numpy.random.default_rng([seed, epoch])``), so a
resumed run sees the same order; :class:`MixtureSampler` wraps it for a ``DataLoader``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["allocate", "weighted_draw", "MixtureSampler"]


def allocate(num_samples: int, weights: Sequence[float]) -> np.ndarray:
    """Split ``num_samples`` draws over datasets in proportion to ``weights`` (largest remainder;
    ties go to the earlier dataset)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    exact = num_samples * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    short = num_samples - int(counts.sum())
    order = sorted(range(len(w)), key=lambda d: (-remainder[d], d))
    for d in order[:short]:
        counts[d] += 1
    return counts


def weighted_draw(
    sizes: Sequence[int],
    weights: Sequence[float],
    num_samples: int,
    seed: int = 0,
    epoch: int = 0,
) -> np.ndarray:
    """The epoch's indices into the concatenation of datasets of the given ``sizes``.

    Returns an ``int64`` array of length ``num_samples``; see the module docstring.
    """
    sizes_a = np.asarray(sizes, dtype=np.int64)
    if len(sizes_a) != len(weights):
        raise ValueError(f"{len(sizes_a)} dataset sizes but {len(weights)} weights")
    w = np.where(sizes_a > 0, np.asarray(weights, dtype=np.float64), 0.0)
    counts = allocate(num_samples, w)
    offsets = np.concatenate([[0], np.cumsum(sizes_a)[:-1]])
    rng = np.random.default_rng([int(seed), int(epoch)])
    parts = []
    for d, (n, q) in enumerate(zip(sizes_a.tolist(), counts.tolist())):
        if q == 0:
            continue
        reps = -(-q // n)
        perm = np.concatenate([rng.permutation(n) for _ in range(reps)])[:q]
        parts.append(perm + offsets[d])
    out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    rng.shuffle(out)
    return out


class MixtureSampler(torch.utils.data.Sampler[int]):
    """A ``DataLoader`` sampler yielding :func:`weighted_draw`'s indices for the current epoch.

    Call :meth:`set_epoch` at the start of each epoch (like ``DistributedSampler``). With
    ``world_size > 1`` each rank takes every ``world_size``-th index starting at ``rank``; the list
    is padded by wrapping around so that all ranks get ``ceil(num_samples / world_size)``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        num_samples: int,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        allocate(num_samples, [w if n > 0 else 0.0 for n, w in zip(sizes, weights)])  # validate
        self.sizes = list(sizes)
        self.weights = list(weights)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices for ``epoch`` (default: the current one)."""
        idx = weighted_draw(self.sizes, self.weights, self.num_samples, self.seed,
                            self.epoch if epoch is None else epoch)
        if self.world_size > 1:
            total = len(self) * self.world_size
            idx = np.resize(idx, total)[self.rank :: self.world_size]
        return idx.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)
