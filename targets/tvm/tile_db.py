"""The tuning database of a hand-scheduled kernel family (dotconv.py's int8 kernel, fpconv.py's fp32
kernel): per distinct workload, the fastest of up to ``trials`` tile candidates timed on this machine,
in one JSON file of ``work_dir/tuning-PRESET/``, applied to every later build of that workload
(profiling, export).

A kernel family says what the database needs of it (:class:`TileDatabase`): the PrimFunc attribute its
kernels carry their workload key in, how to parse that key, its candidate tiles as plain records, the
PrimFunc of a workload at a record, and random arguments to time it on. Candidates are timed in this
process (one thread), so tuning measures only the ``host`` preset.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwmpq.records import atomic_write_text


class ConvWorkload:
    """What a kernel family's workload record (a frozen dataclass with the conv fields ``h, w, kernel,
    stride, padding, dilation``) shares: its database key and its output size."""

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return ((self.h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (self.w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_key(cls, key: str):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(key).items()})


@dataclass(frozen=True)
class TileDatabase:
    file: str  # e.g. "dot_tiles.json"
    workload_attr: str  # the PrimFunc attribute holding the workload key
    parse: Callable[[str], Any]  # workload key -> workload
    candidates: Callable[[Any], list[dict]]  # workload -> tile records, in the order they are tried
    primfunc: Callable[[Any, dict], Any]  # workload, tile record -> the kernel's PrimFunc
    args: Callable[[Any], list[np.ndarray]]  # workload -> random arguments of the kernel

    def load(self, db_dir: str | os.PathLike) -> dict[str, dict]:
        path = Path(db_dir) / self.file
        return json.loads(path.read_text()) if path.exists() else {}

    def kernels_of(self, mod) -> list[tuple[object, Any]]:
        """(global var, workload) of every kernel of this family in an IRModule."""
        out = []
        for gv, func in mod.functions_items():
            attrs = getattr(func, "attrs", None)
            if attrs is not None and self.workload_attr in attrs:
                out.append((gv, self.parse(str(attrs[self.workload_attr]))))
        return out

    def apply(self, mod, db_dir: str | os.PathLike | None):
        """A copy of ``mod`` with every kernel of this family rescheduled to its tuned tiles (others unchanged)."""
        db = self.load(db_dir) if db_dir is not None else {}
        if not db:
            return mod
        mod = mod.clone()
        for gv, wl in self.kernels_of(mod):
            rec = db.get(wl.key())
            if rec is not None:
                mod[gv] = self.primfunc(wl, rec).with_attr("global_symbol", str(mod[gv].attrs["global_symbol"]))
        return mod

    def tune(self, mod, target, db_dir: str | os.PathLike, trials: int, *, min_repeat_ms: float = 20.0,
             repeat: int = 5) -> dict[str, dict]:
        """Time up to ``trials`` candidates of every untuned kernel of this family in ``mod`` and record the
        fastest; returns the new records."""
        db = self.load(db_dir)
        new = {}
        for _, wl in self.kernels_of(mod):
            if trials <= 0 or wl.key() in db or wl.key() in new:
                continue
            new[wl.key()] = self.tune_workload(wl, target, trials, min_repeat_ms, repeat)
        if new:
            db = {**self.load(db_dir), **new}  # re-read: another process may have added workloads meanwhile
            Path(db_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(db_dir) / self.file, json.dumps(db, indent=1, sort_keys=True))
        return new

    def tune_workload(self, wl, target, trials: int, min_repeat_ms: float = 20.0, repeat: int = 5) -> dict:
        """Build and time the first ``trials`` candidates; the record of the fastest (and of every one tried)."""
        t0 = time.time()
        tried = []
        for tiles in self.candidates(wl)[:trials]:
            rec = dict(tiles)
            try:
                rec["ms"] = self.time(wl, tiles, target, min_repeat_ms, repeat)
            except Exception as e:  # noqa: BLE001 - a candidate that fails to build is skipped, and said
                rec["error"] = str(e).splitlines()[0][:200]
            tried.append(rec)
        ok = [t for t in tried if "ms" in t]
        if not ok:
            raise RuntimeError(f"no tile candidate of {wl} built: {tried}")
        best = min(ok, key=lambda t: t["ms"])
        return {**best, "trials": len(tried), "tune_s": round(time.time() - t0, 2), "tried": tried}

    def time(self, wl, tiles: dict, target, min_repeat_ms: float = 20.0, repeat: int = 5) -> float:
        """Median ms of the kernel alone at ``tiles`` on random arguments, one thread."""
        import tvm

        lib = tvm.compile(tvm.IRModule({"main": self.primfunc(wl, tiles)}), target).jit()
        dev = tvm.cpu()
        tvm.get_global_func("runtime.config_threadpool")(1, 1)
        tensors = [tvm.runtime.tensor(a, device=dev) for a in self.args(wl)]
        res = lib.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=int(min_repeat_ms))(*tensors)
        return float(np.median(res.results)) * 1e3
