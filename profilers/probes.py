"""What a profile measures besides the model's own layers: the speed probes that gate every comparison
with a LUT, and the target's transition stand-ins."""

from __future__ import annotations

from collections.abc import Sequence

from hwmpq.records import Edge, LayerSpec

from .jobs import timed_as_pair

# The speed reference: one fixed fp32 conv profiled into every LUT and timed again beside whatever is later
# compared with the LUT (``lut validate``). This shared 2-vCPU machine runs 1.3-1.5x slower for minutes at
# a time (the same 53 mobilenetv2 rows summed to 3.99 ms, then 3.03 ms two minutes later); the reference
# tells such a shift of the machine's speed apart from an error of the latency model.
REFERENCE = LayerSpec("speed_reference", "conv", 32, 32, (3, 3), padding=(1, 1), in_hw=(16, 16), out_hw=(16, 16),
                      bias=False, macs=32 * 32 * 9 * 16 * 16, params=32 * 32 * 9)
# The reference stays in L2 and misses most slow spells of the shared L3 and memory, which whole models feel:
# a 1x1 conv streaming 1 MB in and 1 MB out (beyond the 1 MB L2) follows whole fp32 models' window-to-window
# times with log correlation +0.89..+0.92 against the reference's +0.78..+0.83
# (`git show eac1d54:bench/ort/bench_speed_probes.py`).
MEMORY_REFERENCE = LayerSpec("speed_reference_memory", "conv", 256, 256, (1, 1), in_hw=(32, 32), out_hw=(32, 32),
                             bias=False, macs=256 * 256 * 32 * 32, params=256 * 256)
SPEED_PROBES = (REFERENCE, MEMORY_REFERENCE)  # both are profiled into every LUT and gate every comparison


def profiling_specs(specs: Sequence[LayerSpec], edges: Sequence[Edge], target) -> list[LayerSpec]:
    """``specs`` plus the :data:`SPEED_PROBES` and the target's transition stand-ins (one per tensor
    shape of the edges not timed with their own two layers), which must be profiled as layers for
    ``hwmpq.lut.model.build_table`` to turn chain times into transition costs."""
    known = {s.signature for s in specs}
    by_fqn = {s.fqn: s for s in specs}
    specs = list(specs) + [p for p in SPEED_PROBES if p.signature not in known]
    if not target.capabilities.transitions:
        return specs
    extra = {}
    for e in edges:
        if e.src in by_fqn and e.dst in by_fqn and timed_as_pair(e, by_fqn, target):
            continue
        st = target.transition_stand_in(e.tensor_shape)
        extra.setdefault(st.signature, st)
    return specs + [s for sig, s in extra.items() if sig not in known]
