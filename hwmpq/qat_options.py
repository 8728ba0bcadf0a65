"""The one QAT path (`hwmpq train --qat`, the fine-tune after a search, the Python API, the benches) and the
options every QAT run accepts: SAQ's sharpness-aware minimisation and FrostNet's StatAssist and GradBoost.

:func:`run_qat` is the sequence::

    stat_assist(model, splits, options, **fit_kwargs)    # float warm-up (no-op unless options.stat_assist)
    prepare_qat(model, plan, splits, ...)                # quantize_ (BN folded with the warm-up's statistics), calibrate
    fit(model, splits, **fit_kwargs, **fit_hooks(options, model))

Mechanisms live in hwmpq/sam.py (SAMStep) and hwmpq/frost.py (GradBoost, float_warmup).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .records import BitPlan

if TYPE_CHECKING:
    from .train import TrainResult


@dataclass(frozen=True)
class QATOptions:
    sam: bool = False  # sharpness-aware minimisation (ascent to w + eps, ||eps|| <= rho, descent there)
    rho: float = 0.05
    stat_assist: bool = False  # float warm-up first, then QAT from the float statistics
    stat_assist_epochs: int = 1
    grad_boost: bool = False  # sign-matched Laplace gradient noise, range-scaled, decayed, masked, clipped
    grad_boost_scale: float = 1.0  # multiplier of FrostNet's noise (1.0 = the paper's magnitude)

    _version = 1

    def __post_init__(self) -> None:
        if self.rho <= 0 or self.stat_assist_epochs < 0 or self.grad_boost_scale < 0:
            raise ValueError(f"QATOptions: rho must be > 0, stat_assist_epochs >= 0, grad_boost_scale >= 0: {self}")

    @property
    def label(self) -> str:
        """Short name for tables: ``plain``, ``sam``, ``sa+gb``, ``sam+sa+gb``."""
        parts = [n for n, on in (("sam", self.sam), ("sa", self.stat_assist), ("gb", self.grad_boost)) if on]
        return "+".join(parts) or "plain"


def fit_hooks(options: QATOptions, model: nn.Module | None = None) -> dict[str, Any]:
    """Keywords for ``hwmpq.train.fit``: ``{"step_fn": SAMStep | None, "grad_transforms": [GradBoost] | []}``.

    ``step_fn`` is None without SAM (fit's default step then applies the transforms). Build fresh hooks per
    fit call: GradBoost keeps per-parameter gradient statistics. ``model`` is accepted for the contract and
    unused (the hooks find the weights at each step). StatAssist is *not* a fit hook: it is the float phase
    before ``quantize_``; call :func:`stat_assist` there (a model that is already quantized, such as a
    supernet's plan model, has no float phase left to assist)."""
    from .frost import GradBoost
    from .sam import SAMStep

    return {"step_fn": SAMStep(rho=options.rho) if options.sam else None,
            "grad_transforms": [GradBoost(scale=options.grad_boost_scale)] if options.grad_boost else []}


def stat_assist(model: nn.Module, splits, options: QATOptions, **fit_kwargs):
    """StatAssist's float warm-up, before quantization: trains the float ``model`` in place for
    ``options.stat_assist_epochs`` with fit's keywords (lr, batch_size, seed, limit_batches, ...; checkpoint
    and resume ignored). QAT then starts from these weights and BatchNorm statistics (folded when quantized).
    No-op (returns None) unless ``options.stat_assist``; otherwise returns the warm-up's TrainResult."""
    if not options.stat_assist:
        return None
    from .frost import float_warmup

    return float_warmup(model, splits, options.stat_assist_epochs, **fit_kwargs)


def run_qat(model: nn.Module, plan: BitPlan, splits, options: QATOptions | None = None, *, epochs: int,
            calibration_batches: int = 1, placement: str = "tensor", warm_up: bool = True,
            log: Callable[..., Any] = print, **fit_kwargs) -> tuple[nn.Module, TrainResult | None]:
    """StatAssist (if on) -> quantize + calibrate -> fit for ``epochs`` with SAM/GradBoost hooks. Returns the
    quantized model (use it, not ``model``) and fit's TrainResult (None for ``epochs == 0``: quantized and
    calibrated only). ``fit_kwargs`` are :func:`hwmpq.train.fit`'s (lr, batch_size, seed, checkpoint, ...).

    StatAssist's float warm-up runs when the options ask for it, ``warm_up`` is True (a resumed QAT run has
    had it), there is training to assist (``epochs >= 1``) and the plan quantizes a layer; the quantizers are
    then calibrated on at least 4 batches of the warmed-up model's activations. A ``model`` already quantized
    in ``placement`` (a QAT checkpoint, a search's plan model) is trained as it is: no float phase is left to
    warm up (said through ``log`` when StatAssist was asked) and its quantizer scales are kept."""
    from .qmodules import placement_of
    from .train import fit, prepare_qat

    options = options or QATOptions()
    if epochs < 0:
        raise ValueError(f"run_qat: epochs must be >= 0, got {epochs}")
    found = placement_of(model)
    if found is None:
        warmed = False
        if warm_up and epochs >= 1 and any(not p.is_float for _, p in plan.layers):
            if options.stat_assist:
                log("StatAssist: float warm-up before quantizing the plan")
            warmed = stat_assist(model, splits, options, log=log, **fit_kwargs) is not None
        model = prepare_qat(model, plan, splits, calibration_batches=max(calibration_batches, 4) if warmed
                            else calibration_batches, batch_size=fit_kwargs.get("batch_size", 128),
                            seed=fit_kwargs.get("seed", 0), placement=placement)
    elif found != placement:
        raise ValueError(f"the model is quantized per {found} but this QAT places quantizers per {placement}; "
                         "start from its float model")
    elif options.stat_assist:
        log("note: StatAssist: the model is already quantized, so there is no float phase to warm up; QAT "
            "starts from its quantizers")
    if epochs < 1:
        return model, None
    return model, fit(model, splits, epochs=epochs, log=log, **fit_kwargs, **fit_hooks(options, model))
