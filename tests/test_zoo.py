"""Model zoo: every registered model builds and runs at its default input; names, patterns, errors."""

from __future__ import annotations

import pytest
import torch

from hwmpq.zoo import create_model, list_models
from hwmpq.zoo.registry import UnknownModelError, default_input_shape

ZOO = list_models()
SMALL_INPUT = {"resnet18": (1, 3, 64, 64)}  # the ImageNet stem handles any size; keep the test cheap


def test_registry_holds_the_promised_models():
    assert {"resnet20", "resnet18", "mobilenetv2", "mobilenetv2_050", "test_tiny", "test_small"} <= set(ZOO)
    assert list_models("test_*") == ["test_small", "test_tiny"]
    assert list_models("*resnet*") == [n for n in ZOO if "resnet" in n]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", ZOO, ids=ZOO)
def test_builds_and_runs(name):
    shape = SMALL_INPUT.get(name, default_input_shape(name))
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_050", "test_small"])
def test_in_chans_override(name):
    n, _, h, w = default_input_shape(name)
    model = create_model(name, in_chans=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 2, h, w)).shape == (2, 10)


def test_default_in_chans_follows_default_input():
    assert create_model("test_tiny").conv1.in_channels == 1
    assert create_model("resnet20").stem[0].in_channels == 3


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet21'; known: .*resnet20") as e:
        create_model("resnet21")
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    assert str(e.value).startswith("unknown model")  # not KeyError's quoted repr
    with pytest.raises(UnknownModelError):
        default_input_shape("resnet21")
