"""Pareto tools shared by NEMO, the ILP sweep and the benchmarks: non-dominated sorting, crowding,
hypervolume, picking a plan within a budget, front I/O (JSON with full plans, CSV for reading) and a plot.

All objective arrays are *minimised*: accuracy enters as error = 1 - accuracy. Pure functions over
numbers, so tests can state the right answer (NNCF style).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from hwmpq.records import BitPlan, Precision, RecordError, atomic_write_text, from_jsonable, to_jsonable

OBJECTIVES = ("error", "latency_ms", "energy_mj", "size_bytes")
FRONT_VERSION = 1


class FrontError(ValueError):
    """A front file is malformed or empty; the message names the file and what is wrong."""


# ---------------------------------------------------------------- sorting


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """True if ``a`` is no worse than ``b`` everywhere and better somewhere (minimisation)."""
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(F: np.ndarray) -> list[np.ndarray]:
    """Deb's fast non-dominated sort of the rows of ``F`` [N, M]: a list of index arrays, front 0 first.
    Identical rows share a front."""
    F = np.asarray(F, dtype=float)
    if F.ndim != 2:
        raise ValueError(f"non_dominated_sort: expected an [N, M] array, got shape {F.shape}")
    n = len(F)
    if n == 0:
        return []
    le = np.all(F[:, None, :] <= F[None, :, :], axis=2)
    lt = np.any(F[:, None, :] < F[None, :, :], axis=2)
    dom = le & lt  # dom[i, j]: i dominates j
    count = dom.sum(axis=0)  # how many dominate j
    fronts = []
    current = np.flatnonzero(count == 0)
    while current.size:
        fronts.append(current)
        count = count - dom[current].sum(axis=0)
        count[current] = -1  # assigned: never zero again (later fronts cannot dominate earlier ones)
        current = np.flatnonzero(count == 0)
    return fronts


def ranks(F: np.ndarray) -> np.ndarray:
    """Front index of every row (0 = non-dominated)."""
    r = np.zeros(len(F), dtype=int)
    for k, idx in enumerate(non_dominated_sort(F)):
        r[idx] = k
    return r


def crowding_distance(F: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of the rows of one front; boundary points get ``inf``."""
    F = np.asarray(F, dtype=float)
    n, m = F.shape
    d = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(F[:, k], kind="stable")
        span = F[order[-1], k] - F[order[0], k]
        d[order[0]] = d[order[-1]] = np.inf
        if span <= 0:
            continue
        d[order[1:-1]] += (F[order[2:], k] - F[order[:-2], k]) / span
    return d


# ---------------------------------------------------------------- hypervolume


def hypervolume(F: np.ndarray, ref: Sequence[float]) -> float:
    """Exact hypervolume dominated by the rows of ``F`` and bounded by the reference point ``ref``
    (minimisation; points not strictly better than ``ref`` in every objective contribute nothing).
    Slicing algorithm: fast in 2-3 objectives, exponential in general; use it on small fronts."""
    F = np.asarray(F, dtype=float).reshape(-1, len(ref))
    ref = np.asarray(ref, dtype=float)
    F = F[np.all(F < ref, axis=1)]
    if len(F) == 0:
        return 0.0
    F = F[non_dominated_sort(F)[0]]
    return float(_hv(F, ref))


def _hv(F: np.ndarray, ref: np.ndarray) -> float:
    if F.shape[1] == 1:
        return float(ref[0] - F[:, 0].min())
    if F.shape[1] == 2:
        order = np.argsort(F[:, 0], kind="stable")
        vol, best_y = 0.0, ref[1]
        for x, y in F[order]:
            if y < best_y:
                vol += (ref[0] - x) * (best_y - y)
                best_y = y
        return vol
    order = np.argsort(F[:, -1], kind="stable")
    F = F[order]
    vol = 0.0
    for i in range(len(F)):
        upper = F[i + 1, -1] if i + 1 < len(F) else ref[-1]
        if upper <= F[i, -1]:
            continue
        sub = F[: i + 1, :-1]
        sub = sub[non_dominated_sort(sub)[0]]
        vol += _hv(sub, ref[:-1]) * (upper - F[i, -1])
    return vol


# ---------------------------------------------------------------- front points


@dataclass(frozen=True)
class FrontPoint:
    """One plan on a front with its objectives. ``latency_ms``/``energy_mj`` are LUT predictions;
    ``measured_ms`` is the exported artifact's measured latency (the quoted statistic, p10 by default), when measured."""

    plan: BitPlan
    accuracy: float
    latency_ms: float
    energy_mj: float
    size_bytes: float
    method: str = ""
    measured_ms: float | None = None
    extra: dict = field(default_factory=dict)

    def objectives(self, names: Sequence[str] = OBJECTIVES) -> np.ndarray:
        vals = {"error": 1.0 - self.accuracy, "latency_ms": self.latency_ms, "energy_mj": self.energy_mj,
                "size_bytes": self.size_bytes,
                "measured_ms": self.measured_ms if self.measured_ms is not None else math.nan}
        return np.array([vals[n] for n in names], dtype=float)


def objective_matrix(points: Sequence[FrontPoint], names: Sequence[str] = OBJECTIVES) -> np.ndarray:
    return np.array([p.objectives(names) for p in points], dtype=float).reshape(len(points), len(names))


def pareto_front(points: Sequence[FrontPoint], names: Sequence[str] = OBJECTIVES) -> list[FrontPoint]:
    """The non-dominated points (duplicated plans kept once), sorted by latency."""
    uniq: dict[tuple, FrontPoint] = {}
    for p in points:
        uniq.setdefault(p.plan.layers, p)
    pts = list(uniq.values())
    if not pts:
        return []
    first = non_dominated_sort(objective_matrix(pts, names))[0]
    return sorted((pts[i] for i in first), key=lambda p: (p.latency_ms, -p.accuracy))


def model_size_bytes(params: Sequence[int], precisions: Iterable[Precision]) -> float:
    """Weights only: sum of params x w_bits / 8."""
    return float(sum(n * p.w_bits / 8.0 for n, p in zip(params, precisions, strict=True)))


# ---------------------------------------------------------------- pick within a budget


class NoPlanWithinBudget(ValueError):
    """No plan on the front meets the budget; the message gives the cheapest point."""


def pick(points: Sequence[FrontPoint], budget_ms: float | None = None, budget_mj: float | None = None,
         use_measured: bool = False) -> FrontPoint:
    """The most accurate point with latency <= ``budget_ms`` and energy <= ``budget_mj`` (ties: faster).
    ``use_measured`` compares the measured latency where present instead of the prediction."""
    if budget_ms is None and budget_mj is None:
        raise ValueError("pick: give budget_ms and/or budget_mj")
    if not points:
        raise FrontError("pick: the front is empty")

    def lat(p: FrontPoint) -> float:
        return p.measured_ms if (use_measured and p.measured_ms is not None) else p.latency_ms

    ok = [p for p in points if (budget_ms is None or lat(p) <= budget_ms)
          and (budget_mj is None or p.energy_mj <= budget_mj)]
    if not ok:
        fastest = min(points, key=lat)
        frugal = min(points, key=lambda p: p.energy_mj)
        raise NoPlanWithinBudget(
            f"no plan on the front meets budget_ms={budget_ms} budget_mj={budget_mj}: the fastest point takes "
            f"{lat(fastest):.4g} ms, the most frugal {frugal.energy_mj:.4g} mJ; raise the budget")
    return max(ok, key=lambda p: (p.accuracy, -lat(p), -p.energy_mj))


# ---------------------------------------------------------------- I/O


def _point_json(p: FrontPoint) -> dict:
    return {"plan": to_jsonable(p.plan), "accuracy": p.accuracy, "latency_ms": p.latency_ms,
            "energy_mj": p.energy_mj, "size_bytes": p.size_bytes, "method": p.method,
            "measured_ms": p.measured_ms, "extra": dict(p.extra)}


def front_to_json(points: Sequence[FrontPoint], meta: dict | None = None) -> str:
    data = {"points": [_point_json(p) for p in points], "meta": meta or {}}
    return json.dumps({"_type": "ParetoFront", "_version": FRONT_VERSION, "_data": data}, indent=1)


def _nan_none(v) -> float:
    return math.nan if v is None else float(v)


def front_from_json(text: str, where: str = "$") -> list[FrontPoint]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise FrontError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("_type") != "ParetoFront":
        raise FrontError(f"{where}: not a ParetoFront file (written by `hwmpq search --method nemo|ilp`)")
    if raw.get("_version") != FRONT_VERSION:
        raise FrontError(f"{where}: ParetoFront version {raw.get('_version')!r} unsupported (expected {FRONT_VERSION})")
    out = []
    for i, d in enumerate(raw.get("_data", {}).get("points", [])):
        try:
            plan = from_jsonable(d["plan"], f"{where}.points[{i}].plan")
            if not isinstance(plan, BitPlan):
                raise FrontError(f"{where}.points[{i}].plan is not a BitPlan")
            out.append(FrontPoint(plan, float(d["accuracy"]), float(d["latency_ms"]), _nan_none(d["energy_mj"]),
                                  _nan_none(d["size_bytes"]), str(d.get("method", "")),
                                  None if d.get("measured_ms") is None else float(d["measured_ms"]),
                                  dict(d.get("extra") or {})))
        except (KeyError, TypeError) as e:
            raise FrontError(f"{where}.points[{i}]: missing or bad field {e}") from None
    return out


CSV_FIELDS = ("method", "accuracy", "latency_ms", "energy_mj", "size_bytes", "measured_ms", "plan")


def front_to_csv(points: Sequence[FrontPoint]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({"method": p.method, "accuracy": p.accuracy, "latency_ms": p.latency_ms,
                    "energy_mj": p.energy_mj, "size_bytes": p.size_bytes,
                    "measured_ms": "" if p.measured_ms is None else p.measured_ms,
                    "plan": ";".join(f"{f}={q.label}" for f, q in p.plan.layers)})
    return buf.getvalue()


def front_from_csv(text: str, where: str = "$") -> list[FrontPoint]:
    out = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text))):
        try:
            layers = tuple((f, Precision.parse(q)) for f, q in (kv.rsplit("=", 1) for kv in row["plan"].split(";")))
            out.append(FrontPoint(BitPlan(layers), float(row["accuracy"]), float(row["latency_ms"]),
                                  float(row["energy_mj"]), float(row["size_bytes"]), row.get("method", ""),
                                  float(row["measured_ms"]) if row.get("measured_ms") else None))
        except (KeyError, ValueError, RecordError) as e:
            raise FrontError(f"{where} row {i + 2}: cannot read front point ({e})") from None
    return out


def save_front(points: Sequence[FrontPoint], path: str | Path, meta: dict | None = None) -> list[Path]:
    """Write ``path`` (.json) and its .csv sibling atomically; returns both paths."""
    p = Path(path)
    json_path = p if p.suffix == ".json" else p.with_suffix(".json")
    csv_path = json_path.with_suffix(".csv")
    atomic_write_text(json_path, front_to_json(points, meta) + "\n")
    atomic_write_text(csv_path, front_to_csv(points))
    return [json_path, csv_path]


def load_front(path: str | Path) -> list[FrontPoint]:
    p = Path(path)
    if not p.is_file():
        raise FrontError(f"{p}: no such front file (give the .json or .csv written by a NEMO/ILP search)")
    text = p.read_text()
    pts = front_from_csv(text, str(p)) if p.suffix == ".csv" else front_from_json(text, str(p))
    if not pts:
        raise FrontError(f"{p}: the front holds no points")
    return pts


def with_measured(point: FrontPoint, measured_ms: float) -> FrontPoint:
    return replace(point, measured_ms=float(measured_ms))


# ---------------------------------------------------------------- plot


def plot_fronts(fronts: dict[str, Sequence[FrontPoint]], path: str | Path, title: str = "",
                x: str = "auto") -> Path:
    """PNG: accuracy vs latency, one marker per method; colour = energy (mJ), marker area = model size.
    ``x='auto'`` plots measured latency where a point has one (hollow marker: LUT prediction only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts_all = [p for pts in fronts.values() for p in pts]
    if not pts_all:
        raise FrontError("plot_fronts: nothing to plot")
    e = np.array([p.energy_mj for p in pts_all], dtype=float)
    s = np.array([p.size_bytes for p in pts_all], dtype=float)
    e_lo, e_hi = np.nanmin(e), np.nanmax(e)
    s_lo, s_hi = np.nanmin(s), max(np.nanmax(s), np.nanmin(s) + 1e-9)
    norm = matplotlib.colors.Normalize(e_lo, e_hi if e_hi > e_lo else e_lo + 1e-9)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^vP*Xh<>"
    for k, (method, pts) in enumerate(fronts.items()):
        pts = sorted(pts, key=lambda p: _x(p, x))
        xs = [_x(p, x) for p in pts]
        ys = [100 * p.accuracy for p in pts]
        area = 30 + 170 * (np.array([p.size_bytes for p in pts]) - s_lo) / (s_hi - s_lo)
        measured = np.array([x != "latency_ms" and p.measured_ms is not None for p in pts])
        best, stair_x, stair_y = -np.inf, [], []  # the (accuracy, latency) staircase of this method
        for xv, yv in zip(xs, ys, strict=True):
            if yv > best:
                best = yv
                stair_x.append(xv)
                stair_y.append(yv)
        ax.step(stair_x, stair_y, where="post", alpha=0.5, lw=1)
        energy = np.array([p.energy_mj for p in pts])
        for mask, filled in ((measured, True), (~measured, False)):
            if not mask.any():
                continue
            label = method if filled or not measured.any() else None
            common = {"s": area[mask], "marker": markers[k % len(markers)], "label": label}
            if filled:
                ax.scatter(np.array(xs)[mask], np.array(ys)[mask], c=energy[mask], cmap="viridis", norm=norm,
                           edgecolors="k", linewidths=0.5, **common)
            else:
                ax.scatter(np.array(xs)[mask], np.array(ys)[mask], facecolors="none",
                           edgecolors=plt.cm.viridis(norm(energy[mask])), linewidths=1.5, **common)
    ax.set_xlabel("latency (ms): filled = measured artifact, hollow = LUT prediction" if x == "auto"
                  else x.replace("_", " "))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Pareto fronts (colour: energy mJ, size: model bytes)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="energy (mJ)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


def _x(p: FrontPoint, x: str) -> float:
    if x == "auto":
        return p.measured_ms if p.measured_ms is not None else p.latency_ms
    if x == "measured_ms" and p.measured_ms is None:
        raise FrontError("plot_fronts(x='measured_ms'): a point has no measured latency")
    return float(getattr(p, x))
