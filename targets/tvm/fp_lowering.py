"""Lower a module's float32 dense convs and linear layers to the fp32 tiled kernel (fpconv.py) before it
is tuned and compiled: ``nn.conv2d`` (NCHW/OIHW, groups 1, constant weights, symmetric padding) and
``matmul`` by a constant 2-d weight, each with the constant bias ``add`` that follows it fused into the
kernel. Run by every compile of a target that has the kernel (``TvmTarget._compile_to``), so a layer
row and the same layer inside an exported model are one kernel with one tuning record, whichever way
the Relax builder wrote the layer. Other ops (depthwise/grouped convs, integer layers) are untouched.
"""

from __future__ import annotations

import numpy as np

from .fpconv import FpKernel, FpWorkload, kernel_primfunc, pack_weights


def lower_float_layers(mod, fp_kernel: FpKernel):
    """``mod`` with every eligible float32 conv / linear replaced by the tiled kernel (bias fused)."""
    from tvm import relax

    mutator = _make_mutator()(mod, fp_kernel)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    mod = relax.transform.DeadCodeElimination()(mutator.builder_.finalize())
    return _without_unused_kernels(mod, set(mutator.kernels))


def _without_unused_kernels(mod, names: set[str]):
    """``mod`` minus the kernels made here that no Relax function calls (the bias-free ones a fused bias
    replaced): neither tuned nor built."""
    import tvm
    from tvm import relax

    used = {gv.name_hint for _, f in mod.functions_items() if isinstance(f, relax.Function)
            for gv in relax.analysis.all_global_vars(f)}
    return tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint not in names - used},
                        attrs=mod.attrs, global_infos=mod.global_infos)


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _static_shape(expr) -> tuple[int, ...] | None:
    from tvm import relax, tirx

    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None:
        return None
    dims = ty.shape.values if hasattr(ty.shape, "values") else None
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return _ints(dims)


def conv_workload(call, lanes: int) -> tuple[FpWorkload, np.ndarray] | None:
    """(workload without bias, OIHW weights) of an eligible ``relax.nn.conv2d`` call, else None."""
    from tvm.ir.expr import GenericConst

    x, w = call.args
    a = call.attrs
    shape = _static_shape(x)
    if shape is None or len(shape) != 4 or not isinstance(w, GenericConst) or int(a.groups) != 1:
        return None
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or "NCHW")) != ("NCHW", "OIHW", "NCHW"):
        return None
    if str(a.out_dtype or "float32") not in ("float32", "void", ""):
        return None
    top, left, bottom, right = _ints(a.padding)
    if (top, left) != (bottom, right):
        return None
    weight = w.value.numpy()
    if weight.dtype != np.float32:
        return None
    n, c, h, wd = shape
    return FpWorkload(lanes, n, h, wd, c, weight.shape[0], _ints(weight.shape[2:]), _ints(a.strides), (top, left),
                      _ints(a.dilation), bias=False), weight


def linear_workload(call, lanes: int) -> tuple[FpWorkload, np.ndarray] | None:
    """(workload without bias, OI weights) of ``matmul(x[n, c], constant[c, o])``, else None."""
    from tvm.ir.expr import GenericConst

    x, w = call.args
    shape = _static_shape(x)
    if shape is None or len(shape) != 2 or not isinstance(w, GenericConst):
        return None
    weight = w.value.numpy()
    if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[0] != shape[1]:
        return None
    return (FpWorkload(lanes, shape[0], 1, 1, shape[1], weight.shape[1], (1, 1), (1, 1), (0, 0), (1, 1), bias=False,
                       linear=True), np.ascontiguousarray(weight.T))


def _bias_of(const, wl: FpWorkload) -> np.ndarray | None:
    """The per-channel bias of an ``add`` operand shaped like the layer builders' ``(1, O[, 1, 1])``."""
    from tvm.ir.expr import GenericConst

    if not isinstance(const, GenericConst):
        return None
    b = const.value.numpy()
    want = (1, wl.o) if wl.linear else (1, wl.o, 1, 1)
    return b.reshape(-1).astype(np.float32) if b.dtype == np.float32 and b.shape == want else None


def _make_mutator():
    """The mutator class (built on first use: TVM is imported lazily)."""
    from dataclasses import replace

    from tvm import relax
    from tvm.ir import Op
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Lower(PyExprMutator):
        def __init__(self, mod, fp_kernel: FpKernel) -> None:
            super().__init__(mod)
            self.lanes = fp_kernel.lanes
            self.kernels: dict[str, tuple[FpWorkload, np.ndarray, object]] = {}  # kernel name -> layer

        def _emit_kernel(self, wl: FpWorkload, weight: np.ndarray, x, bias: np.ndarray | None):
            name = f"hwmpq_fpconv_{len(self.kernels)}"
            gv = self.builder_.add_func(kernel_primfunc(wl).with_attr("global_symbol", name), name)
            self.kernels[gv.name_hint] = (wl, weight, x)
            args = [x, relax.const(pack_weights(weight, wl.lanes))]
            if bias is not None:
                args.append(relax.const(bias))
            out = (wl.n, wl.o) if wl.linear else (wl.n, wl.o, *wl.out_hw)
            return relax.call_tir(gv, args, relax.TensorType(out, "float32"))

        def _kernel_call(self, var):
            """(workload, weights, input) when ``var`` is bound to a bias-free kernel call made here."""
            bound = self.lookup_binding(var) if isinstance(var, relax.Var) else None
            if not (isinstance(bound, relax.Call) and isinstance(bound.op, Op) and bound.op.name == "relax.call_tir"):
                return None
            layer = self.kernels.get(bound.args[0].name_hint)
            return layer if layer is not None and not layer[0].bias else None

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if not isinstance(call.op, Op):
                return call
            name = call.op.name
            if name in ("relax.nn.conv2d", "relax.matmul"):
                found = (conv_workload if name == "relax.nn.conv2d" else linear_workload)(call, self.lanes)
                if found is not None:
                    return self._emit_kernel(*found, call.args[0], None)
            if name == "relax.add":
                for var, other in (call.args, call.args[::-1]):
                    layer = self._kernel_call(var)
                    bias = _bias_of(other, layer[0]) if layer is not None else None
                    if bias is not None:  # the bias-free call becomes dead code
                        wl, weight, x = layer
                        return self._emit_kernel(replace(wl, bias=True), weight, x, bias)
            return call

    return _Lower
