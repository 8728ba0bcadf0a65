"""``hwmpq demo`` / ``make demo``: the whole job on this machine's CPU, from nothing.

1. float pre-training of resnet20 on a slice of Fashion-MNIST (or --weights; reused from the workdir),
2. profiling its layers and transitions on ort-x86 into a LUT (reduced MeasureConfig; resumed if present),
3. an SSPS (or DNAS) search under the budget, 4. QAT fine-tune from the supernet's weights,
5. export to ONNX Runtime and measurement, and the same path for fp32 and uniform int8,
6. one table: budget, predicted, measured latency and test accuracy.

The short schedule searches fp32 vs w8a8 per layer only (on ort-x86 only w8a8 becomes integer kernels;
w4a8/w16a16 run as float between Q/DQ and are slower than fp32, which the full LUT shows), which halves
the supernet's cost. Default schedule (short, aimed at <= 15 min on 2 idle cores) vs ``--full`` (what a real run looks like: all 55k
training images, 30 float epochs, 20 search epochs, 10 QAT epochs, 100 timed repeats; hours on 2 cores).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from .loop import LoopConfig, run_loop

SHORT = {"train_images": 6000, "pretrain_epochs": 2, "search_epochs": 3, "finetune_epochs": 1, "repeat": 30,
         "limit_batches": 12, "finetune_limit_batches": 30}
FULL = {"train_images": None, "pretrain_epochs": 30, "search_epochs": 20, "finetune_epochs": 10, "repeat": 100,
        "limit_batches": None, "finetune_limit_batches": None}


@dataclass(frozen=True)
class DemoConfig:
    loop: LoopConfig
    pretrain_epochs: int
    workdir: str

    @classmethod
    def make(cls, *, full: bool = False, workdir: str = "runs/demo", method: str = "ssps", budget: str = "0.5range",
             train_images: int | None = None, pretrain_epochs: int | None = None, search_epochs: int | None = None,
             finetune_epochs: int | None = None, repeat: int | None = None, weights: str | None = None,
             seed: int = 0, progress: bool = True) -> DemoConfig:
        base = dict(FULL if full else SHORT)
        given = {"train_images": train_images, "pretrain_epochs": pretrain_epochs, "search_epochs": search_epochs,
                 "finetune_epochs": finetune_epochs, "repeat": repeat}
        base.update({k: v for k, v in given.items() if v is not None})
        w = Path(workdir)
        tag = "full" if full else "short"
        loop = LoopConfig(
            method=method, model="resnet20", data="fashion-mnist", data_limit=base["train_images"], weights=weights,
            target="ort-x86", threads=1, lut=str(w / f"lut_{tag}.sqlite"), profile_missing=True,
            warmup=10 if not full else 30, repeat=base["repeat"], budget=budget,
            search={"epochs": base["search_epochs"], "warmup_epochs": 1, "limit_batches": base["limit_batches"],
                    "batch_size": 64},
            finetune_epochs=base["finetune_epochs"], finetune_limit_batches=base["finetune_limit_batches"],
            out=str(w / f"plan_{method}.json"), baselines=("fp32", "8"), seed=seed, progress=progress,
            candidates=() if full else ("fp32", "w8a8"))
        return cls(loop=loop, pretrain_epochs=base["pretrain_epochs"], workdir=str(w))


def float_weights(cfg: DemoConfig) -> str:
    """The float weights the demo starts from: --weights, else trained here once and reused."""
    if cfg.loop.weights:
        return cfg.loop.weights
    from hwmpq.data import load_dataset
    from hwmpq.modelspec import load_model
    from hwmpq.train import fit, save_weights

    limit = cfg.loop.data_limit
    path = Path(cfg.workdir) / f"resnet20_fmnist_{limit or 'all'}_{cfg.pretrain_epochs}ep.pt"
    if path.is_file():
        print(f"demo: reusing float weights {path}")
        return str(path)
    splits = load_dataset("fashion-mnist", limit=limit, seed=cfg.loop.seed)
    model = load_model("resnet20", num_classes=10, in_chans=1)
    print(f"demo: float pre-training resnet20 on {len(splits.train)} Fashion-MNIST images, {cfg.pretrain_epochs} epochs")
    fit(model, splits, epochs=cfg.pretrain_epochs, lr=0.05, batch_size=128, seed=cfg.loop.seed,
        progress=cfg.loop.progress)
    save_weights(model, path)
    return str(path)


def run_demo(cfg: DemoConfig) -> list[dict]:
    t0 = time.perf_counter()
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    loop = replace(cfg.loop, weights=float_weights(cfg))
    rows = run_loop(loop)
    print(f"demo: done in {time.perf_counter() - t0:.0f} s; plans, traces, report and exports in {cfg.workdir}")
    return rows
