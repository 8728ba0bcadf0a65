"""What a profile costs and what it measures: ``--precisions`` (the default leaves out what the target only
emulates, and says so; the LUT records what it covers and its table offers only that), adaptive repeats
(``MeasureConfig.stable_pct``: a job stops once its quoted statistic is known well enough) and the time per
phase at the end. Real ORT sessions on the small zoo model."""

from __future__ import annotations

import random

import pytest
from typer.testing import CliRunner

from hwmpq.records import FP32, MeasureConfig, Precision

W8A8, W4A8 = Precision(8, 8), Precision(4, 8)
pytestmark = pytest.mark.filterwarnings("ignore:.*transition entries are not in the LUT")  # --no-transitions
QUICK = ["--target", "ort-x86", "--model", "test_small", "--warmup", "2", "--repeat", "20", "--rounds", "1",
         "--no-context", "--no-transitions"]


def _cli(args):
    import typer

    from hwmpq.profilers.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands: `profile` stays a named subcommand
    return CliRunner().invoke(app, ["profile", *args])


def _table(lut):
    from hwmpq.lut.model import build_table
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.cli import load_model_and_graph
    from hwmpq.targets import get_target

    _, _, specs, edges = load_model_and_graph("test_small", None, None)
    target = get_target("ort-x86")
    with LutStore.read(lut) as store:
        config = store.measurements("layer")[0].config
        return build_table(store, specs, edges, config, target), store.precisions, store.measurements("layer")


def test_is_stable_asks_for_a_tight_confidence_interval_of_the_quoted_quantile():
    rng = random.Random(0)
    tight = [1.0 + 0.001 * rng.random() for _ in range(40)]
    spread = [1.0 + 0.2 * rng.random() for _ in range(40)]
    cfg = MeasureConfig(stable_pct=1.0)
    assert cfg.is_stable(tight)
    assert not cfg.is_stable(spread)  # p10's interval spans about x_(1)..x_(9): ~4% of 1.0 here
    assert MeasureConfig(stable_pct=10.0).is_stable(spread)
    assert not cfg.is_stable(tight[:20])  # too few samples for a two-sided interval of p10
    assert not MeasureConfig(stable_pct=0.0).is_stable(tight)  # fixed count: never stops early
    assert MeasureConfig(stable_pct=1.0, statistic="median").is_stable(tight[:20])
    with pytest.raises(ValueError, match="stable_pct"):
        MeasureConfig(stable_pct=-1)
    assert MeasureConfig(stable_pct=0).key != MeasureConfig(stable_pct=1).key  # another protocol


def test_default_precisions_leave_out_the_emulated_ones_and_the_lut_records_what_it_covers(tmp_path):
    lut = tmp_path / "cpu.lut"
    done = _cli([*QUICK, "--lut", str(lut)])
    assert done.exit_code == 0, done.output
    text = " ".join(done.output.split())
    assert "not w4a8, w16a16 (ort-x86 runs them as float compute between Q/DQ" in text, text
    assert "profiled in" in text and "layer runs" in text and "graph" in text, text  # time per phase
    table, covered, rows = _table(lut)
    native = {FP32, W8A8, Precision(4, 32)}
    assert set(covered) == native and {m.precision for m in rows} <= native
    assert set(table.candidates) == {FP32, W8A8, Precision(4, 32)} & {m.precision for m in rows}

    more = _cli([*QUICK, "--lut", str(lut), "--precisions", "fp32,w8a8,w4a8"])  # adds w4a8 only
    assert more.exit_code == 0, more.output
    table, covered, rows = _table(lut)
    assert W4A8 in covered and FP32 in covered and W4A8 in table.candidates
    assert {m.precision for m in rows} >= {FP32, W8A8, W4A8}
    assert "already in" in more.output


def test_unknown_precisions_are_refused_before_any_work(tmp_path):
    lut = tmp_path / "cpu.lut"
    bad = _cli([*QUICK, "--lut", str(lut), "--precisions", "fp32,w3a3"])
    assert bad.exit_code == 2
    assert "w3a3" in bad.output and "offers" in bad.output, bad.output
    bad = _cli([*QUICK, "--lut", str(lut), "--precisions", "fast"])
    assert bad.exit_code == 2 and "not a label" in bad.output, bad.output
    assert not lut.exists()


def test_adaptive_repeats_stop_stable_jobs_early_and_fixed_counts_take_every_repeat(tmp_path):

    import hwmpq
    from hwmpq.api import ProfileOptions
    from hwmpq.lut.store import LutStore
    from hwmpq.modelspec import load_model_and_input

    net, x = load_model_and_input("test_small", None, None)
    opts = ProfileOptions(progress=False, transitions=False, precisions="fp32,w8a8", table=False)
    loose = MeasureConfig(warmup=2, repeat=200, rounds=10, stable_pct=25.0)
    res = hwmpq.profile(net, x, target="ort-x86", lut=tmp_path / "a.lut", config=loose, context=False, options=opts)
    with LutStore.read(tmp_path / "a.lut") as store:
        ns = [m.n for m in store.measurements("layer")]
    assert ns and all(n < 200 for n in ns) and all(n >= 40 for n in ns), ns  # >= 2 rounds of 20, < all 10
    assert dict(res.phase_s)["layer runs"] > 0

    fixed = MeasureConfig(warmup=2, repeat=40, rounds=2, stable_pct=0.0)
    hwmpq.profile(net, x, target="ort-x86", lut=tmp_path / "b.lut", config=fixed, context=False, options=opts)
    with LutStore.read(tmp_path / "b.lut") as store:
        assert {m.n for m in store.measurements("layer")} == {40}


def test_a_lut_profiled_at_every_precision_under_another_protocol_offers_what_this_one_timed(tmp_path):
    from hwmpq.lut.model import build_table
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.cli import load_model_and_graph
    from hwmpq.targets import get_target

    lut = tmp_path / "cpu.lut"
    assert _cli([*QUICK, "--lut", str(lut), "--precisions", "all"]).exit_code == 0
    again = [*QUICK[:QUICK.index("--repeat")], "--repeat", "21", *QUICK[QUICK.index("--repeat") + 2:]]
    assert _cli([*again, "--lut", str(lut)]).exit_code == 0  # another protocol, native precisions
    _, _, specs, edges = load_model_and_graph("test_small", None, None)
    with LutStore.read(lut) as store:
        assert W4A8 in store.precisions  # the file covers w4a8 ...
        by_repeat = {m.config.repeat: m.config for m in store.measurements("layer")}
        table = build_table(store, specs, edges, by_repeat[21], get_target("ort-x86"))
        assert W4A8 not in table.candidates and W8A8 in table.candidates  # ... but not under this protocol
        assert W4A8 in build_table(store, specs, edges, by_repeat[20], get_target("ort-x86")).candidates
