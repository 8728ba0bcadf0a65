"""Models written the way real code is (functional ops, padding, squeeze-excite, concats, grouped convs,
odd channel counts, TensorFlow "SAME" convs): the layer graph comes from the traced program, the MACs
match the formula, and the w8a8 ORT export (and one TVM export) agrees with the torch fake-quant model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.graph import UnsupportedModelError, analyse, layer_graph
from hwmpq.qmodules import calibrate, quantize
from hwmpq.records import W8A8, BitPlan
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session

N, H = 2, 16  # batch and input side of the MAC checks


def conv_macs(n: int, oh: int, ow: int, cout: int, cin: int, groups: int, kh: int, kw: int) -> int:
    """N * OH * OW * Cout * (Cin / groups) * KH * KW."""
    return n * oh * ow * cout * (cin // groups) * kh * kw


def linear_macs(n: int, cin: int, cout: int) -> int:
    """N * in * out (N: every leading dimension of the input)."""
    return n * cin * cout


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.normal_(bn.bias, 0, 0.1)
    nn.init.normal_(bn.running_mean, 0, 0.1)
    nn.init.uniform_(bn.running_var, 0.5, 1.5)
    return bn


class FunctionalPad(nn.Module):
    """F.pad before a conv, F.relu, odd channel counts 3 -> 13 -> 22, Hardswish, functional pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 13, 3)
        self.conv2 = nn.Conv2d(13, 22, 3, stride=2, padding=1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(22, 7)

    def forward(self, x):
        x = F.relu(self.conv1(F.pad(x, (1, 1, 1, 1))))
        x = self.act(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def macs(n: int, h: int) -> list[int]:
        return [conv_macs(n, h, h, 13, 3, 1, 3, 3), conv_macs(n, h // 2, h // 2, 22, 13, 1, 3, 3),
                linear_macs(n, 22, 7)]


class LinearSqueezeExcite(nn.Module):
    """Squeeze-excite with linear layers on ``x.mean((2, 3))``, SiLU, a Swish written out as x * sigmoid(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.bn = _bn(24)
        self.act = nn.SiLU()
        self.fc1 = nn.Linear(24, 6)
        self.fc2 = nn.Linear(6, 24)
        self.head = nn.Conv2d(24, 10, 1)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        x = self.head(x)
        x = x * torch.sigmoid(x)
        return x.mean((2, 3))

    @staticmethod
    def macs(n: int, h: int) -> list[int]:
        return [conv_macs(n, h, h, 24, 3, 1, 3, 3), linear_macs(n, 24, 6), linear_macs(n, 6, 24),
                conv_macs(n, h, h, 10, 24, 1, 1, 1)]


class SamePadConv(nn.Conv2d):
    """A TensorFlow "SAME" conv as EfficientNet ports write it: a ZeroPad2d (asymmetric at stride 2) in
    the conv's own forward, then the convolution with no padding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False,
                 image_size: int = 16) -> None:
        super().__init__(cin, cout, k, stride, groups=groups, bias=bias)
        out = -(-image_size // stride)
        pad = max((out - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class EfficientBlock(nn.Module):
    """EfficientNet's stem and MBConv block: SAME convs (asymmetric padding at stride 2), a ZeroPad2d
    before a depthwise conv, squeeze-excite with 1x1 convs (sigmoid * x), ReLU6, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv(3, 16, 3, stride=2)
        self.bn0 = _bn(16)
        self.expand = nn.Conv2d(16, 40, 1, bias=False)
        self.bn1 = _bn(40)
        self.pad = nn.ZeroPad2d(2)
        self.dw = nn.Conv2d(40, 40, 5, groups=40, bias=False)
        self.bn2 = _bn(40)
        self.se_reduce = nn.Conv2d(40, 4, 1)
        self.se_expand = nn.Conv2d(4, 40, 1)
        self.project = nn.Conv2d(40, 16, 1, bias=False)
        self.bn3 = _bn(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(self.pad(y))))
        s = self.se_expand(F.relu6(self.se_reduce(F.adaptive_avg_pool2d(y, 1))))
        y = torch.sigmoid(s) * y
        x = self.bn3(self.project(y)) + x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def macs(n: int, h: int) -> list[int]:
        o = h // 2
        return [conv_macs(n, o, o, 16, 3, 1, 3, 3), conv_macs(n, o, o, 40, 16, 1, 1, 1),
                conv_macs(n, o, o, 40, 40, 40, 5, 5), conv_macs(n, 1, 1, 4, 40, 1, 1, 1),
                conv_macs(n, 1, 1, 40, 4, 1, 1, 1), conv_macs(n, o, o, 16, 40, 1, 1, 1), linear_macs(n, 16, 5)]


class ConcatGrouped(nn.Module):
    """Two conv branches concatenated, grouped (not depthwise) convs with groups 2 and 4, max pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.g2 = nn.Conv2d(16, 24, 3, padding=1, groups=2)
        self.g4 = nn.Conv2d(24, 20, 3, stride=2, padding=1, groups=4)
        self.fc = nn.Linear(20, 9)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        x = F.max_pool2d(F.relu(self.g2(x)), 2)
        x = F.relu(self.g4(x))
        return self.fc(x.mean((2, 3)))

    @staticmethod
    def macs(n: int, h: int) -> list[int]:
        return [conv_macs(n, h, h, 10, 3, 1, 3, 3), conv_macs(n, h, h, 6, 3, 1, 1, 1),
                conv_macs(n, h, h, 24, 16, 2, 3, 3), conv_macs(n, h // 4, h // 4, 20, 24, 4, 3, 3),
                linear_macs(n, 20, 9)]


NETS = [FunctionalPad, LinearSqueezeExcite, EfficientBlock, ConcatGrouped]


def _net(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.mark.parametrize("cls", NETS, ids=lambda c: c.__name__)
def test_layers_and_macs_follow_the_formula(cls):
    model = _net(cls)
    specs = layer_graph(model, torch.randn(N, 3, H, H))
    expected = cls.macs(N, H)
    assert len(specs) == len(expected) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert [s.macs for s in specs] == expected, [s.fqn for s in specs]
    assert all(s.params == sum(p.numel() for p in model.get_submodule(s.fqn).parameters()) for s in specs)


def test_kinds_groups_and_same_padding_geometry():
    specs = {s.fqn: s for s in layer_graph(_net(ConcatGrouped), torch.zeros(1, 3, H, H))}
    assert (specs["g2"].kind, specs["g2"].groups, specs["g4"].kind, specs["g4"].groups) == ("conv", 2, "conv", 4)
    block = {s.fqn: s for s in layer_graph(_net(EfficientBlock), torch.zeros(1, 3, H, H))}
    assert block["dw"].kind == "dwconv" and block["dw"].in_hw == (12, 12) and block["dw"].padding == (0, 0)
    # the stem convolves the input its own forward padded: 16 + (0 left, 1 right) at stride 2
    stem = block["stem"]
    assert (stem.in_hw, stem.padding, stem.out_hw, stem.stride) == ((17, 17), (0, 0), (8, 8), (2, 2))


class _StringPadding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same3 = nn.Conv2d(4, 4, 3, padding="same")
        self.same4 = nn.Conv2d(4, 4, (4, 3), padding="same", dilation=(1, 2))
        self.valid = nn.Conv2d(4, 4, 3, padding="valid")

    def forward(self, x):
        return self.valid(self.same4(self.same3(x)))


def test_string_padding_becomes_numbers():
    s = {sp.fqn: sp for sp in layer_graph(_StringPadding(), torch.zeros(1, 4, 10, 10))}
    assert (s["same3"].padding, s["same3"].in_hw, s["same3"].out_hw) == ((1, 1), (10, 10), (10, 10))
    # height: a 4-tall kernel pads 3 (odd: 1 before, 2 after) -> the 13-row input it convolves, unpadded;
    # width: dilation 2 x (3 - 1) = 4 -> 2 each side
    assert (s["same4"].padding, s["same4"].in_hw, s["same4"].out_hw) == ((0, 2), (13, 10), (10, 10))
    assert s["same4"].macs == conv_macs(1, 10, 10, 4, 4, 1, 4, 3)
    assert (s["valid"].padding, s["valid"].out_hw) == ((0, 0), (8, 8))


class _Tokens(nn.Module):
    """A Linear on (N, T, C) tokens: patch embedding, then a per-token MLP and a mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.mlp = nn.Linear(12, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, 12)
        return self.head(F.gelu(self.mlp(t)).mean(1))


def test_linear_on_tokens_has_batch_times_tokens_rows():
    specs, edges = analyse(_Tokens(), torch.zeros(N, 3, H, H))
    mlp = specs[1]
    assert (mlp.fqn, mlp.batch, mlp.macs) == ("mlp", N * 16, linear_macs(N * 16, 12, 20))
    assert mlp.input_shape == (N * 16, 12) and specs[2].macs == linear_macs(N, 20, 3)
    assert [(e.src, e.dst, e.tensor_shape) for e in edges] == [("patch", "mlp", (N * 16, 12)),
                                                              ("mlp", "head", (N, 20))]


def test_edges_pass_through_functional_ops_not_merges():
    _, edges = analyse(_net(LinearSqueezeExcite), torch.zeros(1, 3, H, H))
    by_pair = {(e.src, e.dst): e for e in edges}
    # stem -> SiLU -> mean -> fc1 -> relu -> fc2; the excite product merges stem's and fc2's outputs
    assert set(by_pair) == {("stem", "fc1"), ("fc1", "fc2")}
    assert by_pair["stem", "fc1"].activation == "silu" and by_pair["stem", "fc1"].tensor_shape == (1, 24)
    assert by_pair["fc1", "fc2"].activation == "relu"
    _, edges = analyse(_net(FunctionalPad), torch.zeros(1, 3, H, H))
    assert [(e.src, e.dst, e.activation) for e in edges] == [("conv1", "conv2", "relu"), ("conv2", "fc", "hardswish")]
    _, edges = analyse(_net(ConcatGrouped), torch.zeros(1, 3, H, H))
    assert [(e.src, e.dst) for e in edges] == [("g2", "g4"), ("g4", "fc")]  # nothing through the concat


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _SwishModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.swish, self.c2 = nn.Conv2d(3, 8, 3), _Swish(), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.swish(self.c1(x)).view(x.size(0), 8, -1)[..., None])


def test_written_out_swish_and_view_with_sizes_keep_the_edge():
    _, edges = analyse(_SwishModel(), torch.zeros(1, 3, 6, 6))
    assert [(e.src, e.dst, e.activation) for e in edges] == [("c1", "c2", "silu")]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(x)


class _BadView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).view(-1, 5, 7)


def test_untraceable_model_names_its_source_line():
    with pytest.raises(UnsupportedModelError) as e:
        analyse(_DataDependent(), torch.zeros(1, 4))
    msg = str(e.value)
    assert "cannot trace _DataDependent with torch.fx" in msg and "test_graph_any_model.py" in msg, msg
    assert "if x.sum() > 0:" in msg and "node 'gt'" in msg, msg


def test_op_failing_on_the_example_names_node_and_line():
    with pytest.raises(UnsupportedModelError, match=r"on an input of shape \(1, 3, 8, 8\) failed at method "
                                                    r"'view' \(node 'view'\) at File .*test_graph_any_model\.py"
                                                    r".*\.view\(-1, 5, 7\)"):
        analyse(_BadView(), torch.zeros(1, 3, 8, 8))


def _quantized(model: nn.Module, x: torch.Tensor):
    fqns = [s.fqn for s in layer_graph(model, x[:1])]
    plan = BitPlan.uniform(fqns, W8A8)
    q = quantize(copy.deepcopy(model), plan)
    calibrate(q, [x])
    return q.eval(), plan


def _ort_agreement(q, path: str, x: torch.Tensor) -> tuple[float, float, float]:
    sess = make_session(path, 1)
    got = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ref = q(x).numpy()
    return float((ref.argmax(1) == got.argmax(1)).mean()), float(np.abs(ref - got).max()), float(np.abs(ref).max())


@pytest.mark.slow
@pytest.mark.parametrize("cls", NETS, ids=lambda c: c.__name__)
def test_w8a8_ort_export_agrees_with_torch_fake_quant(cls, tmp_path):
    model = _net(cls)
    torch.manual_seed(1)
    x = torch.randn(64, 3, H, H)
    q, plan = _quantized(model, x)
    res = OrtTarget(threads=1).export(q, plan, x[:1], str(tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["integer_layers"], manifest
    agree, diff, scale = _ort_agreement(q, res.artifact, x)
    assert agree >= 0.98 and diff < 0.05 * scale, (agree, diff, scale)


class _TvmNet(nn.Module):
    """F.pad before a conv, a concat of two branches, a grouped conv, squeeze-excite (mean, linear,
    sigmoid, product), odd channel counts 3 -> 13 -> 22."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 13, 3)
        self.b = nn.Conv2d(3, 9, 1)
        self.g = nn.Conv2d(22, 22, 3, padding=1, groups=2)
        self.se = nn.Linear(22, 22)
        self.fc = nn.Linear(22, 6)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(F.pad(x, (1, 1, 1, 1)))), F.relu(self.b(x))], 1)
        x = F.relu(self.g(x))
        x = x * torch.sigmoid(self.se(x.mean((2, 3))))[:, :, None, None]
        return self.fc(x.mean((2, 3)))


@pytest.mark.tvm
@pytest.mark.slow
def test_tvm_export_of_a_model_outside_the_zoo(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")
    from hwmpq.targets.tvm.target import TvmTarget

    model = _net(_TvmNet)
    x = torch.randn(1, 3, 10, 10)
    specs = layer_graph(model, x)
    assert [s.macs for s in specs] == [conv_macs(1, 10, 10, 13, 3, 1, 3, 3), conv_macs(1, 10, 10, 9, 3, 1, 1, 1),
                                       conv_macs(1, 10, 10, 22, 22, 2, 3, 3), linear_macs(1, 22, 22),
                                       linear_macs(1, 22, 6)]
    plan = BitPlan.uniform([s.fqn for s in specs], W8A8)
    res = TvmTarget("host", work_dir=str(tmp_path / "work")).export(model, plan, x, str(tmp_path / "out"))
    check = json.loads(open(res.manifest).read())["verification"]
    assert check["ok"] and check["max_lsb"] <= 2, check
    assert set(res.integer_layers) == {s.fqn for s in specs}
