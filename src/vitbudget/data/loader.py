"""DataLoaders: deterministic subsets and epoch orders, both cores, readable worker errors."""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, VitbudgetError


SUBSET_SEED = 0  # the one permutation every fixed subset is drawn from


def subset_indices(n: int, limit: int | None) -> list[int]:
    """A fixed pseudo-random subset of `limit` indices in ascending order (all when limit is None).

    The first `limit` of the seed-0 permutation of n, for every use: `eval --limit`, and the
    images a `train_limit` recipe trains on at ANY training seed (the seed changes initialisation
    and order, never the images), so `holdout_indices` (the last images of the same permutation)
    is disjoint from every training subset with limit <= n - holdout.
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    return sorted(_permutation(n)[:limit].tolist())


def holdout_indices(n: int, holdout: int) -> list[int]:
    """The last `holdout` of the same permutation (all n if holdout >= n), ascending: `vitbudget tune`'s held-out images."""
    if holdout <= 0:
        raise ConfigError(f"--holdout must be positive, got {holdout}")
    return sorted(_permutation(n)[-holdout:].tolist()) if holdout < n else list(range(n))


def _permutation(n: int) -> np.ndarray:
    return np.random.default_rng(SUBSET_SEED).permutation(n)


def epoch_order(indices: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a function of (seed, epoch) only, so resume can replay it."""
    perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(indices))
    return [indices[i] for i in perm]


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not fight the model for cores


MAX_WORKERS = 64  # data-loading processes; beyond this they only cost memory


def check_loader_args(batch_size: int, workers: int | None) -> int:
    """The worker count to use; ConfigError for a batch size or worker count torch would choke on."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be an integer from 0 to {MAX_WORKERS}, got {workers!r}")
    return workers


def make_loader(dataset: Dataset, order: Sequence[int], batch_size: int, workers: int | None = None, drop_last: bool = False) -> DataLoader:
    workers = check_loader_args(batch_size, workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(order),
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        drop_last=drop_last,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # never draw from the global RNG: resume stays exact
    )


def iterate(loader: Iterable) -> Iterator:
    """Iterate a loader, re-raising a worker's DataError with its own message, not torch's wrapper."""
    try:
        yield from loader
    except VitbudgetError as exc:
        message = str(exc)
        if message.startswith("Caught "):  # torch's ExceptionWrapper: the original is the last line
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(": ", 1)[1] if ": " in last else last
            raise type(exc)(message) from None
        raise
