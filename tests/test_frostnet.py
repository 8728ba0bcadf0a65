"""The Frost bottleneck and the small FrostNet: registry, layer graph, quantization, a real training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.graph import analyse
from hwmpq.qmodules import QuantLayer, calibrate, quantize_
from hwmpq.records import BitPlan, Precision
from hwmpq.targets.fake import FakeTarget
from hwmpq.zoo import create_model, list_models
from hwmpq.zoo.frostnet import FrostBottleneck

pytestmark = pytest.mark.usefixtures("one_thread")


def test_frost_bottleneck_shapes_and_residual():
    torch.manual_seed(0)
    b = FrostBottleneck(16, 16, kernel=3, expand=3, reduce=2, stride=1)
    assert b.use_res and b.squeeze[0].out_channels == 8 and b.expand[0].in_channels == 24
    assert b.expand[0].out_channels == 72 and b.depthwise[0].groups == 72
    x = torch.randn(2, 16, 6, 6)
    b.eval()
    # residual: output minus the branch is the input
    branch = b.project(b.depthwise(b.expand(torch.cat([x, b.squeeze(x)], 1))))
    torch.testing.assert_close(b(x) - branch, x)
    down = FrostBottleneck(16, 24, kernel=5, expand=2, reduce=4, stride=2)
    assert not down.use_res and down(x).shape == (2, 24, 3, 3)
    with pytest.raises(ValueError, match="kernel"):
        FrostBottleneck(16, 16, kernel=4, expand=1, reduce=1, stride=1)


@pytest.mark.parametrize("name", ["frostnet_small", "frostnet_small_cifar"])
def test_registered_and_analysable(name):
    assert name in list_models("frostnet*")
    shape = (1, 1, 28, 28) if name == "frostnet_small" else (1, 3, 32, 32)
    m = create_model(name, num_classes=10, in_chans=shape[1])
    specs, edges = analyse(m, torch.randn(shape))
    convs = [n for n, x in m.named_modules() if isinstance(x, nn.Conv2d)]
    assert [s.fqn for s in specs] == convs + ["classifier"]  # every conv and the classifier, in order
    assert len(specs) == 1 + 4 * 7 + 1 + 1
    kinds = {s.kind for s in specs}
    assert kinds == {"conv", "dwconv", "linear"}
    # every layer the graph found can be built by a target (what profiling needs)
    t = FakeTarget()
    assert all(t.build_layer(s, Precision(8, 8)).error_msg is None for s in specs)
    assert any(e.dst.endswith("depthwise.0") for e in edges)


def test_frostnet_trains_and_quantized_gradients_reach_every_layer():
    torch.manual_seed(0)
    m = create_model("frostnet_small", num_classes=10, in_chans=1, width_mult=0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=0.01)
    losses = []
    for _ in range(12):  # memorise one batch (float, BatchNorm live)
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    names = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    quantize_(m, BitPlan.uniform(names, Precision(4, 8)))
    assert sum(isinstance(mod, QuantLayer) for mod in m.modules()) == len(names)
    calibrate(m, [x])
    F.cross_entropy(m(x), y).backward()
    for n in names:
        w = m.get_submodule(n).weight
        assert w.grad is not None and torch.isfinite(w.grad).all() and float(w.grad.abs().sum()) > 0, n
