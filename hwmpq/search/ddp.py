"""``hwmpq search`` on more than one process: the torchrun entry point.

    torchrun --nproc_per_node 2 -m hwmpq.search.ddp --method ssps --model resnet20 --data fashion-mnist \\
        --target ort-x86 --lut lut.sqlite --budget 0.6x --out plan.json

takes the same options as ``hwmpq search``. Every process trains the supernet on its shard of the train and
val splits (DistributedSampler, hwmpq/search/distributed.py); gradients of the weights, quantizer scales and
architecture logits are averaged by DDP, so the logits, the Gumbel noise (same seed everywhere) and the SSPS
fixing decisions are identical on all ranks. Rank 0 alone fine-tunes, exports, measures and writes files.
"""

from __future__ import annotations

import sys

import torch

from .distributed import init_from_env, is_dist


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: the ``hwmpq search`` command, distributed."""
    import typer

    from .cli import register

    init_from_env()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    try:
        app(["search", *(argv if argv is not None else sys.argv[1:])])
    finally:
        if is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
