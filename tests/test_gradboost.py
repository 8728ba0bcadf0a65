"""GradBoost: sign-matched, range-scaled, masked, clipped, decaying gradient noise (FrostNet)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hwmpq.frost import GradBoost, GradBoostConfigError
from hwmpq.qat_options import QATOptions, fit_hooks
from hwmpq.quantizers import LSQQuantizer
from hwmpq.sam import SAMStep


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 30)
        self.q = LSQQuantizer(4, signed=True)


def _feed(gb, net, grads, steps):
    """Call the transform at the given global steps with the given gradient tensors; return the increments."""
    out = []
    for step, g in zip(steps, grads, strict=True):
        net.fc.weight.grad = g.clone()
        net.fc.bias.grad = None
        net.q.scale.grad = torch.ones(1)
        gb(net, step)
        out.append(net.fc.weight.grad - g)
        assert torch.equal(net.q.scale.grad, torch.ones(1))  # LSQ step sizes are never boosted
    return out


def _grads(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    gs = [torch.randn(30, 20, generator=g) for _ in range(n)]
    for t in gs:
        t[0, :5] = 0.0  # exact zeros must stay zero
    return gs


def test_noise_is_sign_matched_masked_and_clipped():
    net, gb = _Net(), GradBoost(scale=1.0, clip_by=0.05, warmup_steps=5, mask_prob=0.5, seed=1)
    gs = _grads(10)
    deltas = _feed(gb, net, gs, range(10))
    for d in deltas[:5]:
        assert torch.count_nonzero(d) == 0  # warm-up: statistics only
    for g, d in zip(gs[5:], deltas[5:], strict=True):
        new = g + d
        assert torch.equal(torch.sign(new), torch.sign(g))  # never flips a sign, zeros stay zero
        assert bool((new.abs() >= g.abs()).all())  # only enlarges |g|
        assert float(d.abs().max()) <= 0.05 + 1e-6  # clipped
        assert float(d.abs().max()) == pytest.approx(0.05, abs=1e-6)  # and the clip is really reached at this scale
        frac = float((d != 0).float().mean())
        assert 0.35 < frac < 0.65  # a fair coin per element
    assert 0.35 < gb.last["boosted_fraction"] < 0.65


def test_noise_is_scaled_by_the_running_gradient_range():
    net, gb = _Net(), GradBoost(scale=1.0, clip_by=10.0, warmup_steps=3, mask_prob=0.0, seed=0)
    const = torch.full((30, 20), 0.3)
    deltas = _feed(gb, net, [const] * 6, range(6))
    assert all(torch.count_nonzero(d) == 0 for d in deltas)  # range 0: no noise
    small = GradBoost(scale=1.0, clip_by=1e6, warmup_steps=3, mask_prob=0.0, seed=0)
    big = GradBoost(scale=1.0, clip_by=1e6, warmup_steps=3, mask_prob=0.0, seed=0)
    gs = _grads(6)
    d_small = _feed(small, _Net(), gs, range(6))[-1]
    d_big = _feed(big, _Net(), [10 * g for g in gs], range(6))[-1]
    torch.testing.assert_close(d_big, 10 * d_small, rtol=1e-4, atol=1e-5)  # same draws, 10x the range


def test_noise_decays_exponentially_after_warmup():
    gs = _grads(12, seed=3)
    a = GradBoost(scale=1.0, decay=0.01, clip_by=100.0, warmup_steps=10, mask_prob=0.0, seed=7)
    b = GradBoost(scale=1.0, decay=0.01, clip_by=100.0, warmup_steps=10, mask_prob=0.0, seed=7)
    early = _feed(a, _Net(), gs[:11], list(range(11)))[-1]  # first noisy step (t = 0)
    late = _feed(b, _Net(), gs[:11], list(range(10)) + [310])[-1]  # same draws, 300 steps later
    ratio = float(late.abs().sum() / early.abs().sum())
    assert ratio == pytest.approx(0.99 ** 300, rel=1e-4)
    assert a.decay_factor(0) == 0 and a.decay_factor(10) == 1.0 and a.decay_factor(110) < a.decay_factor(20)


def test_fit_hooks_builds_the_requested_mechanisms():
    assert fit_hooks(QATOptions()) == {"step_fn": None, "grad_transforms": []}
    hooks = fit_hooks(QATOptions(sam=True, rho=0.1, grad_boost=True, grad_boost_scale=0.5))
    assert isinstance(hooks["step_fn"], SAMStep) and hooks["step_fn"].rho == 0.1
    (gb,) = hooks["grad_transforms"]
    assert isinstance(gb, GradBoost) and gb.scale == 0.5
    assert QATOptions(sam=True, grad_boost=True).label == "sam+gb"


@pytest.mark.parametrize("kw", [{"decay": 1.0}, {"clip_by": 0.0}, {"mask_prob": 1.5}, {"scale": -1.0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(GradBoostConfigError):
        GradBoost(**kw)
