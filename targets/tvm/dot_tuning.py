"""Tuning of the dot-product int8 kernel (dotconv.py): its knobs are the register tile (``tile_w`` output
pixels x ``tile_o`` channel blocks). Each distinct workload is built and timed at up to ``trials`` tile
candidates on this machine; the fastest lands in ``work_dir/tuning-PRESET/dot_tiles.json`` and every
later build (profiling, export) of that workload uses it. MetaSchedule tunes the rest of a module.

Candidates are timed in this process, so tuning measures only the ``host`` preset; a board's kernels
use :func:`dotconv.default_tiles` (untuned) until its candidates can be timed there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hwmpq.records import atomic_write_text

from .dot_intrin import SDOT, VNNI, DotIntrin
from .dotconv import WORKLOAD_ATTR, DotWorkload, Tiles, candidate_tiles, kernel_primfunc, up

_INTRINS = {i.name: i for i in (SDOT, VNNI)}
DB_FILE = "dot_tiles.json"


def _db_path(db_dir: str | os.PathLike) -> Path:
    return Path(db_dir) / DB_FILE


def load_db(db_dir: str | os.PathLike) -> dict[str, dict]:
    path = _db_path(db_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def kernels_of(mod) -> list[tuple[object, DotWorkload]]:
    """(global var, workload) of every dot-product kernel in an IRModule."""
    out = []
    for gv, func in mod.functions_items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and WORKLOAD_ATTR in attrs:
            out.append((gv, DotWorkload.from_key(str(attrs[WORKLOAD_ATTR]))))
    return out


def apply_database(mod, db_dir: str | os.PathLike | None):
    """A copy of ``mod`` with every dot-product kernel rescheduled to its tuned tiles (others unchanged)."""
    db = load_db(db_dir) if db_dir is not None else {}
    if not db:
        return mod
    mod = mod.clone()
    for gv, wl in kernels_of(mod):
        rec = db.get(wl.key())
        if rec is None:
            continue
        func = kernel_primfunc(wl, _INTRINS[wl.intrin], Tiles(rec["tile_w"], rec["tile_o"]))
        mod[gv] = func.with_attr("global_symbol", str(mod[gv].attrs["global_symbol"]))
    return mod


def tune(mod, target, db_dir: str | os.PathLike, trials: int, *, min_repeat_ms: float = 20.0,
         repeat: int = 5) -> dict[str, dict]:
    """Time up to ``trials`` tile candidates of every untuned dot-product kernel of ``mod`` in this
    process (one thread) and record the fastest; returns the new records."""
    db = load_db(db_dir)
    new = {}
    for _, wl in kernels_of(mod):
        if trials <= 0 or wl.key() in db or wl.key() in new:
            continue
        new[wl.key()] = tune_workload(wl, _INTRINS[wl.intrin], target, trials, min_repeat_ms, repeat)
    if new:
        db = {**load_db(db_dir), **new}  # re-read: another process may have added workloads meanwhile
        Path(db_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(_db_path(db_dir), json.dumps(db, indent=1, sort_keys=True))
    return new


def tune_workload(wl: DotWorkload, intrin: DotIntrin, target, trials: int, min_repeat_ms: float = 20.0,
                  repeat: int = 5) -> dict:
    """Build and time the first ``trials`` candidates; the record of the fastest (and of every one tried)."""
    t0 = time.time()
    tried = []
    for tiles in candidate_tiles(wl, intrin)[:trials]:
        try:
            ms = time_kernel(wl, intrin, tiles, target, min_repeat_ms, repeat)
        except Exception as e:  # noqa: BLE001 - a candidate that fails to build is skipped, and said
            tried.append({"tile_w": tiles.tile_w, "tile_o": tiles.tile_o, "error": str(e).splitlines()[0][:200]})
            continue
        tried.append({"tile_w": tiles.tile_w, "tile_o": tiles.tile_o, "ms": ms})
    ok = [t for t in tried if "ms" in t]
    if not ok:
        raise RuntimeError(f"no tile candidate of {wl} built: {tried}")
    best = min(ok, key=lambda t: t["ms"])
    return {**best, "trials": len(tried), "tune_s": round(time.time() - t0, 2), "tried": tried}


def time_kernel(wl: DotWorkload, intrin: DotIntrin, tiles: Tiles, target, min_repeat_ms: float = 20.0,
                repeat: int = 5) -> float:
    """Median ms of the kernel alone on random codes, one thread."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": kernel_primfunc(wl, intrin, tiles)}), target).jit()
    rng = np.random.default_rng(0)
    oh, ow = wl.out_hw
    lanes = intrin.lanes
    lo = -128 if wl.in_dtype == "int8" else 0
    x_shape = (wl.n, wl.c) if wl.linear else (wl.n, wl.h, wl.w, wl.c)
    args = [rng.integers(lo, lo + 256, x_shape).astype(wl.in_dtype),
            rng.integers(-127, 128, (up(wl.o, lanes) // lanes, *wl.kernel, up(wl.c, 4) // 4, lanes, 4)).astype(np.int8),
            rng.integers(-1000, 1000, wl.o).astype(np.int32), np.full(wl.o, 1e-3, np.float32),
            np.zeros((wl.n, wl.o) if wl.linear else (wl.n, oh, ow, wl.o), wl.out_dtype)]
    dev = tvm.cpu()
    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    tensors = [tvm.runtime.tensor(a, device=dev) for a in args]
    res = lib.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms))(*tensors)
    return float(np.median(res.results)) * 1e3
