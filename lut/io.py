"""LUT rows as pandas frames; export to Parquet/CSV, import and merge (refusing foreign rows unless forced).

Parquet files carry the LUT meta (schema version, target, device and its details) in their schema
metadata under ``hwmpq_meta``; CSV files are plain tables (every row still names its device, target
and schema version, but the device details are not kept).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hwmpq.atomic import atomic_write

from .schema import COLUMNS, version_problem
from .store import CorruptLutError, ForeignLutError, LutError, LutStore, row_to_measurement

FORMATS = ("parquet", "csv")
_META_KEY = b"hwmpq_meta"


def export_lut(store: LutStore, path: str | os.PathLike, fmt: str = "parquet") -> int:
    """Write every row of ``store`` to ``path`` (atomically); returns the number of rows."""
    if fmt not in FORMATS:
        raise LutError(f"export format {fmt!r} is not one of {FORMATS}")
    df = store.frame()
    if fmt == "csv":
        atomic_write(Path(path), lambda tmp: df.to_csv(tmp, index=False))
        return len(df)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[_META_KEY] = json.dumps(store.meta, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    atomic_write(Path(path), lambda tmp: pq.write_table(table, tmp))
    return len(df)


def read_export(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, str]]:
    """(rows, LUT meta) of an exported file; the format comes from the suffix (.parquet, .csv)."""
    p = Path(path)
    if not p.is_file():
        raise LutError(f"{p}: no such file to import")
    try:
        if p.suffix.lower() == ".csv":
            return pd.read_csv(p, dtype={"signature": str, "device": str, "config_key": str}), {}
        if p.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            raw = (table.schema.metadata or {}).get(_META_KEY)
            return table.to_pandas(), (json.loads(raw) if raw else {})
    except Exception as e:  # pyarrow and pandas raise many types for a damaged file
        raise CorruptLutError(f"{p}: not a readable LUT export ({type(e).__name__}: {e})") from None
    raise LutError(f"{p}: unknown export format {p.suffix!r}; use .parquet or .csv")


def copy_lut(store: LutStore, path: str | os.PathLike) -> None:
    """A consistent copy of ``store`` at ``path`` (SQLite backup API, then an atomic rename)."""
    import sqlite3

    p = Path(path)
    if p.exists():
        raise LutError(f"{p} already exists; choose a new --out path")

    def write(tmp: str) -> None:
        dst = sqlite3.connect(tmp)
        try:
            store._conn.backup(dst)
        finally:
            dst.close()

    atomic_write(p, write)


@dataclass(frozen=True)
class MergeReport:
    added: int  # keys the destination did not have
    replaced: int  # keys where the incoming row was better (ok over failed, else newer)
    kept: int  # keys where the destination's row stayed
    foreign: int  # incoming rows of another device/target/schema (taken only with force)


def _better(new: Any, old: Any) -> bool:
    if new.ok != old.ok:
        return new.ok
    return new.time_unix > old.time_unix


def _absorb(into: LutStore, incoming: list, shapes: dict, source: str, force: bool) -> MergeReport:
    mine = into.meta
    ident = (mine["device"], mine["target"])
    foreign = [m for m in incoming if (m.device, m.target) != ident]
    if foreign and not force:
        f = foreign[0]
        raise ForeignLutError(
            f"{source}: {len(foreign)} of {len(incoming)} rows come from another device or target "
            f"(e.g. device {f.device}, target {f.target!r}; {into.path} holds device {ident[0]}, target "
            f"{ident[1]!r}); pass --force (force=True) to take them knowingly")
    if foreign:
        warnings.warn(f"{source}: taking {len(foreign)} rows of another device/target (--force)", stacklevel=3)
    current = {_key(m): m for m in into.measurements(all_rows=True)}
    take, added, replaced = [], 0, 0
    for m in incoming:
        old = current.get(_key(m))
        if old is None or _better(m, old):
            take.append(m)
            added, replaced = added + (old is None), replaced + (old is not None)
            current[_key(m)] = m
    into.add_many(take)
    for (kind, sig), desc in shapes.items():
        into.note_shape(kind, sig, desc)
    return MergeReport(added, replaced, len(incoming) - len(take), len(foreign))


def _key(m: Any) -> tuple:
    src = (m.src_precision.w_bits, m.src_precision.a_bits) if m.src_precision else (0, 0)
    return (m.device, m.target, m.kind, m.signature, m.precision.w_bits, m.precision.a_bits, *src, m.config.key)


def import_lut(path: str | os.PathLike, into: LutStore, force: bool = False) -> MergeReport:
    """Add the rows of an exported file to ``into`` in one transaction, stored under this schema version;
    rows of another device or target, or of a schema version :func:`~hwmpq.lut.schema.migrate` does not
    upgrade, are refused unless ``force`` (forced rows keep their device and target)."""
    df, meta = read_export(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise CorruptLutError(f"{path}: not an hwmpq LUT export; missing columns {missing}")
    versions = sorted({int(v) for v in df["schema_version"].dropna().unique()})
    refused = [version_problem(v) for v in versions if version_problem(v)]  # older rows of the same meaning: taken
    if refused and not force:
        raise ForeignLutError(f"{path}: rows of {'; '.join(refused)}; {into.path} is version {into.schema_version}; "
                              "pass --force (force=True) to take them knowingly")
    df = df.astype(object).where(df.notna(), None)
    for c in ("src_w_bits", "src_a_bits"):
        df[c] = [0 if v is None else v for v in df[c]]
    records = df.to_dict("records")
    incoming = [row_to_measurement(r, where=f"{path} row {i}") for i, r in enumerate(records)]
    shapes = {(r["kind"], r["signature"]): r["shape"] for r in records if r.get("shape")}
    return _absorb(into, incoming, shapes, str(path), force)


def merge(a: LutStore, b: LutStore, *, force: bool = False) -> MergeReport:
    """Merge the rows of ``b`` into ``a`` (in place, one transaction). For a key both hold, a successful
    measurement beats a failed one, otherwise the newer one wins."""
    if b.schema_version != a.schema_version and not force:
        raise ForeignLutError(f"{b.path} is schema version {b.schema_version}, {a.path} is "
                              f"{a.schema_version}; pass --force (force=True) to merge knowingly")
    return _absorb(a, b.measurements(all_rows=True), b.shapes(), str(b.path), force)
