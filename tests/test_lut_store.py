"""The SQLite LUT store: real measurements in and out (fake target and real ONNX Runtime), refusal of
corrupted and foreign files, export/import round trips, merge, and the ``lut`` CLI."""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from hwmpq.device import cpu_details_from_cpuinfo, fingerprint
from hwmpq.graph import analyse
from hwmpq.lut.cli import register
from hwmpq.lut.io import export_lut, import_lut, merge
from hwmpq.lut.schema import OLDEST_UPGRADABLE
from hwmpq.lut.store import SCHEMA_VERSION, CorruptLutError, ForeignLutError, LutError, LutStore
from hwmpq.profilers.runner import profile
from hwmpq.records import FP32, W8A8, MeasureConfig, Measurement
from hwmpq.targets import get_target
from hwmpq.targets.base import DeviceInfo
from hwmpq.zoo import create_model

FAST = MeasureConfig(warmup=2, repeat=5)


@pytest.fixture(scope="module")
def tiny_graph():
    return analyse(create_model("test_tiny", in_chans=1), torch.zeros(1, 1, 8, 8))


def _profiled(path, target, graph, config=FAST, **kw) -> LutStore:
    store = LutStore.open(path, target=target.id, device=target.device())
    profile(*graph, target, store, config, progress=False, **kw)
    return store


@pytest.fixture
def fake_lut(tmp_path, tiny_graph):
    store = _profiled(tmp_path / "fake.lut", get_target("fake"), tiny_graph)
    yield store
    store.close()


def _key(m: Measurement):
    return (m.kind, m.signature, m.precision, m.src_precision, m.config.key)


def test_fingerprint_is_stable_and_sensitive():
    text = "processor: 0\nmodel name\t: Some CPU\nflags\t: fpu avx2 avx512_vnni amx_int8 sse4_2\n"
    d = cpu_details_from_cpuinfo(text, cores=2, machine="x86_64", system="Linux")
    assert d["cpu_model"] == "Some CPU" and d["flags"] == "sse4_2 avx2 avx512_vnni amx_int8"
    assert fingerprint(d) == fingerprint(dict(reversed(list(d.items()))))
    assert fingerprint(d) != fingerprint({**d, "cores": "4"})


def test_fake_measurements_round_trip(fake_lut, tiny_graph):
    specs, _ = tiny_graph
    rows = fake_lut.measurements()
    prec = get_target("fake").precisions
    assert len(rows) == len({s.signature for s in specs}) * len(prec.conv) == len(fake_lut)
    for m in rows:
        assert fake_lut.get(m.kind, m.signature, m.precision, FAST, m.src_precision) == m
        assert m.ok and m.n == FAST.repeat and m.p10_ms <= m.latency_ms <= m.p90_ms
    assert fake_lut.get("layer", specs[0].signature, W8A8, MeasureConfig(repeat=6)) is None  # other protocol
    df = fake_lut.frame()
    assert len(df) == len(rows) and df["ok"].all()
    for col in ("latency_ms", "p10_ms", "p90_ms", "w_bits", "a_bits", "n", "min_repeat_ms"):
        assert pd.api.types.is_numeric_dtype(df[col]), col
    assert set(df["precision"]) == {p.label for p in prec.conv}


def test_real_ort_measurements_and_device_check(tmp_path, tiny_graph):
    target = get_target("ort-x86", threads=1, workdir=str(tmp_path / "onnx"))  # built models go there
    path = tmp_path / "ort.lut"
    with _profiled(path, target, tiny_graph) as store:
        rows = store.measurements()
        kinds = {m.kind for m in rows}
        assert kinds == {"layer", "transition", "overhead"}
        ok = [m for m in rows if m.ok]
        assert len(ok) >= 0.9 * len(rows), [m.error_msg for m in rows if not m.ok][:3]
        assert all(0 < m.p10_ms <= m.latency_ms <= m.p90_ms < 1000 for m in ok)
        assert all(m.versions.get("onnxruntime") and m.device == target.device().fingerprint for m in rows)
        layer_energy = [m.energy_mj for m in ok if m.kind == "layer"]
        assert all(e is not None and e > 0 for e in layer_energy)  # the target's modeled energy
        df = store.frame()
        assert (df["shape"].notna()).all()
    # the same device reopens; the same CPU with another thread count is another device
    LutStore.open(path, target=target.id, device=target.device()).close()
    with pytest.raises(ForeignLutError, match="threads"):
        LutStore.open(path, target=target.id, device=get_target("ort-x86", threads=2).device())


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "other_sqlite", "no_meta_rows"])
def test_corrupted_files_raise_clear_errors(tmp_path, fake_lut, damage):
    bad = tmp_path / f"{damage}.lut"
    fake_lut.close()
    data = fake_lut.path.read_bytes()
    if damage == "random":
        bad.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "other_sqlite":
        conn = sqlite3.connect(bad)
        conn.execute("CREATE TABLE results (x)")
        conn.commit()
        conn.close()
    else:
        bad.write_bytes(data)
        conn = sqlite3.connect(bad)
        conn.execute("DELETE FROM meta")
        conn.commit()
        conn.close()
    for opener in (lambda: LutStore.read(bad), lambda: LutStore.open(bad, target="fake",
                                                                         device=get_target("fake").device())):
        with pytest.raises(CorruptLutError) as err:
            opener()
        assert str(bad) in str(err.value)
    with pytest.raises(LutError, match="no such LUT"):
        LutStore.read(tmp_path / "missing.lut")


def _set_meta(path, key, value):
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value=? WHERE key=?", (value, key))
    conn.commit()
    conn.close()


def test_foreign_device_target_schema_refused_then_forced(fake_lut):
    fake = get_target("fake")
    path = fake_lut.path
    some = fake_lut.measurements()[0]
    fake_lut.close()
    other = DeviceInfo("0123456789abcdef", {"kind": "board"})
    with pytest.raises(ForeignLutError) as err:
        LutStore.open(path, target="fake", device=other)
    text = str(err.value)
    assert "fake-device-0" in text and "0123456789abcdef" in text and "--force" in text
    with pytest.raises(ForeignLutError, match="target 'fake' .*'ort-x86'"):
        LutStore.open(path, target="ort-x86", device=fake.device())
    with pytest.warns(UserWarning, match="foreign LUT"):
        forced = LutStore.open(path, target="fake", device=other, force=True)
    with forced:  # knowingly: the other device's rows answer queries
        assert forced.get(some.kind, some.signature, some.precision, FAST, some.src_precision) == some
    _set_meta(path, "schema_version", str(SCHEMA_VERSION + 98))
    with pytest.raises(ForeignLutError, match=f"schema version {SCHEMA_VERSION + 98}"):
        LutStore.open(path, target="fake", device=fake.device())
    with pytest.warns(UserWarning):
        LutStore.open(path, target="fake", device=fake.device(), force=True).close()
    LutStore.read(path).close()  # analysis never checks the device


def _as_version(path, version: int) -> None:
    """Rewrite a LUT of this schema version as a file of ``version`` (its rows renumbered, no inflight table)."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE inflight")
    conn.execute("UPDATE measurements SET schema_version=?", (version,))
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    conn.commit()
    conn.close()


def test_an_older_lut_is_upgraded_in_place_once(fake_lut):
    fake = get_target("fake")
    path, rows = fake_lut.path, sorted(fake_lut.measurements(), key=_key)
    fake_lut.close()
    _as_version(path, OLDEST_UPGRADABLE)
    with LutStore.open(path, target="fake", device=fake.device()) as store:  # not foreign: upgraded
        assert store.schema_version == SCHEMA_VERSION
        assert sorted(store.measurements(), key=_key) == rows
        store.add(dataclasses.replace(rows[0], latency_ms=1.5))  # writes (and the inflight table) work
        assert store.get(rows[0].kind, rows[0].signature, rows[0].precision, FAST, rows[0].src_precision).latency_ms == 1.5
    conn = sqlite3.connect(path)
    assert {r[0] for r in conn.execute("SELECT DISTINCT schema_version FROM measurements")} == {SCHEMA_VERSION}
    assert conn.execute("SELECT COUNT(*) FROM inflight").fetchone()[0] == 0
    conn.close()


def test_a_lut_older_than_the_migration_is_refused_naming_both_versions(fake_lut):
    fake = get_target("fake")
    path = fake_lut.path
    fake_lut.close()
    _as_version(path, OLDEST_UPGRADABLE - 1)
    with pytest.raises(ForeignLutError, match=rf"schema version {OLDEST_UPGRADABLE - 1} \(this hwmpq reads version "
                                              rf"{SCHEMA_VERSION}; .*cannot be upgraded"):
        LutStore.open(path, target="fake", device=fake.device())
    with LutStore.read(path) as store:  # analysis still reads it, as it was written
        assert store.schema_version == OLDEST_UPGRADABLE - 1 and len(store) > 0


def test_an_older_read_only_lut_says_it_must_be_writable_to_upgrade(fake_lut):
    if os.geteuid() == 0:
        pytest.skip("root writes read-only files")
    path = fake_lut.path
    fake_lut.close()
    _as_version(path, OLDEST_UPGRADABLE)
    os.chmod(path, 0o444)
    with pytest.raises(LutError, match=rf"schema version {OLDEST_UPGRADABLE}.*to version {SCHEMA_VERSION}.*writable"):
        LutStore.read(path)


def test_an_export_of_an_older_version_imports_and_one_too_old_is_refused(tmp_path, fake_lut):
    out = tmp_path / "old.csv"
    export_lut(fake_lut, out, "csv")
    df = pd.read_csv(out, dtype=str)  # every column as written
    df["schema_version"] = OLDEST_UPGRADABLE
    df.to_csv(out, index=False)
    fake = get_target("fake")
    with LutStore.open(tmp_path / "new.lut", target="fake", device=fake.device()) as into:
        assert import_lut(out, into).added == len(fake_lut.measurements())
        assert {m.precision for m in into.measurements()} == {m.precision for m in fake_lut.measurements()}
    df["schema_version"] = OLDEST_UPGRADABLE - 1
    df.to_csv(out, index=False)
    with LutStore.open(tmp_path / "other.lut", target="fake", device=fake.device()) as into:
        with pytest.raises(ForeignLutError, match=f"schema version {OLDEST_UPGRADABLE - 1}"):
            import_lut(out, into)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_import_round_trip(tmp_path, fake_lut, fmt):
    failed = Measurement("deadbeef00000000", FP32, "fake", "fake-device-0", None, config=FAST,
                         error_msg="build failed: no kernel, with, commas", versions={"x": "1"}, time_unix=5.0)
    fake_lut.add(failed)
    out = tmp_path / f"lut.{fmt}"
    assert export_lut(fake_lut, out, fmt) == len(fake_lut)
    fake = get_target("fake")
    with LutStore.open(tmp_path / "copy.lut", target="fake", device=fake.device()) as copy:
        rep = import_lut(out, copy)
        assert rep.added == len(fake_lut) and rep.foreign == 0
        got = sorted(copy.measurements(), key=lambda m: repr(_key(m)))
        want = sorted(fake_lut.measurements(), key=lambda m: repr(_key(m)))
        assert got == want
        assert copy.shapes() == fake_lut.shapes()
    with LutStore.open(tmp_path / "other.lut", target="fake", device=DeviceInfo("ffff", {})) as foreign:
        with pytest.raises(ForeignLutError, match="another device"):
            import_lut(out, foreign)
        with pytest.warns(UserWarning):
            assert import_lut(out, foreign, force=True).foreign == len(fake_lut)
    (tmp_path / f"junk.{fmt}").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LutError):
        import_lut(tmp_path / f"junk.{fmt}", fake_lut)


def test_merge_prefers_ok_then_newer(tmp_path, fake_lut, tiny_graph):
    fake = get_target("fake")
    rows = fake_lut.measurements()
    with LutStore.open(tmp_path / "b.lut", target="fake", device=fake.device()) as b:
        newer = dataclasses.replace(rows[0], latency_ms=123.0, time_unix=rows[0].time_unix + 10)
        broken = dataclasses.replace(rows[1], latency_ms=None, error_msg="run failed", time_unix=rows[1].time_unix + 10)
        extra = dataclasses.replace(rows[2], config=MeasureConfig(repeat=7))
        for m in (newer, broken, extra):
            b.add(m)
        rep = merge(fake_lut, b)
    assert (rep.added, rep.replaced, rep.kept) == (1, 1, 1)
    assert fake_lut.get(rows[0].kind, rows[0].signature, rows[0].precision, FAST).latency_ms == 123.0
    assert fake_lut.get(rows[1].kind, rows[1].signature, rows[1].precision, FAST).ok  # ok beats failed
    assert len(fake_lut) == len(rows) + 1
    with LutStore.open(tmp_path / "c.lut", target="fake", device=DeviceInfo("eeee", {})) as c:
        c.add(dataclasses.replace(rows[0], device="eeee"))
        with pytest.raises(ForeignLutError):
            merge(fake_lut, c)


@pytest.mark.slow
def test_lut_cli_show_plot_export_import_merge(tmp_path, fake_lut):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    fake_lut.close()
    path = str(fake_lut.path)
    png = tmp_path / "heat.png"
    res = runner.invoke(app, ["lut", "show", path, "--plot", str(png), "--model", "test_tiny"])
    assert res.exit_code == 0, res.output
    assert "conv1" in res.output and "w8a8" in res.output and "fp32" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = runner.invoke(app, ["lut", "show", path, "--value", "p90_ms"])
    assert res.exit_code == 0 and "layers: p90_ms" in res.output, res.output
    assert runner.invoke(app, ["lut", "show", path, "--value", "speed"]).exit_code == 2
    res = runner.invoke(app, ["lut", "export", path, "--format", "csv", "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["lut", "import", str(tmp_path / "x.csv"), "--into", str(tmp_path / "y.lut")])
    assert res.exit_code == 0 and "added" in res.output, res.output
    res = runner.invoke(app, ["lut", "merge", path, str(tmp_path / "y.lut"), "--out", str(tmp_path / "z.lut")])
    assert res.exit_code == 0, res.output
    with LutStore.read(tmp_path / "z.lut") as z, LutStore.read(path) as a:
        assert len(z) == len(a) and z.meta["device"] == a.meta["device"]
    (tmp_path / "bad.lut").write_bytes(os.urandom(3000))
    res = runner.invoke(app, ["lut", "show", str(tmp_path / "bad.lut")])
    assert res.exit_code == 2 and "not a readable hwmpq LUT" in res.output
