"""Fake quantization with learned step size (LSQ, Esser et al. 2020) and integer semantics.

Forward numerics equal ONNX QuantizeLinear -> DequantizeLinear for the same scale and zero point:
``q = saturate(round_half_even(x / scale) + zero_point)``, ``y = (q - zero_point) * scale``, in float32.
Gradients are straight-through (LSQ's, with its gradient scale for the step size).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .records import FLOAT_BITS, VALID_BITS


class _RoundHalfEvenSTE(torch.autograd.Function):
    """Round half to even in the forward pass (exactly ``torch.round``), identity gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundHalfEvenSTE.apply(x)


class _GradScale(torch.autograd.Function):
    """Identity in the forward pass (bit-exact), gradient multiplied by ``g`` (LSQ's step-size scale)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def _scaled_grad(s: torch.Tensor, g: float) -> torch.Tensor:
    return s if g == 1.0 else _GradScale.apply(s, g)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code; signed codes are symmetric-friendly two's complement."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qmin: int, qmax: int,
               grad_scale: float = 1.0) -> torch.Tensor:
    """The ONNX QDQ pair in torch: divide, round half to even, add zero point, saturate, dequantize."""
    s = _scaled_grad(scale, grad_scale)
    q = torch.clamp(round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


class LSQQuantizer(nn.Module):
    """Per-tensor (activations) or per-channel (weights, ``channel_axis=0``) quantizer.

    ``bits=32`` is the identity. ``signed=None`` (activations) decides at calibration: unsigned when the
    observed input is non-negative (after ReLU), signed otherwise. Zero point is always 0 (symmetric
    signed, or unsigned from 0), which is what integer kernels want.
    """

    def __init__(self, bits: int, signed: bool | None = True, channel_axis: int | None = None,
                 num_channels: int = 1) -> None:
        super().__init__()
        if bits not in VALID_BITS:
            raise ValueError(f"bits={bits} is not supported; use one of {VALID_BITS}")
        self.bits = bits
        self.channel_axis = channel_axis
        self.register_buffer("signed_flag", torch.tensor(-1 if signed is None else int(signed)))
        n = num_channels if channel_axis is not None else 1
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def enabled(self) -> bool:
        return self.bits != FLOAT_BITS

    @property
    def signed(self) -> bool:
        return bool(self.signed_flag.item() != 0)

    @property
    def range(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Initialise the step size from data: max-abs for >=5 bits, LSQ's 2*mean|x|/sqrt(Qp) below."""
        if int(self.signed_flag) == -1:
            self.signed_flag.fill_(0 if float(x.min()) >= 0 else 1)
        qmax = self.range[1]
        if self.channel_axis is None:
            a = x.detach().abs().flatten().float()
            if a.numel() > 1_000_000:
                a = a[torch.randperm(a.numel(), device=a.device)[:1_000_000]]
            hi = torch.quantile(a, 0.9999) if a.numel() > 100 else a.max()
            lsq = 2 * a.mean() / math.sqrt(qmax)
            s = hi / qmax if self.bits >= 5 else torch.minimum(lsq, hi / qmax)
            s = s.reshape(1)
        else:
            dims = [d for d in range(x.dim()) if d != self.channel_axis]
            a = x.detach().abs()
            hi = a.amax(dim=dims)
            lsq = 2 * a.mean(dim=dims) / math.sqrt(qmax)
            s = hi / qmax if self.bits >= 5 else torch.minimum(lsq, hi / qmax)
        self.scale.copy_(torch.clamp(s, min=1e-8))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            self.calibrate(x)
        qmin, qmax = self.range
        g = 1.0 / math.sqrt(max(1, x.numel() // self.scale.numel()) * qmax) if self.training else 1.0
        return fake_quant(x, self._view(self.effective_scale(), x), 0, qmin, qmax, grad_scale=g)

    def effective_scale(self) -> torch.Tensor:
        """The step size actually used (and exported): positive, never zero."""
        return self.scale.abs().clamp_min(1e-8)

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        sign = {-1: "auto", 0: "unsigned", 1: "signed"}[int(self.signed_flag)]
        return f"bits={self.bits}, {sign}, {axis}"
