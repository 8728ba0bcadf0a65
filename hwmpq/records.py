"""Plain, frozen, versioned records passed between stages.

Every record serialises to ``{"_type": name, "_version": n, "_data": {...}}`` and is rebuilt only
if its type is in the allow-list below (never by importing a name found in a file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

FLOAT_BITS = 32
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16, FLOAT_BITS)
OP_KINDS = ("conv", "dwconv", "linear")


class RecordError(ValueError):
    """A record (plan, LUT row, config) is malformed; the message says what and where."""


@dataclass(frozen=True, order=True)
class Precision:
    """Weight and activation bit-widths of one layer; 32 means float."""

    w_bits: int
    a_bits: int

    _version = 1

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise RecordError(f"Precision.{name} must be an int, got {bits!r}")
            if bits not in VALID_BITS:
                raise RecordError(f"Precision.{name}={bits} is not one of {VALID_BITS}")

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS

    @property
    def label(self) -> str:
        """Short human and column label: ``fp32``, ``w8a8``, ``w4a32``."""
        return "fp32" if self.is_float else f"w{self.w_bits}a{self.a_bits}"

    @classmethod
    def parse(cls, text: str) -> Precision:
        """Inverse of :attr:`label` (also accepts ``8`` for w8a8 and ``32``/``fp32`` for float)."""
        t = text.strip().lower()
        if t in ("fp32", "float", "32"):
            return cls(FLOAT_BITS, FLOAT_BITS)
        if t.isdigit():
            return cls(int(t), int(t))
        if t.startswith("w") and "a" in t:
            w, a = t[1:].split("a", 1)
            if w.isdigit() and a.isdigit():
                return cls(int(w), int(a))
        raise RecordError(f"cannot parse precision {text!r}; use e.g. fp32, w8a8, w4a8, 8")


FP32 = Precision(FLOAT_BITS, FLOAT_BITS)
W8A8 = Precision(8, 8)


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer as the hardware sees it: shapes only, plus its place in the model."""

    fqn: str
    kind: str  # conv | dwconv | linear
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    batch: int = 1
    bias: bool = True
    macs: int = 0
    params: int = 0

    _version = 1

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise RecordError(f"LayerSpec {self.fqn!r}: kind {self.kind!r} is not one of {OP_KINDS}")
        for name in ("kernel", "stride", "padding", "dilation", "in_hw", "out_hw"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @property
    def shape_fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "in_hw": list(self.in_hw),
            "batch": self.batch, "bias": self.bias,
        }

    @property
    def signature(self) -> str:
        """Stable hash of the shape fields: identical layers share one measurement."""
        blob = json.dumps(self.shape_fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.batch, self.in_channels)
        return (self.batch, self.in_channels, *self.in_hw)

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.batch, self.out_channels)
        return (self.batch, self.out_channels, *self.out_hw)


@dataclass(frozen=True)
class Edge:
    """A data edge between two quantizable layers (the consumer reads the producer's output,
    possibly through elementwise ops, pooling or a residual add)."""

    src: str
    dst: str
    tensor_shape: tuple[int, ...]
    # the elementwise activation applied on the way (after the last merge, if any): one of ACTIVATIONS.
    # ORT fuses it into a float conv, and ReLU6 (a Clip) costs a float conv far more than ReLU does.
    activation: str = "relu"
    # the merge the tensor passes through on the way: one of MERGES. A residual add between integer
    # layers is a float Add on dequantized inputs that also keeps ORT from folding the ReLU into the Q.
    merge: str = "none"
    # the one max pool the tensor passes through on the way (a ResNet stem's), as (kernel_h, kernel_w,
    # stride_h, stride_w, pad_h, pad_w); () if none (or one :func:`chains` cannot time: dilated, ceil mode)
    pool: tuple[int, ...] = ()

    _version = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensor_shape", tuple(int(v) for v in self.tensor_shape))
        object.__setattr__(self, "pool", tuple(int(v) for v in self.pool))
        if self.activation not in ACTIVATIONS:
            raise RecordError(f"Edge {self.src}->{self.dst}: activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.merge not in MERGES:
            raise RecordError(f"Edge {self.src}->{self.dst}: merge {self.merge!r} is not one of {MERGES}")
        if len(self.pool) not in (0, 6) or any(v < 0 for v in self.pool):
            raise RecordError(f"Edge {self.src}->{self.dst}: pool {self.pool!r} is not (kernel_h, kernel_w, stride_h, "
                              "stride_w, pad_h, pad_w)")

    @property
    def signature(self) -> str:
        """The stand-in chain's signature: the tensor shape (and the chains' :data:`CHAIN_VERSION`)."""
        key = ["chain", list(self.tensor_shape), CHAIN_VERSION]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def pair_signature(self, src: LayerSpec, dst: LayerSpec) -> str:
        """The signature of this edge timed with its own two layers (:func:`pair_signature`)."""
        return pair_signature(src, dst, self.activation, self.merge, self.pool)


ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "sigmoid", "silu")
MERGES = ("none", "add", "concat")


# What a transition chain holds between its two layers is the glue a target's exporter writes; when
# that glue changes, this version changes every transition signature, so a LUT's old chain rows are
# measured again instead of pricing glue the exporter no longer writes. 2: an activation the integer
# producer's quantizer absorbs is no longer in the chain (the exporter drops it); max pools in pair chains.
CHAIN_VERSION = 2


def pair_signature(src: LayerSpec, dst: LayerSpec, activation: str = "relu", merge: str = "none",
                   pool: tuple[int, ...] = ()) -> str:
    """Signature of a chain of two real layers joined by ``activation`` (after a residual add if ``merge``
    is "add", after the max pool ``pool`` if any): the transition of an edge measured with its own
    neighbours."""
    key = (["pair", src.signature, dst.signature, activation] + ([merge] if merge != "none" else [])
           + (["maxpool", *pool] if pool else []) + [CHAIN_VERSION])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def pooled_shape(shape: tuple[int, ...], pool: tuple[int, ...]) -> tuple[int, ...]:
    """The NCHW ``shape`` after the max pool ``pool`` (:attr:`Edge.pool`; no ceil mode, no dilation)."""
    if not pool:
        return tuple(shape)
    kh, kw, sh, sw, ph, pw = pool
    n, c, h, w = shape
    return (n, c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)


def chains(src: LayerSpec, dst: LayerSpec, edge: Edge) -> bool:
    """Whether ``src``'s output is ``dst``'s input as it stands (no reshaping between; at most the edge's
    max pool, and then no merge), so that the two layers can be timed as one two-layer chain."""
    if edge.pool:
        return (edge.merge == "none" and len(src.output_shape) == 4
                and pooled_shape(src.output_shape, edge.pool) == edge.tensor_shape == dst.input_shape)
    return src.output_shape == edge.tensor_shape == dst.input_shape and edge.merge in ("none", "add")


STATISTICS = ("median", "p10")


@dataclass(frozen=True)
class MeasureConfig:
    """The frozen measurement protocol, stored with every measurement, and the statistic readers quote.

    ``statistic``: every row keeps its median, p10 and p90; ``p10`` (the default) is quoted because on a
    shared machine the 10th percentile estimates the uncontended latency far more stably than the median
    (measured with ``lut validate`` here: the spread of LUT prediction errors within one validation run fell
    from 5-8% to 2.5-3.5% on mobilenetv2). It is how rows are read, not how they are measured, so it is
    not part of :attr:`key`.

    ``stable_pct`` (adaptive repeats, TVM's min_repeat_ms in spirit): the profiler stops timing a job after
    the round in which :meth:`is_stable` says its quoted statistic is known to +-stable_pct % (95%
    confidence), so ``repeat`` and ``rounds`` are maxima; 0 times every job ``repeat`` times. Whole-model
    measurements always take every repeat."""

    warmup: int = 30
    number: int = 1
    repeat: int = 100
    min_repeat_ms: float = 0.0
    threads: int = 1
    timeout_s: float = 60.0
    statistic: str = "p10"
    rounds: int = 5
    stable_pct: float = 1.0

    _version = 1

    def __post_init__(self) -> None:
        # 60 and 60.0 are one protocol: normalise numeric types so the key (and the LUT lookup) agree
        for name in ("warmup", "number", "repeat", "threads", "rounds"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("min_repeat_ms", "timeout_s", "stable_pct"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.warmup < 0 or self.number < 1 or self.repeat < 1 or self.threads < 1 or self.rounds < 1:
            raise RecordError(f"MeasureConfig needs warmup>=0, number>=1, repeat>=1, threads>=1, rounds>=1: {self}")
        if not 0.0 <= self.stable_pct < 100.0:
            raise RecordError(f"MeasureConfig.stable_pct must be in [0, 100), got {self.stable_pct}")
        if self.statistic not in STATISTICS:
            raise RecordError(f"MeasureConfig.statistic: {self.statistic!r} is not one of {STATISTICS}")

    @property
    def key(self) -> str:
        """The protocol's identity; hashed with statistic "median", the one statistic of LUTs written
        before p10 was quoted, and without ``rounds`` (it spreads the same samples over time, see
        :meth:`per_round`), so rows of older LUTs keep their keys."""
        d = dataclasses.asdict(self) | {"statistic": "median"}
        d.pop("rounds")
        if not self.stable_pct:  # the fixed-count protocol keeps the key it had before stable_pct existed
            d.pop("stable_pct")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def per_round(self) -> MeasureConfig:
        """The protocol of one round: ``repeat`` split into ``rounds`` slices (each a fresh session with its
        own warm-up), timed round-robin over many jobs so that a slow spell of a shared machine hits a
        slice of every job's samples, not all samples of a few jobs. Measured on this machine:
        two back-to-back single-round profiles of mobilenetv2_050 differed by -38%..+11% per row (5-95%)."""
        rounds = min(self.rounds, self.repeat)
        return dataclasses.replace(self, repeat=-(-self.repeat // rounds), rounds=1)

    def is_stable(self, latencies_ms: Sequence[float]) -> bool:
        """Whether the quoted statistic of these samples is known well enough to stop timing (adaptive
        repeats, ``stable_pct`` > 0): the distribution-free 95% confidence interval of the quantile (order
        statistics around rank q*n, binomial bounds) lies within +-``stable_pct`` % of the quoted value. No
        assumption on the latency distribution, which on a shared machine is skewed and has spells."""
        if not self.stable_pct or not latencies_ms:
            return False
        a = sorted(float(v) for v in latencies_ms)
        n, q = len(a), (0.5 if self.statistic == "median" else 0.1)
        half = 1.96 * math.sqrt(n * q * (1 - q))
        lo, hi = math.floor(n * q - half), math.ceil(n * q + half)
        if lo < 0 or hi > n - 1:  # too few samples for a two-sided interval
            return False
        quoted = self.quote(a)
        return quoted > 0 and (a[hi] - a[lo]) / 2 <= quoted * self.stable_pct / 100

    def quote(self, latencies_ms: Iterable[float]) -> float:
        """The quoted statistic of raw samples (p10 interpolated as numpy's default percentile)."""
        a = [float(v) for v in latencies_ms]
        if not a:
            raise ValueError("no latencies to quote")
        if self.statistic == "median" or len(a) == 1:
            return statistics.median(a)
        return statistics.quantiles(a, n=10, method="inclusive")[0]


@dataclass(frozen=True)
class Measurement:
    """One timed (signature, precision) on one device. Units are in the field names."""

    signature: str
    precision: Precision
    target: str
    device: str  # device fingerprint
    latency_ms: float | None
    p10_ms: float | None = None
    p90_ms: float | None = None
    n: int = 0
    energy_mj: float | None = None
    energy_source: str = "modeled"  # measured | modeled
    config: MeasureConfig = field(default_factory=MeasureConfig)
    kind: str = "layer"  # layer | transition | overhead
    src_precision: Precision | None = None  # transitions only: the producer's precision (``precision`` is the consumer's)
    emulated: bool = False
    error_msg: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    time_unix: float = 0.0

    _version = 1

    @property
    def ok(self) -> bool:
        return self.error_msg is None and self.latency_ms is not None

    def quoted_ms(self, statistic: str) -> float | None:
        """The latency a reader quoting ``statistic`` uses (None for a failed row)."""
        if not self.ok:
            return None
        return self.p10_ms if statistic == "p10" and self.p10_ms is not None else self.latency_ms


@dataclass(frozen=True)
class BuildResult:
    artifact: str | None
    error_msg: str | None = None

    _version = 1


@dataclass(frozen=True)
class RunResult:
    latencies_ms: tuple[float, ...] | None
    error_msg: str | None = None

    _version = 1


@dataclass(frozen=True)
class BitPlan:
    """Ordered per-layer precisions, keyed by fully-qualified module name (like torchao's FqnToConfig)."""

    layers: tuple[tuple[str, Precision], ...]
    model: str = ""
    target: str = ""
    notes: str = ""

    _version = 1

    def __post_init__(self) -> None:
        seen = set()
        for item in self.layers:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Precision)):
                raise RecordError(f"BitPlan entry must be (fqn, Precision), got {item!r}")
            if item[0] in seen:
                raise RecordError(f"BitPlan names layer {item[0]!r} twice")
            seen.add(item[0])

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Precision], **kw: str) -> BitPlan:
        return cls(tuple(mapping.items()), **kw)

    @classmethod
    def uniform(cls, fqns: Iterable[str], precision: Precision, **kw: str) -> BitPlan:
        return cls(tuple((f, precision) for f in fqns), **kw)

    def as_dict(self) -> dict[str, Precision]:
        return dict(self.layers)

    def __getitem__(self, fqn: str) -> Precision:
        return self.as_dict()[fqn]

    def __len__(self) -> int:
        return len(self.layers)

    def validate_against(self, fqns: Iterable[str], allowed: Mapping[str, Iterable[Precision]] | None = None) -> None:
        """Refuse a plan that names layers the model lacks, misses layers, or uses precisions a target
        cannot run for that layer (``allowed``: fqn -> precisions)."""
        names = list(fqns)
        plan = self.as_dict()
        unknown = [f for f in plan if f not in names]
        if unknown:
            raise RecordError(f"plan names layers the model does not have: {unknown}; model layers: {names}")
        missing = [f for f in names if f not in plan]
        if missing:
            raise RecordError(f"plan has no precision for layers: {missing}")
        if allowed is not None:
            for f, p in plan.items():
                ok = list(allowed.get(f, ()))
                if p not in ok:
                    raise RecordError(
                        f"plan layer {f!r}: {p.label} cannot run on the target; allowed: {[q.label for q in ok]}"
                    )


# ---------------------------------------------------------------- versioned JSON

_REGISTRY: dict[str, type] = {
    c.__name__: c
    for c in (Precision, LayerSpec, Edge, MeasureConfig, Measurement, BuildResult, RunResult, BitPlan)
}


# records defined beside the code that owns them: the allow-list names them here, in one place, and their
# module is imported only when such a record is read (never a name taken from the file itself)
_ELSEWHERE: dict[str, str] = {
    "QATOptions": "hwmpq.qat_options",
    "TrainResult": "hwmpq.train",
    "SAQConfig": "hwmpq.search.saq",
}


def _record_class(name: str) -> type | None:
    if name not in _REGISTRY and name in _ELSEWHERE:
        import importlib

        _REGISTRY[name] = getattr(importlib.import_module(_ELSEWHERE[name]), name)
    return _REGISTRY.get(name)


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        data = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"_type": type(obj).__name__, "_version": getattr(obj, "_version", 1), "_data": data}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def from_jsonable(obj: Any, where: str = "$") -> Any:
    if isinstance(obj, dict) and "_type" in obj:
        name = obj.get("_type")
        cls = _record_class(name) if isinstance(name, str) else None
        if cls is None:
            raise RecordError(f"{where}: unknown record type {name!r}; known: {sorted({*_REGISTRY, *_ELSEWHERE})}")
        version = obj.get("_version")
        if version != getattr(cls, "_version", 1):
            raise RecordError(f"{where}: {name} version {version!r} is not supported (expected {cls._version})")
        data = obj.get("_data")
        if not isinstance(data, dict):
            raise RecordError(f"{where}: {name} has no _data object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(data) - set(fields)
        if extra:
            raise RecordError(f"{where}: {name} has unknown fields {sorted(extra)}")
        kwargs = {k: _coerce(from_jsonable(v, f"{where}.{k}"), fields[k].type) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise RecordError(f"{where}: cannot build {name}: {e}") from None
        except RecordError as e:  # the record's own check: add where it is in the file
            raise RecordError(f"{where}: {e}") from None
    if isinstance(obj, list):
        return [from_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {k: from_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    return obj


def _coerce(value: Any, annotation: Any) -> Any:
    """JSON has no tuples: turn lists back into (nested) tuples where the field is a tuple."""
    if isinstance(value, list) and "tuple" in str(annotation):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def to_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=1, sort_keys=False)


def from_json(text: str, expected: type | None = None, where: str = "$") -> Any:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not valid JSON: {e}") from None
    obj = from_jsonable(raw, where)
    if expected is not None and not isinstance(obj, expected):
        raise RecordError(f"{where}: expected a {expected.__name__}, got {type(obj).__name__}")
    return obj


def save_record(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def load_record(path: str | os.PathLike, expected: type | None = None) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"{p}: no such file")
    return from_json(p.read_text(), expected, where=str(p))


def save_plan(plan: BitPlan, path: str | os.PathLike) -> None:
    save_record(plan, path)


def load_plan(path: str | os.PathLike) -> BitPlan:
    return load_record(path, BitPlan)
