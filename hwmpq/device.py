"""Who measured: the CPU facts a latency depends on, and a stable short hash of them.

Two machines with the same fingerprint are treated as the same device (their LUT rows are
interchangeable). The hash covers exactly the dict it is given, so a target adds what else it
depends on (runtime version, thread count) before hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path

# ISA features that change which kernels a runtime picks (x86 and aarch64 /proc/cpuinfo names)
RELEVANT_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "fphp",
)
_MODEL_KEYS = ("model name", "Hardware", "Processor", "cpu model")
_ARM_KEYS = ("CPU implementer", "CPU part", "CPU variant")


def _parse_cpuinfo(text: str) -> dict[str, str]:
    """First value of every ``key : value`` line (the first processor block describes the rest)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in out:
            out[key] = value.strip()
    return out


def cpu_details_from_cpuinfo(text: str, *, cores: int, machine: str, system: str) -> dict[str, str]:
    """The details dict from the text of ``/proc/cpuinfo`` (separate so tests can feed any text)."""
    info = _parse_cpuinfo(text)
    model = next((info[k] for k in _MODEL_KEYS if info.get(k)), "")
    arm = " ".join(f"{k.split()[-1]}={info[k]}" for k in _ARM_KEYS if k in info)
    if arm:
        model = f"{model} ({arm})".strip() if model else arm
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "cpu_model": model or "unknown",
        "flags": " ".join(f for f in RELEVANT_FLAGS if f in flags),
        "cores": str(cores),
        "machine": machine,
        "os": system,
    }


def local_cpu_details() -> dict[str, str]:
    """CPU model name, relevant ISA flags, logical core count, machine and OS of this host."""
    path = Path("/proc/cpuinfo")
    text = path.read_text(errors="replace") if path.is_file() else ""
    return cpu_details_from_cpuinfo(text, cores=os.cpu_count() or 1, machine=platform.machine(),
                                    system=platform.system())


def fingerprint(details: Mapping[str, str]) -> str:
    """Stable 16-hex-digit hash of ``details`` (key order does not matter; values are compared as text)."""
    blob = json.dumps({str(k): str(v) for k, v in details.items()}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe_difference(theirs: Mapping[str, str], ours: Mapping[str, str]) -> str:
    """Human list of the detail fields that differ, e.g. ``cpu_model: 'A' (LUT) vs 'B' (here)``."""
    keys = sorted(set(theirs) | set(ours))
    diffs = [f"{k}: {theirs.get(k, '<absent>')!r} (LUT) vs {ours.get(k, '<absent>')!r} (here)"
             for k in keys if str(theirs.get(k)) != str(ours.get(k))]
    return "; ".join(diffs) if diffs else "details are equal but the fingerprints differ"
