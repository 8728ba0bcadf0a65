"""Uniform-precision baselines through the same path as the searches (``--method uniform --bits 8``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hwmpq.records import FP32, Precision

from .base import SearchInputs, SearchResult, register_strategy
from .budget import within


@dataclass(frozen=True)
class UniformConfig:
    precision: Precision = Precision(8, 8)


@register_strategy(UniformConfig)
def uniform(inputs: SearchInputs, cfg: UniformConfig) -> SearchResult:
    """Every layer at ``cfg.precision``; a layer the LUT says cannot run it stays fp32 (and the notes say so).
    The budget is reported against, never enforced: a baseline is what it is."""
    t0 = time.perf_counter()
    table = inputs.table
    if cfg.precision not in table.candidates:
        raise ValueError(f"{cfg.precision.label} is not a candidate of the LUT for {table.target or 'this target'}; "
                         f"candidates: {[c.label for c in table.candidates]}")
    k = table.candidates.index(cfg.precision)
    notes, idx = [], []
    for fqn, allowed in zip(table.fqns, table.allowed, strict=True):
        if allowed[k]:
            idx.append(k)
        elif FP32 in table.candidates and allowed[table.candidates.index(FP32)]:
            idx.append(table.candidates.index(FP32))
            notes.append(f"{fqn}: {cfg.precision.label} not runnable on the target, kept fp32")
        else:
            raise ValueError(f"layer {fqn!r} can run neither {cfg.precision.label} nor fp32 by the LUT")
    lat, mj = table.predict_indices(idx)
    if not within(table, idx, inputs.budget):
        notes.append(f"uniform {cfg.precision.label} is over budget by the LUT ({lat:.4g} ms, {mj:.4g} mJ)")
    plan = table.plan_from_indices(idx, target=table.target)
    return SearchResult(plan=plan, predicted_ms=lat, predicted_mj=mj, notes=notes,
                        trace={"method": "uniform", "precision": cfg.precision.label, "notes": notes},
                        wall_s=time.perf_counter() - t0)
