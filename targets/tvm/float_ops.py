"""Float32 ops of an exported model outside the integer stream (stream.py), in torch's NCHW layout: a few
rules here, and through TVM's own torch.fx importer any other op it knows (padding, concat, products,
sigmoid, SiLU, Hardswish, slicing, reshapes, ...)."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hwmpq.graph import describe


class FloatOpError(ValueError):
    """An op has no float rule here and TVM's importer has none (or failed); the message names it."""


_FUNCS = {operator.add: "add", torch.add: "add", operator.iadd: "add", F.relu: "relu", torch.relu: "relu",
          torch.flatten: "flatten", F.adaptive_avg_pool2d: "gap"}


def _module_rule(bb, mod: nn.Module, x, batch: int):
    from tvm import relax

    op = relax.op
    if isinstance(mod, nn.ReLU):
        return bb.emit(op.nn.relu(x))
    if isinstance(mod, nn.ReLU6):
        return bb.emit(op.clip(x, 0, 6))
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(mod, nn.Flatten) and (mod.start_dim, mod.end_dim) == (1, -1):
        return bb.emit(op.reshape(x, (batch, -1)))
    if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
        return bb.emit(op.mean(x, axis=[2, 3], keepdims=True))
    if isinstance(mod, nn.BatchNorm2d):
        inv = (mod.weight / torch.sqrt(mod.running_var + mod.eps)).detach().numpy().reshape(1, -1, 1, 1)
        shift = (mod.bias.detach().numpy().reshape(1, -1, 1, 1) - mod.running_mean.numpy().reshape(1, -1, 1, 1) * inv)
        return bb.emit(op.add(op.multiply(x, relax.const(inv.astype(np.float32))),
                              relax.const(shift.astype(np.float32))))
    if isinstance(mod, nn.ConstantPad2d):  # ZeroPad2d too; TVM's importer has the function, not the module
        left, right, top, bottom = mod.padding
        return bb.emit(op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], "constant", float(mod.value)))
    return None


def float_rule(bb, node: fx.Node, args, modules: dict[str, nn.Module], batch: int):
    """``node`` on float32 NCHW ``args`` by a rule of this module, or None (no rule: the importer's)."""
    from tvm import relax

    if node.op == "call_module":
        return _module_rule(bb, modules[node.target], args[0], batch)
    if node.op not in ("call_function", "call_method"):
        return None
    kind = _FUNCS.get(node.target) if node.op == "call_function" else node.target
    if kind == "add" and len(args) == 2 and not node.kwargs:
        return bb.emit(relax.op.add(args[0], args[1]))
    if kind == "relu":
        return bb.emit(relax.op.nn.relu(args[0]))
    if kind == "gap" and args[1] in (1, (1, 1)):
        return bb.emit(relax.op.mean(args[0], axis=[2, 3], keepdims=True))
    if (kind == "flatten" and tuple(args[1:2]) == (1,) and len(args) == 2 and not node.kwargs) or \
            (kind in ("view", "reshape") and len(args) == 3 and args[2] == -1):
        return bb.emit(relax.op.reshape(args[0], (batch, -1)))  # flatten(x, 1) / x.view(N, -1)
    return None


class FloatOps:
    """Ops without a rule here, emitted in float by TVM's own torch.fx importer (what
    ``relax.frontend.torch.from_fx`` uses), on this export's block builder and values."""

    def __init__(self, bb, model: nn.Module, env: dict) -> None:
        from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

        self.model = model
        self.importer = TorchFXImporter()
        self.importer.block_builder = bb
        self.importer.named_modules = dict(model.named_modules())
        self.importer.env = env

    def _key(self, node: fx.Node):
        if node.op == "call_module":
            return type(self.importer.named_modules[node.target])
        return node.target.__name__ if node.op == "call_function" else node.target

    def emit(self, node: fx.Node):
        from tvm import relax

        imp = self.importer
        if node.op == "get_attr":
            return imp._fetch_attr(self.model, node.target)
        key = self._key(node)
        if key not in imp.convert_map:
            raise FloatOpError(f"{describe(node, imp.named_modules)} has no TVM export rule")
        if node.op == "call_module":  # the converters look parameters up by tensor
            for p in imp.named_modules[node.target].parameters():
                imp.params.setdefault(p, relax.const(p.detach().float().numpy()))
        try:
            return imp.convert_map[key](node)
        except Exception as e:  # noqa: BLE001 - any importer failure names the op
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FloatOpError(f"{describe(node, imp.named_modules)}: TVM's importer failed "
                               f"({type(e).__name__}: {first})") from e
