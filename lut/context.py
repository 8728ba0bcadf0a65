"""Kernels in context, in the latency model: what each layer's kernel costs more inside the whole model
than alone, from the kernel rows ``hwmpq.profilers.context`` measures (the why and how of that
measurement are in its module doc).

How it is used: :func:`kernel_deltas` gives, per (layer, p), the median kernel time in the uniform plan
at p minus alone; ``build_table`` adds it to the layer's row at p (``context=True``, the default, where
the LUT holds both rows; a LUT without kernel rows gives the plain table). The uniform plans are never among ``lut
validate``'s random plans, which draw every layer's precision at random. A layer in a mixed plan gets
the delta of the uniform plan of its own precision: an approximation, as the caches a mixed plan leaves
lie between the uniform plans'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hwmpq.profilers.context import KIND, WHERE, kernel_signature, model_signature
from hwmpq.records import Edge, LayerSpec, MeasureConfig, Precision


def kernel_deltas(store, specs: Sequence[LayerSpec], edges: Sequence[Edge],
                  config: MeasureConfig) -> dict[tuple[str, Precision], float]:
    """{(layer fqn, precision): median kernel ms in the uniform plan minus alone} for the pairs whose
    two rows the store holds (a layer has rows only at the precisions it runs: in the uniform plan of a
    precision it does not allow, it runs fp32 and is not timed)."""
    model = model_signature(specs, edges)
    out = {}
    for p in sorted({m.precision for m in store.measurements(KIND)}):
        for s in specs:
            rows = [store.get(KIND, kernel_signature(model, s.fqn, w), p, config) for w in WHERE]
            if all(r is not None and r.ok for r in rows):
                out[(s.fqn, p)] = rows[0].latency_ms - rows[1].latency_ms
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
