"""Quantized layer wrappers, ``quantize_(model, plan)`` and BatchNorm folding.

Weights are quantized per output channel (symmetric) at w_bits by the layer's ``QuantLayer``. Where the
activation quantizers sit is the *placement*, a property of the target's exporter:

- ``"tensor"`` (ONNX Runtime): one quantizer per tensor, shared by producer and consumers
  (hwmpq/placement.py); the quantized model is a ``torch.fx.GraphModule`` over the model's modules.
- ``"layer"`` (TVM): each layer computes ``out_q(layer(in_q(x), w_q(W)))`` with its own input and output
  quantizers, which is what a per-layer integer kernel with requantize consumes.

Either way the output quantizer is what lets the backend run the layer as an integer kernel. Layers at
fp32 stay plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import trace
from .quantizers import LSQQuantizer, round_ste
from .records import BitPlan, Precision

PLACEMENTS = ("tensor", "layer")


def integer_bias(precision: Precision) -> bool:
    """Whether the exporters store the bias as int32 codes at scale in_scale * w_scale (the integer
    kernels' accumulator grid): int8-class weights and activations; int4 weights run as float."""
    return precision.w_bits <= 8 and precision.a_bits <= 8 and precision.w_bits != 4


def runs_own_forward(layer: nn.Module) -> bool:
    """Whether ``layer`` is a Conv2d/Linear subclass with a forward of its own (e.g. a TensorFlow "SAME"
    conv padding its input first): quantized, it runs that forward with the quantized weight and bias,
    so whatever it does around its kernel is kept."""
    return type(layer).forward not in (nn.Conv2d.forward, nn.Linear.forward)


class QuantLayer(nn.Module):
    """Wraps one Conv2d or Linear (sharing its parameters) with its weight quantizer and, in layer
    placement, its own input and output quantizers. In tensor placement the activation quantizers are
    the graph's (``set_input_quantizer`` links the one on its input) and the bias is rounded to the integer
    accumulator's grid, as the exported integer kernel adds it."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, precision: Precision, placement: str = "layer") -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}; use one of {PLACEMENTS}")
        self.layer = layer
        self.precision = precision
        self.placement = placement
        self.w_quant = LSQQuantizer(precision.w_bits, signed=True, channel_axis=0,
                                    num_channels=layer.weight.shape[0])
        if placement == "layer":
            self.in_quant = LSQQuantizer(precision.a_bits, signed=None)
            self.out_quant = LSQQuantizer(precision.a_bits, signed=True)
        else:
            self.in_quant = self.out_quant = None
        self._input_quantizer: list[LSQQuantizer] = []  # a reference, not a submodule (the graph owns it)

    @property
    def input_quantizer(self) -> LSQQuantizer | None:
        return self._input_quantizer[0] if self._input_quantizer else None

    def set_input_quantizer(self, q: LSQQuantizer) -> None:
        self._input_quantizer = [q]

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias as the integer kernel adds it: int32 codes at in_scale * w_scale (tensor placement)."""
        b = self.layer.bias
        q = self.input_quantizer
        if b is None or q is None or not integer_bias(self.precision) or not q.enabled:
            return b
        step = q.effective_scale().reshape(()) * self.w_quant.effective_scale()
        return torch.clamp(round_ste(b / step), -(2**31), 2**31 - 1) * step

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def quantized_weight(self) -> torch.Tensor:
        return self.w_quant(self.layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        w = self.w_quant(self.layer.weight)
        b = self.layer.bias if self.in_quant is not None else self.quantized_bias()
        if runs_own_forward(self.layer):
            params = {"weight": w} if b is None else {"weight": w, "bias": b}
            y = torch.func.functional_call(self.layer, params, (x,))
        elif isinstance(self.layer, nn.Conv2d):
            c = self.layer
            y = F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        else:
            y = F.linear(x, w, b)
        return self.out_quant(y) if self.out_quant is not None else y

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


def _wrap_layers(model: nn.Module, plan: BitPlan, fold_bn: bool, placement: str) -> None:
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = [f for f in plan.as_dict() if f not in names]
    if unknown:
        raise ValueError(f"plan names layers that are not Conv2d/Linear modules of the model: {unknown}")
    if fold_bn:
        fold_batchnorm(model)
    for fqn, precision in plan.layers:
        if precision.is_float:
            continue
        set_submodule(model, fqn, QuantLayer(model.get_submodule(fqn), precision, placement))


def quantize_(model: nn.Module, plan: BitPlan, *, fold_bn: bool = True) -> nn.Module:
    """Insert quantizers in place according to ``plan``, in layer placement (each quantized layer with
    its own input and output quantizers: the TVM targets' form); layers at fp32 stay float. Returns
    ``model``. :func:`quantize` is the general form (tensor placement for ONNX Runtime).

    BatchNorm is folded first (deployment numerics) unless ``fold_bn=False``. Quantizer step sizes are
    initialised from the first batch the model sees (run :func:`calibrate` for a deliberate start).
    """
    _wrap_layers(model, plan, fold_bn, "layer")
    return model


def quantize(model: nn.Module, plan: BitPlan, *, placement: str = "tensor", fold_bn: bool = True) -> nn.Module:
    """The quantized model for ``plan`` with activation quantizers placed as ``placement`` says (module
    docstring). ``"layer"`` is :func:`quantize_`. ``"tensor"`` returns a ``torch.fx.GraphModule`` over
    ``model``'s own modules (BatchNorm folded and layers wrapped in place, so hooks and optimizers on
    them stay valid) with one quantizer per tensor, ``tensor_quant.q<i>``; use the returned model, not
    ``model``, from then on."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}; use one of {PLACEMENTS}")
    if placement == "layer":
        return quantize_(model, plan, fold_bn=fold_bn)
    _wrap_layers(model, plan, fold_bn, "tensor")
    from .placement import place_tensor_quantizers

    modules = dict(model.named_modules())

    def integer_layer(node) -> Precision | None:
        m = modules.get(node.target) if node.op == "call_module" else None
        return m.precision if isinstance(m, QuantLayer) and m.precision.a_bits != 32 else None

    gm, inputs = place_tensor_quantizers(model, integer_layer, (QuantLayer,))
    for fqn, q in inputs.items():
        gm.get_submodule(fqn).set_input_quantizer(gm.tensor_quant[q])
    return gm


def float_view(model: nn.Module) -> nn.Module:
    """A copy of a quantized ``model`` computing in float: QuantLayers unwrapped to their (folded) layers,
    tensor quantizers made identities. For shape analysis, and as the float start of a new quantization."""
    import copy

    plain = copy.deepcopy(model)
    for fqn, q in quant_layers(plain).items():
        set_submodule(plain, fqn, q.layer)
    if isinstance(getattr(plain, "tensor_quant", None), nn.ModuleDict):
        for name in list(plain.tensor_quant):
            plain.tensor_quant[name] = nn.Identity()
    return plain


def placement_of(model: nn.Module) -> str | None:
    """"tensor" or "layer" for a quantized model, None for a float one."""
    layers = quant_layers(model)
    if not layers:
        return "tensor" if hasattr(model, "tensor_quant") else None
    return next(iter(layers.values())).placement


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
