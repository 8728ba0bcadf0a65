"""Tuning of the fp32 tiled kernel (fpconv.py): its knobs are the register tile (``tile_w`` output pixels
x ``tile_o`` channel blocks) and the loop order (``row`` / ``block``). Each distinct workload is built
and timed at up to ``trials`` candidates on this machine (~0.3 s each: a 0.1-0.2 s build and 5 timed
repeats of >= 20 ms); the fastest lands in ``work_dir/tuning-PRESET/fp_tiles.json`` beside the int8
kernel's ``dot_tiles.json`` and every later build (profiling, export) of that workload uses it.

Candidates are timed in this process, so tuning measures only the ``host`` preset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hwmpq.records import atomic_write_text

from .fpconv import WORKLOAD_ATTR, FpTiles, FpWorkload, candidate_tiles, kernel_primfunc, pack_weights

DB_FILE = "fp_tiles.json"


def _db_path(db_dir: str | os.PathLike) -> Path:
    return Path(db_dir) / DB_FILE


def load_db(db_dir: str | os.PathLike) -> dict[str, dict]:
    path = _db_path(db_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def tiles_of(rec: dict) -> FpTiles:
    return FpTiles(rec["tile_w"], rec["tile_o"], rec["order"])


def kernels_of(mod) -> list[tuple[object, FpWorkload]]:
    """(global var, workload) of every fp32 tiled kernel in an IRModule."""
    out = []
    for gv, func in mod.functions_items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and WORKLOAD_ATTR in attrs:
            out.append((gv, FpWorkload.from_key(str(attrs[WORKLOAD_ATTR]))))
    return out


def apply_database(mod, db_dir: str | os.PathLike | None):
    """A copy of ``mod`` with every fp32 kernel rescheduled to its tuned tiles (others unchanged)."""
    db = load_db(db_dir) if db_dir is not None else {}
    if not db:
        return mod
    mod = mod.clone()
    for gv, wl in kernels_of(mod):
        rec = db.get(wl.key())
        if rec is not None:
            func = kernel_primfunc(wl, tiles_of(rec))
            mod[gv] = func.with_attr("global_symbol", str(mod[gv].attrs["global_symbol"]))
    return mod


def tune(mod, target, db_dir: str | os.PathLike, trials: int, *, min_repeat_ms: float = 20.0,
         repeat: int = 5) -> dict[str, dict]:
    """Time up to ``trials`` candidates of every untuned fp32 kernel of ``mod`` in this process (one
    thread) and record the fastest; returns the new records."""
    db = load_db(db_dir)
    new = {}
    for _, wl in kernels_of(mod):
        if trials <= 0 or wl.key() in db or wl.key() in new:
            continue
        new[wl.key()] = tune_workload(wl, target, trials, min_repeat_ms, repeat)
    if new:
        db = {**load_db(db_dir), **new}  # re-read: another process may have added workloads meanwhile
        Path(db_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(_db_path(db_dir), json.dumps(db, indent=1, sort_keys=True))
    return new


def tune_workload(wl: FpWorkload, target, trials: int, min_repeat_ms: float = 20.0, repeat: int = 5) -> dict:
    """Build and time the first ``trials`` candidates; the record of the fastest (and of every one tried)."""
    t0 = time.time()
    tried = []
    for tiles in candidate_tiles(wl)[:trials]:
        rec = {"tile_w": tiles.tile_w, "tile_o": tiles.tile_o, "order": tiles.order}
        try:
            rec["ms"] = time_kernel(wl, tiles, target, min_repeat_ms, repeat)
        except Exception as e:  # noqa: BLE001 - a candidate that fails to build is skipped, and said
            rec["error"] = str(e).splitlines()[0][:200]
        tried.append(rec)
    ok = [t for t in tried if "ms" in t]
    if not ok:
        raise RuntimeError(f"no tile candidate of {wl} built: {tried}")
    best = min(ok, key=lambda t: t["ms"])
    return {**best, "trials": len(tried), "tune_s": round(time.time() - t0, 2), "tried": tried}


def kernel_args(wl: FpWorkload, seed: int = 0) -> list[np.ndarray]:
    """Random inputs of the kernel's signature: x, packed weights, [bias,] a zero output."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (wl.n, wl.c) if wl.linear else (wl.n, wl.c, wl.h, wl.w)).astype(np.float32)
    w = rng.normal(0, 0.1, (wl.o, wl.c, *wl.kernel)).astype(np.float32)
    out = np.zeros((wl.n, wl.o) if wl.linear else (wl.n, wl.o, *wl.out_hw), np.float32)
    bias = [rng.normal(0, 0.1, wl.o).astype(np.float32)] if wl.bias else []
    return [x, pack_weights(w, wl.lanes), *bias, out]


def time_kernel(wl: FpWorkload, tiles: FpTiles, target, min_repeat_ms: float = 20.0, repeat: int = 5) -> float:
    """Median ms of the kernel alone on random data, one thread."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": kernel_primfunc(wl, tiles)}), target).jit()
    dev = tvm.cpu()
    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    tensors = [tvm.runtime.tensor(a, device=dev) for a in kernel_args(wl)]
    res = lib.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms))(*tensors)
    return float(np.median(res.results)) * 1e3
