"""Layer-by-precision views of a LUT: the matrix ``lut show`` prints and the heatmap ``--plot`` draws."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hwmpq.atomic import atomic_write
from hwmpq.records import Precision


@dataclass(frozen=True)
class LayerMatrix:
    """``values[r, c]`` (the column ``value``, e.g. latency_ms) for row label r and precision column c;
    NaN where not measured or failed (``failed[r, c]`` tells which)."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    values: np.ndarray
    failed: np.ndarray
    value: str = "latency_ms"


def short_shape(description: str | None) -> str:
    """``conv 16->32 k3 s2 32x32`` from a stored layer shape description (JSON of shape fields)."""
    if not description:
        return "?"
    try:
        d = json.loads(description)
        if "tensor_shape" in d:
            return "x".join(str(v) for v in d["tensor_shape"])
        k = d["kernel"][0]
        hw = "x".join(str(v) for v in d["in_hw"])
        return f"{d['kind']} {d['in_channels']}->{d['out_channels']} k{k} s{d['stride'][0]} {hw}"
    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
        return description[:40]


def _column_order(labels: Sequence[str]) -> list[str]:
    """fp32 first, then by decreasing (w, a) bits."""
    return sorted(set(labels), key=lambda s: tuple(-b for b in _bits(s)))


def _bits(label: str) -> tuple[int, int]:
    p = Precision.parse(label)
    return p.w_bits, p.a_bits


def pick_config(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Rows of the most common MeasureConfig (a LUT may hold several), and the other config keys."""
    if df.empty:
        return df, []
    counts = df["config_key"].value_counts()
    return df[df["config_key"] == counts.index[0]], list(counts.index[1:])


VALUES = ("latency_ms", "p10_ms", "p90_ms", "energy_mj")


def layer_matrix(df: pd.DataFrame, order: Sequence[tuple[str, str]] | None = None,
                 value: str = "latency_ms") -> LayerMatrix:
    """The layer rows of a LUT frame as a matrix. ``order``: (row label, signature) pairs, e.g. the model's
    layers in execution order; by default one row per signature, labelled by its shape."""
    if value not in VALUES:
        raise ValueError(f"cannot show {value!r}; choose one of {VALUES}")
    layers = df[df["kind"] == "layer"].sort_values("time_unix")
    cols = _column_order(layers["precision"].dropna().tolist())
    if order is None:
        sigs = list(dict.fromkeys(layers["signature"]))
        shape_of = dict(zip(layers["signature"], layers["shape"], strict=True))
        order = [(f"{short_shape(shape_of[s])} [{s[:6]}]", s) for s in sigs]
    lat = np.full((len(order), len(cols)), np.nan)
    failed = np.zeros(lat.shape, dtype=bool)
    cell = {(r.signature, r.precision): r for r in layers.itertuples()}  # newest row wins (sorted by time)
    for i, (_, sig) in enumerate(order):
        for j, col in enumerate(cols):
            r = cell.get((sig, col))
            if r is not None:
                if r.ok:
                    lat[i, j] = getattr(r, value)
                else:
                    failed[i, j] = True
    return LayerMatrix(tuple(label for label, _ in order), tuple(cols), lat, failed, value)


def plot_heatmap(matrix: LayerMatrix, path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG heatmap (log colour scale, ms annotated; failed cells hatched, missing ones blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n_rows, n_cols = matrix.values.shape
    if n_rows == 0 or n_cols == 0:
        raise ValueError(f"the LUT has no layer {matrix.value} values to plot")
    fig, ax = plt.subplots(figsize=(1.3 + 1.1 * n_cols + 3.0, 1.2 + 0.32 * n_rows))
    data = np.ma.masked_invalid(matrix.values)
    finite = matrix.values[np.isfinite(matrix.values)]
    norm = LogNorm(vmin=max(finite.min(), 1e-6), vmax=max(finite.max(), 2e-6)) if finite.size else None
    im = ax.imshow(data, aspect="auto", cmap="viridis", norm=norm)
    for i in range(n_rows):
        for j in range(n_cols):
            v = matrix.values[i, j]
            if np.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
            elif matrix.failed[i, j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", color="red", lw=0))
                ax.text(j, i, "failed", ha="center", va="center", fontsize=6, color="red")
    ax.set_xticks(range(n_cols), matrix.columns)
    ax.set_yticks(range(n_rows), matrix.rows, fontsize=7)
    ax.set_xlabel("precision")
    ax.set_title(title or f"{matrix.value} per layer and precision", fontsize=9)
    if norm is not None:
        fig.colorbar(im, ax=ax, label=f"{matrix.value} (log scale)")
    fig.tight_layout()
    try:  # readers never see half a PNG; savefig takes the format from the temporary file's extension
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
    finally:
        plt.close(fig)
