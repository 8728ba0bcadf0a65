"""Backends. ``get_target(name)`` resolves ``fake``, ``ort-x86`` and ``tvm:PRESET`` lazily (no backend
library is imported until its target is asked for)."""

from __future__ import annotations

import importlib

from .base import Capabilities, DeviceInfo, ExportResult, Target, TargetPrecisions, check_capabilities

# name prefix -> "module:factory"; the factory takes the text after ':' (if any) and keyword options
_TARGETS = {
    "fake": "hwmpq.targets.fake:FakeTarget",
    "ort-x86": "hwmpq.targets.ort.target:OrtTarget",
    "tvm": "hwmpq.targets.tvm.target:TvmTarget",
}


class UnknownTargetError(ValueError):
    pass


def get_target(name: str, **options) -> Target:
    """``fake`` | ``ort-x86`` | ``tvm:PRESET`` (e.g. ``tvm:host``, ``tvm:arm-a72``)."""
    prefix, _, rest = name.partition(":")
    if prefix not in _TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}; known: fake, ort-x86, tvm:PRESET")
    module, _, factory = _TARGETS[prefix].partition(":")
    cls = getattr(importlib.import_module(module), factory)
    target = cls(rest, **options) if rest else cls(**options)
    check_capabilities(target)
    return target


__all__ = ["Capabilities", "DeviceInfo", "ExportResult", "Target", "TargetPrecisions", "UnknownTargetError",
           "check_capabilities", "get_target"]
