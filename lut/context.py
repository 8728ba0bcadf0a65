"""Kernels in context, in the latency model: what each layer's kernel costs more inside the whole model
than alone, from the kernel rows ``hwmpq.profilers.context`` measures (the why and how of that
measurement are in its module doc).

How it is used: :func:`kernel_deltas` gives, per (layer, p), the median kernel time in a plan that
runs it at p minus alone, averaged over the uniform plan at p and the mixed context plans that run it at
p; ``build_table`` adds it to the layer's row at p (``context=True``, the default, where the LUT holds
both rows; a LUT without kernel rows gives the plain table). The average is one number per (layer, p),
so the table stays a sum the searches can optimise; the context of one particular plan lies around it.
The context plans are drawn from their own seeds, never ``lut validate``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hwmpq.profilers.context import (
    KIND,
    MIXED_PLANS,
    WHERE,
    kernel_signature,
    mixed_plan_names,
    model_signature,
)
from hwmpq.records import Edge, LayerSpec, MeasureConfig, Precision


def kernel_deltas(store, specs: Sequence[LayerSpec], edges: Sequence[Edge],
                  config: MeasureConfig) -> dict[tuple[str, Precision], float]:
    """{(layer fqn, precision): median kernel ms in the model minus alone, averaged over the context plans
    (the uniform plan at p, the mixed ones) that ran it at p} for the pairs with both rows of some plan in
    the store (in the uniform plan of a precision it does not allow, a layer runs fp32 and is not timed)."""
    model = model_signature(specs, edges)
    out = {}
    for p in sorted({m.precision for m in store.measurements(KIND)}):
        for s in specs:
            deltas = []
            for plan in [""] + mixed_plan_names(MIXED_PLANS):
                rows = [store.get(KIND, kernel_signature(model, s.fqn, w, plan), p, config) for w in WHERE]
                if all(r is not None and r.ok for r in rows):
                    deltas.append(rows[0].latency_ms - rows[1].latency_ms)
            if deltas:
                out[(s.fqn, p)] = float(np.mean(deltas))
    return out


def apply_deltas(lat: np.ndarray, specs: Sequence[LayerSpec], cands: Sequence[Precision],
                 deltas: dict[tuple[str, Precision], float]) -> np.ndarray:
    """``lat`` [layers, candidates] with each layer's delta at each precision added (floored at 0)."""
    out = lat.copy()
    for i, s in enumerate(specs):
        for j, p in enumerate(cands):
            d = deltas.get((s.fqn, p))
            if d is not None and np.isfinite(out[i, j]):
                out[i, j] = max(out[i, j] + d, 0.0)
    return out
