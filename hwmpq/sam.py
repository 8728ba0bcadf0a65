"""Sharpness-aware minimisation for quantized training (SAM: Foret et al. 2021; SAQ: Liu et al. 2021).

One step, with the quantizers in the loop:

1. forward/backward at the current weights ``w``: loss L(w) and gradient g;
2. ascent: ``eps = rho * g / ||g||`` (one global L2 norm over all perturbed tensors);
3. forward/backward at ``w + eps``: the gradient used for the update is taken *there*;
4. restore ``w`` exactly (saved copies, or by removing the hooks), apply the grad transforms, step.

What is perturbed (``perturb``):

* ``"quantized"`` (default, SAQ's choice): eps is added to the *output of each weight quantizer*, i.e.
  to Q(w), so the perturbation cannot vanish in rounding; g is dL/dQ(w). Layers without a weight
  quantizer (fp32 layers of a mixed plan, or a float model) have their float weight perturbed instead.
* ``"float"`` (plain SAM on the latent float weights, then quantized): eps is added to the Conv/Linear
  weights that received a gradient; small eps may be absorbed by rounding.

Only what the first forward actually used is perturbed (detected with forward hooks), so the step works on
a ``quantize_``-ed model, a float model, and the search supernet alike. Biases, BatchNorm and quantizer step
sizes are not perturbed (as in SAQ). BatchNorm running statistics are not updated by the second forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .quantizers import LSQQuantizer

PERTURB_MODES = ("quantized", "float")
LossFn = Callable[[Tensor, Tensor], Tensor]


class SAMConfigError(ValueError):
    """Bad SAM settings (rho, perturbation mode)."""


def _is_weight_quantizer(m: nn.Module) -> bool:
    # weight quantizers are per-channel (QuantLayer.w_quant, the supernet's w_quants); activations per-tensor
    return isinstance(m, LSQQuantizer) and m.channel_axis is not None


@dataclass
class _Sites:
    """What one forward used: weight-quantizer outputs (quantized mode) and plain weight parameters."""

    q_out: dict[LSQQuantizer, Tensor] = field(default_factory=dict)
    params: dict[int, nn.Parameter] = field(default_factory=dict)


def _record_sites(model: nn.Module, perturb: str) -> tuple[_Sites, list]:
    """Install hooks that record, during the next forward, which weights were used."""
    sites, handles = _Sites(), []
    if perturb == "quantized":
        def keep_q(mod, args, out):
            out = out.view_as(out)  # a non-leaf even for an identity (32-bit) quantizer
            out.retain_grad()
            sites.q_out[mod] = out
            return out

        def keep_plain(mod, args, out):
            sites.params[id(mod.weight)] = mod.weight

        for m in model.modules():
            if _is_weight_quantizer(m):
                handles.append(m.register_forward_hook(keep_q))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(keep_plain))  # fires only when the module itself runs
    return sites, handles


def _float_params(model: nn.Module) -> dict[int, nn.Parameter]:
    return {id(m.weight): m.weight for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.grad is not None}


class _Perturbation:
    """eps from the gradients of the recorded sites; ``apply`` moves to w + eps, ``restore`` moves back."""

    def __init__(self, sites: _Sites, rho: float) -> None:
        self.q_eps: dict[LSQQuantizer, Tensor] = {}
        self.p_eps: dict[int, tuple[nn.Parameter, Tensor]] = {}
        grads = []
        for q, out in sites.q_out.items():
            if out.grad is not None:
                self.q_eps[q] = out.grad.detach().clone()
                grads.append(self.q_eps[q])
        for k, p in sites.params.items():
            if p.grad is not None:
                self.p_eps[k] = (p, p.grad.detach().clone())
                grads.append(self.p_eps[k][1])
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
        self.grad_norm = float(norm)
        factor = rho / (self.grad_norm + 1e-12)
        for g in grads:
            g.mul_(factor)  # in place: the dicts now hold eps
        self.eps_norm = rho if self.grad_norm > 0 else 0.0
        self._handles: list = []
        self._saved: dict[int, Tensor] = {}

    @torch.no_grad()
    def apply(self) -> None:
        for q, eps in self.q_eps.items():
            self._handles.append(q.register_forward_hook(lambda mod, args, out, e=eps: out + e))
        for k, (p, eps) in self.p_eps.items():
            self._saved[k] = p.detach().clone()
            p.add_(eps)

    @torch.no_grad()
    def restore(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for k, (p, _) in self.p_eps.items():
            if k in self._saved:
                p.copy_(self._saved[k])
        self._saved.clear()


class _FrozenBatchNormStats:
    """Context: BatchNorm running statistics are left untouched by the forwards inside."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc) -> None:
        for m, (mom, nbt) in zip(self.bns, self.saved, strict=True):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _first_pass(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, perturb: str) -> tuple[Tensor, _Sites]:
    sites, handles = _record_sites(model, perturb)
    try:
        loss = loss_fn(model(x), y)
        if torch.isfinite(loss):
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    if perturb == "float":
        sites.params = _float_params(model)
    return loss, sites


def _check(rho: float, perturb: str) -> None:
    if not rho > 0:
        raise SAMConfigError(f"SAM rho must be > 0 (the radius of the ascent step), got {rho}")
    if perturb not in PERTURB_MODES:
        raise SAMConfigError(f"SAM perturb={perturb!r} is not one of {PERTURB_MODES}")


class SAMStep:
    """A ``hwmpq.train.fit`` step function (StepFn) doing one SAM/SAQ update; see the module docstring.

    ``last`` holds the step's diagnostics: loss at w, loss at w + eps, ||g||, ||eps||."""

    def __init__(self, rho: float = 0.05, perturb: str = "quantized") -> None:
        _check(rho, perturb)
        self.rho, self.perturb = rho, perturb
        self.steps = 0
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, optimizer: Optimizer, loss_fn: LossFn,
                 grad_transforms: Sequence[Callable] = ()) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, sites = _first_pass(model, x, y, loss_fn, self.perturb)
        if not torch.isfinite(loss):
            return loss.detach()
        pert = _Perturbation(sites, self.rho)
        optimizer.zero_grad(set_to_none=True)
        pert.apply()
        try:
            with _FrozenBatchNormStats(model):
                loss_adv = loss_fn(model(x), y)
                if torch.isfinite(loss_adv):
                    loss_adv.backward()
        finally:
            pert.restore()
        if not torch.isfinite(loss_adv):  # no update from a non-finite perturbed loss (as fit's default step)
            optimizer.zero_grad(set_to_none=True)
            self.last = {"loss": float(loss.detach()), "loss_perturbed": float(loss_adv.detach()), "skipped": 1.0}
            self.steps += 1
            return loss.detach()
        for t in grad_transforms:
            t(model, self.steps)
        optimizer.step()
        self.last = {"loss": float(loss.detach()), "loss_perturbed": float(loss_adv.detach()), "grad_norm": pert.grad_norm,
                     "eps_norm": pert.eps_norm}
        self.steps += 1
        return loss.detach()


def sharpness(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], loss_fn: LossFn, rho: float = 0.05,
              perturb: str = "quantized") -> tuple[float, float]:
    """SAQ's sharpness ``L(w + eps) - L(w)`` averaged over ``batches`` (eps from each batch's gradient),
    in eval mode. Returns (sharpness, mean L(w)). Weights, grads and BatchNorm statistics are left as found
    (``.grad`` is cleared)."""
    _check(rho, perturb)
    was = model.training
    model.eval()
    diffs, losses = [], []
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            loss, sites = _first_pass(model, x, y, loss_fn, perturb)
            pert = _Perturbation(sites, rho)
            pert.apply()
            try:
                with torch.no_grad():
                    loss_adv = loss_fn(model(x), y)
            finally:
                pert.restore()
            diffs.append(float(loss_adv) - float(loss.detach()))
            losses.append(float(loss.detach()))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    n = max(1, len(diffs))
    return sum(diffs) / n, sum(losses) / n
