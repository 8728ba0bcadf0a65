"""Name -> factory registry. Factories are registered by the zoo modules listed in ``_MODULES``, which
are imported on first use (explicitly, not as a side effect of importing hwmpq)."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable

from torch import nn

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_DEFAULT_INPUT: dict[str, tuple[int, int, int, int]] = {}
_MODULES = ("resnet", "mobilenet", "tiny", "frostnet")
_loaded = False


class UnknownModelError(KeyError, ValueError):
    """No zoo model has that name (a KeyError for mapping-style callers, a ValueError for user input)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def register_model(name: str, default_input: tuple[int, int, int, int] = (1, 3, 32, 32)):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _FACTORIES[name] = fn
        _DEFAULT_INPUT[name] = default_input
        return fn

    return deco


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in _MODULES:
            try:
                importlib.import_module(f"{__package__}.{m}")
            except ModuleNotFoundError as e:
                if e.name != f"{__package__}.{m}":
                    raise
        _loaded = True


def list_models(pattern: str = "*") -> list[str]:
    _load()
    return sorted(n for n in _FACTORIES if fnmatch.fnmatch(n, pattern))


def default_input_shape(name: str, in_chans: int | None = None) -> tuple[int, int, int, int]:
    _load()
    if name not in _DEFAULT_INPUT:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    n, c, h, w = _DEFAULT_INPUT[name]
    return (n, in_chans or c, h, w)


def create_model(name: str, num_classes: int = 10, in_chans: int | None = None, **kwargs) -> nn.Module:
    """Build a zoo model by name; ``in_chans`` defaults to the channels of its default input (test_tiny: 1).
    Unknown names get the list of known ones."""
    _load()
    if name not in _FACTORIES:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(list_models())} "
                                "(or pass path/to/file.py:factory)")
    in_chans = _DEFAULT_INPUT[name][1] if in_chans is None else in_chans
    return _FACTORIES[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
