"""The closed loop: data and model -> LUT (profiling missing entries if asked) -> search under the budget ->
QAT fine-tune from the search's weights -> export to the target -> measure -> one table of budget,
predicted and measured latency, test accuracy and top-1 agreement with the float model. ``hwmpq search``
and ``hwmpq demo`` are thin shells over it. With ``ptq`` (``--ptq``, hwmpq/search/ptq.py) nothing is
trained: the plan's model is the float model quantized and calibrated.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hwmpq.records import MeasureConfig, Precision, atomic_write_text, save_plan, to_json

from . import distributed
from .base import Budget, SearchInputs, SearchResult, run_search


@dataclass
class LoopConfig:
    method: str = "ssps"  # dnas | ssps | saq | nemo | ilp | uniform
    ray: str | None = None  # nemo/ilp: Ray address for candidate evaluations (None: local process pool)
    model: str = "resnet20"
    num_classes: int | None = None  # classes of a zoo model; None: the data's (unlabelled data: 10)
    data: str = "fashion-mnist"
    data_limit: int | None = None  # train images kept (val/test shrink with it); None: all
    weights: str | None = None  # trained float weights (state dict or hwmpq checkpoint)
    pretrain_epochs: int = 0  # train the float model first (when no --weights): the demo uses this
    pretrain_lr: float = 0.05
    target: str = "ort-x86"
    threads: int = 1
    lut: str | None = None
    profile_missing: bool = False
    precisions: str = "native"  # what --profile-missing measures (hwmpq profile --precisions)
    force_lut: bool = False
    warmup: int = 30  # MeasureConfig of the LUT rows (must match how the LUT was profiled)
    repeat: int = 100
    budget: str | None = None  # "0.6x" or ms
    budget_ms: float | None = None
    budget_mj: float | None = None
    bits: str = "8"  # uniform: the precision (8, w4a8, fp32, ...)
    candidates: tuple[str, ...] = ()  # restrict the search to these precisions (e.g. fp32, w8a8); () = all
    search: dict[str, Any] = field(default_factory=dict)  # DNASConfig / SSPSConfig fields
    finetune_epochs: int | None = None  # None: 1, or 0 with ptq
    finetune_lr: float = 0.001  # SGD; 0.01 wrecks LSQ step sizes of a BN-folded model within a few steps
    finetune_limit_batches: int | None = None
    batch_size: int = 128
    qat: dict[str, Any] = field(default_factory=dict)  # QATOptions fields (sam, rho, stat_assist, grad_boost)
    out: str = "plan.json"
    export_dir: str | None = None
    baselines: tuple[str, ...] = ()  # extra uniform rows through the same path, e.g. ("fp32", "8")
    ptq: bool = False  # post-training: no training anywhere; plans are calibrated, not fine-tuned (ptq.py)
    calibration_batches: int = 4  # ptq: training batches the plan's quantizers are calibrated on
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.finetune_epochs is None:
            self.finetune_epochs = 0 if self.ptq else 1


@dataclass
class Context:
    splits: Any
    model: nn.Module
    example_input: torch.Tensor
    target: Any
    table: Any
    budget: Budget
    measure: MeasureConfig
    float_acc: float | None  # None: unlabelled data
    float_top1: torch.Tensor | None = None  # the float model's test-split predictions (for the agreement)
    search_splits: Any = None  # what the search reads, when not ``splits`` (ptq on unlabelled data)


def _log(msg: str) -> None:
    if distributed.is_main():
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(msg, highlight=False)


def load_data_and_model(cfg: LoopConfig):
    from hwmpq.data import load_dataset, require_labels
    from hwmpq.modelspec import load_model_for_data

    kw = {"seed": cfg.seed}
    if cfg.data_limit is not None and cfg.data == "fashion-mnist":
        kw["limit"] = cfg.data_limit
    splits = load_dataset(cfg.data, **kw)
    if not cfg.ptq:
        require_labels(splits, "a search without --ptq (it trains)")
    model = load_model_for_data(cfg.model, splits, weights=cfg.weights, num_classes=cfg.num_classes)
    if cfg.weights is None and cfg.pretrain_epochs > 0:
        from hwmpq.train import fit

        _log(f"[bold]float pre-training[/] {cfg.model} on {cfg.data}: {cfg.pretrain_epochs} epoch(s)")
        fit(model, splits, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, batch_size=cfg.batch_size,
            seed=cfg.seed, progress=cfg.progress and distributed.is_main(), log=_log)
    elif cfg.weights is None:
        _log("[yellow]note[/]: no --weights and no --pretrain-epochs: searching an untrained float model")
    return splits, model.eval(), torch.zeros(1, *splits.input_shape)


def load_table(cfg: LoopConfig, model: nn.Module, example_input: torch.Tensor, target, measure: MeasureConfig):
    """LatencyTable from the LUT store; missing entries are profiled with ``profile_missing``, else named."""
    from hwmpq.graph import analyse
    from hwmpq.lut.model import MissingEntriesError, build_table, edges_through_merges
    from hwmpq.lut.store import LutStore

    if cfg.lut is None:
        raise ValueError("give --lut PATH (a LUT file; with --profile-missing it is created and filled)")
    specs, _ = analyse(model, example_input)
    edges = edges_through_merges(model, example_input)
    with LutStore.open(cfg.lut, target=target.id, device=target.device(), force=cfg.force_lut) as store:
        if cfg.profile_missing:
            _profile_missing(cfg, model, example_input, specs, edges, target, store, measure)
        try:
            return build_table(store, specs, edges, measure, target, allow_foreign=cfg.force_lut)
        except MissingEntriesError as e:
            layers = sorted({f for f, _ in e.missing})
            raise MissingEntriesError(e.missing, f"; layers without entries: {layers}. Or rerun with "
                                      "--profile-missing to measure them now") from None


def _profile_missing(cfg: LoopConfig, model, example_input, specs, edges, target, store, measure) -> None:
    """The profile sequence (hwmpq.api.measure_missing) over what the LUT lacks; a complete LUT measures
    nothing. A profile stopped early (a dead device) leaves the missing entries to be named by the table."""
    from hwmpq.profilers.sequence import ProfileOptions, ProfileStopped, measure_missing

    try:
        report, context_rows = measure_missing(model, example_input, specs, edges, target, store, measure,
                                               options=ProfileOptions(progress=cfg.progress, precisions=cfg.precisions))
    except ProfileStopped:
        return
    if report.measured or report.failed:
        _log(f"profiled {report.measured} missing entries into {cfg.lut} ({report.failed} failed)")
    if context_rows:
        _log("timed the layers' kernels in the model's uniform and mixed plans and alone (lut/context.py)")


def restrict_candidates(table, labels: tuple[str, ...]):
    """The same LUT over a subset of its candidates (the search space shrinks; nothing is re-measured)."""
    from hwmpq.lut.table import LatencyTable

    if not labels:
        return table
    wanted = [Precision.parse(s) for s in labels]
    unknown = [p.label for p in wanted if p not in table.candidates]
    if unknown:
        raise ValueError(f"--candidates {unknown} are not in the LUT for {table.target}; it has "
                         f"{[c.label for c in table.candidates]}")
    k = [table.candidates.index(p) for p in wanted]
    lat = table.layer_ms[:, k]
    none = [f for f, ok in zip(table.fqns, np.isfinite(lat).any(axis=1), strict=True) if not ok]
    if none:
        raise ValueError(f"with --candidates {list(labels)} layers {none} have no runnable precision; add fp32")
    trans = tuple((i, j, t[np.ix_(k, k)]) for i, j, t in table.transitions)
    return LatencyTable(table.fqns, tuple(wanted), lat, table.energy_mj[:, k], trans, table.constant_ms,
                        target=table.target, device=table.device, emulated=table.emulated)


def prepare(cfg: LoopConfig) -> Context:
    from hwmpq.targets import get_target

    from .budget import cheapest_plan, check_feasible, parse_budget
    from .ptq import accuracy, check_ptq, predictions, search_splits

    if cfg.ptq:
        check_ptq(cfg.method, qat=cfg.qat, finetune_epochs=cfg.finetune_epochs, pretrain_epochs=cfg.pretrain_epochs,
                  calibration_batches=cfg.calibration_batches)
        _log(f"post-training (--ptq): nothing is trained; each plan is quantized and calibrated on "
             f"{cfg.calibration_batches} training batch(es)")
    splits, model, x = load_data_and_model(cfg)
    target = get_target(cfg.target, threads=cfg.threads)
    measure = MeasureConfig(warmup=cfg.warmup, repeat=cfg.repeat, threads=cfg.threads)
    table = restrict_candidates(load_table(cfg, model, x, target, measure), cfg.candidates)
    no_budget = cfg.budget is None and cfg.budget_ms is None and cfg.budget_mj is None
    if cfg.method == "uniform" and no_budget:  # a baseline needs no budget
        budget = Budget(latency_ms=float("inf"))
    else:
        budget = parse_budget(table, cfg.budget, cfg.budget_ms, cfg.budget_mj)
    lowest = table.predict_indices(cheapest_plan(table))[0]
    if lowest <= 0:
        _log(f"[yellow]warning[/]: the LUT predicts {lowest:.3g} ms for its cheapest plan: its transition terms are "
             "dominated by timing noise (layers too small for this MeasureConfig); raise --repeat when profiling")
    if cfg.method != "uniform":
        check_feasible(table, budget)  # refused before any training
    float_top1, labels = predictions(model, splits.loader("test", batch_size=512))
    float_acc = accuracy(float_top1, labels)
    searched = search_splits(splits, model, _log) if cfg.ptq else splits
    return Context(splits, model, x, target, table, budget, measure, float_acc, float_top1, searched)


def method_config(cfg: LoopConfig, method: str, bits: str | None = None):
    from .dnas import DNASConfig
    from .ssps import SSPSConfig
    from .uniform import UniformConfig

    if method == "uniform":
        return UniformConfig(Precision.parse(bits or cfg.bits))
    fields = dict(cfg.search)
    if method == "dnas":
        fields = {k: v for k, v in fields.items() if k not in ("fix_every", "certainty")}
        return DNASConfig(**fields)
    if method == "ssps":
        return SSPSConfig(**fields)
    if method == "saq":
        from .saq import SAQConfig

        return SAQConfig.from_options(fields)
    if method in ("nemo", "ilp"):
        from .ilp import ILPConfig
        from .nemo import NEMOConfig

        front_dir = str(Path(cfg.out).with_suffix("")) + f"_{method}_front"
        extra = {"out_dir": front_dir, "ray_address": cfg.ray}
        if method == "nemo":
            return NEMOConfig(generations=cfg.search.get("epochs", 8), **extra)
        return ILPConfig(**extra)
    raise ValueError(f"--method {method!r}: use dnas, ssps, saq, nemo, ilp or uniform")


def fine_tune(ctx: Context, cfg: LoopConfig, result: SearchResult) -> nn.Module:
    """QAT of the plan (hwmpq.qat_options.run_qat: StatAssist, quantize, calibrate, fit with the SAM/GradBoost
    hooks), starting from the search's weights and quantizer scales when it has them; with ``cfg.ptq``
    calibration only: the float model quantized by the plan, calibrated, not trained."""
    from hwmpq.qat_options import QATOptions, run_qat
    from hwmpq.qmodules import placement_of

    from .ptq import calibrated

    plan = result.plan
    if cfg.ptq:
        return calibrated(ctx.model, plan, ctx.splits, ctx.target.placement, batches=cfg.calibration_batches,
                          batch_size=cfg.batch_size, seed=cfg.seed)
    wants_quant = any(not p.is_float for _, p in plan.layers)
    placement = ctx.target.placement
    found = placement_of(result.model) if result.model is not None else None
    if result.model is not None and not wants_quant:
        return result.model.eval()  # a float plan: nothing to quantize or fine-tune
    if result.model is not None and found == placement:
        start = result.model  # already quantized by the plan as the target wants, with the search's scales
    else:
        # no model, float weights, or a supernet's per-layer quantizers (its scales do not carry over to
        # tensor placement, and its weights were trained under them: the demo's SSPS plan reached 0.796
        # test accuracy from them against 0.812 from the float weights): quantize and calibrate
        start = copy.deepcopy(result.model if result.model is not None and found is None else ctx.model)
    model, _ = run_qat(start, plan, ctx.splits, QATOptions(**cfg.qat), epochs=cfg.finetune_epochs if wants_quant
                       else 0, placement=placement, lr=cfg.finetune_lr, batch_size=cfg.batch_size, seed=cfg.seed,
                       limit_batches=cfg.finetune_limit_batches, progress=cfg.progress, log=_log)
    return model.eval()


def export_row(ctx: Context, model: nn.Module, result: SearchResult, out_dir: Path, acc: float | None,
               agreement: float | None = None):
    """The row's deployable export (None if the target cannot export whole models); timed later, with the
    other rows' exports (:func:`measure_together`)."""
    extra = {"budget_ms": ctx.budget.latency_ms, "budget_mj": ctx.budget.energy_mj,
             "predicted_ms": result.predicted_ms, "predicted_mj": result.predicted_mj, "test_acc": acc,
             "agreement": agreement}
    if not ctx.target.capabilities.export:
        _log(f"[yellow]note[/]: target {ctx.target.id} cannot export whole models; not measured")
        return None
    return ctx.target.export(model, result.plan, ctx.example_input, str(out_dir), manifest_extra=extra)


def measure_together(ctx: Context, cfg: LoopConfig, rows: list[dict[str, Any]], exports: list) -> None:
    """Every row's export timed in one interleaved run, beside the LUT's speed reference, and again if the
    machine ran slower than at profile time (``lut.validate.measure_at_speed``): timed one by one right
    after each row's fine-tuning, the same int8 export measured 10-40% slower than a minute later."""
    from hwmpq.lut.model import speed_rows
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.measure import measure_at_speed

    live = [(r, e) for r, e in zip(rows, exports, strict=True) if e is not None]
    if not live or not ctx.target.capabilities.measure_artifact:
        return
    with LutStore.read(cfg.lut) as store:
        probe_rows = speed_rows(store, ctx.measure)
    timed, check = measure_at_speed(ctx.target, [e for _, e in live], ctx.measure, probe_rows)
    for (row, export), (quoted, _, _, err) in zip(live, timed, strict=True):
        if err:
            _log(f"[red]measuring {export.artifact} failed[/]: {err}")
        row["measured_ms"], row["speed_factor"] = quoted, (check.factor if check else None)


def run_row(ctx: Context, cfg: LoopConfig, method: str, bits: str | None, out: Path) -> tuple[Any, dict[str, Any]]:
    """Search (or uniform plan), fine-tune (calibrate, with ptq), evaluate, export: the export (or None) and
    one row of the final table, its ``measured_ms`` left for :func:`measure_together`."""
    from .ptq import scores_on_test

    mcfg = method_config(cfg, method, bits)
    splits = ctx.splits if ctx.search_splits is None else ctx.search_splits
    inputs = SearchInputs(ctx.model, splits, ctx.table, ctx.budget, ctx.example_input, seed=cfg.seed,
                          progress=cfg.progress, log=_log)
    t0 = time.perf_counter()
    result = run_search(inputs, mcfg)
    search_s = time.perf_counter() - t0
    label = method if method != "uniform" else f"uniform {mcfg.precision.label}"
    if not distributed.is_main():
        return None, {"method": label}
    save_plan(result.plan, out)
    atomic_write_text(out.with_suffix(".trace.json"), to_json(result.trace) + "\n")
    model = fine_tune(ctx, cfg, result)
    acc, agreement = scores_on_test(model, ctx.splits, _float_top1(ctx))
    exported = export_row(ctx, model, result, out.parent / f"{out.stem}_export", acc, agreement)
    return exported, {
        "method": label, "budget_ms": ctx.budget.latency_ms, "budget_mj": ctx.budget.energy_mj,
        "predicted_ms": result.predicted_ms, "predicted_mj": result.predicted_mj, "measured_ms": None,
        "test_acc": acc, "agreement": agreement, "search_s": search_s, "repaired": result.repaired, "plan": str(out),
        "notes": result.notes,
        "bits": {p.label: sum(1 for _, q in result.plan.layers if q == p) for _, p in result.plan.layers}}


def _float_top1(ctx: Context) -> torch.Tensor:
    """The float model's test-split predictions, made once per context."""
    if ctx.float_top1 is None:
        from .ptq import predictions

        ctx.float_top1 = predictions(ctx.model, ctx.splits.loader("test", batch_size=512))[0]
    return ctx.float_top1


def run_loop(cfg: LoopConfig) -> list[dict[str, Any]]:
    """The whole job; returns the rows it printed (and wrote to ``<out>.report.json``)."""
    ctx = prepare(cfg)
    out = Path(cfg.out)
    if cfg.export_dir:
        out_dir = Path(cfg.export_dir)
    rows, exports = [], []
    for method, bits in [(cfg.method, None)] + [("uniform", b) for b in cfg.baselines]:
        path = out if not rows else out.with_name(f"{out.stem}.uniform_{Precision.parse(bits).label}.json")
        exported, row = run_row(ctx, cfg, method, bits, path)
        rows.append(row)
        exports.append(exported)
    if distributed.is_main():
        measure_together(ctx, cfg, rows, exports)
        if cfg.export_dir:
            _move_export(out, out_dir)
        report = {"config": asdict(cfg), "float_test_acc": ctx.float_acc, "lut": cfg.lut, "target": ctx.target.id,
                  "rows": rows}
        atomic_write_text(out.with_suffix(".report.json"), to_json(report) + "\n")
        print_table(rows, ctx, cfg)
    return rows


def _move_export(plan_path: Path, out_dir: Path) -> None:
    import shutil

    src = plan_path.parent / f"{plan_path.stem}_export"
    if src.resolve() == out_dir.resolve():
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.move(str(src), str(out_dir))


def print_table(rows: list[dict[str, Any]], ctx: Context, cfg: LoopConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    b = ctx.budget
    acc = (f"float test acc {ctx.float_acc:.4f}" if ctx.float_acc is not None
           else "unlabelled data: no accuracy, agreement only")
    title = (f"{cfg.model} on {cfg.data}, {ctx.target.id}" + ("; post-training (--ptq)" if cfg.ptq else "")
             + "; budget " + (f"{b.latency_ms:.4g} ms" if b.latency_ms is not None else "") +
             (f" {b.energy_mj:.4g} mJ" if b.energy_mj is not None else "") + f"; {acc}")
    t = Table(title=title)
    for col in ("method", "budget ms", "predicted ms", "measured ms", "test acc", "agreement", "search s", "plan"):
        t.add_column(col, justify="left" if col in ("method", "plan") else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        t.add_row(r["method"] + (" (repaired)" if r.get("repaired") else ""), f(r.get("budget_ms"), ".4g"),
                  f(r.get("predicted_ms"), ".4g"), f(r.get("measured_ms"), ".4g"), f(r.get("test_acc"), ".4f"),
                  f(r.get("agreement"), ".4f"), f(r.get("search_s"), ".1f"),
                  " ".join(f"{k}x{v}" for k, v in r.get("bits", {}).items()))
    Console(width=160).print(t)
    Console().print("agreement: top-1 agreement with the float model on the test split")
    speed = next((r["speed_factor"] for r in rows if r.get("speed_factor")), None)
    if speed is not None:
        Console().print(f"measured: all exports in one interleaved run, the machine at {speed:.2f}x its time "
                        "for the LUT's slowest speed probe (>1: slower than when profiled)")
    for r in rows:
        for n in r.get("notes", []):
            Console().print(f"[yellow]{r['method']}[/]: {n}")
