"""Whole-model QDQ export for ONNX Runtime: integer kernels where the plan says int8, float where it says
fp32, outputs agreeing with the torch fake-quant model, bad plans refused before any work."""

import json
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from hwmpq.data import load_digits
from hwmpq.graph import analyse
from hwmpq.qmodules import calibrate, quantize, quantize_
from hwmpq.records import FP32, BitPlan, Precision, RecordError, from_jsonable, save_plan
from hwmpq.targets.ort.export import ExportError
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session
from hwmpq.zoo import create_model

W8A8 = Precision(8, 8)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained(digits):
    """test_tiny trained for a few hundred steps on sklearn digits (float, BatchNorm live)."""
    torch.manual_seed(0)
    model = create_model("test_tiny")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = digits.train.tensors
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def quantized(model, plan, digits):
    import copy

    q = quantize(copy.deepcopy(model), plan)
    calibrate(q, [digits.train.tensors[0][:256]])
    return q.eval()


def run_all(path: str, x: torch.Tensor) -> np.ndarray:
    sess = make_session(path, 1)
    return np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])


@pytest.mark.slow
def test_mixed_plan_exports_integer_kernels_and_agrees_with_torch(trained, digits, tmp_path):
    x0 = torch.zeros(1, 1, 8, 8)
    specs, _ = analyse(trained, x0)
    plan = BitPlan.from_dict({"conv1": W8A8, "conv2": W8A8, "dw": FP32, "pw": W8A8, "fc": W8A8})
    qmodel = quantized(trained, plan, digits)
    result = OrtTarget(threads=1).export(qmodel, plan, x0, str(tmp_path / "out"))
    assert set(result.integer_layers) == {"conv1", "conv2", "pw", "fc"}
    assert result.float_layers == ("dw",)
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "out" / "model.opt.onnx").graph.node)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1 and ops["Conv"] == 1, ops
    xt, _ = digits.test.tensors
    with torch.no_grad():
        ref = qmodel(xt).numpy()
    got = run_all(result.artifact, xt)
    agree = (ref.argmax(1) == got.argmax(1)).mean()
    max_diff = float(np.abs(ref - got).max())
    print(f"digits test: {len(xt)} images, top-1 agreement {agree:.4f}, max logit diff {max_diff:.4f}")
    assert agree >= 0.99
    assert max_diff < 0.1 * float(np.abs(ref).max())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert from_jsonable(manifest["plan"]) == plan
    assert manifest["integer_layers"] == list(result.integer_layers)
    assert manifest["versions"]["onnxruntime"] and "conv1" in manifest["layer_scales"]


def test_layers_ort_cannot_make_integer_stay_float_with_a_warning(trained, digits, tmp_path):
    x0 = torch.zeros(1, 1, 8, 8)
    plan = BitPlan.from_dict({"conv1": Precision(16, 16), "conv2": W8A8, "dw": Precision(4, 8), "pw": FP32,
                              "fc": Precision(4, 32)})
    qmodel = quantized(trained, plan, digits)
    with pytest.warns(UserWarning, match="did not turn it into an integer kernel"):
        result = OrtTarget(threads=1).export(qmodel, plan, x0, str(tmp_path / "out"))
    assert "conv1" in result.float_layers and "dw" in result.float_layers
    assert "conv2" in result.integer_layers and "fc" in result.integer_layers  # MatMulNBits
    xt = digits.test.tensors[0][:50]
    with torch.no_grad():
        ref = qmodel(xt).numpy()
    assert (ref.argmax(1) == run_all(result.artifact, xt).argmax(1)).mean() >= 0.96


def test_bad_plans_are_refused_before_any_work(trained, digits, tmp_path):
    x0 = torch.zeros(1, 1, 8, 8)
    target = OrtTarget(threads=1)
    good = BitPlan.uniform(["conv1", "conv2", "dw", "pw", "fc"], W8A8)
    with pytest.raises(RecordError, match="does not have"):
        target.export(quantized(trained, good, digits), BitPlan.from_dict({**good.as_dict(), "ghost": W8A8}), x0,
                      str(tmp_path / "a"))
    conv_w4a32 = BitPlan.from_dict({**good.as_dict(), "conv1": Precision(4, 32)})
    with pytest.raises(RecordError, match="cannot run"):
        target.export(quantized(trained, good, digits), conv_w4a32, x0, str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    import copy

    uncalibrated = quantize(copy.deepcopy(trained), good)
    with pytest.raises(ExportError, match="not calibrated"):
        target.export(uncalibrated, good, x0, str(tmp_path / "c"))
    per_layer = quantized_per_layer = quantize_(copy.deepcopy(trained), good)
    calibrate(quantized_per_layer, [digits.train.tensors[0][:64]])
    with pytest.raises(ExportError, match="placed per layer"):
        target.export(per_layer, good, x0, str(tmp_path / "d"))


@pytest.mark.slow
def test_export_cli_float_checkpoint_warns_and_refuses_unknown_layers(trained, tmp_path):
    from typer.testing import CliRunner

    from hwmpq.cli import _register, app

    _register()
    torch.save(trained.state_dict(), tmp_path / "float.pt")
    plan = BitPlan.from_dict({"conv1": W8A8, "conv2": W8A8, "dw": FP32, "pw": W8A8, "fc": FP32})
    save_plan(plan, tmp_path / "plan.json")
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(app, ["export", "--model", "test_tiny", "--weights", str(tmp_path / "float.pt"),
                                  "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"),
                                  "--data", "digits"])
    assert res.exit_code == 0, res.output
    assert "WARNING" in res.output and "calibrating" in res.output
    assert "integer kernels (3)" in res.output and (tmp_path / "out" / "model.opt.onnx").is_file()
    save_plan(BitPlan.from_dict({"nope": W8A8}), tmp_path / "bad.json")
    res = runner.invoke(app, ["export", "--model", "test_tiny", "--plan", str(tmp_path / "bad.json"),
                              "--out", str(tmp_path / "bad"), "--data", "digits"])
    assert res.exit_code == 2 and "does not have" in res.output and not (tmp_path / "bad").exists()


def test_a_checkpoint_of_the_other_placement_is_refused_with_what_to_do(trained, digits, tmp_path):
    import copy

    from hwmpq.modelspec import ModelLoadError
    from hwmpq.targets.cli import load_for_export

    plan = BitPlan.uniform(["conv1", "conv2", "dw", "pw", "fc"], W8A8)
    per_layer = quantize_(copy.deepcopy(trained), plan)
    calibrate(per_layer, [digits.train.tensors[0][:64]])
    torch.save(per_layer.state_dict(), tmp_path / "layer.pt")
    with pytest.raises(ModelLoadError, match="placed per layer.*--placement tensor"):
        load_for_export("test_tiny", str(tmp_path / "layer.pt"), plan, "1,1,8,8", None, OrtTarget(threads=1))
    per_tensor = quantized(trained, plan, digits)
    torch.save(per_tensor.state_dict(), tmp_path / "tensor.pt")
    net, *_ = load_for_export("test_tiny", str(tmp_path / "tensor.pt"), plan, "1,1,8,8", None, OrtTarget(threads=1))
    x = digits.test.tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(net(x), per_tensor(x))  # the checkpoint restores the trained quantizers exactly


class _StemPoolNet(torch.nn.Module):
    """A ResNet stem (conv, BN, ReLU, max pool) into a 3x3 conv, then a 3x3 conv after a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.pool = torch.nn.MaxPool2d(3, 2, 1)
        self.conv = torch.nn.Conv2d(16, 16, 3, 1, 1)
        self.head = torch.nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(self.pool(torch.relu(self.bn(self.stem(x)))))))


def _between_kernels(path, first: int = 0) -> list[str]:
    """The optimized graph's node types between its ``first``-th layer kernel and the next one."""
    ops = [n.op_type for n in onnx.load(path).graph.node]
    at = [i for i, op in enumerate(ops) if op in ("Conv", "QLinearConv")]
    return ops[at[first] + 1:at[first + 1]]


@pytest.mark.parametrize("src", [FP32, W8A8], ids=["fp32", "w8a8"])
@pytest.mark.parametrize("dst", [FP32, W8A8], ids=["fp32", "w8a8"])
def test_pair_chains_hold_the_glue_the_exporter_writes(tmp_path, src, dst):
    """What a pair chain (the LUT's transition row) puts between its two layers is what ORT runs between
    them in the exported model, through a max pool (the stem edge) and through an absorbed ReLU."""
    from hwmpq.profilers.measure import export_plan
    from hwmpq.targets.ort import layers

    model, x = _StemPoolNet().eval(), torch.randn(1, 3, 64, 64)
    specs, edges = analyse(model, x)
    by = {s.fqn: s for s in specs}
    assert [(e.src, e.dst, e.pool) for e in edges] == [("stem", "conv", (3, 3, 2, 2, 1, 1)), ("conv", "head", ())]
    plan = BitPlan.from_dict({"stem": src, "conv": dst, "head": dst})
    exported = export_plan(OrtTarget(threads=1, workdir=str(tmp_path)), model, plan, x, str(tmp_path / "export"))
    make_session(open(exported.artifact, "rb").read(), 1, optimized_path=str(tmp_path / "model_opt.onnx"))
    for i, e in enumerate(edges):
        a, b = (src, dst) if i == 0 else (dst, dst)
        chain = layers.chain_model(by[e.src], a, by[e.dst], b, e.activation, e.merge, e.pool)
        make_session(chain.SerializeToString(), 1, optimized_path=str(tmp_path / f"chain{i}_opt.onnx"))
        assert _between_kernels(tmp_path / f"chain{i}_opt.onnx") == _between_kernels(tmp_path / "model_opt.onnx", i), \
            f"edge {e.src}->{e.dst} at {a.label}->{b.label}"
