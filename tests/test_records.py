"""Records: JSON round trip of every record type, and malformed input that says what and where."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwmpq import records
from hwmpq.records import (
    FP32,
    VALID_BITS,
    BitPlan,
    BuildResult,
    Edge,
    LayerSpec,
    MeasureConfig,
    Measurement,
    Precision,
    RecordError,
    RunResult,
    from_json,
    load_plan,
    load_record,
    save_plan,
    to_json,
)

P44, P48, P88 = Precision(4, 4), Precision(4, 8), Precision(8, 8)
SPEC = LayerSpec("layers.0.conv1", "conv", 16, 32, kernel=(3, 3), stride=(2, 2), padding=(1, 1), in_hw=(32, 32),
                 out_hw=(16, 16), batch=1, bias=False, macs=1_179_648, params=4608)
EXAMPLES = {
    "Precision": P48,
    "LayerSpec": SPEC,
    "Edge": Edge("conv1", "conv2", (1, 16, 32, 32)),
    "MeasureConfig": MeasureConfig(warmup=5, repeat=20, min_repeat_ms=1.5, threads=2, timeout_s=3.0),
    "Measurement": Measurement("abc123", P88, "ort-x86", "dev0", 0.25, p10_ms=0.2, p90_ms=0.3, n=20,
                               energy_mj=0.01, config=MeasureConfig(repeat=20), kind="transition",
                               src_precision=P44, versions={"onnxruntime": "1.31"}, time_unix=1.7e9),
    "Measurement_error": Measurement("abc123", FP32, "tvm-arm", "dev1", None, error_msg="build failed: x"),
    "BuildResult": BuildResult("/tmp/a.so"),
    "RunResult": RunResult((0.1, 0.2, 0.15), None),
    "RunResult_timeout": RunResult(None, "timeout after 3 s"),
    "BitPlan": BitPlan((("conv1", P88), ("fc", FP32), ("conv2", P44)), model="resnet20", target="ort-x86",
                       notes="ssps"),
}


def _extra_examples() -> dict[str, object]:
    from hwmpq.qat_options import QATOptions
    from hwmpq.train import TrainResult

    return {"QATOptions": QATOptions(sam=True, rho=0.1, grad_boost=True),
            "TrainResult": TrainResult(1, ({"epoch": 1, "val_acc": 0.5},), 0.5, None)}


@pytest.mark.parametrize("name", [*EXAMPLES, "QATOptions", "TrainResult"])
def test_round_trip(name, tmp_path: Path):
    obj = {**EXAMPLES, **_extra_examples()}[name]
    text = to_json(obj)
    assert json.loads(text)["_type"] == type(obj).__name__ and json.loads(text)["_version"] == 1
    back = from_json(text, type(obj))
    assert back == obj and type(back) is type(obj)
    records.save_record(obj, tmp_path / "r.json")
    assert load_record(tmp_path / "r.json", type(obj)) == obj


def test_every_record_class_of_records_module_has_an_example():
    classes = {n for n, c in inspect.getmembers(records, inspect.isclass)
               if dataclasses.is_dataclass(c) and c.__module__ == records.__name__}
    assert classes <= {k.split("_")[0] for k in EXAMPLES}, classes


def test_records_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        P48.w_bits = 2  # type: ignore[misc]


def test_signature_depends_on_shape_only():
    renamed = dataclasses.replace(SPEC, fqn="other", macs=0, params=0)
    assert renamed.signature == SPEC.signature
    assert dataclasses.replace(SPEC, stride=(1, 1)).signature != SPEC.signature


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a busy shared CPU
@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True),
                          st.sampled_from(VALID_BITS), st.sampled_from(VALID_BITS)), max_size=12,
                unique_by=lambda t: t[0]))
def test_bitplan_round_trip_any(entries):
    plan = BitPlan(tuple((f, Precision(w, a)) for f, w, a in entries))
    back = from_json(to_json(plan), BitPlan)
    assert back == plan and list(back.as_dict()) == [f for f, _, _ in entries]  # order kept


def test_precision_parse_and_label():
    assert Precision.parse("w4a8") == P48 and Precision.parse("8") == P88 and Precision.parse("fp32") == FP32
    assert P48.label == "w4a8" and FP32.label == "fp32"
    with pytest.raises(RecordError, match="cannot parse precision 'w4'"):
        Precision.parse("w4")


@pytest.mark.parametrize("kwargs,match", [
    (dict(w_bits=9, a_bits=8), r"Precision.w_bits=9 is not one of"),
    (dict(w_bits=8, a_bits=1), r"Precision.a_bits=1 is not one of"),
    (dict(w_bits=8.0, a_bits=8), r"w_bits must be an int"),
    (dict(w_bits=True, a_bits=8), r"w_bits must be an int"),
])
def test_bad_precision(kwargs, match):
    with pytest.raises(RecordError, match=match):
        Precision(**kwargs)


def _plan_json(**override) -> dict:
    raw = json.loads(to_json(EXAMPLES["BitPlan"]))
    raw.update(override)
    return raw


@pytest.mark.parametrize("text,match", [
    ('{"_type": "BitPlan", ', r"plan.json: not valid JSON"),
    (json.dumps(_plan_json(_type="Evil")), r"plan.json: unknown record type 'Evil'"),
    (json.dumps(_plan_json(_version=7)), r"plan.json: BitPlan version 7 is not supported"),
    (json.dumps(_plan_json(_data=[1])), r"plan.json: BitPlan has no _data object"),
    (json.dumps({"_type": "BitPlan", "_version": 1, "_data": {"layers": [], "colour": 1}}),
     r"plan.json: BitPlan has unknown fields \['colour'\]"),
    (json.dumps({"_type": "BitPlan", "_version": 1, "_data": {"layers": [["conv1", {
        "_type": "Precision", "_version": 1, "_data": {"w_bits": 9, "a_bits": 8}}]]}}),
     r"plan.json.layers\[0\]\[1\]: Precision.w_bits=9 is not one of"),
    (json.dumps({"_type": "BitPlan", "_version": 1, "_data": {"layers": [["conv1", 8]]}}),
     r"plan.json: BitPlan entry must be \(fqn, Precision\), got \('conv1', 8\)"),
    (json.dumps({"_type": "BitPlan", "_version": 1, "_data": {}}), r"plan.json: cannot build BitPlan"),
    (json.dumps(json.loads(to_json(P88))), r"plan.json: expected a BitPlan, got Precision"),
], ids=["truncated", "unknown-type", "version", "no-data", "extra-field", "bad-bits", "bad-entry", "missing-field",
        "wrong-type"])
def test_malformed_plan_file(tmp_path: Path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(RecordError, match=match):
        load_plan(path)


def test_duplicate_layer_and_missing_file(tmp_path: Path):
    with pytest.raises(RecordError, match="names layer 'a' twice"):
        BitPlan((("a", P88), ("a", P44)))
    with pytest.raises(RecordError, match="nope.json: no such file"):
        load_plan(tmp_path / "nope.json")


def test_validate_against_model_and_target(tmp_path: Path):
    plan = BitPlan.from_dict({"conv1": P88, "fc": P44})
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json") == plan
    plan.validate_against(["conv1", "fc"], {"conv1": [P88, FP32], "fc": [P44]})
    with pytest.raises(RecordError, match=r"layers the model does not have: \['fc'\]"):
        plan.validate_against(["conv1"])
    with pytest.raises(RecordError, match=r"no precision for layers: \['conv2'\]"):
        plan.validate_against(["conv1", "conv2", "fc"])
    with pytest.raises(RecordError, match=r"plan layer 'fc': w4a4 cannot run on the target; allowed: \['w8a8'\]"):
        plan.validate_against(["conv1", "fc"], {"conv1": [P88], "fc": [P88]})


def test_measure_config_rejects_bad_protocol():
    with pytest.raises(RecordError, match="repeat>=1"):
        MeasureConfig(repeat=0)
    with pytest.raises(RecordError, match="'mean' is not one of"):
        MeasureConfig(statistic="mean")
    assert MeasureConfig().key == MeasureConfig().key != MeasureConfig(repeat=5).key


def test_the_statistic_is_how_rows_are_read_not_part_of_the_protocol_key():
    # a LUT written when only the median was quoted (with a fixed repeat count: stable_pct 0) keeps its keys
    fixed = dict(stable_pct=0.0)
    assert MeasureConfig(statistic="p10", **fixed).key == MeasureConfig(statistic="median", **fixed).key \
        == "fa7bf0b7e529"  # the default key before p10 and adaptive repeats
    assert MeasureConfig(statistic="p10").key == MeasureConfig(statistic="median").key  # adaptive repeats too
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 100.0]
    assert MeasureConfig(statistic="median").quote(samples) == pytest.approx(np.median(samples))
    assert MeasureConfig(statistic="p10").quote(samples) == pytest.approx(np.percentile(samples, 10))
    rng = np.random.default_rng(0)
    for n in range(1, 40):  # the same p10 as the ORT timing summary (numpy's percentile), at every size
        x = rng.exponential(size=n).tolist()
        assert MeasureConfig(statistic="p10").quote(x) == pytest.approx(np.percentile(x, 10))
    m = Measurement("s", P88, "t", "d", latency_ms=2.0, p10_ms=1.5)
    assert (m.quoted_ms("p10"), m.quoted_ms("median")) == (1.5, 2.0)
    assert Measurement("s", P88, "t", "d", latency_ms=None, error_msg="boom").quoted_ms("p10") is None


def test_layerspec_rejects_unknown_kind():
    with pytest.raises(RecordError, match="kind 'lstm' is not one of"):
        LayerSpec("x", "lstm", 1, 1)


def test_records_defined_elsewhere_round_trip_through_the_one_allow_list():
    from hwmpq.qat_options import QATOptions
    from hwmpq.records import from_json, to_json
    from hwmpq.search.saq import SAQConfig

    for rec in (QATOptions(sam=True, rho=0.1), SAQConfig()):
        assert from_json(to_json(rec)) == rec
