"""The LUT file's schema: its version, the measurement columns, the tables' DDL (lut/store.py), and the one
way an older file becomes this version (:func:`migrate`) or is refused (:func:`version_problem`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .errors import LutError

# What each version holds:
# 1: rows priced per-layer quantizers (a quantize/dequantize pair around every layer)
# 2: ort-x86 layer rows and chains price the tensor-placement export (one quantizer per tensor, integer
#    residual adds: targets/ort/layers.py emit_glue)
# 3: as 2, plus the ``inflight`` table of jobs a profiler started and has not committed, and the
#    ``stable_pct`` column (MeasureConfig.stable_pct, adaptive repeats; 0 in rows of older files)
SCHEMA_VERSION = 3
# the oldest version whose rows mean what this version's rows mean: migrate() renumbers them
OLDEST_UPGRADABLE = 2
# model: a whole uniform plan timed end to end (a kind the schema accepts; hwmpq writes no such rows);
# kernel: a layer's kernel inside a context plan of the model (uniform or mixed), or alone (profilers/context.py)
KINDS = ("layer", "transition", "overhead", "model", "kernel")

CONFIG_COLS = ("warmup", "number", "repeat", "min_repeat_ms", "threads", "timeout_s", "statistic", "stable_pct")
KEY_COLS = ("device", "target", "kind", "signature", "w_bits", "a_bits", "src_w_bits", "src_a_bits",
            "config_key", "schema_version")
VALUE_COLS = ("latency_ms", "p10_ms", "p90_ms", "n", "energy_mj", "energy_source", "emulated", "error_msg",
              "time_unix", "versions_json") + CONFIG_COLS
COLUMNS = KEY_COLS + VALUE_COLS

# jobs a profiler started and has not committed: a process that dies inside a job (a native crash in a
# backend, or a kill) leaves its row here, so a job that keeps killing the profiler can be given up on
INFLIGHT_DDL = f"""
CREATE TABLE IF NOT EXISTS inflight ({", ".join(f"{c} {'INTEGER' if 'bits' in c else 'TEXT'} NOT NULL"
                                               for c in KEY_COLS[:9])},
  attempts INTEGER NOT NULL, started_unix REAL NOT NULL, PRIMARY KEY ({", ".join(KEY_COLS[:9])}));
"""
DDL = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE measurements (
  device TEXT NOT NULL, target TEXT NOT NULL, kind TEXT NOT NULL, signature TEXT NOT NULL,
  w_bits INTEGER NOT NULL, a_bits INTEGER NOT NULL, src_w_bits INTEGER NOT NULL, src_a_bits INTEGER NOT NULL,
  config_key TEXT NOT NULL, schema_version INTEGER NOT NULL,
  latency_ms REAL, p10_ms REAL, p90_ms REAL, n INTEGER NOT NULL, energy_mj REAL, energy_source TEXT NOT NULL,
  emulated INTEGER NOT NULL, error_msg TEXT, time_unix REAL NOT NULL, versions_json TEXT NOT NULL,
  warmup INTEGER NOT NULL, number INTEGER NOT NULL, repeat INTEGER NOT NULL, min_repeat_ms REAL NOT NULL,
  threads INTEGER NOT NULL, timeout_s REAL NOT NULL, statistic TEXT NOT NULL, stable_pct REAL NOT NULL DEFAULT 0,
  PRIMARY KEY ({", ".join(KEY_COLS)})
);
CREATE TABLE shapes (kind TEXT NOT NULL, signature TEXT NOT NULL, description TEXT NOT NULL,
  PRIMARY KEY (kind, signature));
""" + INFLIGHT_DDL


def version_problem(version: int) -> str | None:
    """Why a file of schema ``version`` cannot be used as this version (None: it is this version, or
    :func:`migrate` upgrades it)."""
    if version > SCHEMA_VERSION:
        return (f"schema version {version} (this hwmpq reads version {SCHEMA_VERSION} and older; a newer hwmpq "
                "wrote it)")
    if version < OLDEST_UPGRADABLE:
        return (f"schema version {version} (this hwmpq reads version {SCHEMA_VERSION}; rows of version {version} "
                f"priced per-layer quantizers and cannot be upgraded: profile again into a new file)")
    return None


def migrate(conn: sqlite3.Connection, path: Path, meta: dict[str, str]) -> dict[str, str]:
    """Upgrade the LUT open on ``conn`` from an older schema version to :data:`SCHEMA_VERSION` in one
    transaction (its rows renumbered, the tables it lacks created) and return its new ``meta``. A file of
    this version, or one :func:`version_problem` refuses, is returned unchanged (``LutStore.open`` then
    names both versions). Raises :class:`LutError` when the file cannot be written."""
    version = int(meta["schema_version"])
    if version == SCHEMA_VERSION or version_problem(version):
        return meta
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(INFLIGHT_DDL)
        if "stable_pct" not in {r[1] for r in conn.execute("PRAGMA table_info(measurements)")}:
            conn.execute("ALTER TABLE measurements ADD COLUMN stable_pct REAL NOT NULL DEFAULT 0")
        conn.execute("UPDATE measurements SET schema_version=? WHERE schema_version=?", (SCHEMA_VERSION, version))
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise LutError(f"{path}: schema version {version}, which this hwmpq upgrades in place to version "
                       f"{SCHEMA_VERSION}; upgrading failed ({e}): make the file and its folder writable, or "
                       "copy it to a writable place") from None
    return {**meta, "schema_version": str(SCHEMA_VERSION)}
