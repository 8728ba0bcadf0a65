"""StatAssist: the float warm-up runs before quantize_, and QAT starts from its weights and statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hwmpq.frost import float_warmup
from hwmpq.qat_options import QATOptions, run_qat, stat_assist
from hwmpq.qmodules import QuantLayer, fold_batchnorm, quantize_
from hwmpq.records import BitPlan, Precision
from hwmpq.train import evaluate
from hwmpq.zoo import create_model

QUIET = {"progress": False, "log": lambda *a: None}


pytestmark = pytest.mark.usefixtures("one_thread")




def _model():
    torch.manual_seed(0)
    return create_model("test_tiny", num_classes=10, in_chans=1)


def _plan(model, bits=4):
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return BitPlan.uniform(names, Precision(bits, bits))


def test_stat_assist_is_a_no_op_unless_asked(digits):
    m = _model()
    before = copy.deepcopy(m.state_dict())
    assert stat_assist(m, digits, QATOptions(), epochs=3, lr=0.1) is None
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert stat_assist(m, digits, QATOptions(stat_assist=True, stat_assist_epochs=0)) is None


def test_warmup_trains_the_float_model_and_its_statistics(digits):
    m = _model()
    mean0 = m.bn1.running_mean.clone()
    res = stat_assist(m, digits, QATOptions(stat_assist=True, stat_assist_epochs=1), lr=0.1, batch_size=32,
                      checkpoint="ignored.pt", **QUIET)
    assert res.epochs_run == 1 and res.val_acc > 0.25
    assert not torch.equal(m.bn1.running_mean, mean0) and int(m.bn1.num_batches_tracked) > 10
    # quantize_ folds exactly these statistics
    folded = copy.deepcopy(m)
    fold_batchnorm(folded)
    inv = torch.rsqrt(m.bn1.running_var + m.bn1.eps) * m.bn1.weight
    torch.testing.assert_close(folded.conv1.weight.detach(), (m.conv1.weight * inv[:, None, None, None]).detach())


def test_warmup_refuses_a_quantized_model(digits):
    m = quantize_(_model(), _plan(_model()))
    with pytest.raises(ValueError, match="before quantize_"):
        float_warmup(m, digits, 1)


def test_run_qat_with_every_aid_reaches_useful_accuracy(digits):
    """From random init: StatAssist's float epoch, then w4a4 QAT with SAM and GradBoost. Plain w4a4 QAT from
    the same random init for the same QAT budget is the reference (the assist costs one extra float epoch)."""
    opts = QATOptions(sam=True, rho=0.05, stat_assist=True, stat_assist_epochs=1, grad_boost=True)
    kw = dict(epochs=1, lr=0.1, batch_size=32, seed=0, **QUIET)
    m, res = run_qat(_model(), _plan(_model()), digits, opts, **kw)
    assert isinstance(m.conv1, QuantLayer) and m.conv1.precision == Precision(4, 4)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # folded after the warm-up
    acc = evaluate(m, digits.loader("test"))
    plain, _ = run_qat(_model(), _plan(_model()), digits, QATOptions(), **kw)
    acc_plain = evaluate(plain, digits.loader("test"))
    assert acc > 0.3 and acc > acc_plain + 0.15, (acc, acc_plain)
