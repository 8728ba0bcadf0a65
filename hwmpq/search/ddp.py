"""Supernet training on more than one process: torchrun + DistributedDataParallel (tested with gloo on CPU).

    torchrun --nproc_per_node 2 -m hwmpq.search.ddp --method ssps --model resnet20 --data fashion-mnist \\
        --target ort-x86 --lut lut.sqlite --budget 0.6x --out plan.json

takes the same options as ``hwmpq search``. Every process trains the supernet on its shard of the train and
val splits (DistributedSampler); gradients of the weights, quantizer scales and architecture logits are
averaged by DDP, so the logits, the Gumbel noise (same seed everywhere) and the SSPS fixing decisions are
identical on all ranks. Rank 0 alone fine-tunes, exports, measures and writes files.
Without torch.distributed initialised, these helpers fall back to one process.
"""

from __future__ import annotations

import contextlib
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


class _NullBar:
    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool):
    if not enabled:
        yield _NullBar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as bar:
        yield bar


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: the ``hwmpq search`` command, distributed."""
    import typer

    from .cli import register

    init_from_env()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    try:
        app(["search", *(argv if argv is not None else __import__("sys").argv[1:])])
    finally:
        if is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
