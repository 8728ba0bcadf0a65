"""MetaSchedule tuning with a trial budget; one JSON database per target kept in ``work_dir`` (beside the
LUT) and reused by every later build and by the exporter.

On the ``host`` preset candidates run locally (MetaSchedule's LocalRunner). On a board, MetaSchedule
needs a tracker (its RPCRunner asks a tracker for a device): ``--tracker HOST:PORT --key K``. A direct
``--rpc`` connection can profile untuned kernels only. The cost model is ``random`` (xgboost is not
installed here); with tiny budgets this is a random search over valid schedules.
The int8 dot-product kernels (dotconv.py) and the fp32 tiled kernels (fpconv.py) are hand-scheduled and
skipped by MetaSchedule; their register tiles are tuned by dot_tuning.py and fp_tuning.py (host only) into
the same folder, and applied by the same compile.
"""

from __future__ import annotations

import os
from pathlib import Path

from .presets import TvmPreset


class TuningUnavailableError(ValueError):
    """Tuning was asked for where MetaSchedule cannot measure candidates; the message says what to pass."""


def database_dir(work_dir: str | os.PathLike, preset: TvmPreset) -> Path:
    return Path(work_dir) / f"tuning-{preset.name}"


def open_database(work_dir: str | os.PathLike, preset: TvmPreset):
    """The preset's JSON database (created empty when missing)."""
    from tvm.s_tir import meta_schedule as ms

    d = database_dir(work_dir, preset)
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(str(d / "workloads.json"), str(d / "records.json"), allow_missing=True)


def _runner(preset: TvmPreset, tracker: str | None, key: str | None, timeout_s: float):
    from tvm.s_tir import meta_schedule as ms

    if preset.is_host:
        return ms.runner.LocalRunner(timeout_sec=timeout_s)
    if not (tracker and key):
        raise TuningUnavailableError(
            f"tuning for {preset.name} measures candidates on the board and needs --tracker HOST:PORT --key K "
            "(MetaSchedule's RPC runner works through a tracker); pass --tune-trials 0 to profile untuned")
    host, _, port = tracker.rpartition(":")
    cfg = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=timeout_s)
    return ms.runner.RPCRunner(rpc_config=cfg)


def build_candidate(mod, target, _params):
    """MetaSchedule's default build minus its ``import tvm.s_tir.tensor_intrin`` (181 s on this machine,
    paid again in every builder worker, so every candidate hit the builder timeout). No intrinsic is
    tensorized here, so the import is not needed for these builds."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _builder(preset: TvmPreset, timeout_s: float):
    from tvm.s_tir import meta_schedule as ms

    if preset.is_host:
        return ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=timeout_s)
    from tvm.support import cc

    fcompile = cc.cross_compiler(preset.cross_compiler)

    def export(mod):  # MetaSchedule's builder hook: artifact path of a cross-linked .so
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="hwmpq-ms-"), "tuned.so")
        mod.export_library(path, fcompile=fcompile)
        return path

    return ms.builder.LocalBuilder(f_build=build_candidate, f_export=export, timeout_sec=timeout_s)


def tune(mod, target, preset: TvmPreset, work_dir: str | os.PathLike, trials: int, *,
         tracker: str | None = None, key: str | None = None, timeout_s: float = 30.0) -> None:
    """Tune every task of ``mod`` with at most ``trials`` candidates in total; results land in the
    preset's database (already-tuned workloads are measured again only if the budget allows). The
    dot-product and fp32 tiled kernels get up to ``trials`` tile candidates each (host only;
    dot_tuning.py, fp_tuning.py)."""
    from . import dot_tuning, fp_tuning

    if trials <= 0:
        return
    if preset.is_host:
        dot_tuning.tune(mod, target, database_dir(work_dir, preset), trials)
        fp_tuning.tune(mod, target, database_dir(work_dir, preset), trials)
    mod = prepare_for_tuning(mod)
    if not _has_unscheduled(mod):  # only hand-scheduled kernels: no MetaSchedule (nor its slow imports)
        return
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune import tune_tasks

    db = open_database(work_dir, preset)
    runner = _runner(preset, tracker, key, timeout_s)
    d = database_dir(work_dir, preset)
    # MetaSchedule's tune_relax skips a task only when its module is marked scheduled; the dot-product
    # kernels carry the mark on the function, so the tasks are extracted and filtered here
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if not _scheduled(t.dispatched[0])]
    if not tasks:
        return
    logs = str(d / "logs")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work_dir=logs, seed=0)
    tune_tasks(tasks=contexts, task_weights=weights, work_dir=logs, max_trials_global=trials,
               num_trials_per_iter=min(trials, 8), builder=_builder(preset, timeout_s), runner=runner,
               database=db, cost_model="random")


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _scheduled(mod) -> bool:
    """Whether a task's module holds a function marked ``tirx.is_scheduled`` (a dot-product or fp32 kernel)."""
    from tvm import tirx

    return any(isinstance(f, tirx.PrimFunc) and _is_scheduled(f) for _, f in mod.functions_items())


def _has_unscheduled(mod) -> bool:
    """Whether a legalized module has a TIR function MetaSchedule would tune (not ``tirx.is_scheduled``)."""
    from tvm import tirx

    return any(isinstance(f, tirx.PrimFunc) and not _is_scheduled(f) for _, f in mod.functions_items())


def prepare_for_tuning(mod):
    """Legalize and fuse the way ``compile_relax`` does, so extracted tasks match the database keys
    (``tune_relax`` on an un-legalized module finds no tasks in TVM 0.27)."""
    from tvm import relax

    seq = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
           relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    import tvm

    return tvm.transform.Sequential(seq)(mod)


def compile_with_database(mod, target, preset: TvmPreset, work_dir: str | os.PathLike | None):
    """``tvm.compile`` with tuned schedules applied where the database has them (DLight elsewhere), and
    the tuned tiles of the dot-product and fp32 tiled kernels."""
    import tvm

    from . import dot_tuning, fp_tuning

    if work_dir is not None:
        mod = dot_tuning.apply_database(mod, database_dir(work_dir, preset))
        mod = fp_tuning.apply_database(mod, database_dir(work_dir, preset))
    if work_dir is None or not (database_dir(work_dir, preset) / "records.json").exists():
        return tvm.compile(mod, target)
    from tvm.s_tir import meta_schedule as ms

    db = open_database(work_dir, preset)
    with target:
        return ms.relax_integration.compile_relax(db, mod, target, params=None)
