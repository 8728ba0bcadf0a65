"""Resolve a ``--model`` argument: a zoo name or ``path/to/file.py:factory``, plus optional weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .zoo.registry import _DEFAULT_INPUT, create_model, list_models


class ModelLoadError(ValueError):
    """The model could not be built or its weights loaded; the message says why."""


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ModelLoadError(f"--input-shape {text!r}: expected N,C,H,W integers, e.g. 1,3,32,32") from None
    if len(dims) != 4 or min(dims) < 1:
        raise ModelLoadError(f"--input-shape {text!r}: expected four positive integers N,C,H,W")
    return dims


def _from_file(spec: str, **kwargs) -> nn.Module:
    path, _, factory = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"--model {spec!r}: file {file} does not exist")
    modname = f"hwmpq_user_model_{abs(hash(str(file.resolve())))}"
    mspec = importlib.util.spec_from_file_location(modname, file)
    module = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        raise ModelLoadError(f"--model {spec!r}: importing {file} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ModelLoadError(f"--model {spec!r}: {file} has no callable {factory!r}")
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ModelLoadError(f"--model {spec!r}: factory {factory}() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--model {spec!r}: {factory}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(spec: str, *, num_classes: int = 10, in_chans: int | None = None,
               weights: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` and load ``weights`` (a state dict, loaded weights_only)."""
    if ".py:" in spec or spec.endswith(".py") or "/" in spec:
        if ":" not in spec:
            raise ModelLoadError(f"--model {spec!r}: give the factory too, as path/to/file.py:factory")
        model = _from_file(spec)
    else:
        kw = {"num_classes": num_classes}
        if in_chans is not None:
            kw["in_chans"] = in_chans
        try:
            model = create_model(spec, **kw)
        except KeyError as e:
            raise ModelLoadError(str(e.args[0])) from None
    if weights:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"--weights {path}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"--weights {path}: not a weights-only torch checkpoint ({e})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"--weights {path} does not fit the model: {e}") from e


def default_shape(spec: str, in_chans: int | None = None) -> tuple[int, int, int, int] | None:
    list_models()
    if spec in _DEFAULT_INPUT:
        n, c, h, w = _DEFAULT_INPUT[spec]
        return (n, in_chans or c, h, w)
    return None
