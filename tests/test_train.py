"""Training loop: determinism, resume == uninterrupted, NaN stop with the last good checkpoint kept, QAT learns."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from hwmpq.graph import fqns, layer_graph
from hwmpq.modelspec import load_weights
from hwmpq.qat_options import QATOptions, run_qat
from hwmpq.records import BitPlan, Precision, from_json, to_json
from hwmpq.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainResult,
    default_step,
    evaluate,
    fit,
    load_checkpoint,
    prepare_qat,
    save_weights,
)
from hwmpq.zoo import create_model

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and far faster on a shared, oversubscribed machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("test_tiny", in_chans=1)


def _noise(model: torch.nn.Module, step: int) -> None:
    """A grad transform that draws from the global generator: resume must restore its state."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.add_(torch.randn_like(p.grad), alpha=1e-3)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_seeded_runs_are_equal_and_seed_matters(digits):
    kw = dict(epochs=2, batch_size=64, limit_batches=4, grad_transforms=[_noise], **QUIET)
    a, b, c = _model(), _model(), _model()
    ra, rb = fit(a, digits, seed=1, **kw), fit(b, digits, seed=1, **kw)
    fit(c, digits, seed=2, **kw)
    assert _same_state(a, b)
    assert [h["train_loss"] for h in ra.history] == [h["train_loss"] for h in rb.history]
    assert not _same_state(a, c)
    assert ra.epochs_run == 2 and len(ra.history) == 2 and ra.val_acc == ra.history[-1]["val_acc"]


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(digits, tmp_path: Path):
    kw = dict(epochs=2, batch_size=64, limit_batches=5, seed=3, **QUIET)
    whole = _model()
    r_whole = fit(whole, digits, checkpoint=str(tmp_path / "whole.pt"), grad_transforms=[_noise], **kw)

    def interrupt(model, step):  # dies in the middle of epoch 2 (steps 0-4 are epoch 1)
        _noise(model, step)
        if step == 7:
            raise _Interrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Interrupt):
        fit(_model(), digits, checkpoint=str(ckpt), grad_transforms=[interrupt], **kw)
    assert load_checkpoint(ckpt)["epoch"] == 1
    resumed = _model(seed=99)  # different init: everything must come from the checkpoint
    r_res = fit(resumed, digits, checkpoint=str(ckpt), resume=True, grad_transforms=[_noise], **kw)
    assert _same_state(whole, resumed)
    assert r_res.epochs_run == 2
    assert [h["train_loss"] for h in r_res.history] == [h["train_loss"] for h in r_whole.history]
    again = fit(resumed, digits, checkpoint=str(ckpt), resume=True, **kw)  # finished: nothing left to run
    assert again.epochs_run == 2 and _same_state(whole, resumed)


def test_checkpoint_is_weights_only_and_loads_as_weights(digits, tmp_path: Path):
    ckpt = tmp_path / "c.pt"
    model = _model()
    fit(model, digits, epochs=1, batch_size=64, limit_batches=2, checkpoint=str(ckpt), **QUIET)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["format"] == "hwmpq-train-checkpoint" and raw["epoch"] == 1 and raw["epochs"] == 1
    assert raw["rng_torch"].dtype == torch.uint8 and set(raw["history"][0]) >= {"train_loss", "val_acc", "lr"}
    fresh = _model(seed=5)
    load_weights(fresh, str(ckpt))
    assert _same_state(model, fresh)
    save_weights(model, tmp_path / "w.pt")
    plain = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(plain) == set(model.state_dict())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_resume_refuses_foreign_checkpoint(digits, tmp_path: Path):
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not an hwmpq training checkpoint"):
        fit(_model(), digits, epochs=1, checkpoint=str(bad), resume=True, **QUIET)
    other = tmp_path / "other.pt"
    fit(_model(), digits, epochs=1, limit_batches=1, checkpoint=str(other), **QUIET)
    with pytest.raises(CheckpointError, match="does not fit"):
        fit(create_model("test_tiny", in_chans=1, num_classes=5), digits, epochs=2, checkpoint=str(other),
            resume=True, **QUIET)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(digits, tmp_path: Path):
    ckpt = tmp_path / "c.pt"
    snapshots: list[bytes] = []

    def log(msg: str) -> None:  # called after each epoch's checkpoint is written
        snapshots.append(ckpt.read_bytes())

    def step_fn(model, x, y, opt, loss_fn, transforms):
        loss = default_step(model, x, y, opt, loss_fn, transforms)
        return torch.tensor(float("inf")) if len(snapshots) == 1 and calls.append(1) is None and len(calls) == 3 \
            else loss

    calls: list[int] = []
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 of 4.*last good checkpoint .*c.pt \(epoch 1\)"):
        fit(_model(), digits, epochs=3, batch_size=64, limit_batches=4, checkpoint=str(ckpt), step_fn=step_fn,
            progress=False, log=log)
    assert len(snapshots) == 1 and ckpt.read_bytes() == snapshots[0]
    assert load_checkpoint(ckpt)["epoch"] == 1


def test_divergence_with_huge_lr_is_reported(digits, tmp_path: Path):
    ckpt = tmp_path / "c.pt"
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at epoch 1.*no checkpoint was written"):
        fit(_model(), digits, epochs=1, lr=1e8, batch_size=32, checkpoint=str(ckpt), **QUIET)
    assert not ckpt.exists()  # no good epoch, so nothing written


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(epochs=1, lr=0.0), dict(epochs=1, resume=True)])
def test_fit_rejects_bad_arguments(digits, kw):
    with pytest.raises(ValueError):
        fit(_model(), digits, **kw, **QUIET)


def test_evaluate_counts_and_restores_mode(tiny_trained, digits):
    tiny_trained.train()
    acc = evaluate(tiny_trained, digits.loader("test", batch_size=50))
    assert tiny_trained.training
    x, y = digits.test.tensors
    with torch.no_grad():
        tiny_trained.eval()
        expect = float((tiny_trained(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(expect)
    assert acc > 0.85  # the fixture really learned


def test_qat_beats_quantization_without_training(tiny_trained, digits, tmp_path: Path):
    names = fqns(layer_graph(tiny_trained, torch.zeros(1, 1, 8, 8)))
    plan = BitPlan.uniform(names, Precision(3, 4), model="test_tiny")
    float_acc = evaluate(tiny_trained, digits.loader("test"))
    ptq = prepare_qat(copy.deepcopy(tiny_trained), plan, digits, batch_size=128)
    ptq_acc = evaluate(ptq, digits.loader("test"))
    ckpt = tmp_path / "q.pt"
    tuned, _ = run_qat(copy.deepcopy(tiny_trained), plan, digits, QATOptions(), epochs=3, lr=0.01, batch_size=32,
                       checkpoint=str(ckpt), **QUIET)
    qat_acc = evaluate(tuned, digits.loader("test"))
    print(f"float {float_acc:.3f} w3a4 no training {ptq_acc:.3f} after QAT {qat_acc:.3f}")
    assert qat_acc >= ptq_acc + 0.05, (float_acc, ptq_acc, qat_acc)
    state = torch.load(ckpt, weights_only=True)["model"]
    assert any(k.endswith("w_quant.scale") for k in state)  # learned step sizes are saved
    reloaded = prepare_qat(create_model("test_tiny", in_chans=1), plan, digits)
    reloaded.load_state_dict(state)
    assert evaluate(reloaded, digits.loader("test")) == pytest.approx(qat_acc)


def test_train_result_round_trips_as_record():
    r = TrainResult(2, ({"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}), 0.75, "x.pt")
    assert from_json(to_json(r), TrainResult) == r


def test_progress_bar_path_runs(digits, capsys):
    lines: list[str] = []
    r = fit(_model(), digits, epochs=1, batch_size=64, limit_batches=2, progress=True, log=lines.append)
    assert r.epochs_run == 1 and lines and lines[0].startswith("epoch 1/1: train loss")
