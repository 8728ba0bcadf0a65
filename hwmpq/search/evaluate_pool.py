"""Candidate evaluation for NEMO and the ILP front: the accuracy proxy of one plan, run serially, in a
local process pool (default) or on a Ray cluster (``ray_address``).

A job is a plain tuple of candidate indices (one per layer); the context it needs (float model,
calibration batch, validation slice, candidate list) is shipped once per worker, not once per job.
The proxy: copy the float model, ``quantize`` it with the plan, calibrate the quantizers on a few
training batches (no training), and measure top-1 accuracy on a held-out validation slice.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import torch
from torch import nn

from hwmpq.data import Splits
from hwmpq.records import BitPlan, Precision

Job = tuple[int, ...]


@dataclass(frozen=True)
class ProxyConfig:
    """How much data the accuracy proxy uses (``eval_samples`` from the val split, in order)."""

    calib_samples: int = 256
    eval_samples: int = 1000
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.calib_samples < 1 or self.eval_samples < 1 or self.batch_size < 1:
            raise ValueError(f"ProxyConfig: sample counts and batch size must be >= 1, got {self}")


@dataclass
class EvalContext:
    """Everything a worker needs to score a plan; picklable (the model must be, e.g. a zoo model)."""

    model: nn.Module
    fqns: tuple[str, ...]
    candidates: tuple[Precision, ...]
    calib_x: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    batch_size: int = 250


def make_context(model: nn.Module, splits: Splits, fqns: Sequence[str], candidates: Sequence[Precision],
                 config: ProxyConfig = ProxyConfig(), seed: int = 0) -> EvalContext:
    g = torch.Generator().manual_seed(seed)
    tx, _ = splits.train.tensors
    calib = tx[torch.randperm(len(tx), generator=g)[: config.calib_samples]]
    vx, vy = splits.val.tensors
    n = min(config.eval_samples, len(vx))
    model = copy.deepcopy(model).eval()
    return EvalContext(model, tuple(fqns), tuple(candidates), calib.clone(), vx[:n].clone(), vy[:n].clone(),
                       config.batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy in eval mode (local until hwmpq.train.evaluate takes loaders only)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def evaluate_plan(ctx: EvalContext, job: Job) -> float:
    """Accuracy proxy of the plan choosing ``ctx.candidates[job[l]]`` for layer ``ctx.fqns[l]``."""
    from hwmpq.qmodules import calibrate, quantize

    plan = BitPlan(tuple((f, ctx.candidates[int(i)]) for f, i in zip(ctx.fqns, job, strict=True)))
    model = quantize(copy.deepcopy(ctx.model), plan)
    calibrate(model, [ctx.calib_x])
    return accuracy(model, ctx.val_x, ctx.val_y, ctx.batch_size)


def points_from_jobs(table, jobs: Sequence[Job], accuracies: Sequence[float], params: Sequence[int],
                     method: str, model_name: str = "") -> list:
    """FrontPoints (LUT latency/energy, weight bytes) for scored jobs; ``table`` is a LatencyTable."""
    from .pareto import FrontPoint

    out = []
    for job, acc in zip(jobs, accuracies, strict=True):
        lat, en = table.predict_indices(job)
        size = sum(n * table.candidates[i].w_bits / 8 for n, i in zip(params, job, strict=True))
        plan = table.plan_from_indices(job, model=model_name, target=table.target, notes=method)
        out.append(FrontPoint(plan, float(acc), lat, en, float(size), method))
    return out


EvalFn = Callable[[EvalContext, Job], float]

# ---------------------------------------------------------------- process-pool worker state
_WORKER: dict = {}


def _init_worker(blob: bytes, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["ctx"], _WORKER["fn"] = pickle.loads(blob)


def _run_in_worker(job: Job) -> float:
    return _WORKER["fn"](_WORKER["ctx"], job)


class Evaluator:
    """Scores jobs with ``fn(ctx, job)``: serially (``workers=0``), in a spawn process pool
    (``workers>=1``) or on Ray (``ray_address``: ``local`` starts a local instance, else an address
    ``ray.init`` accepts, e.g. ``auto`` or ``ray://host:10001``). Results keep the job order.
    Use as a context manager, or call :meth:`close`."""

    def __init__(self, ctx: EvalContext, fn: EvalFn = evaluate_plan, workers: int = 0,
                 ray_address: str | None = None, threads_per_worker: int = 1) -> None:
        if workers < 0:
            raise ValueError(f"Evaluator: workers must be >= 0, got {workers}")
        self.ctx, self.fn, self.workers = ctx, fn, workers
        self.backend = "ray" if ray_address else ("process" if workers >= 1 else "serial")
        self.n_evaluated = 0
        self._pool = None
        self._actors: list = []
        if self.backend == "process":
            blob = pickle.dumps((ctx, fn))
            self._pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                             initargs=(blob, threads_per_worker))
        elif self.backend == "ray":
            self._actors = _ray_actors(ctx, fn, ray_address, workers, threads_per_worker)

    def map(self, jobs: Sequence[Job]) -> list[float]:
        jobs = [tuple(int(i) for i in j) for j in jobs]
        self.n_evaluated += len(jobs)
        if self.backend == "serial":
            return [self.fn(self.ctx, j) for j in jobs]
        if self.backend == "process":
            return list(self._pool.map(_run_in_worker, jobs, chunksize=max(1, len(jobs) // (4 * self.workers))))
        import ray

        refs = [self._actors[k % len(self._actors)].score.remote(j) for k, j in enumerate(jobs)]
        return [float(v) for v in ray.get(refs)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayUnavailableError(RuntimeError):
    """``--ray`` was given but Ray is not installed or the cluster cannot be reached."""


def _ray_actors(ctx: EvalContext, fn: EvalFn, address: str, workers: int, threads: int) -> list:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("--ray needs Ray: pip install 'hwmpq[ray]' (or pip install ray)") from None
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False}
        try:
            if address == "local":
                ray.init(num_cpus=max(1, workers or os.cpu_count() or 1), **kw)
            else:
                ray.init(address=address, **kw)
        except Exception as e:  # ray raises ConnectionError, RuntimeError, ValueError...
            raise RayUnavailableError(f"cannot connect to Ray at {address!r}: {type(e).__name__}: {e}") from e

    @ray.remote(num_cpus=1)
    class _Worker:
        def __init__(self, blob: bytes) -> None:
            _init_worker(blob, threads)

        def score(self, job: Job) -> float:
            return _run_in_worker(job)

    n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    blob_ref = ray.put(pickle.dumps((ctx, fn)))
    return [_Worker.remote(blob_ref) for _ in range(n)]
