"""Tuning of the dot-product int8 kernel (dotconv.py): its knobs are the register tile (``tile_w`` output
pixels x ``tile_o`` channel blocks). Each distinct workload is built and timed at up to ``trials`` tile
candidates on this machine; the fastest lands in ``work_dir/tuning-PRESET/dot_tiles.json`` and every
later build (profiling, export) of that workload uses it (tile_db.py). MetaSchedule tunes the rest of a
module.

Candidates are timed in this process, so tuning measures only the ``host`` preset; a board's kernels
use :func:`dotconv.default_tiles` (untuned) until its candidates can be timed there.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .dot_intrin import SDOT, VNNI
from .dotconv import WORKLOAD_ATTR, DotWorkload, Tiles, candidate_tiles, kernel_primfunc, up
from .tile_db import TileDatabase

_INTRINS = {i.name: i for i in (SDOT, VNNI)}


def kernel_args(wl: DotWorkload, seed: int = 0) -> list[np.ndarray]:
    """Random arguments of the kernel: codes, packed weight codes, int32 bias, multipliers, a zero output."""
    rng = np.random.default_rng(seed)
    oh, ow = wl.out_hw
    lanes = _INTRINS[wl.intrin].lanes
    lo = -128 if wl.in_dtype == "int8" else 0
    x_shape = (wl.n, wl.c) if wl.linear else (wl.n, wl.h, wl.w, wl.c)
    return [rng.integers(lo, lo + 256, x_shape).astype(wl.in_dtype),
            rng.integers(-127, 128, (up(wl.o, lanes) // lanes, *wl.kernel, up(wl.c, 4) // 4, lanes, 4)).astype(np.int8),
            rng.integers(-1000, 1000, wl.o).astype(np.int32), np.full(wl.o, 1e-3, np.float32),
            np.zeros((wl.n, wl.o) if wl.linear else (wl.n, oh, ow, wl.o), wl.out_dtype)]


DOT_TILES = TileDatabase(
    file="dot_tiles.json", workload_attr=WORKLOAD_ATTR, parse=DotWorkload.from_key,
    candidates=lambda wl: [asdict(t) for t in candidate_tiles(wl, _INTRINS[wl.intrin])],
    primfunc=lambda wl, rec: kernel_primfunc(wl, _INTRINS[wl.intrin], Tiles(rec["tile_w"], rec["tile_o"])),
    args=kernel_args)
load_db, kernels_of, apply_database, tune = DOT_TILES.load, DOT_TILES.kernels_of, DOT_TILES.apply, DOT_TILES.tune
