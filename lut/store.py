"""The LUT store: one SQLite file (WAL, one transaction per measurement) per (device, target).

A file holds a ``meta`` table naming the schema version, the target id and the device fingerprint
(plus the device details as JSON), a ``measurements`` table keyed by
(device, target, kind, signature, precision, src_precision, MeasureConfig.key, schema version), and a
``shapes`` table describing each signature (so ``lut show`` can print what a hash stands for).
``src_w_bits``/``src_a_bits`` are 0 when there is no source precision (a NULL would defeat the key).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hwmpq.device import describe_difference
from hwmpq.records import MeasureConfig, Measurement, Precision
from hwmpq.targets.base import DeviceInfo

from .errors import CorruptLutError, ForeignLutError, LutError
from .schema import COLUMNS, CONFIG_COLS, DDL, KEY_COLS, KINDS, SCHEMA_VERSION, migrate, version_problem


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)  # explicit transactions
    conn.row_factory = sqlite3.Row
    return conn


def _create_atomically(path: Path, target: str, device: DeviceInfo) -> None:
    """Build the empty LUT in a temporary file and link it into place: a half-created LUT is never seen,
    and if another process created ``path`` meanwhile, its file wins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(DDL)
            meta = {"schema_version": str(SCHEMA_VERSION), "target": target, "device": device.fingerprint,
                    "device_details": json.dumps(dict(device.details), sort_keys=True),
                    "emulated": str(int(device.emulated)), "created_unix": f"{time.time():.3f}"}
            conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
            conn.commit()
        finally:
            conn.close()
        try:
            os.link(tmp, path)  # create-if-absent: a LUT another process just created is never replaced
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    try:
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise CorruptLutError(f"{path}: the SQLite file is damaged ({check}); restore it from a copy or "
                                  "delete it and profile again")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "measurements"} <= tables:
            raise CorruptLutError(f"{path}: a SQLite database but not an hwmpq LUT (tables: {sorted(tables)}); "
                                  "give the path of a LUT written by `hwmpq profile`")
        meta = {r[0]: r[1] for r in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as e:
        raise CorruptLutError(f"{path}: not a readable hwmpq LUT ({e}); the file is corrupted, truncated or "
                              "of another format") from None
    missing = {"schema_version", "target", "device"} - set(meta)
    if missing:
        raise CorruptLutError(f"{path}: the LUT meta table lacks {sorted(missing)}; the file is damaged")
    return meta


class LutStore:
    """An open LUT file. Use :meth:`open` to profile or search (checks the device) and :meth:`read`
    to analyse any LUT. Queries return the rows of this device/target; a store opened with
    ``force=True`` on a foreign file (or by :meth:`read`) falls back to rows of any device/target."""

    def __init__(self, path: Path, conn: sqlite3.Connection, meta: dict[str, str],
                 identity: tuple[str, str, int], any_device: bool) -> None:
        self.path = path
        self._conn = conn
        self._meta = meta
        self._id = identity  # (device, target, schema version) whose rows queries return
        self._any_device = any_device  # fall back to rows of any device/target (force, or analysis)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, target: str, device: DeviceInfo, force: bool = False) -> LutStore:
        """Open (creating if absent) the LUT at ``path`` for ``target`` on ``device``."""
        p = Path(path)
        if not p.exists():
            try:
                _create_atomically(p, target, device)
            except (OSError, sqlite3.Error) as e:
                raise LutError(f"{p}: cannot create the LUT file ({e}); choose a writable path") from None
        store = cls._open_existing(p)
        problems = store._foreign_problems(target, device)
        if problems:
            text = (f"{p} was not measured here: {'; '.join(problems)}. A LUT from another device, target or "
                    "schema version gives wrong latencies; profile this device into a new file, or pass "
                    "--force (force=True) to use it knowingly")
            if not force:
                store.close()
                raise ForeignLutError(text)
            warnings.warn(f"using a foreign LUT (--force): {text}", stacklevel=2)
        store._id = (device.fingerprint, target, SCHEMA_VERSION)
        store._any_device = bool(problems)
        return store

    @classmethod
    def read(cls, path: str | os.PathLike) -> LutStore:
        """Open an existing LUT for analysis (``lut show``, export) without checking the device."""
        p = Path(path)
        if not p.is_file():
            raise LutError(f"{p}: no such LUT file; create one with `hwmpq profile --lut {p} ...`")
        return cls._open_existing(p)

    @classmethod
    def _open_existing(cls, p: Path) -> LutStore:
        if not p.is_file():
            raise CorruptLutError(f"{p}: not a file")
        if p.stat().st_size == 0:
            raise CorruptLutError(f"{p}: the file is empty (truncated?), not an hwmpq LUT; delete it to start anew")
        conn = _connect(p)
        try:
            meta = _read_meta(conn, p)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.OperationalError:  # a read-only file or folder: reading still works
                pass
        except sqlite3.DatabaseError as e:
            conn.close()
            raise CorruptLutError(f"{p}: cannot open the LUT ({e})") from None
        except LutError:
            conn.close()
            raise
        try:
            int(meta["schema_version"])
        except ValueError:
            conn.close()
            raise CorruptLutError(f"{p}: schema_version {meta['schema_version']!r} is not a number") from None
        try:
            meta = migrate(conn, p, meta)
        except LutError:
            conn.close()
            raise
        ident = (meta["device"], meta["target"], int(meta["schema_version"]))
        return cls(p, conn, meta, ident, any_device=True)

    def _foreign_problems(self, target: str, device: DeviceInfo) -> list[str]:
        m = self._meta
        out = []
        if m["schema_version"] != str(SCHEMA_VERSION):
            out.append(version_problem(int(m["schema_version"])))
        if m["target"] != target:
            out.append(f"target {m['target']!r} (this run uses {target!r})")
        if m["device"] != device.fingerprint:
            theirs = self.device_details
            out.append(f"device {m['device']} (this device is {device.fingerprint}: "
                       f"{describe_difference(theirs, dict(device.details))})")
        return out

    # ------------------------------------------------------------------ properties
    @property
    def meta(self) -> dict[str, str]:
        return dict(self._meta)

    @property
    def target(self) -> str:
        """The target id the file was created for."""
        return self._meta["target"]

    @property
    def device(self) -> str:
        """The device fingerprint the file was created for."""
        return self._meta["device"]

    @property
    def device_details(self) -> dict[str, str]:
        try:
            return dict(json.loads(self._meta.get("device_details", "{}")))
        except (json.JSONDecodeError, TypeError, ValueError):
            return {}

    @property
    def schema_version(self) -> int:
        return int(self._meta["schema_version"])

    @property
    def precisions(self) -> tuple[Precision, ...] | None:
        """The precisions the profiles into this file covered (``hwmpq profile --precisions``; the meta key
        ``precisions``), or None when no profile said: then every precision the target offers is expected."""
        text = self._meta.get("precisions")
        if not text:
            return None
        try:
            return tuple(sorted(Precision.parse(s) for s in json.loads(text)))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise CorruptLutError(f"{self.path}: the meta key 'precisions' is not a list of precision labels: "
                                  f"{text!r}") from None

    def note_precisions(self, precisions) -> None:
        """Record that a profile covered ``precisions`` (added to those already recorded; a file that records
        none yet covers the precisions of its layer rows)."""
        have = self.precisions
        if have is None:
            have = {m.precision for m in self.measurements("layer")}
        have = set(have)
        labels = sorted(p.label for p in have | set(precisions))
        text = json.dumps(labels)
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", ("precisions", text))
        self._meta["precisions"] = text

    # ------------------------------------------------------------------ rows
    def add(self, m: Measurement) -> None:
        """Insert or replace one measurement in its own committed transaction."""
        if m.kind not in KINDS:
            raise LutError(f"measurement kind {m.kind!r} is not one of {KINDS}")
        row = measurement_to_row(m)
        sql = f"INSERT OR REPLACE INTO measurements ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._transaction():
            self._conn.execute(sql, [row[c] for c in COLUMNS])
            self._conn.execute(_INFLIGHT_WHERE.replace("SELECT attempts FROM", "DELETE FROM"), _job_key(m))

    def job_started(self, m: Measurement) -> int:
        """Note that the job keyed like ``m`` is being measured; returns how many earlier attempts were
        left unfinished (their process died). :meth:`add` of its result, or :meth:`job_abandoned`, clears it."""
        key = _job_key(m)
        with self._transaction():
            r = self._conn.execute(_INFLIGHT_WHERE, key).fetchone()
            before = int(r[0]) if r else 0
            self._conn.execute(f"INSERT OR REPLACE INTO inflight VALUES ({', '.join('?' * 11)})",
                               (*key, before + 1, time.time()))
        return before

    def job_abandoned(self, m: Measurement, earlier_crashes: int = 0) -> None:
        """The job keyed like ``m`` stopped without a crash (interrupt, dead device, or one round of it
        done): forget the attempt, keeping ``earlier_crashes`` (what :meth:`job_started` returned)."""
        key = _job_key(m)
        with self._transaction():
            self._conn.execute(_INFLIGHT_WHERE.replace("SELECT attempts FROM", "DELETE FROM"), key)
            if earlier_crashes > 0:
                self._conn.execute(f"INSERT INTO inflight VALUES ({', '.join('?' * 11)})",
                                   (*key, earlier_crashes, time.time()))

    def note_shape(self, kind: str, signature: str, description: Mapping[str, Any] | str) -> None:
        """Remember what a signature stands for (layer shape fields, tensor shape)."""
        text = description if isinstance(description, str) else json.dumps(description, sort_keys=True)
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO shapes VALUES (?, ?, ?)", (kind, signature, text))

    def note_shapes(self, items: Mapping[tuple[str, str], str]) -> None:
        """Many :meth:`note_shape` calls, ``{(kind, signature): description}``, in one transaction."""
        with self._transaction():
            self._conn.executemany("INSERT OR REPLACE INTO shapes VALUES (?, ?, ?)",
                                   [(k, s, d) for (k, s), d in items.items()])

    def shapes(self) -> dict[tuple[str, str], str]:
        return {(r[0], r[1]): r[2] for r in self._conn.execute("SELECT kind, signature, description FROM shapes")}

    def get(self, kind: str, signature: str, precision: Precision, config: MeasureConfig,
            src_precision: Precision | None = None) -> Measurement | None:
        """The stored measurement (ok or failed) for this key, or None if never measured."""
        sw, sa = (src_precision.w_bits, src_precision.a_bits) if src_precision else (0, 0)
        sql = ("SELECT * FROM measurements WHERE kind=? AND signature=? AND w_bits=? AND a_bits=? "
               "AND src_w_bits=? AND src_a_bits=? AND config_key=?")
        args: tuple = (kind, signature, precision.w_bits, precision.a_bits, sw, sa, config.key)
        if not self._any_device:
            sql, args = sql + " AND device=? AND target=? AND schema_version=?", args + self._id
        try:
            rows = [dict(r) for r in self._conn.execute(sql, args)]
        except sqlite3.DatabaseError as e:  # e.g. a forced LUT of another schema version
            raise CorruptLutError(f"{self.path}: reading a measurement failed ({e})") from None
        if not rows:
            return None
        rows.sort(key=lambda r: (r["device"], r["target"], r["schema_version"]) != self._id)
        return row_to_measurement(rows[0], where=str(self.path))

    def measurements(self, kind: str | None = None, *, all_rows: bool = False) -> list[Measurement]:
        """Rows of this store's device/target, one per key (with the any-device fallback, a key missing
        here is taken from another device). ``all_rows=True``: every row in the file."""
        chosen: dict[tuple, dict[str, Any]] = {}
        for r in self._rows(kind):
            mine = (r["device"], r["target"], r["schema_version"]) == self._id
            if all_rows:
                chosen[len(chosen),] = r
            elif mine or self._any_device:
                key = tuple(r[c] for c in KEY_COLS[2:9])
                if mine or key not in chosen:
                    chosen[key] = r
        return [row_to_measurement(r, where=str(self.path)) for r in chosen.values()]

    def add_many(self, ms: list[Measurement]) -> None:
        """Insert or replace many measurements in ONE transaction (all or nothing: import, merge)."""
        sql = f"INSERT OR REPLACE INTO measurements ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        for m in ms:
            if m.kind not in KINDS:
                raise LutError(f"measurement kind {m.kind!r} is not one of {KINDS}")
        with self._transaction():
            self._conn.executemany(sql, [[measurement_to_row(m)[c] for c in COLUMNS] for m in ms])

    @property
    def identity(self) -> tuple[str, str, int]:
        """(device fingerprint, target, schema version) of the rows this store writes and prefers."""
        return self._id

    def _rows(self, kind: str | None = None) -> Iterator[dict[str, Any]]:
        sql, args = "SELECT * FROM measurements", ()
        if kind is not None:
            sql, args = sql + " WHERE kind=?", (kind,)
        try:
            cur = self._conn.execute(sql + " ORDER BY kind, signature, w_bits, a_bits, src_w_bits, src_a_bits", args)
            for r in cur:
                yield dict(r)
        except sqlite3.DatabaseError as e:
            raise CorruptLutError(f"{self.path}: reading measurements failed ({e})") from None

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0])

    def frame(self):
        """Every row as a pandas DataFrame: numbers as numbers, ``precision``/``src_precision`` labels and
        the signature's ``shape`` description added."""
        from .frame import rows_frame

        return rows_frame(list(self._rows()), self.shapes())

    # ------------------------------------------------------------------ plumbing
    def _transaction(self):
        return _Transaction(self._conn, self.path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> LutStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LutStore({str(self.path)!r}, target={self.target!r}, device={self.device!r})"


class _Transaction:
    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn, self.path = conn, path

    def __enter__(self) -> None:
        if self.conn is None:
            raise LutError(f"{self.path}: the LUT store is closed")
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # nothing to roll back: the original exception is what matters


_INFLIGHT_WHERE = f"SELECT attempts FROM inflight WHERE {' AND '.join(f'{c}=?' for c in KEY_COLS[:9])}"


def _job_key(m: Measurement) -> tuple:
    row = measurement_to_row(m)
    return tuple(row[c] for c in KEY_COLS[:9])


# ---------------------------------------------------------------------- row <-> record
def measurement_to_row(m: Measurement) -> dict[str, Any]:
    sw, sa = (m.src_precision.w_bits, m.src_precision.a_bits) if m.src_precision else (0, 0)
    row = {"device": m.device, "target": m.target, "kind": m.kind, "signature": m.signature,
           "w_bits": m.precision.w_bits, "a_bits": m.precision.a_bits, "src_w_bits": sw, "src_a_bits": sa,
           "config_key": m.config.key, "schema_version": SCHEMA_VERSION, "latency_ms": m.latency_ms,
           "p10_ms": m.p10_ms, "p90_ms": m.p90_ms, "n": int(m.n), "energy_mj": m.energy_mj,
           "energy_source": m.energy_source, "emulated": int(bool(m.emulated)), "error_msg": m.error_msg,
           "time_unix": float(m.time_unix), "versions_json": json.dumps(dict(m.versions), sort_keys=True)}
    row.update({c: getattr(m.config, c) for c in CONFIG_COLS})
    return row


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if f != f else f  # NaN (pandas' missing) -> None


def row_to_measurement(r: Mapping[str, Any], where: str = "LUT") -> Measurement:
    """Rebuild a Measurement from a stored or exported row; a malformed row raises CorruptLutError."""
    try:
        fields = {c: r[c] for c in CONFIG_COLS if c != "stable_pct"} | {"stable_pct": r.get("stable_pct", 0.0)}
        config = MeasureConfig(**{c: (str(v) if c == "statistic" else
                                      float(v) if c in ("min_repeat_ms", "timeout_s", "stable_pct") else int(v))
                                  for c, v in fields.items()})
        if str(r["config_key"]) != config.key:
            raise ValueError(f"config_key {r['config_key']} does not match the config columns ({config.key})")
        sw, sa = int(r["src_w_bits"]), int(r["src_a_bits"])
        err = r.get("error_msg")
        return Measurement(
            signature=str(r["signature"]), precision=Precision(int(r["w_bits"]), int(r["a_bits"])),
            target=str(r["target"]), device=str(r["device"]), latency_ms=_opt_float(r["latency_ms"]),
            p10_ms=_opt_float(r["p10_ms"]), p90_ms=_opt_float(r["p90_ms"]), n=int(r["n"]),
            energy_mj=_opt_float(r["energy_mj"]), energy_source=str(r["energy_source"]), config=config,
            kind=str(r["kind"]), src_precision=Precision(sw, sa) if sw else None, emulated=bool(int(r["emulated"])),
            error_msg=None if err is None or (isinstance(err, float) and err != err) else str(err),
            versions=json.loads(r["versions_json"]) if r.get("versions_json") else {},
            time_unix=float(r["time_unix"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptLutError(f"{where}: malformed measurement row "
                              f"({r.get('kind')} {r.get('signature')}): {type(e).__name__}: {e}") from None
