"""SAM/SAQ step: the update uses the gradient at w + eps (quantizers in the loop) and w is restored."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.qmodules import QuantLayer, calibrate, quantize_
from hwmpq.records import FP32, BitPlan, Precision
from hwmpq.sam import SAMConfigError, SAMStep, sharpness
from hwmpq.zoo import create_model

RHO, LR = 0.5, 0.1


pytestmark = pytest.mark.usefixtures("one_thread")




def _batch(splits, n=64):
    x, y = splits.train.tensors
    return x[:n], y[:n]


def _float_model(seed=0):
    torch.manual_seed(seed)
    return create_model("test_tiny", num_classes=10, in_chans=1)


def _quant_model(splits, seed=0):
    m = _float_model(seed)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    plan = BitPlan(tuple((n, Precision(4, 4)) for n in convs) + (("fc", FP32),))  # mixed: fc stays float
    quantize_(m, plan)
    calibrate(m, [_batch(splits, 128)[0]])
    return m


class _Recorder:
    """Grad transform that snapshots every parameter's .grad just before the optimizer step."""

    def __init__(self):
        self.grads = None

    def __call__(self, model, step):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _freeze_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_float(model, x, y):
    """Plain SAM by hand on the float weights of Conv/Linear layers: (grad at w, grad at w + eps)."""
    ref = copy.deepcopy(model)
    g0 = _grads(ref, x, y)
    names = [f"{n}.weight" for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norm = torch.sqrt(sum((g0[n] ** 2).sum() for n in names))
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(RHO * g0[n] / norm)
    _freeze_bn(ref)
    return g0, _grads(ref, x, y)


def _reference_quantized(model, x, y):
    """SAQ by hand: eps on each quantized weight Q(w) (dL/dQ(w) normalised), float weight for fp32 layers."""
    ref = copy.deepcopy(model)
    qls = {n: m for n, m in ref.named_modules() if isinstance(m, QuantLayer)}
    leaves = {}
    for n, ql in qls.items():
        leaves[n] = ql.w_quant(ql.layer.weight).detach().requires_grad_(True)
        ql.w_quant.forward = lambda w, t=leaves[n]: t  # instance attribute shadows the class method
    g0 = _grads(ref, x, y)
    gq = {n: t.grad for n, t in leaves.items()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in gq.values()) + (g0["fc.weight"] ** 2).sum())
    for n, ql in qls.items():
        del ql.w_quant.forward
        orig = ql.w_quant.forward
        ql.w_quant.forward = lambda w, f=orig, e=RHO * gq[n] / norm: f(w) + e
    with torch.no_grad():
        ref.fc.weight.add_(RHO * g0["fc.weight"] / norm)
    return g0, _grads(ref, x, y)


def _run_step(model, x, y, perturb):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec = _Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = SAMStep(rho=RHO, perturb=perturb)
    loss = step(model, x, y, opt, F.cross_entropy, [rec])
    return before, rec.grads, step, loss


@pytest.mark.parametrize("kind,perturb", [("float", "float"), ("quantized", "quantized"), ("quantized", "float")],
                         ids=["float-model", "qat-saq", "qat-float-eps"])
def test_sam_gradient_is_taken_at_perturbed_weights_and_weights_restored(digits, kind, perturb):
    x, y = _batch(digits)
    model = _float_model() if kind == "float" else _quant_model(digits)
    model.train()
    ref_model = copy.deepcopy(model)
    g0 = _grads(copy.deepcopy(model), x, y)  # plain gradient at w
    reference = _reference_quantized if perturb == "quantized" else _reference_float
    _, g_adv = reference(model, x, y)
    before, used, step, loss = _run_step(model, x, y, perturb)
    assert set(used) == set(g_adv)
    for n in g_adv:
        torch.testing.assert_close(used[n], g_adv[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # the perturbed gradient really differs from the gradient at w (else the test could not fail)
    diff = max(float((g_adv[n] - g0[n]).abs().max()) for n in g_adv)
    assert diff > 1e-3
    # w restored before the update: w_new = w_old - lr * g(w + eps), exactly as SGD would do from w_old
    for n, p in model.named_parameters():
        if n in used:
            torch.testing.assert_close(p.detach(), before[n] - LR * used[n], rtol=0, atol=1e-6)
    assert step.last["loss_perturbed"] > step.last["loss"] and step.last["eps_norm"] == pytest.approx(RHO)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(F.cross_entropy(ref_model(x), y)), rel=1e-5)


def test_sam_leaves_batchnorm_statistics_to_the_first_forward(digits):
    x, y = _batch(digits)
    model = _float_model()
    ref = copy.deepcopy(model)
    ref.train()
    with torch.no_grad():
        ref(x)  # one ordinary training forward
    _run_step(model, x, y, "float")
    torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean)
    torch.testing.assert_close(model.bn1.running_var, ref.bn1.running_var)
    assert int(model.bn1.num_batches_tracked) == 1


def test_sharpness_is_positive_and_changes_nothing(digits):
    model = _quant_model(digits)
    x, y = _batch(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s, loss = sharpness(model, [(x, y)], F.cross_entropy, rho=0.05)
    s_big, _ = sharpness(model, [(x, y)], F.cross_entropy, rho=0.5)
    assert 0 < s < s_big
    assert loss == pytest.approx(float(F.cross_entropy(model.eval()(x), y)), rel=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_sam_step_trains_inside_fit(digits):
    from hwmpq.train import evaluate, fit

    model = _float_model()
    acc0 = evaluate(model, digits.loader("val"))
    fit(model, digits, epochs=2, lr=0.1, batch_size=32, step_fn=SAMStep(rho=0.05), progress=False,
        log=lambda *a: None)
    acc = evaluate(model, digits.loader("val"))
    assert acc > max(0.5, acc0 + 0.3), (acc0, acc)


@pytest.mark.parametrize("kw", [{"rho": 0.0}, {"rho": -1.0}, {"perturb": "both"}])
def test_bad_sam_settings_are_refused(kw):
    with pytest.raises(SAMConfigError):
        SAMStep(**kw)


def test_non_finite_perturbed_loss_skips_the_update(digits):
    x, y = _batch(digits)
    model = _quant_model(digits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def loss_fn(out, target):  # finite at w, infinite at w + eps
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss if len(calls) == 1 else loss * float("inf")

    step = SAMStep(rho=0.05)
    loss = step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, [])
    assert torch.isfinite(loss) and step.last["skipped"] == 1.0 and len(calls) == 2
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
