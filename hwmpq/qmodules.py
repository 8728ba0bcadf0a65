"""Quantized layer wrappers, ``quantize_(model, plan)`` and BatchNorm folding.

A quantized layer at (w_bits, a_bits) computes ``out_q(layer(in_q(x), w_q(W)))``: input and output
activations at a_bits (per tensor), weights at w_bits (per output channel, symmetric). The output
quantizer is what lets ONNX Runtime and TVM run the layer as an integer kernel (QLinearConv / requantize).
Layers at fp32 stay plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import trace
from .quantizers import LSQQuantizer
from .records import BitPlan, Precision


class QuantLayer(nn.Module):
    """Wraps one Conv2d or Linear (sharing its parameters) with weight, input and output quantizers."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, precision: Precision) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.precision = precision
        self.w_quant = LSQQuantizer(precision.w_bits, signed=True, channel_axis=0,
                                    num_channels=layer.weight.shape[0])
        self.in_quant = LSQQuantizer(precision.a_bits, signed=None)
        self.out_quant = LSQQuantizer(precision.a_bits, signed=True)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def quantized_weight(self) -> torch.Tensor:
        return self.w_quant(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x)
        w = self.w_quant(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            y = F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = F.linear(x, w, self.layer.bias)
        return self.out_quant(y)

    def extra_repr(self) -> str:
        return self.precision.label


def get_submodule_parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent_name, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, fqn)
    setattr(parent, child, new)


@torch.no_grad()
def _fold(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
    old_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = beta + (old_bias - bn.running_mean) * factor
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.clone())
    else:
        conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear (its only user) into that layer, in
    place; the BatchNorm becomes Identity. Returns the (layer, batchnorm) pairs folded."""
    gm: fx.GraphModule = trace(model)
    modules = dict(gm.named_modules())
    folded = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[src.target], (nn.Conv2d, nn.Linear))):
            continue
        _fold(model.get_submodule(src.target), model.get_submodule(node.target))
        set_submodule(model, node.target, nn.Identity())
        folded.append((src.target, node.target))
    return folded


def quantize_(model: nn.Module, plan: BitPlan, *, fold_bn: bool = True) -> nn.Module:
    """Insert quantizers in place according to ``plan`` (layers at fp32 stay float).

    BatchNorm is folded first (deployment numerics) unless ``fold_bn=False``. Quantizer step sizes are
    initialised from the first batch the model sees (run :func:`calibrate` for a deliberate start).
    """
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = [f for f in plan.as_dict() if f not in names]
    if unknown:
        raise ValueError(f"plan names layers that are not Conv2d/Linear modules of the model: {unknown}")
    if fold_bn:
        fold_batchnorm(model)
    for fqn, precision in plan.layers:
        if precision.is_float:
            continue
        set_submodule(model, fqn, QuantLayer(model.get_submodule(fqn), precision))
    return model


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> None:
    """Initialise every quantizer's step size from the first batch (weights from the weights)."""
    was = model.training
    model.eval()
    for q in model.modules():
        if isinstance(q, LSQQuantizer):
            q.initialized.fill_(False)
    for x in batches:
        model(x)
        break
    model.train(was)
