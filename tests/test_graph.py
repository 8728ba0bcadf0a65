"""Layer graph: MACs and params against independent counts, edges, signatures, unsupported models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.graph import UnsupportedModelError, analyse, layer_graph
from hwmpq.zoo import create_model, list_models
from hwmpq.zoo.registry import default_input_shape

ZOO = list_models()


def _hooked_counts(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """fqn -> (MACs, params) measured from the tensors a real forward pass produces (forward hooks):
    conv = output elements x (in_channels / groups) x kh x kw, linear = output elements x in_features."""
    counts: dict[str, tuple[int, int]] = {}

    def hook(name):
        def fn(mod, args, out):
            per_output = mod.in_features if isinstance(mod, nn.Linear) else \
                mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]  # (cin/groups)*kh*kw
            counts[name] = (out.numel() * per_output, mod.weight.numel() + (mod.bias.numel() if mod.bias is not None
                                                                             else 0))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("name", ZOO, ids=ZOO)
def test_macs_and_params_match_forward_hook_counts(name):
    shape = default_input_shape(name)
    if name == "resnet18":
        shape = (1, 3, 64, 64)  # same code path as 224 px, a twelfth of the compute
    model = create_model(name, in_chans=shape[1])
    x = torch.randn(shape)
    specs = layer_graph(model, x)
    expected = _hooked_counts(model, x)
    assert [s.fqn for s in specs] == list(expected)  # same layers, in execution order
    for s in specs:
        assert (s.macs, s.params) == expected[s.fqn], s.fqn


def _conv(h: int, w: int, cout: int, cin: int, k: int) -> int:
    return h * w * cout * cin * k * k


def test_resnet20_closed_form():
    """ResNet-20 on 32x32 by hand (He et al. 2016, CIFAR layout): 40.81 M MACs, 0.27 M params."""
    stem = _conv(32, 32, 16, 3, 3)
    stage1 = 6 * _conv(32, 32, 16, 16, 3)
    stage2 = _conv(16, 16, 32, 16, 3) + 5 * _conv(16, 16, 32, 32, 3) + _conv(16, 16, 32, 16, 1)
    stage3 = _conv(8, 8, 64, 32, 3) + 5 * _conv(8, 8, 64, 64, 3) + _conv(8, 8, 64, 32, 1)
    fc = 64 * 10
    specs = layer_graph(create_model("resnet20"), torch.zeros(1, 3, 32, 32))
    assert len(specs) == 1 + 18 + 2 + 1  # 19 3x3 convs, 2 projection shortcuts, fc
    assert sum(s.macs for s in specs) == stem + stage1 + stage2 + stage3 + fc == 40_813_184
    conv_params = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32) \
        + (32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64)
    assert sum(s.params for s in specs) == conv_params + 64 * 10 + 10
    # Fashion-MNIST geometry: 28x28, one channel, batch 4 scales MACs by 4
    fm = layer_graph(create_model("resnet20", in_chans=1), torch.zeros(4, 1, 28, 28))
    assert fm[0].macs == 4 * _conv(28, 28, 16, 1, 3) and fm[-1].macs == 4 * 64 * 10
    by_name = {s.fqn: s for s in fm}
    assert by_name["layers.2.0.conv1"].in_hw == (14, 14) and by_name["layers.2.0.conv1"].out_hw == (7, 7)
    assert by_name["layers.2.0.shortcut.0"].macs == 4 * _conv(7, 7, 64, 32, 1)


def test_test_tiny_layers_kinds_and_edges():
    specs, edges = analyse(create_model("test_tiny"), torch.zeros(1, 1, 8, 8))
    assert [(s.fqn, s.kind) for s in specs] == [("conv1", "conv"), ("conv2", "conv"), ("dw", "dwconv"),
                                                ("pw", "conv"), ("fc", "linear")]
    assert [s.macs for s in specs] == [_conv(8, 8, 8, 1, 3), _conv(8, 8, 8, 8, 3), 4 * 4 * 8 * 9,
                                       4 * 4 * 16 * 8, 16 * 10]
    # conv1 -> conv2 directly; dw reads a residual add (a merge), so no edge into dw; pw -> fc through pooling
    assert [(e.src, e.dst) for e in edges] == [("conv1", "conv2"), ("dw", "pw"), ("pw", "fc")]
    assert edges[2].tensor_shape == (1, 16)


def test_signature_shared_by_identical_layers_only():
    specs = {s.fqn: s for s in layer_graph(create_model("resnet20"), torch.zeros(1, 3, 32, 32))}
    a, b = specs["layers.0.0.conv1"], specs["layers.0.2.conv2"]
    assert a.fqn != b.fqn and a.signature == b.signature
    assert specs["layers.1.0.conv1"].signature != specs["layers.1.0.conv2"].signature  # stride 2 vs 1
    assert len({s.signature for s in specs.values()}) < len(specs)


class _WithGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x))


class _WithSoftmaxFn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=1)


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


@pytest.mark.parametrize("model,x,fqns", [
    (_WithGelu(), torch.zeros(1, 1, 6, 6), ["conv"]),
    (_WithSoftmaxFn(), torch.zeros(1, 4), ["fc"]),
], ids=["module", "function"])
def test_other_modules_and_functions_pass_through(model, x, fqns):
    assert [s.fqn for s in layer_graph(model, x)] == fqns


@pytest.mark.parametrize("model,x,match", [
    (_DataDependent(), torch.zeros(1, 4), r"cannot trace _DataDependent with torch.fx"),
    (_Shared(), torch.zeros(1, 4), r"layer 'fc' is called more than once"),
    (create_model("test_tiny"), torch.zeros(1, 3, 8, 8), r"on an input of shape \(1, 3, 8, 8\) failed"),
], ids=["control-flow", "shared", "wrong-shape"])
def test_unsupported_models_are_named(model, x, match):
    with pytest.raises(UnsupportedModelError, match=match):
        analyse(model, x)


def test_unsupported_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)


class _FunctionalPool(nn.Module):
    def __init__(self, **pool) -> None:
        super().__init__()
        self.a, self.b, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), pool

    def forward(self, x):
        return self.b(F.max_pool2d(torch.relu(self.a(x)), 3, 2, 1, **self.pool))


def test_edges_carry_the_max_pool_on_their_way():
    """``Edge.pool`` from a module or a functional max pool; () for one a chain cannot time (ceil mode)."""
    x = torch.randn(1, 3, 16, 16)
    (edge,) = analyse(_FunctionalPool(), x)[1]
    assert (edge.pool, edge.tensor_shape, edge.activation) == ((3, 3, 2, 2, 1, 1), (1, 8, 8, 8), "relu")
    assert analyse(_FunctionalPool(ceil_mode=True), x)[1][0].pool == ()
