"""FrostNet's aids for quantization-aware training (Tae et al. 2020, "FrostNet: Towards Quantization-Aware
Network Architecture Search"): GradBoost and StatAssist.

**GradBoost** (a ``hwmpq.train.fit`` grad transform, :class:`GradBoost`): for every trained parameter,
per element, exponential moving averages of min|g| and max|g| are kept (the running gradient range).
After ``warmup_steps`` steps of collecting those statistics, each step adds to the gradient

    noise = sign(g) * clip(|Laplace(0, 1)| * scale * (max|g| - min|g|)_ema * (1 - decay)^t * mask, clip_by)

with ``mask`` a fair coin per element (FrostNet's "toss coin") and ``t`` the steps since the warm-up.
The noise is sign-matched (it only enlarges |g|, never flips it; elements with g == 0 get none), scaled by
the running range, decays exponentially, is randomly masked, and is clipped to ``clip_by`` in absolute value.
This follows the FrostNet reference optimizers (QSGD/QAdam); here it is an optimizer-independent transform.
Quantizer step sizes (LSQ ``scale``) are left alone: their gradients are already rescaled by LSQ.

**StatAssist** (:func:`float_warmup`): FrostNet starts QAT from the statistics of a short float training
(the assist): here, ``epochs`` of ordinary float training (BatchNorm in train mode, its running statistics
updated), after which ``quantize_`` folds BatchNorm with those statistics and the quantizers are calibrated
on several batches of the warmed-up model's activations. Simplified: FrostNet also hands the optimizer's
momentum from the float phase to the QAT phase; ``hwmpq.train.fit`` builds its own optimizer, so the
momentum is not carried over.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizers import LSQQuantizer


class GradBoostConfigError(ValueError):
    """Bad GradBoost settings."""


class GradBoost:
    """Grad transform ``t(model, step)``: adds FrostNet's sign-matched gradient noise in place (see module doc).

    ``last`` holds the step's diagnostics: mean |noise| over boosted elements, the decay factor, the fraction
    of elements that received noise."""

    def __init__(self, scale: float = 1.0, decay: float = 0.01, clip_by: float = 1e-3, mask_prob: float = 0.5,
                 beta: float = 0.9, warmup_steps: int = 10, seed: int = 0) -> None:
        if scale < 0 or not 0 <= decay < 1 or clip_by <= 0 or not 0 <= mask_prob <= 1 or not 0 < beta < 1 \
                or warmup_steps < 0:
            raise GradBoostConfigError(
                f"GradBoost needs scale >= 0, 0 <= decay < 1, clip_by > 0, 0 <= mask_prob <= 1, 0 < beta < 1, "
                f"warmup_steps >= 0; got scale={scale}, decay={decay}, clip_by={clip_by}, mask_prob={mask_prob}, "
                f"beta={beta}, warmup_steps={warmup_steps}")
        self.scale, self.decay, self.clip_by = scale, decay, clip_by
        self.mask_prob, self.beta, self.warmup_steps = mask_prob, beta, warmup_steps
        self.generator = torch.Generator().manual_seed(seed)
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.last: dict[str, float] = {}

    def decay_factor(self, step: int) -> float:
        """Noise multiplier at global ``step``: 0 during the warm-up, then (1 - decay)^(steps since)."""
        if step < self.warmup_steps:
            return 0.0
        return (1.0 - self.decay) ** (step - self.warmup_steps)

    def _update_range(self, p: nn.Parameter) -> torch.Tensor:
        """Per-element running range max|g| - min|g| (EMAs started at the first |g| seen)."""
        g = p.grad.detach().abs()
        st = self.state.get(id(p))
        if st is None or st["min"].shape != g.shape:
            st = self.state[id(p)] = {"min": g.clone(), "max": g.clone()}
        new_min, new_max = torch.minimum(st["min"], g), torch.maximum(st["max"], g)
        st["min"].mul_(self.beta).add_(new_min, alpha=1 - self.beta)
        st["max"].mul_(self.beta).add_(new_max, alpha=1 - self.beta)
        return (st["max"] - st["min"]).clamp_min(0)

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int) -> None:
        skip = {id(m.scale) for m in model.modules() if isinstance(m, LSQQuantizer)}
        factor = self.decay_factor(step) * self.scale
        total = boosted = 0
        noise_sum = 0.0
        for p in model.parameters():
            if p.grad is None or id(p) in skip:
                continue
            rng = self._update_range(p)
            total += p.grad.numel()
            if factor == 0.0:
                continue
            lap = torch.empty_like(p.grad).exponential_(1.0, generator=self.generator)  # |Laplace(0, 1)|
            keep = torch.rand(p.grad.shape, generator=self.generator) >= self.mask_prob
            noise = (lap * rng * factor * keep).clamp_(max=self.clip_by) * torch.sign(p.grad)
            p.grad.add_(noise)
            nz = noise != 0
            boosted += int(nz.sum())
            noise_sum += float(noise.abs().sum())
        self.last = {"mean_abs_noise": noise_sum / max(1, boosted), "decay_factor": factor,
                     "boosted_fraction": boosted / max(1, total)}


def float_warmup(model: nn.Module, splits, warmup_epochs: int, **fit_kwargs):
    """StatAssist's float phase: train the (float) ``model`` in place for ``warmup_epochs`` with
    ``hwmpq.train.fit`` (same keywords: lr, batch_size, seed, limit_batches, ...; ``epochs``, checkpoint and
    resume are the QAT run's and are not used here).
    Returns fit's TrainResult, or None for ``epochs == 0``. Refuses an already quantized model."""
    from .qmodules import QuantLayer
    from .train import fit

    if warmup_epochs < 0:
        raise ValueError(f"StatAssist epochs must be >= 0, got {warmup_epochs}")
    if any(isinstance(m, (QuantLayer, LSQQuantizer)) for m in model.modules()):
        raise ValueError("StatAssist warms up the float model: call it before quantize_/prepare_qat, not after")
    if warmup_epochs == 0:
        return None
    kw = {k: v for k, v in fit_kwargs.items() if k not in ("checkpoint", "resume", "epochs")}
    return fit(model, splits, epochs=warmup_epochs, **kw)
