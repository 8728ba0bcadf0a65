"""The Python API: the whole loop as four verbs, in the torchao style (a verb takes a model and frozen config
dataclasses and returns a frozen record)::

    import hwmpq
    lut = hwmpq.profile(model, x, target="ort-x86", lut="cpu.lut")
    found = hwmpq.search(model, "digits", target="ort-x86", lut="cpu.lut", budget="0.5range")
    export = hwmpq.export(found.model, found.plan, target="ort-x86", out="export", example_input=x)
    timing = hwmpq.measure(export, target="ort-x86")

Each verb runs the stages the CLI runs, in their order (``hwmpq profile`` is a thin shell over
:func:`profile`). A target is a name for ``hwmpq.targets.get_target`` (``"ort-x86"``, ``"tvm:host"``,
``"fake"``) or a target object; data is anything ``--data`` takes, a :class:`hwmpq.data.Splits` or
DataLoaders (:func:`as_splits`). Mistakes a caller can fix raise ValueError (TypeError for a wrong kind of
argument, LookupError for LUT entries that are missing), before any measuring or training where they can
be seen then. Importing this module does not import torch; the verbs do.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .profilers.sequence import ProfileOptions, ProfileStopped, measure_missing
from .records import BitPlan, MeasureConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import Splits
    from .lut.store import LutStore
    from .lut.table import LatencyTable
    from .qat_options import QATOptions
    from .records import Edge, LayerSpec
    from .search.base import Budget, SearchResult
    from .targets.base import ExportResult, Target

METHODS = ("ssps", "dnas", "saq", "nemo", "ilp", "uniform")


# ---------------------------------------------------------------- configs and records

@dataclass(frozen=True)
class ProfileResult:
    """What :func:`profile` did to the LUT file and the table the search consumes."""

    lut: str
    target: str
    config: MeasureConfig  # the protocol of the rows (what a search must read them with)
    measured: int  # rows committed with a latency in this call
    kept: int  # rows already in the LUT (a resumed profile does not measure them again)
    failed: int  # jobs committed as build/run failures
    context_rows: int  # kernel-in-context rows committed (lut/context.py)
    seconds: float
    table: LatencyTable | None = field(repr=False)  # None: ``ProfileOptions(table=False)``, or see table_error
    table_error: str | None = None  # why no table could be built (e.g. failed entries the table needs)
    precisions: tuple[str, ...] = ()  # the precisions the LUT now covers (its table's candidates)
    phase_s: tuple[tuple[str, float], ...] = ()  # seconds per phase of this call (graph, builds, runs, ...)


@dataclass(frozen=True)
class SearchOptions:
    """The epochs, fine-tune and LUT options of :func:`search` (the method's own settings are its config)."""

    epochs: int = 4  # search epochs of a method given by name (nemo: generations)
    warmup_epochs: int = 1  # weight-only epochs before architecture steps (method by name)
    limit_batches: int | None = None  # train batches per search epoch (method by name); None: all
    search_batch_size: int = 64  # batch size of the search (method by name)
    bits: str = "8"  # method="uniform": the precision (8, w4a8, fp32, ...)
    candidates: tuple[str, ...] = ()  # search only these precisions, e.g. ("fp32", "w8a8"); (): all
    finetune_epochs: int | None = None  # QAT epochs after the search (0: calibrated only); None: 1, or 0 with ptq
    finetune_lr: float = 0.001  # SGD; 0.01 wrecks LSQ step sizes of a BN-folded model
    finetune_limit_batches: int | None = None
    batch_size: int = 128  # QAT and calibration batch size
    qat: QATOptions | None = None  # SAM / StatAssist / GradBoost in the fine-tune
    profile_missing: bool = True  # measure LUT entries the model needs and the LUT lacks (else: refuse)
    precisions: str | tuple[str, ...] = "native"  # what profile_missing measures (ProfileOptions.precisions)
    force_lut: bool = False  # use a LUT of another device knowingly
    out_dir: str | None = None  # nemo/ilp: where their Pareto front is written (None: not written)
    seed: int = 0  # data split, search and fine-tune
    progress: bool = True
    ptq: bool = False  # post-training: no training anywhere (ilp, nemo, uniform); the plan's model calibrated
    calibration_batches: int = 4  # ptq: training batches the plan's quantizers are calibrated on


@dataclass(frozen=True)
class SearchOutcome:
    """The plan :func:`search` found and the fine-tuned (with ``ptq``: calibrated) quantized model, in the
    target's placement."""

    plan: BitPlan
    model: nn.Module = field(repr=False)
    predicted_ms: float
    predicted_mj: float
    test_acc: float | None  # None: unlabelled data
    budget: Budget
    table: LatencyTable = field(repr=False)  # the LUT's table the search ran on (``SearchOptions.candidates``)
    result: SearchResult = field(repr=False)  # the strategy's record: trace, notes, repaired, wall_s
    lut: str
    target: str
    agreement: float | None = None  # top-1 agreement with the float model on the test split


@dataclass(frozen=True)
class Timing:
    """End-to-end latency of one exported artifact (:func:`measure`): a RunResult's samples summarised."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    latencies_ms: tuple[float, ...] = field(repr=False)
    artifact: str
    target: str
    config: MeasureConfig


# ---------------------------------------------------------------- targets, data, protocol

def target_work_dir(lut: str | os.PathLike) -> str:
    """Where a TVM target keeps its tuning database and built layers for ``lut``: beside it, so export
    reuses them."""
    p = Path(lut).resolve()
    return str(p.parent / (p.stem + ".tvm"))


@contextmanager
def resolved_target(target: str | Target, *, threads: int | None = None,
                    lut: str | os.PathLike | None = None) -> Iterator[Target]:
    """The target object for ``target``. One made here from a name (with ``threads``; a TVM one with its
    work dir beside ``lut``) is cleaned up afterwards; an object passed in is the caller's to clean up."""
    if not isinstance(target, str):
        _check_target_object(target)
        yield target
        return
    from .targets import get_target

    options: dict[str, Any] = {} if threads is None else {"threads": threads}
    if target.startswith("tvm:") and lut is not None:
        options["work_dir"] = target_work_dir(lut)
    made = get_target(target, **options)
    try:
        yield made
    finally:
        for name in ("cleanup", "close"):  # built layers in temp files, RPC sessions
            release = getattr(made, name, None)
            if callable(release):
                release()


def _check_target_object(target: Any) -> None:
    from .targets.base import Target

    if not isinstance(target, Target):
        raise TypeError(f"target must be a name ('ort-x86', 'tvm:PRESET', 'fake') or a target object "
                        f"(hwmpq.targets.get_target), got {type(target).__name__}")


def _threads(target: Target) -> int:
    return int(target.threads)


def _check_threads(config: MeasureConfig, target: Target) -> None:
    """A target times with the threads it was made with; rows under another count would all fail."""
    if config.threads != _threads(target):
        raise ValueError(f"MeasureConfig.threads={config.threads} but target {target.id} runs "
                         f"{_threads(target)} thread(s); pass the target by name (made with the config's "
                         "threads) or make it with threads=config.threads")


def lut_config(lut: str | os.PathLike) -> MeasureConfig | None:
    """The protocol most of the LUT's layer rows were measured under; None without a file or rows. A
    search must read the rows under the protocol they were measured with."""
    if not Path(lut).is_file():
        return None
    from collections import Counter

    from .lut.store import LutStore

    with LutStore.read(lut) as store:
        configs = Counter(m.config for m in store.measurements("layer"))
    return configs.most_common(1)[0][0] if configs else None


def as_splits(data: Any, *, seed: int = 0, **data_kw: Any) -> Splits:
    """A :class:`hwmpq.data.Splits` from any data form the verbs take: a Splits; what ``--data`` takes (a
    name, an image folder, an .npz, ``file.py:factory``; ``data_kw`` are ``load_data``'s keywords); or a
    DataLoader, or a (train, val[, test]) tuple of them: their datasets are used as they are (the loaders'
    batch sizes are not: the verbs batch as the CLI does), the last one given also serving as the later
    splits (one loader: train, val and test; two: the second is val and test)."""
    from .data import Splits, load_data

    if isinstance(data, Splits):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(os.fspath(data), seed=seed, **data_kw)
    return _splits_from_loaders(data)


def _splits_from_loaders(data: Any) -> Splits:
    from torch.utils.data import DataLoader, IterableDataset

    from .data import splits_from_datasets

    loaders = [data] if isinstance(data, DataLoader) else list(data) if isinstance(data, (tuple, list)) else []
    if not 1 <= len(loaders) <= 3 or not all(isinstance(d, DataLoader) for d in loaders):
        raise TypeError(f"data must be a dataset name, a path, a hwmpq.data.Splits, a DataLoader or a (train, "
                        f"val[, test]) tuple of DataLoaders; got {type(data).__name__}")
    datasets = [d.dataset for d in loaders]
    if any(isinstance(ds, IterableDataset) for ds in datasets):
        raise ValueError("a DataLoader over an IterableDataset cannot be split or stacked; give one over a "
                         "map-style dataset (with __len__ and __getitem__)")
    train, val, test = (datasets[min(i, len(datasets) - 1)] for i in range(3))
    return splits_from_datasets(f"DataLoader({type(train).__name__})", train, val, test)


def _require_float(model: nn.Module, verb: str) -> None:
    from .qmodules import placement_of

    if placement_of(model) is not None:
        raise ValueError(f"{verb} takes the float model; this one is quantized (hwmpq.qmodules.float_view(model) "
                         "is its float form)")


def _float_graph(model: nn.Module, example_input: torch.Tensor) -> tuple[list[LayerSpec], list[Edge]]:
    """The layers and the edges the LUT model prices (across residual adds and concats too)."""
    from .graph import analyse
    from .lut.model import edges_through_merges

    specs, _ = analyse(model, example_input)
    return specs, edges_through_merges(model, example_input)


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


@contextmanager
def _lut_store(lut: str | os.PathLike, target: Target, force: bool) -> Iterator[LutStore]:
    from .lut.store import LutStore

    with LutStore.open(lut, target=target.id, device=target.device(), force=force) as store:
        yield store


# ---------------------------------------------------------------- profile

def profile(model: nn.Module, example_input: torch.Tensor, *, target: str | Target = "ort-x86",
            lut: str | os.PathLike, config: MeasureConfig | None = None, context: bool = True,
            options: ProfileOptions | None = None) -> ProfileResult:
    """Measure the float ``model``'s layers (each unique signature once, at every precision the target runs),
    their transitions and the per-model constant into the SQLite LUT ``lut``, then (``context``) each
    layer's kernel inside the model's uniform and mixed context plans, and build the LatencyTable.

    An existing LUT is resumed (only what it lacks is measured); one of another device, target or schema is
    refused (``ForeignLutError``; ``ProfileOptions(force=True)`` uses it knowingly). ``config`` defaults to
    the protocol of the LUT's rows, else ``MeasureConfig()`` at the target's threads. Ctrl-C keeps every
    committed row and re-raises KeyboardInterrupt; a device that stops answering raises
    :class:`ProfileStopped`."""
    options = options or ProfileOptions()
    _require_float(model, "profile")
    config = config or lut_config(lut)
    t0 = time.perf_counter()
    with resolved_target(target, threads=config.threads if config else None, lut=lut) as tgt:
        config = config or MeasureConfig(threads=_threads(tgt))
        _check_threads(config, tgt)
        tgt.precisions.select(options.precisions)  # a bad --precisions fails before any work
        specs, edges = _float_graph(model, example_input)
        graph_s = time.perf_counter() - t0
        with _lut_store(lut, tgt, options.force) as store:
            report, context_rows = measure_missing(model, example_input, specs, edges, tgt, store, config,
                                                   context=context, options=options)
            t1 = time.perf_counter()
            table, error = _try_table(store, specs, edges, config, tgt, options, context) if options.table \
                else (None, None)
            covered = tuple(p.label for p in store.precisions or tgt.precisions.all)
        tid = tgt.id
    phases = (("graph", graph_s), *report.phase_s) + ((("table", time.perf_counter() - t1),) if options.table else ())
    result = ProfileResult(lut=os.fspath(lut), target=tid, config=config, measured=report.measured,
                           kept=report.skipped, failed=report.failed, context_rows=context_rows,
                           seconds=time.perf_counter() - t0, table=table, table_error=error, precisions=covered,
                           phase_s=phases)
    if options.progress:
        _console().print(format_phases(result))
    return result


def format_phases(result: ProfileResult) -> str:
    """One line: where the time of a profile went, largest phase first."""
    parts = ", ".join(f"{name} {s:.1f} s" for name, s in sorted(result.phase_s, key=lambda kv: -kv[1]))
    return (f"profiled in {result.seconds:.1f} s ({parts}); the LUT covers {', '.join(result.precisions)}")


def _table(store: LutStore, specs, edges, config: MeasureConfig, target: Target, *, force: bool,
           context: bool) -> LatencyTable:
    """The LatencyTable from the store; a profile under emulation gives a table marked emulated."""
    from .lut.model import build_table

    return build_table(store, specs, edges, config, target, allow_foreign=force,
                       allow_emulated=bool(target.device().emulated), context=context)


def _try_table(store, specs, edges, config, target, options: ProfileOptions,
               context: bool) -> tuple[LatencyTable | None, str | None]:
    from .lut.model import MissingEntriesError

    try:
        return _table(store, specs, edges, config, target, force=options.force, context=context), None
    except MissingEntriesError as e:
        return None, str(e)


# ---------------------------------------------------------------- search

def search(model: nn.Module, data: Any, *, target: str | Target = "ort-x86", lut: str | os.PathLike | ProfileResult,
           budget: Budget | str | float | None = None, method: Any = None, options: SearchOptions | None = None,
           config: MeasureConfig | None = None) -> SearchOutcome:
    """Search bit-widths for the float ``model`` under ``budget`` on ``data``'s splits, priced by the LUT,
    then QAT-fine-tune the plan, quantized as the target's exporter wants
    (``hwmpq.qmodules.quantize(model, plan, placement=target.placement)``), and measure its test accuracy
    and top-1 agreement with the float model.

    ``method`` is a config (``SSPSConfig(...)``, ``DNASConfig``, ``SAQConfig``, ``NEMOConfig``, ``ILPConfig``,
    ``UniformConfig``) or a name in :data:`METHODS`, configured from ``options`` as ``hwmpq search`` does;
    None is ``"ssps"``, or ``"ilp"`` with ``SearchOptions(ptq=True)``. ``ptq`` trains nothing
    (hwmpq/search/ptq.py): ilp, nemo or uniform choose the plan, whose model is calibrated on
    ``calibration_batches`` training batches, not fine-tuned; data without labels is accepted then (the
    float model's predictions serve as the sensitivities' labels; ``test_acc`` is None).
    ``budget`` is a :class:`Budget`, text (``"0.6x"`` of the fp32 plan, ``"0.5range"`` from the fastest plan
    to fp32, ``"2.5ms"``) or a number of ms; a uniform baseline needs none. ``lut`` is a LUT path or a
    :class:`ProfileResult`; entries it lacks are profiled first (``SearchOptions.profile_missing``).
    ``config`` defaults to the protocol of the LUT's rows. ``model`` is not modified."""
    opts = options or SearchOptions()
    if isinstance(lut, ProfileResult):
        config, lut = config or lut.config, lut.lut
    strategy = _method_config(("ilp" if opts.ptq else "ssps") if method is None else method, opts)
    _check_ptq(strategy, opts)
    _check_budget(budget, strategy)
    _require_float(model, "search")
    splits = as_splits(data, seed=opts.seed)
    import torch

    from .data import require_labels
    from .modelspec import check_channels

    if not opts.ptq:
        require_labels(splits, "a search without ptq (it trains)")
    check_channels(model, splits.input_shape)
    model = copy.deepcopy(model).eval()  # the caller's model keeps its weights and mode
    x = torch.zeros(1, *splits.input_shape)
    config = config or lut_config(lut)
    with resolved_target(target, threads=config.threads if config else None, lut=lut) as tgt:
        config = config or MeasureConfig(threads=_threads(tgt))
        _check_threads(config, tgt)
        table = _search_table(model, x, tgt, lut, config, opts)
        bound = _budget(budget, table, strategy)
        return _search_and_tune(model, splits, x, tgt, table, bound, strategy, config, opts, lut)


def _method_config(method: Any, opts: SearchOptions) -> Any:
    """The strategy config for ``method`` (a name is configured as ``hwmpq search`` does), refused before any
    work when no strategy runs it."""
    if not isinstance(method, str):
        from .search.base import strategy_for

        strategy_for(method)
        return method
    from .search.loop import LoopConfig, method_config

    search = {"epochs": opts.epochs, "warmup_epochs": opts.warmup_epochs, "limit_batches": opts.limit_batches,
              "batch_size": opts.search_batch_size}
    strategy = method_config(LoopConfig(search=search, bits=opts.bits), method.strip().lower())
    if method.strip().lower() in ("nemo", "ilp"):
        strategy = replace(strategy, out_dir=opts.out_dir)
    return strategy


def _check_ptq(strategy: Any, opts: SearchOptions) -> None:
    """With ``opts.ptq``: refuse a method or an option that trains, before any work."""
    if not opts.ptq:
        return
    from .search.ptq import check_ptq, strategy_name

    qat = asdict(opts.qat) if opts.qat is not None else {}
    check_ptq(strategy_name(strategy), qat=qat, finetune_epochs=opts.finetune_epochs or 0,
              calibration_batches=opts.calibration_batches)


def _is_uniform(strategy: Any) -> bool:
    from .search.uniform import UniformConfig

    return isinstance(strategy, UniformConfig)


def _check_budget(budget: Any, strategy: Any) -> None:
    """Refuse a malformed or missing budget before any work (its feasibility needs the table)."""
    from .search.base import Budget, BudgetError
    from .search.budget import parse_budget_text

    if budget is None:
        if not _is_uniform(strategy):
            raise BudgetError("give a budget: a Budget, text such as '0.6x', '0.5range' or '2.5ms', or ms")
    elif isinstance(budget, str):
        kind, value = parse_budget_text(budget)
        if kind == "ms":
            Budget(latency_ms=value)
    elif isinstance(budget, bool) or not isinstance(budget, (int, float, Budget)):
        raise TypeError(f"budget must be a Budget, text ('0.6x', '0.5range', '2.5ms') or ms, got "
                        f"{type(budget).__name__}")
    elif not isinstance(budget, Budget):
        Budget(latency_ms=float(budget))


def _budget(budget: Any, table: LatencyTable, strategy: Any) -> Budget:
    """The Budget against ``table``; infeasible budgets are refused before any training (not for uniform
    baselines, which are reported against the budget, never held to it)."""
    from .search.base import Budget
    from .search.budget import check_feasible, parse_budget

    if isinstance(budget, Budget):
        bound = budget
    elif budget is None:
        bound = Budget(latency_ms=math.inf)
    elif isinstance(budget, str):
        bound = parse_budget(table, budget)
    else:
        bound = Budget(latency_ms=float(budget))
    if not _is_uniform(strategy):
        check_feasible(table, bound)
    return bound


def _search_table(model: nn.Module, x: torch.Tensor, target: Target, lut: str | os.PathLike,
                  config: MeasureConfig, opts: SearchOptions) -> LatencyTable:
    """The LUT's table for the model, profiling what it lacks first (``opts.profile_missing``)."""
    from .lut.model import MissingEntriesError
    from .search.loop import restrict_candidates

    specs, edges = _float_graph(model, x)
    with _lut_store(lut, target, opts.force_lut) as store:
        if opts.profile_missing:
            measure_missing(model, x, specs, edges, target, store, config,
                            options=ProfileOptions(progress=opts.progress, force=opts.force_lut,
                                                   precisions=opts.precisions))
        try:
            table = _table(store, specs, edges, config, target, force=opts.force_lut, context=True)
        except MissingEntriesError as e:
            hint = "" if opts.profile_missing else "; or pass SearchOptions(profile_missing=True)"
            raise MissingEntriesError(e.missing, hint) from None
    return restrict_candidates(table, opts.candidates)


def _search_and_tune(model, splits, x, target, table, budget, strategy, config, opts: SearchOptions,
                     lut) -> SearchOutcome:
    """run_search (on the float model's labels for unlabelled data under ptq), then the loop's fine-tune
    (hwmpq/search/loop.py; calibration only under ptq), the test accuracy and the agreement."""
    from .search.base import SearchInputs, run_search
    from .search.loop import Context, LoopConfig, _log, fine_tune
    from .search.ptq import predictions, scores_on_test, search_splits

    searched = search_splits(splits, model, _log) if opts.ptq else splits
    inputs = SearchInputs(model, searched, table, budget, x, seed=opts.seed, progress=opts.progress, log=_log)
    result = run_search(inputs, strategy)
    tune = LoopConfig(finetune_epochs=opts.finetune_epochs, finetune_lr=opts.finetune_lr,
                      finetune_limit_batches=opts.finetune_limit_batches, batch_size=opts.batch_size,
                      qat=asdict(opts.qat) if opts.qat is not None else {}, ptq=opts.ptq,
                      calibration_batches=opts.calibration_batches, seed=opts.seed, progress=opts.progress)
    ctx = Context(splits, model, x, target, table, budget, config, float_acc=math.nan)
    tuned = fine_tune(ctx, tune, result)
    float_top1, _ = predictions(model, splits.loader("test", batch_size=512))
    acc, agreement = scores_on_test(tuned, splits, float_top1)
    return SearchOutcome(plan=result.plan, model=tuned, predicted_ms=result.predicted_ms,
                         predicted_mj=result.predicted_mj, test_acc=acc, budget=budget, table=table, result=result,
                         lut=os.fspath(lut), target=target.id, agreement=agreement)


# ---------------------------------------------------------------- export

def export(model: nn.Module, plan: BitPlan | str | os.PathLike, *, target: str | Target = "ort-x86",
           out: str | os.PathLike, example_input: torch.Tensor | None = None, data: Any = None,
           manifest_extra: dict | None = None) -> ExportResult:
    """Write the target's deployable artifact of ``model`` by ``plan`` (a BitPlan or a plan.json) into
    ``out`` with its manifest, and return the target's ExportResult.

    A quantized model (QAT-trained, e.g. ``search(...).model``) is exported as it is; it must be quantized in
    the target's placement. A float model is quantized in the target's placement and its quantizers are
    calibrated on one batch of ``data`` (any form :func:`as_splits` takes), with a warning: post-training,
    no QAT. ``example_input`` defaults to a zero batch of one of ``data``'s shape. ``model`` is not
    modified."""
    from .qmodules import placement_of
    from .records import load_plan

    bit_plan = plan if isinstance(plan, BitPlan) else load_plan(plan)
    with resolved_target(target) as tgt:
        if not tgt.capabilities.export:
            raise ValueError(f"target {tgt.id!r} has no exporter")
        splits = None if data is None else _calibration_splits(data, example_input)
        x = _example_input(example_input, splits)
        _check_plan(model, bit_plan, x, tgt)
        if placement_of(model) is None:
            net = _quantized_copy(model, bit_plan, tgt, splits, x)
        else:
            net = _as_exported(model, bit_plan, tgt)
        was_training = net.training
        net.eval()
        try:
            return tgt.export(net, bit_plan, x, os.fspath(out), manifest_extra=dict(manifest_extra or {}))
        finally:
            net.train(was_training)


def _calibration_splits(data: Any, example_input: torch.Tensor | None) -> Splits:
    """``data`` as Splits; an image folder is read at the model's input size (as ``hwmpq export`` does)."""
    from .data import is_image_folder

    kw = {}
    if example_input is not None and isinstance(data, (str, os.PathLike)) and is_image_folder(os.fspath(data)):
        kw["image_size"] = tuple(example_input.shape[2:])
    return as_splits(data, **kw)


def _example_input(example_input: torch.Tensor | None, splits: Splits | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    if splits is None:
        raise ValueError("give example_input (a batch of one, N,C,H,W) or data to take its shape from")
    import torch

    return torch.zeros(1, *splits.input_shape)


def _check_plan(model: nn.Module, plan: BitPlan, x: torch.Tensor, target: Target) -> None:
    """The plan must name the model's layers, at precisions the target runs (before any calibration)."""
    from .graph import layer_graph
    from .qmodules import float_view, placement_of

    plain = float_view(model) if placement_of(model) is not None else model
    specs = layer_graph(plain, x)
    plan.validate_against([s.fqn for s in specs], {s.fqn: target.precisions.for_layer(s) for s in specs})


def _quantized_copy(model: nn.Module, plan: BitPlan, target: Target, splits: Splits | None,
                    x: torch.Tensor) -> nn.Module:
    """A float model quantized by ``plan`` in the target's placement and calibrated (with a warning)."""
    from .qmodules import calibrate, quantize

    needs_scales = any(not p.is_float for _, p in plan.layers)
    if needs_scales and splits is None:
        raise ValueError("the model is float (no trained quantizer scales): give data (a dataset name, an image "
                         "folder, an .npz, file.py:factory, Splits or a DataLoader) to calibrate it, or export "
                         "a QAT-trained model (hwmpq.search(...).model)")
    net = quantize(copy.deepcopy(model).eval(), plan, placement=target.placement)
    if needs_scales:
        from .data import check_input_shape
        from .train import calibration_batch

        check_input_shape(splits, tuple(x.shape))
        warnings.warn(f"the model is float; calibrating its quantizers on one batch of {splits.name} "
                      "(post-training, no QAT): accuracy may be lower than a trained plan's", stacklevel=3)
        calibrate(net, [calibration_batch(splits, 1)])
    return net


def _as_exported(model: nn.Module, plan: BitPlan, target: Target) -> nn.Module:
    """A quantized model as it is, if it is quantized the way the target's exporter reads."""
    from .qmodules import placement_of

    found = placement_of(model)
    if found != target.placement and any(not p.is_float for _, p in plan.layers):
        raise ValueError(f"the model is quantized in {found!r} placement but target {target.id} exports "
                         f"{target.placement!r}; quantize the float model with "
                         f"hwmpq.quantize(model, plan, placement={target.placement!r})")
    return model


# ---------------------------------------------------------------- measure

def measure(artifact: ExportResult | str | os.PathLike, *, target: str | Target = "ort-x86",
            config: MeasureConfig | None = None) -> Timing:
    """Time an exported artifact end to end on the target (an ExportResult, or its folder, manifest.json
    or artifact file). ``config`` defaults to ``MeasureConfig()`` at the target's threads. A run that fails
    raises RuntimeError with the target's message."""
    exported = _as_export(artifact)
    with resolved_target(target, threads=config.threads if config else None) as tgt:
        if not tgt.capabilities.measure_artifact:
            raise ValueError(f"target {tgt.id!r} cannot time whole models")
        config = config or MeasureConfig(threads=_threads(tgt))
        _check_threads(config, tgt)
        run = tgt.measure_artifact(exported, config)
        tid = tgt.id
    return _timing(run, exported, tid, config)


ARTIFACT_NAMES = ("model.onnx", "model.so")  # what the exporters write (ort-x86, tvm:*)


def _as_export(artifact: Any) -> ExportResult:
    """An ExportResult for an export folder, its manifest.json or its artifact file."""
    from .targets.base import ExportResult

    if isinstance(artifact, ExportResult):
        return artifact
    if not isinstance(artifact, (str, os.PathLike)):
        raise TypeError(f"artifact must be an ExportResult or a path, got {type(artifact).__name__}")
    p = Path(artifact)
    folder = p if p.is_dir() else p.parent
    file = p if p.is_file() and p.name != "manifest.json" else next(
        (folder / n for n in ARTIFACT_NAMES if (folder / n).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{artifact}: no exported model here (looked for {', '.join(ARTIFACT_NAMES)})")
    return ExportResult(str(folder), str(file), str(folder / "manifest.json"))


def _timing(run, exported: ExportResult, target_id: str, config: MeasureConfig) -> Timing:
    from .latency_stats import summarize

    if run.error_msg or not run.latencies_ms:
        raise RuntimeError(f"measuring {exported.artifact} on {target_id} failed: "
                           f"{run.error_msg or 'no latencies returned'}")
    try:
        st = summarize(run.latencies_ms)
    except ValueError as e:
        raise RuntimeError(f"measuring {exported.artifact} on {target_id} failed: {e}") from None
    return Timing(median_ms=st.median_ms, p10_ms=st.p10_ms, p90_ms=st.p90_ms, n=st.n,
                  latencies_ms=tuple(float(v) for v in run.latencies_ms), artifact=exported.artifact,
                  target=target_id, config=config)


__all__ = ["METHODS", "ProfileOptions", "ProfileResult", "ProfileStopped", "SearchOptions", "SearchOutcome",
           "Timing", "as_splits", "export", "lut_config", "measure", "measure_missing", "profile",
           "resolved_target", "search", "target_work_dir"]
