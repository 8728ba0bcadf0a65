"""The hwmpq CLI: --help everywhere, zoo list, graph totals, train (float, resume, QAT) and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from hwmpq import cli
from hwmpq.records import BitPlan, Precision, save_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    if not getattr(cli, "_test_registered", False):
        cli._register()
        cli._test_registered = True
    return cli.app


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _command_paths(app: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for c in app.registered_commands:
        paths.append((*prefix, c.name or c.callback.__name__.replace("_", "-")))
    for g in app.registered_groups:
        paths.append((*prefix, g.name))
        paths.extend(_command_paths(g.typer_instance, (*prefix, g.name)))
    return paths


def run(app, *args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (args, result.output, result.exception)
    return result


def test_help_on_every_subcommand(app):
    paths = _command_paths(app)
    assert {("zoo",), ("zoo", "list"), ("graph",), ("train",)} <= set(paths)
    for path in paths:
        assert "Usage" in run(app, *path, "--help").output, path


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "hwmpq", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "graph" in out.stdout


def test_zoo_list(app):
    out = run(app, "zoo", "list").output
    assert "resnet20" in out and "1,3,32,32" in out and "test_tiny" in out
    assert run(app, "zoo", "list", "test_*").output.split()[::2] == ["test_small", "test_tiny"]
    bad = run(app, "zoo", "list", "nothing*", code=2)
    assert "no zoo model matches 'nothing*'" in bad.output


def test_graph_totals(app, tmp_path: Path):
    out = run(app, "graph", "--model", "test_tiny", "--json", str(tmp_path / "g.json")).output
    # conv1 + conv2 + dw + pw + fc, by hand: 8*8*8*1*9 + 8*8*8*8*9 + 4*4*8*9 + 4*4*16*8 + 16*10
    assert "layers=5 macs=44832 params=1018" in out
    assert "dwconv" in out and "1x8x4x4" in out
    assert len(json.loads((tmp_path / "g.json").read_text())) == 5
    r20 = run(app, "graph", "--model", "resnet20", "--input-shape", "1,1,28,28").output
    assert "layers=22" in r20 and "1x1x28x28" in r20


MODEL_FILE = '''
from torch import nn

def gelu_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU())

def broken():
    raise RuntimeError("factory exploded")


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return self.conv(-x)


def branchy():
    return Branchy()
'''


@pytest.mark.parametrize("args,message", [
    (["graph", "--model", "resnet21"], "unknown model 'resnet21'"),
    (["graph", "--model", "{d}/missing.py:net", "--input-shape", "1,1,8,8"], "missing.py does not exist"),
    (["graph", "--model", "{d}/m.py:broken", "--input-shape", "1,1,8,8"], "factory broken() raised RuntimeError"),
    (["graph", "--model", "{d}/m.py:branchy", "--input-shape", "1,1,8,8"], "if x.sum() > 0"),
    (["graph", "--model", "{d}/m.py:gelu_net"], "give --input-shape N,C,H,W"),
    (["graph", "--model", "resnet20", "--input-shape", "1,3,32"], "expected four positive integers"),
    (["train", "--model", "resnet21", "--data", "digits", "--epochs", "1", "--out", "{d}/c.pt"], "unknown model"),
    (["train", "--model", "test_tiny", "--data", "cifar", "--epochs", "1", "--out", "{d}/c.pt"], "unknown dataset"),
    (["train", "--model", "test_tiny", "--data", "digits", "--epochs", "1", "--out", "{d}/c.pt", "--qat"],
     "--qat and --plan go together"),
    (["train", "--model", "test_tiny", "--data", "digits", "--epochs", "1", "--out", "{d}/c.pt", "--sam"],
     "apply to QAT"),
], ids=["unknown-zoo", "missing-file", "factory-raises", "untraceable-model", "file-no-shape", "bad-shape",
        "train-unknown-zoo", "unknown-dataset", "qat-no-plan", "sam-no-qat"])
def test_bad_input_is_one_clear_line(app, tmp_path: Path, args, message):
    (tmp_path / "m.py").write_text(MODEL_FILE)
    result = run(app, *(a.format(d=tmp_path) for a in args), code=2)
    assert message in result.output and "error:" in result.output
    assert "Traceback" not in result.output


def test_missing_dataset(app, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HWMPQ_DATA", str(tmp_path / "empty"))
    out = run(app, "train", "--model", "test_small", "--data", "fashion-mnist", "--epochs", "1",
              "--out", str(tmp_path / "c.pt"), code=2).output
    assert "dataset-fashion-mnist" in out and "HWMPQ_DATA" in out


TRAIN = ["train", "--model", "test_tiny", "--data", "digits", "--batch-size", "64", "--no-progress"]


def test_train_resume_and_summary(app, tmp_path: Path):
    ckpt = tmp_path / "c.pt"
    run(app, *TRAIN, "--epochs", "1", "--out", str(ckpt), "--save-weights", str(tmp_path / "w.pt"))
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["result"]["_data"]["epochs_run"] == 1 and 0 <= summary["test_acc"] <= 1
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == set(torch.load(ckpt, weights_only=True)["model"])
    out = run(app, *TRAIN, "--epochs", "2", "--out", str(ckpt), "--resume").output
    assert "resuming from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


@pytest.fixture
def float_weights(tmp_path: Path, tiny_trained) -> Path:
    path = tmp_path / "float.pt"
    torch.save(tiny_trained.state_dict(), path)
    return path


def _plan(tmp_path: Path, layers: dict[str, Precision]) -> Path:
    path = tmp_path / "plan.json"
    save_plan(BitPlan.from_dict(layers), path)
    return path


TINY_LAYERS = ("conv1", "conv2", "dw", "pw", "fc")


def test_train_qat_from_float_weights(app, tmp_path: Path, float_weights: Path):
    plan = _plan(tmp_path, {n: Precision(4, 8) for n in TINY_LAYERS})
    out = run(app, *TRAIN, "--epochs", "1", "--out", str(tmp_path / "q.pt"), "--qat", "--plan", str(plan),
              "--weights", str(float_weights), "--lr", "0.005").output
    acc = json.loads((tmp_path / "q.json").read_text())["test_acc"]
    assert acc > 0.8, out  # started from the trained float weights, not from scratch
    state = torch.load(tmp_path / "q.pt", weights_only=True)["model"]
    assert "conv1.w_quant.scale" in state and "bn1.running_mean" not in state  # quantized, BN folded


@pytest.mark.parametrize("flags", [["--sam"], ["--grad-boost"], ["--stat-assist"]], ids=lambda f: f[0])
def test_train_qat_options(app, tmp_path: Path, float_weights: Path, flags):
    from hwmpq import qat_options

    plan = _plan(tmp_path, {n: Precision(8, 8) for n in TINY_LAYERS})
    args = [*TRAIN, "--epochs", "1", "--out", str(tmp_path / "q.pt"), "--qat", "--plan", str(plan),
            "--weights", str(float_weights), *flags]
    if not hasattr(qat_options, "fit_hooks"):
        assert "not available yet" in run(app, *args, code=2).output
        return
    run(app, *args)
    assert torch.load(tmp_path / "q.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("content,message", [
    ("{not json", "plan.json: not valid JSON"),
    (None, "plan names layers the model does not have: ['conv9']"),
    ("missing", "plan has no precision for layers: ['fc']"),
], ids=["bad-json", "unknown-layer", "missing-layer"])
def test_train_qat_malformed_plan(app, tmp_path: Path, content, message):
    path = tmp_path / "plan.json"
    if content is None:
        _plan(tmp_path, {**{n: Precision(8, 8) for n in TINY_LAYERS}, "conv9": Precision(8, 8)})
    elif content == "missing":
        _plan(tmp_path, {n: Precision(8, 8) for n in TINY_LAYERS[:-1]})
    else:
        path.write_text(content)
    out = run(app, *TRAIN, "--epochs", "1", "--out", str(tmp_path / "q.pt"), "--qat", "--plan", str(path),
              code=2).output
    assert message in out and str(path) in out.replace("\n", "")


@pytest.mark.slow
def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path: Path):
    """A real interruption: SIGINT to `python -m hwmpq train` after its first checkpoint, then --resume."""
    import os
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "hwmpq", "train", "--model", "test_tiny", "--data", "digits", "--batch-size", "16",
            "--limit", "320", "--epochs", "6", "--no-progress"]
    whole, part = tmp_path / "whole.pt", tmp_path / "part.pt"
    subprocess.run([*base, "--out", str(whole)], check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen([*base, "--out", str(part)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not part.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err, err
    stopped_at = torch.load(part, weights_only=True)["epoch"]
    assert 1 <= stopped_at < 6
    subprocess.run([*base, "--out", str(part), "--resume"], check=True, env=env, capture_output=True, timeout=600)
    a, b = torch.load(whole, weights_only=True), torch.load(part, weights_only=True)
    assert b["epoch"] == 6 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
