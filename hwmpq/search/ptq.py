"""Post-training search (``hwmpq search --ptq``, ``SearchOptions(ptq=True)``): for a pretrained network whose
QAT would be too slow on a CPU. Nothing is trained: no float pre-training, no supernet, no fine-tune. The
plan comes from the method's per-layer sensitivity (ILP: Hessian traces, hwmpq/search/ilp.py) or accuracy
proxy (NEMO) and the LUT under the budget; the chosen plan's model is the float model quantized in the
target's placement and calibrated on a few training batches (:func:`calibrated`).

Unlabelled data: the ILP's Hessian traces (and the accuracy proxy of its front, and NEMO's) need labels, so
the float model's own top-1 predictions serve as them (:func:`search_splits`): the sensitivity is then that
of the loss against the float model's decisions, which is what a quantized copy should keep. Accuracy is
reported only for labelled data; the top-1 agreement with the float model on the test split always
(:func:`scores_on_test`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

PTQ_METHODS = ("ilp", "nemo", "uniform")  # the methods that train nothing
TRAINING_METHODS = ("dnas", "ssps", "saq")  # they train a supernet's weights while they search
QAT_FLAGS = {"sam": "--sam", "stat_assist": "--stat-assist", "grad_boost": "--grad-boost"}


def strategy_name(config: Any) -> str:
    """The method name of a strategy config (``ILPConfig`` -> ``ilp``), as ``--method`` spells it."""
    return type(config).__name__.removesuffix("Config").lower()


def check_ptq(method: str, *, qat: Mapping[str, Any] | None = None, finetune_epochs: int = 0,
              pretrain_epochs: int = 0, calibration_batches: int = 4) -> None:
    """Refuse, before any work, what would train weights under --ptq: a method that trains a supernet
    (dnas, ssps, saq) and the options that train (QAT options, a fine-tune, float pre-training)."""
    if calibration_batches < 1:
        raise ValueError(f"--calibration-batches must be >= 1, got {calibration_batches}")
    if method not in PTQ_METHODS:
        why = "trains a supernet while it searches" if method in TRAINING_METHODS else "is no post-training method"
        raise ValueError(f"--ptq trains no weights, but --method {method} {why}; use --method ilp (the default "
                         "with --ptq), nemo or uniform, or drop --ptq")
    flags = [flag for key, flag in QAT_FLAGS.items() if (qat or {}).get(key)]
    if finetune_epochs > 0:
        flags.append(f"--finetune-epochs {finetune_epochs}")
    if pretrain_epochs > 0:
        flags.append(f"--pretrain-epochs {pretrain_epochs}")
    if flags:
        raise ValueError(f"--ptq trains no weights and cannot be combined with {', '.join(flags)} (they train); "
                         "drop them, or drop --ptq for a QAT fine-tune")


def search_splits(splits, model: nn.Module, log: Callable[[str], None] = print, batch_size: int = 512):
    """The splits a post-training search reads: ``splits`` itself when its train and val labels are all
    given; else each of train and val with labels < 0 (unlabelled data, or a caller's Splits labelling only
    its test split) labelled with the float ``model``'s top-1 predictions (one float pass over it; the
    searches stack these splits in memory anyway). The test split is kept as it is."""
    parts = {name: getattr(splits, name) for name in ("train", "val")}
    unlabelled = [name for name, ds in parts.items() if bool((labels_of(ds) < 0).any())]
    if not unlabelled:
        return splits
    log(f"{' and '.join(unlabelled)} split(s) without labels: the search's sensitivities use the float model's "
        "own top-1 predictions as labels")
    done: dict[int, tuple[TensorDataset, int]] = {}  # a dataset serving as both splits is labelled once
    for name in unlabelled:
        if id(parts[name]) not in done:
            done[id(parts[name])] = _labelled_by(model, parts[name], batch_size)
    relabelled = {name: done[id(parts[name])][0] for name in unlabelled}
    classes = splits.num_classes or next(iter(done.values()))[1]
    return replace(splits, **relabelled, num_classes=classes)


def labels_of(dataset) -> Tensor:
    """All labels of ``dataset`` (a TensorDataset's or LazyDataset's stacked tensor, else read in batches)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) > 1:
        return torch.as_tensor(tensors[1])
    ys = [torch.as_tensor(y) for _, y in DataLoader(dataset, batch_size=512)]
    return torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def _labelled_by(model: nn.Module, dataset, batch_size: int) -> tuple[TensorDataset, int]:
    """``dataset``'s images with ``model``'s top-1 predictions as labels, and the model's class count."""
    was = model.training
    model.eval()
    xs, ys, classes = [], [], 0
    try:
        for x, _ in DataLoader(dataset, batch_size=batch_size):
            logits = model(x)
            xs.append(x)
            ys.append(logits.argmax(dim=1))
            classes = int(logits.shape[1])
    finally:
        model.train(was)
    return TensorDataset(torch.cat(xs), torch.cat(ys)), classes


def calibrated(model: nn.Module, plan, splits, placement: str, *, batches: int = 4, batch_size: int = 128,
               seed: int = 0) -> nn.Module:
    """The chosen plan's model under --ptq: ``quantize`` (hwmpq.qmodules) of a copy of the float ``model``
    in ``placement``, its quantizers calibrated on ``batches`` shuffled training batches; no training."""
    from hwmpq.train import prepare_qat

    return prepare_qat(copy.deepcopy(model), plan, splits, calibration_batches=batches, batch_size=batch_size,
                       seed=seed, placement=placement).eval()


@torch.no_grad()
def predictions(model: nn.Module, loader) -> tuple[Tensor, Tensor]:
    """Top-1 predictions and labels over ``loader`` in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    preds, labels = [], []
    try:
        for x, y in loader:
            preds.append(model(x).argmax(dim=1))
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was)
    return torch.cat(preds), torch.cat(labels)


def scores_on_test(model: nn.Module, splits, float_top1: Tensor) -> tuple[float | None, float]:
    """(test accuracy, or None when the test split has no labels; top-1 agreement with the float model's
    ``float_top1``) on the test split."""
    pred, labels = predictions(model, splits.loader("test", batch_size=512))
    return accuracy(pred, labels), float((pred == float_top1).float().mean()) if len(pred) else 0.0


def accuracy(pred: Tensor, labels: Tensor) -> float | None:
    """Top-1 accuracy of ``pred``; None when any label is missing (< 0) or there are none."""
    if not len(labels) or bool((labels < 0).any()):
        return None
    return float((pred == labels).float().mean())
