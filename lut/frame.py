"""LUT rows as a pandas DataFrame: numbers as numbers, precision labels and signature shapes added."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .schema import COLUMNS


def _label(w: Any, a: Any) -> str | None:
    if w is None or pd.isna(w) or int(w) == 0:
        return None
    return "fp32" if int(w) == 32 and int(a) == 32 else f"w{int(w)}a{int(a)}"


def rows_frame(rows: list[dict[str, Any]], shapes: dict[tuple[str, str], str] | None = None) -> pd.DataFrame:
    """A frame of stored rows: one row per measurement, numeric columns numeric, ``emulated``/``ok`` bool,
    ``src_w_bits``/``src_a_bits`` missing (<NA>) where there is no source precision."""
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for c in ("latency_ms", "p10_ms", "p90_ms", "energy_mj", "time_unix", "min_repeat_ms", "timeout_s"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in ("w_bits", "a_bits", "n", "schema_version", "warmup", "number", "repeat", "threads"):
        df[c] = pd.to_numeric(df[c]).astype("int64")
    for c in ("src_w_bits", "src_a_bits"):
        df[c] = pd.to_numeric(df[c]).astype("Int64").mask(lambda s: s == 0)
    df["emulated"] = df["emulated"].astype(bool)
    df["precision"] = [_label(w, a) for w, a in zip(df["w_bits"], df["a_bits"], strict=True)]
    df["src_precision"] = [_label(w, a) for w, a in zip(df["src_w_bits"], df["src_a_bits"], strict=True)]
    df["ok"] = df["error_msg"].isna() & df["latency_ms"].notna()
    shapes = shapes or {}
    df["shape"] = [shapes.get((k, s)) for k, s in zip(df["kind"], df["signature"], strict=True)]
    return df
