"""The one strategy interface every search method implements (torchao style: a config dataclass names
the method, a registry maps config type to the function that runs it).

    result = run_search(SearchInputs(...), SSPSConfig(...))

A strategy returns a :class:`SearchResult`: the BitPlan, a JSON-able trace, and (for supernet methods)
the model whose weights the fine-tune starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hwmpq.data import Splits
from hwmpq.lut.table import LatencyTable
from hwmpq.modelspec import check_channels
from hwmpq.records import BitPlan


class BudgetError(ValueError):
    """The budget cannot be met (the message gives the smallest reachable cost) or is malformed."""


@dataclass(frozen=True)
class Budget:
    """A latency and/or energy budget. ``parse_budget`` turns CLI text into one."""

    latency_ms: float | None = None
    energy_mj: float | None = None

    def __post_init__(self) -> None:
        if self.latency_ms is None and self.energy_mj is None:
            raise BudgetError("give a latency budget (--budget-ms, --budget 0.6x) or an energy budget (--budget-mj)")
        for name in ("latency_ms", "energy_mj"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise BudgetError(f"budget {name} must be positive, got {v}")


@dataclass
class SearchInputs:
    model: nn.Module  # float model (trained, or at least initialised); strategies must not modify it
    splits: Splits
    table: LatencyTable
    budget: Budget
    example_input: torch.Tensor
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class SearchResult:
    plan: BitPlan
    predicted_ms: float
    predicted_mj: float
    trace: dict[str, Any] = field(default_factory=dict)
    # weights for the fine-tune: a quantize_'d model of ``plan`` (QuantLayers holding the search's scales, as
    # supernet methods return) or float weights (quantized and calibrated by the loop), or None (the input model)
    model: nn.Module | None = None
    repaired: bool = False
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


_STRATEGIES: dict[type, Callable[[SearchInputs, Any], SearchResult]] = {}


def register_strategy(config_type: type):
    """Decorator: ``@register_strategy(DNASConfig) def dnas(inputs, config) -> SearchResult``."""

    def deco(fn):
        _STRATEGIES[config_type] = fn
        return fn

    return deco


def strategy_for(config: Any) -> Callable[[SearchInputs, Any], SearchResult]:
    """The strategy registered for ``config``'s type; a TypeError naming the known configs otherwise (callers
    ask before any profiling or training)."""
    fn = _STRATEGIES.get(type(config))
    if fn is None:
        raise TypeError(f"no search strategy for {type(config).__name__}; known: "
                        f"{sorted(t.__name__ for t in _STRATEGIES)}")
    return fn


def run_search(inputs: SearchInputs, config: Any) -> SearchResult:
    fn = strategy_for(config)
    check_channels(inputs.model, inputs.splits.input_shape)
    return fn(inputs, config)
