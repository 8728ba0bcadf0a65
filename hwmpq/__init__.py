"""hwmpq: hardware-aware mixed-precision quantization with measured per-layer lookup tables.

The whole loop in Python (hwmpq/api.py; README.md, "Python API"):

    lut = hwmpq.profile(model, example_input, target="ort-x86", lut="cpu.lut")
    found = hwmpq.search(model, "digits", target="ort-x86", lut="cpu.lut", budget="0.5range")
    export = hwmpq.export(found.model, found.plan, target="ort-x86", out="export", example_input=example_input)
    timing = hwmpq.measure(export, target="ort-x86")

Every public name is imported on first use (PEP 562), so ``import hwmpq`` and the CLI start without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the submodule defining it
_NAMES = {
    "BitPlan": "records", "LayerSpec": "records", "MeasureConfig": "records", "Measurement": "records",
    "Precision": "records",
    "analyse": "graph", "layer_graph": "graph",
    "fold_batchnorm": "qmodules", "quantize": "qmodules", "quantize_": "qmodules",
    "create_model": "zoo", "list_models": "zoo",
    "profile": "api", "export": "api", "measure": "api", "ProfileOptions": "api", "ProfileResult": "api",
    "ProfileStopped": "api", "SearchOptions": "api", "SearchOutcome": "api", "Timing": "api",
    "Budget": "search.base", "DNASConfig": "search.dnas", "SSPSConfig": "search.ssps",
    "UniformConfig": "search.uniform",
}
# ``hwmpq.search`` is the search package, which is callable as the verb (hwmpq/search/__init__.py)
_PACKAGES = ("search",)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
        globals()[name] = value
        return value
    if name in _PACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = sorted([*_NAMES, *_PACKAGES])
