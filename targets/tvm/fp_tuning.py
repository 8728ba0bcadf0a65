"""Tuning of the fp32 tiled kernel (fpconv.py): its knobs are the register tile (``tile_w`` output pixels
x ``tile_o`` channel blocks) and the loop order (``row`` / ``block``). Each distinct workload is built
and timed at up to ``trials`` candidates on this machine (~0.3 s each: a 0.1-0.2 s build and 5 timed
repeats of >= 20 ms); the fastest lands in ``work_dir/tuning-PRESET/fp_tiles.json`` beside the int8
kernel's ``dot_tiles.json`` and every later build (profiling, export) of that workload uses it
(tile_db.py).

Candidates are timed in this process, so tuning measures only the ``host`` preset.
"""

from __future__ import annotations

import numpy as np

from .fpconv import WORKLOAD_ATTR, FpTiles, FpWorkload, candidate_tiles, kernel_primfunc, pack_weights
from .tile_db import TileDatabase


def tiles_of(rec: dict) -> FpTiles:
    return FpTiles(rec["tile_w"], rec["tile_o"], rec["order"])


def kernel_args(wl: FpWorkload, seed: int = 0) -> list[np.ndarray]:
    """Random inputs of the kernel's signature: x, packed weights, [bias,] a zero output."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (wl.n, wl.c) if wl.linear else (wl.n, wl.c, wl.h, wl.w)).astype(np.float32)
    w = rng.normal(0, 0.1, (wl.o, wl.c, *wl.kernel)).astype(np.float32)
    out = np.zeros((wl.n, wl.o) if wl.linear else (wl.n, wl.o, *wl.out_hw), np.float32)
    bias = [rng.normal(0, 0.1, wl.o).astype(np.float32)] if wl.bias else []
    return [x, pack_weights(w, wl.lanes), *bias, out]


FP_TILES = TileDatabase(
    file="fp_tiles.json", workload_attr=WORKLOAD_ATTR, parse=FpWorkload.from_key,
    candidates=lambda wl: [{"tile_w": t.tile_w, "tile_o": t.tile_o, "order": t.order} for t in candidate_tiles(wl)],
    primfunc=lambda wl, rec: kernel_primfunc(wl, tiles_of(rec)), args=kernel_args)
load_db, kernels_of, apply_database, tune = FP_TILES.load, FP_TILES.kernels_of, FP_TILES.apply, FP_TILES.tune
