"""The one model loader behind every ``--model`` option (and the Python API's model arguments).

A model is a zoo name or ``path/to/file.py:factory``; its example input comes from ``--input-shape`` (a zoo
model has a default) or from the data; ``--weights`` are always read with ``torch.load(weights_only=True)``
(a plain state dict or an hwmpq training checkpoint). A state dict holding trained quantizer scales (a QAT
checkpoint) is loaded into the model quantized by its plan, in the placement it was trained in
(:func:`load_weights_for_plan`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .zoo.registry import _DEFAULT_INPUT, create_model, default_input_shape, list_models


class ModelLoadError(ValueError):
    """The model could not be built or its weights loaded; the message says why."""


class DataShapeError(ValueError):
    """The data does not fit the model (channels per image); the message says how to fix it."""


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


def is_file_spec(spec: str) -> bool:
    """Whether ``spec`` names a Python file (``path/to/file.py:factory``) rather than a zoo model."""
    return ".py:" in spec or spec.endswith(".py") or "/" in spec


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
    """Build the model named by ``spec`` and load ``weights`` (a float state dict, loaded weights_only)."""
    if is_file_spec(spec):
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


def read_state_dict(path: str) -> dict:
    """The state dict in ``path`` (a plain one or an hwmpq training checkpoint's ``model``), weights only."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"--weights {path}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"--weights {path}: not a weights-only torch checkpoint ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_state(model: nn.Module, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{what}: {e}") from e


def load_weights(model: nn.Module, path: str) -> None:
    """Load the float state dict in ``path`` into ``model``."""
    _load_state(model, read_state_dict(path), f"--weights {path} does not fit the model")


def quantizer_placement(state: dict) -> str | None:
    """Where the quantizers of a QAT state dict sit: "tensor", "layer", or None for a float state dict."""
    if any(k.startswith("tensor_quant.") for k in state):
        return "tensor"
    if any(k.endswith((".w_quant.scale", ".in_quant.scale", ".out_quant.scale")) for k in state):
        return "layer"
    return None


def load_weights_for_plan(model: nn.Module, plan, weights: str | None, *, placement: str,
                          target: str = "this target") -> nn.Module:
    """The float ``model`` (freshly built, no weights yet) with ``weights`` as the plan's QAT reads them.

    A state dict with trained quantizer scales loads into ``model`` quantized by ``plan`` in ``placement``
    and the quantized model is returned (its quantizers must have been placed that way: ``target`` names who
    wants ``placement`` in the error). A float state dict (or none) loads into ``model``, which is returned
    float: the caller quantizes and calibrates it."""
    if not weights:
        return model
    state = read_state_dict(weights)
    trained = quantizer_placement(state)
    if trained is None:
        _load_state(model, state, f"--weights {weights} does not fit the model")
        return model
    if trained != placement:
        raise ModelLoadError(f"--weights {weights} holds quantizers placed per {trained}, but {target} wants "
                             f"per-{placement} quantizers: train the QAT with --placement {placement}, or start "
                             "from its float checkpoint (export: with --data to calibrate)")
    from .qmodules import quantize

    net = quantize(model, plan, placement=placement)
    _load_state(net, state, f"--weights {weights} does not fit the model quantized by the plan")
    return net


def default_shape(spec: str, in_chans: int | None = None) -> tuple[int, int, int, int] | None:
    """The zoo model's default input shape (channels replaced by ``in_chans``); None for other specs."""
    list_models()
    if spec in _DEFAULT_INPUT:
        n, c, h, w = _DEFAULT_INPUT[spec]
        return (n, in_chans or c, h, w)
    return None


def input_shape_for(spec: str, input_shape: str | None) -> tuple[int, int, int, int]:
    """The example input's shape: ``--input-shape`` if given, else the zoo model's default. A file model
    needs the option; an unknown zoo name is refused with the list of known ones."""
    shape = parse_input_shape(input_shape)
    if shape is not None:
        return shape
    if is_file_spec(spec):
        raise ModelLoadError(f"--model {spec!r} is not a zoo model: give --input-shape N,C,H,W")
    return default_input_shape(spec)


def load_model_and_input(spec: str, input_shape: str | None = None, weights: str | None = None, *,
                         num_classes: int = 10) -> tuple[nn.Module, torch.Tensor]:
    """(model, zero example input) from the ``--model``/``--input-shape``/``--weights`` options."""
    shape = input_shape_for(spec, input_shape)
    return load_model(spec, num_classes=num_classes, in_chans=shape[1], weights=weights), torch.zeros(shape)


def check_channels(model: nn.Module, input_shape: tuple[int, ...], where: str = "data") -> None:
    """The model's first Conv2d must take the data's channel count (``input_shape`` is C, H, W)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    c = int(input_shape[0])
    if isinstance(first, nn.Conv2d) and first.in_channels != c:
        raise DataShapeError(f"the {where} has {c} channel(s) per image (shape {tuple(input_shape)}), but the "
                             f"model's first conv expects {first.in_channels}; build the model with in_chans={c} "
                             "(zoo models get it from the data) or use data with matching channels")


def load_model_for_data(spec: str, splits, *, weights: str | None = None,
                        num_classes: int | None = None) -> nn.Module:
    """The model for training or searching on ``splits``: a zoo model built for the data's channels and
    classes (``num_classes`` overrides; unlabelled data: 10), ``weights`` (float) loaded, its channels
    checked against the data's (a file model has its own)."""
    model = load_model(spec, num_classes=num_classes or splits.num_classes or 10, in_chans=splits.input_shape[0],
                       weights=weights)
    check_channels(model, splits.input_shape)
    return model
