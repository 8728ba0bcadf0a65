"""Bit-width search strategies over one interface (see base.py).

    from hwmpq.search import run_search, SearchInputs, SSPSConfig
    result = run_search(SearchInputs(model, splits, table, budget, example_input), SSPSConfig(epochs=4))

Names are resolved lazily (``hwmpq --help`` must not import torch); a strategy registers itself when its
config class is imported, so holding a config means its strategy is known to ``run_search``.

This package is also the verb ``hwmpq.search(model, data, ...)`` (:func:`hwmpq.api.search`): the verb and
the package share the name ``hwmpq.search``, and importing any submodule binds that name to the package,
so calling the package runs the verb.
"""

from __future__ import annotations

import importlib
import sys
import types

_NAMES = {
    "Budget": "base", "BudgetError": "base", "SearchInputs": "base", "SearchResult": "base",
    "register_strategy": "base", "run_search": "base", "DNASConfig": "dnas", "SSPSConfig": "ssps",
    "UniformConfig": "uniform", "parse_budget": "budget", "check_feasible": "budget", "repair": "budget",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    """``hwmpq.search(...)`` calls :func:`hwmpq.api.search` (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        from hwmpq.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = sorted(_NAMES)
