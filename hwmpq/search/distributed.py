"""Process-group helpers for supernet training on more than one process (torchrun + DistributedDataParallel,
tested with gloo on CPU), and the shard-aware loaders every supernet search reads its batches from.

Without torch.distributed initialised, every helper falls back to one process: rank 0 of a world of 1,
``wrap`` returns the module itself and the loaders shuffle the whole split.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler


def is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_dist() else 0


def world() -> int:
    return torch.distributed.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str = "gloo") -> bool:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` set); True if distributed."""
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    torch.distributed.init_process_group(backend=backend)
    return True


def wrap(module: nn.Module) -> nn.Module:
    """DDP around the supernet when distributed (unused parameters allowed: fixed layers run one path)."""
    if not is_dist():
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=True)


def loaders(splits, batch_size: int, limit_batches: int | None, seed: int
            ) -> tuple[Callable[[int], Iterable], Iterator, int]:
    """(train loader for an epoch, endless val iterator, train batches per epoch) for this rank's shard."""
    n_batches = math.ceil(len(splits.train) / (batch_size * world()))
    n_batches = min(n_batches, limit_batches) if limit_batches else n_batches

    def make(ds, epoch: int) -> DataLoader:
        if is_dist():
            sampler = DistributedSampler(ds, num_replicas=world(), rank=rank(), shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            return DataLoader(ds, batch_size=batch_size, sampler=sampler)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)

    def val_iter() -> Iterator:
        for epoch in itertools.count(1):
            yield from make(splits.val, 10_000 + epoch)

    return (lambda epoch: make(splits.train, epoch)), val_iter(), n_batches
