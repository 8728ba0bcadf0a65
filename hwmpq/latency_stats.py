"""The one summary of timing samples every measurement quotes: median, p10, p90 (numpy's default linear
percentiles) and the sample count, in ms."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int


def summarize(latencies_ms: Iterable[float]) -> LatencyStats:
    """Median, p10 and p90 of the samples (ms); refuses an empty, non-finite or negative sample."""
    import numpy as np

    a = np.asarray(list(latencies_ms), dtype=float)
    if a.size == 0:
        raise ValueError("no latencies to summarize")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"invalid latencies (min {a.min()!r}, max {a.max()!r})")
    p10, med, p90 = (float(v) for v in np.percentile(a, [10, 50, 90]))
    return LatencyStats(med, p10, p90, int(a.size))
