"""Float training and QAT fine-tuning: seeded SGD + cosine LR, progress bars, weights-only checkpoints, resume.

Checkpoint format (``fit(checkpoint=path)``, written atomically after every epoch, loadable with
``torch.load(path, weights_only=True)``; only tensors, numbers, strings, lists and dicts)::

    {"format": "hwmpq-train-checkpoint", "version": 1,
     "model": model.state_dict(),           # for a quantized model this includes the quantizer scales
     "optimizer": optimizer.state_dict(),
     "epoch": completed epochs (int), "epochs": total epochs planned (int), "seed": int,
     "rng_torch": torch.get_rng_state() (uint8 tensor, global CPU generator after that epoch),
     "history": [{"epoch", "train_loss", "train_acc", "val_acc", "lr", "seconds"}, ...]}

``hwmpq.modelspec.load_weights`` accepts both this checkpoint and a plain state dict (``save_weights``).

Determinism: the global torch generator is seeded once (``seed``) and saved/restored with every checkpoint;
each epoch shuffles with its own generator seeded from (seed, epoch); the learning rate is a function of
the global step. So a resumed run repeats an uninterrupted one exactly (same thread count, same machine).
Python's and numpy's generators are not used here and not saved.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from .atomic import atomic_torch_save
from .records import BitPlan

CHECKPOINT_FORMAT = "hwmpq-train-checkpoint"
CHECKPOINT_VERSION = 1

GradTransform = Callable[[nn.Module, int], None]
LossFn = Callable[[Tensor, Tensor], Tensor]
StepFn = Callable[[nn.Module, Tensor, Tensor, Optimizer, LossFn, Sequence[GradTransform]], Tensor]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint (if any) is left on disk."""


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed (not ours, or from another model); the message says which file."""


@dataclass(frozen=True)
class TrainResult:
    epochs_run: int  # epochs completed in total, including those before a resume
    history: tuple[dict[str, float], ...]
    val_acc: float
    checkpoint: str | None = None

    _version = 1




@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy (0..1) over ``loader`` in eval mode; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    finally:
        model.train(was)
    return correct / max(1, total)


def default_step(model: nn.Module, x: Tensor, y: Tensor, optimizer: Optimizer, loss_fn: LossFn,
                 grad_transforms: Sequence[GradTransform], step: int = 0) -> Tensor:
    """Forward, backward, grad transforms, optimizer step. A non-finite loss skips the update."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    if not torch.isfinite(loss):
        return loss.detach()
    loss.backward()
    for t in grad_transforms:
        t(model, step)
    optimizer.step()
    return loss.detach()


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` (a plain dict of tensors) atomically."""
    atomic_torch_save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights only) and check it is one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an hwmpq training checkpoint (no format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not {CHECKPOINT_VERSION}")
    return ckpt


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: not on biases, BatchNorm, or quantizer step sizes."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or name.endswith("scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@dataclass
class _State:
    """What fit carries between epochs (mutable, private)."""

    epoch: int
    history: list[dict[str, float]]


def _restore(path: str, model: nn.Module, optimizer: Optimizer, epochs: int, log: Callable[..., Any]) -> _State:
    ckpt = load_checkpoint(path)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: does not fit this model/optimizer: {e}") from e
    torch.set_rng_state(ckpt["rng_torch"])
    if int(ckpt["epochs"]) != epochs:
        log(f"note: {path} was planned for {ckpt['epochs']} epochs, now {epochs}: the cosine schedule "
            "changes, so the result will differ from an uninterrupted run")
    log(f"resuming from {path} after epoch {int(ckpt['epoch'])}")
    return _State(int(ckpt["epoch"]), [dict(h) for h in ckpt["history"]])


def _save(path: str, model: nn.Module, optimizer: Optimizer, state: _State, epochs: int, seed: int) -> None:
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": state.epoch, "epochs": epochs, "seed": seed,
        "rng_torch": torch.get_rng_state(), "history": state.history,
    }, path)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not enabled,
                    transient=True)


class _BoundTransform:
    """A grad transform bound to fit's global step: step functions call it as ``t(model)`` or
    ``t(model, step)``; the transform always receives fit's current global step."""

    def __init__(self, transform: GradTransform, counter: list[int]) -> None:
        self.transform, self.counter = transform, counter

    def __call__(self, model: nn.Module, step: int | None = None) -> None:
        self.transform(model, self.counter[0])


class _FirstOutput:
    """Forward hook keeping the model's first output of each step (for train accuracy without a second
    forward; a SAM step's second forward at w + eps is ignored)."""

    def __init__(self) -> None:
        self.logits: Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self.logits is None and isinstance(output, Tensor):
            self.logits = output.detach()


def _run_epoch(model, loader, optimizer, step_fn, transforms, counter, *, epoch, lr, total_steps, n_batches,
               bar, task) -> tuple[float, float]:
    """One pass over ``loader`` (at most ``n_batches``); returns (mean loss, accuracy) on the training data."""
    model.train()
    loss_sum = correct = seen = 0.0
    first = _FirstOutput()
    handle = model.register_forward_hook(first)
    try:
        for i, (x, y) in enumerate(loader):
            if i >= n_batches:
                break
            step_lr = _cosine_lr(lr, counter[0], total_steps)
            for g in optimizer.param_groups:
                g["lr"] = step_lr
            first.logits = None
            loss = step_fn(model, x, y, optimizer, F.cross_entropy, transforms)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {float(loss)} at epoch {epoch}, step {i + 1} of {n_batches} "
                                         f"(lr {step_lr:.4g})")
            counter[0] += 1
            loss_sum += float(loss) * len(y)
            seen += len(y)
            if first.logits is not None and len(first.logits) == len(y):
                correct += int((first.logits.argmax(dim=1) == y).sum())
            bar.update(task, advance=1, info=f"loss {loss_sum / seen:.4f} acc {correct / seen:.3f} lr {step_lr:.4f}")
    finally:
        handle.remove()
    return loss_sum / max(1, seen), correct / max(1, seen)


def fit(model: nn.Module, splits, *, epochs: int, lr: float = 0.05, batch_size: int = 128,
        weight_decay: float = 5e-4, seed: int = 0, momentum: float = 0.9, checkpoint: str | None = None,
        resume: bool = False, progress: bool = True, limit_batches: int | None = None,
        step_fn: StepFn | None = None, grad_transforms: Sequence[GradTransform] = (),
        log: Callable[..., Any] = print) -> TrainResult:
    """Train ``model`` in place on ``splits.train`` (SGD with Nesterov momentum, cosine LR per step to 0 at the
    end of ``epochs``; weight decay on weights only, not on biases, BatchNorm or quantizer step sizes), validate
    on ``splits.val`` after each epoch and checkpoint.

    ``resume=True`` continues from ``checkpoint`` when the file exists (else starts fresh and says so).
    ``limit_batches`` caps the training batches per epoch (fast tests). Raises NonFiniteLossError on a NaN
    or infinite loss without overwriting the last good checkpoint.
    """
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"fit needs epochs >= 1, lr > 0, batch_size >= 1 (got {epochs}, {lr}, {batch_size})")
    if resume and checkpoint is None:
        raise ValueError("fit(resume=True) needs a checkpoint path")
    step_fn = step_fn or default_step
    optimizer = torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=True)
    torch.manual_seed(seed)
    state = _State(0, [])
    if resume and Path(checkpoint).is_file():
        state = _restore(checkpoint, model, optimizer, epochs, log)
    elif resume:
        log(f"no checkpoint at {checkpoint}: starting from epoch 0")
    n_batches = math.ceil(len(splits.train) / batch_size)
    n_batches = min(n_batches, limit_batches) if limit_batches else n_batches
    counter = [state.epoch * n_batches]
    transforms = [_BoundTransform(t, counter) for t in grad_transforms]
    try:
        _epochs(model, splits, optimizer, step_fn, transforms, counter, state, bar_enabled=progress, epochs=epochs,
                lr=lr, batch_size=batch_size, n_batches=n_batches, seed=seed, checkpoint=checkpoint, log=log)
    except NonFiniteLossError as e:
        kept = (f"the last good checkpoint {checkpoint} (epoch {state.epoch}) is kept" if checkpoint and state.epoch
                else "no checkpoint was written")
        raise NonFiniteLossError(f"{e}; {kept}. Lower --lr, or check the data and model.") from None
    return TrainResult(state.epoch, tuple(state.history), state.history[-1]["val_acc"] if state.history else 0.0,
                       checkpoint)


def _epochs(model, splits, optimizer, step_fn, transforms, counter, state: _State, *, bar_enabled, epochs, lr,
            batch_size, n_batches, seed, checkpoint, log) -> None:
    """fit's epoch loop: train, validate, checkpoint, log."""
    val_loader = splits.loader("val", batch_size=512)
    with _progress(bar_enabled) as bar:
        for epoch in range(state.epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            loader = splits.loader("train", batch_size=batch_size, shuffle=True, seed=seed * 100_003 + epoch)
            task = bar.add_task(f"epoch {epoch}/{epochs}", total=n_batches, info="")
            train_loss, train_acc = _run_epoch(model, loader, optimizer, step_fn, transforms, counter, epoch=epoch,
                                               lr=lr, total_steps=epochs * n_batches, n_batches=n_batches, bar=bar,
                                               task=task)
            bar.remove_task(task)
            val_acc = evaluate(model, val_loader)
            state.epoch = epoch
            state.history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                                  "val_acc": val_acc,
                                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
            if checkpoint:
                _save(checkpoint, model, optimizer, state, epochs, seed)
            log(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}, val acc {val_acc:.4f}, "
                f"{state.history[-1]['seconds']:.1f} s")


def calibration_batch(splits, n_batches: int = 1, batch_size: int = 128, seed: int = 0) -> Tensor:
    """The first ``n_batches`` shuffled training batches, concatenated (what quantizers are calibrated on)."""
    xs = []
    for i, (x, _) in enumerate(splits.loader("train", batch_size=batch_size, shuffle=True, seed=seed)):
        if i >= n_batches:
            break
        xs.append(x)
    return torch.cat(xs)


def prepare_qat(model: nn.Module, plan: BitPlan, splits, *, calibration_batches: int = 1, batch_size: int = 128,
                seed: int = 0, placement: str = "tensor") -> nn.Module:
    """``quantize`` (folds BatchNorm; ``placement`` as in :func:`hwmpq.qmodules.quantize`) and calibrate the
    quantizers on ``calibration_batches`` training batches, no training (QAT is
    :func:`hwmpq.qat_options.run_qat`). Returns the quantized model (use it, not ``model``); its state_dict
    includes the quantizer scales."""
    from .qmodules import calibrate, quantize

    if calibration_batches < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
    model = quantize(model, plan, placement=placement)
    calibrate(model, [calibration_batch(splits, calibration_batches, batch_size, seed)])
    return model
