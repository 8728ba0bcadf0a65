"""--model parsing: zoo names, path/to/file.py:factory, --input-shape, --weights (weights only), errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from hwmpq.modelspec import ModelLoadError, default_shape, load_model, load_weights, parse_input_shape

USER_MODELS = '''
import torch
from torch import nn

def good():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))

def boom():
    raise RuntimeError("no GPU here")

def type_boom():
    raise TypeError("bad argument inside the factory")

def not_a_module():
    return 42

VALUE = 3
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(USER_MODELS)
    return path


def test_parse_input_shape():
    assert parse_input_shape("1,3,32,32") == (1, 3, 32, 32)
    assert parse_input_shape("2x1x28x28") == (2, 1, 28, 28)
    assert parse_input_shape(None) is None
    for bad in ("1,3,32", "a,b,c,d", "1,0,8,8"):
        with pytest.raises(ModelLoadError, match=rf"--input-shape '{bad}'"):
            parse_input_shape(bad)


def test_zoo_name_and_default_shape():
    model = load_model("resnet20", num_classes=5, in_chans=1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    assert default_shape("resnet20") == (1, 3, 32, 32) and default_shape("resnet20", 1) == (1, 1, 32, 32)
    assert default_shape("x.py:f") is None


def test_unknown_zoo_name():
    with pytest.raises(ModelLoadError, match=r"unknown model 'resnet2'; known: .*resnet20"):
        load_model("resnet2")


def test_file_factory(user_file: Path):
    model = load_model(f"{user_file}:good")
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("factory,match", [
    ("boom", r"factory boom\(\) raised RuntimeError: no GPU here"),
    ("type_boom", r"factory type_boom\(\) raised TypeError: bad argument inside the factory"),
    ("missing", r"has no callable 'missing'"),
    ("VALUE", r"has no callable 'VALUE'"),
    ("not_a_module", r"not_a_module\(\) returned int, not an nn.Module"),
])
def test_file_factory_errors(user_file: Path, factory, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(f"{user_file}:{factory}")


def test_missing_file_and_missing_factory_part(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"file .*nope.py does not exist"):
        load_model(f"{tmp_path}/nope.py:make")
    with pytest.raises(ModelLoadError, match="give the factory too"):
        load_model(f"{tmp_path}/nope.py")


def test_file_that_fails_to_import(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(ModelLoadError, match=r"importing .*bad.py failed: ModuleNotFoundError"):
        load_model(f"{bad}:f")


def test_weights_round_trip_and_errors(tmp_path: Path):
    src = load_model("test_tiny")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = load_model("test_tiny", weights=str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(),
                                                  strict=True))
    with pytest.raises(ModelLoadError, match="--weights .*missing.pt: no such file"):
        load_model("test_tiny", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="does not fit the model"):
        load_model("test_tiny", num_classes=3, weights=str(tmp_path / "w.pt"))


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_are_loaded_weights_only(tmp_path: Path):
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, evil)  # arbitrary pickled objects are refused, not executed
    with pytest.raises(ModelLoadError, match="not a weights-only torch checkpoint"):
        load_weights(load_model("test_tiny"), str(evil))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2]) + b"garbage")
    with pytest.raises(ModelLoadError, match="not a weights-only torch checkpoint"):
        load_weights(load_model("test_tiny"), str(junk))
