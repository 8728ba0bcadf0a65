"""The single-path supernet shared by DNAS and SSPS.

Per quantizable layer one float weight (BatchNorm folded first, as deployment does), quantized at every
candidate precision the LUT allows for that layer (one LSQ quantizer set per candidate), the candidate
outputs mixed by weights derived from per-layer architecture logits ``alpha`` [L, P]. The cost of a
distribution over plans is the LUT's differentiable expectation (transitions included).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.lut.table import LatencyTable
from hwmpq.qmodules import QuantLayer, fold_batchnorm, set_submodule
from hwmpq.quantizers import LSQQuantizer
from hwmpq.records import BitPlan, Precision


class MissingLayersError(ValueError):
    """The LUT does not cover every quantizable layer of the model (or names layers it does not have)."""


class MixedQuantLayer(nn.Module):
    """One Conv2d/Linear shared by all candidates; ``mix`` ([P] weights, set before forward) mixes them.

    Candidates with a zero mixing weight are skipped (a fixed layer runs its single path only)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, candidates: tuple[Precision, ...], allowed: np.ndarray) -> None:
        super().__init__()
        self.layer = layer
        self.candidates = tuple(candidates)
        self.allowed = [int(i) for i in np.flatnonzero(allowed)]
        n_out = layer.weight.shape[0]
        self.w_quants = nn.ModuleList(LSQQuantizer(p.w_bits, True, 0, n_out) for p in candidates)
        self.in_quants = nn.ModuleList(LSQQuantizer(p.a_bits, signed=None) for p in candidates)
        self.out_quants = nn.ModuleList(LSQQuantizer(p.a_bits, signed=True) for p in candidates)
        self.mix: torch.Tensor | None = None

    def path(self, x: torch.Tensor, k: int) -> torch.Tensor:
        x = self.in_quants[k](x)
        w = self.w_quants[k](self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            y = F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = F.linear(x, w, self.layer.bias)
        return self.out_quants[k](y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            raise RuntimeError("MixedQuantLayer: call Supernet.forward (it sets the mixing weights)")
        out = None
        for k in self.allowed:
            if float(self.mix[k].detach()) == 0.0:  # exactly zero: no output and no gradient to alpha
                continue
            y = self.mix[k] * self.path(x, k)
            out = y if out is None else out + y
        return out

    @torch.no_grad()
    def weight_error(self) -> np.ndarray:
        """[P] relative weight quantization error ||W - Q_p(W)||^2 / ||W||^2 (inf where not allowed)."""
        w = self.layer.weight.detach()
        err = np.full(len(self.candidates), np.inf)
        for k in self.allowed:
            q = self.w_quants[k]
            if not bool(q.initialized) and q.enabled:
                q.calibrate(w)
            err[k] = float(((w - q(w)) ** 2).sum() / (w**2).sum().clamp_min(1e-12))
        return err


def check_coverage(model: nn.Module, table: LatencyTable) -> None:
    """Every Conv2d/Linear of the model must be a row of the LUT, and vice versa."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    missing = [f for f in layers if f not in table.fqns]
    extra = [f for f in table.fqns if f not in layers]
    if missing:
        raise MissingLayersError(f"the LUT has no rows for layers {missing} of the model; profile them "
                                 "(hwmpq search ... --profile-missing, or hwmpq profile)")
    if extra:
        raise MissingLayersError(f"the LUT names layers the model does not have: {extra}; was it built for "
                                 "another model?")
    none = [f for f, ok in zip(table.fqns, table.allowed.any(axis=1), strict=True) if not ok]
    if none:
        raise MissingLayersError(f"the LUT has no runnable precision for layers {none}; profile them "
                                 "(--profile-missing) or check the target's precisions")


class Supernet(nn.Module):
    """Wraps a copy of a float model; ``alpha`` are the architecture logits, ``fixed[l]`` >= 0 pins a layer."""

    def __init__(self, model: nn.Module, table: LatencyTable) -> None:
        super().__init__()
        check_coverage(model, table)
        net = copy.deepcopy(model)
        fold_batchnorm(net)
        self.table = table
        self.fqns = tuple(table.fqns)
        self.candidates = tuple(table.candidates)
        for fqn, allowed in zip(table.fqns, table.allowed, strict=True):
            set_submodule(net, fqn, MixedQuantLayer(net.get_submodule(fqn), self.candidates, allowed))
        self.net = net
        self.alpha = nn.Parameter(torch.zeros(len(self.fqns), len(self.candidates)))
        self.register_buffer("mask", torch.as_tensor(table.allowed))
        self.register_buffer("fixed", torch.full((len(self.fqns),), -1, dtype=torch.long))

    def layers(self) -> list[MixedQuantLayer]:
        return [self.net.get_submodule(f) for f in self.fqns]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "alpha"]

    def logits(self) -> torch.Tensor:
        return self.alpha.masked_fill(~self.mask, -math.inf)

    def probs(self) -> torch.Tensor:
        """[L, P] softmax over allowed candidates; fixed layers are one-hot."""
        p = torch.softmax(self.logits(), dim=1)
        if (self.fixed >= 0).any():
            onehot = F.one_hot(self.fixed.clamp_min(0), len(self.candidates)).to(p.dtype)
            p = torch.where((self.fixed >= 0)[:, None], onehot, p)
        return p

    def mixing(self, tau: float, gumbel: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel-softmax (or plain softmax) weights at temperature ``tau``; fixed rows one-hot."""
        logits = self.logits()
        if gumbel:
            u = torch.rand(logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
            logits = logits - torch.log(-torch.log(u))
        w = torch.softmax(logits / tau, dim=1)
        fixed = self.fixed >= 0
        if fixed.any():
            onehot = F.one_hot(self.fixed.clamp_min(0), len(self.candidates)).to(w.dtype)
            w = torch.where(fixed[:, None], onehot, w)
        return w

    def forward(self, x: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
        mix = self.probs() if mix is None else mix
        for layer, m in zip(self.layers(), mix, strict=True):
            layer.mix = m
        try:
            return self.net(x)
        finally:
            for layer in self.layers():
                layer.mix = None

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Initialise every candidate's quantizers on ``x`` (all paths run; same batch on every rank)."""
        for q in self.modules():
            if isinstance(q, LSQQuantizer):
                q.initialized.fill_(False)
        mix = self.mask.to(torch.float32) / self.mask.sum(dim=1, keepdim=True)
        was = self.training
        self.eval()
        self(x, mix)
        self.train(was)

    def argmax_indices(self) -> list[int]:
        return [int(i) for i in self.probs().argmax(dim=1)]

    def sensitivity(self) -> np.ndarray:
        """[L, P] weight quantization error per layer and candidate (the repair's sensitivity estimate)."""
        return np.stack([m.weight_error() for m in self.layers()])

    @torch.no_grad()
    def to_plan_model(self, plan: BitPlan) -> nn.Module:
        """A normal ``quantize_``-style model for ``plan`` (BN folded, QuantLayer per quantized layer) with the
        supernet's float weights and the chosen candidates' trained quantizer scales."""
        plan.validate_against(self.fqns)
        net = copy.deepcopy(self.net)
        for fqn, precision in plan.layers:
            mq: MixedQuantLayer = net.get_submodule(fqn)
            if precision not in self.candidates:
                raise ValueError(f"layer {fqn!r}: {precision.label} is not a candidate of this supernet")
            k = self.candidates.index(precision)
            if precision.is_float:
                set_submodule(net, fqn, mq.layer)
                continue
            q = QuantLayer(mq.layer, precision)
            q.w_quant.load_state_dict(mq.w_quants[k].state_dict())
            q.in_quant.load_state_dict(mq.in_quants[k].state_dict())
            q.out_quant.load_state_dict(mq.out_quants[k].state_dict())
            set_submodule(net, fqn, q)
        return net
