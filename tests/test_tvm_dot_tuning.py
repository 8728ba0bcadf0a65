"""Tuning the dot-product int8 kernel's register tiles (targets/tvm/dot_tuning.py) on this CPU: the
database on disk, its reuse by later builds and by the export, and exact outputs at the tuned tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

from hwmpq.records import W8A8, LayerSpec, MeasureConfig  # noqa: E402
from hwmpq.targets.tvm import dot_tuning  # noqa: E402
from hwmpq.targets.tvm import layers as L  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
SPEC = LayerSpec("conv", "conv", 32, 64, (3, 3), (1, 1), (1, 1), in_hw=(14, 14), out_hw=(14, 14))


def _needs_dot_kernel(target: TvmTarget) -> None:
    if target.dot_intrin is None:
        pytest.skip("this CPU has no AVX-512 VNNI: tvm:host builds int8 with the Relax kernel")


def test_tuned_tiles_are_stored_reused_and_exact(tmp_path):
    target = TvmTarget("host", work_dir=str(tmp_path), tune_trials=3)
    _needs_dot_kernel(target)
    build = target.build_layer(SPEC, W8A8)
    assert build.error_msg is None, build.error_msg
    db = dot_tuning.load_db(tmp_path / "tuning-host")
    assert len(db) == 1
    (rec,) = db.values()
    assert rec["trials"] == 3 and len(rec["tried"]) == 3 and rec["ms"] == min(t["ms"] for t in rec["tried"])
    art = json.loads(build.artifact)
    x = np.load(art["inputs"])["arr_0"]
    out = _run_local(art["lib"], x)
    np.testing.assert_array_equal(out, L.reference_int_layer(x, SPEC, L.random_int_params(SPEC, W8A8)))
    run = target.run(build, MeasureConfig(warmup=1, repeat=3))
    assert run.error_msg is None and len(run.latencies_ms) == 3

    # a second target on the same folder reuses the record (nothing new is tuned) ...
    again = TvmTarget("host", work_dir=str(tmp_path), tune_trials=3)
    mod, _ = L.single_layer_module(SPEC, W8A8, intrin=again.dot_intrin)
    assert dot_tuning.tune(mod, again.tvm_target, tmp_path / "tuning-host", 3) == {}
    # ... and applying the database reschedules the kernel to the tuned tiles
    from hwmpq.targets.tvm.dotconv import TILES_ATTR, default_tiles

    ((gv, wl),) = dot_tuning.kernels_of(mod)
    default = default_tiles(wl, again.dot_intrin)
    assert str(mod[gv].attrs[TILES_ATTR]) == f"{default.tile_w}x{default.tile_o}"
    tuned = dot_tuning.apply_database(mod, tmp_path / "tuning-host")
    assert str(tuned[gv].attrs[TILES_ATTR]) == f"{rec['tile_w']}x{rec['tile_o']}"


def _run_local(lib: str, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax, runtime

    vm = relax.VirtualMachine(runtime.load_module(lib), tvm.cpu())
    return vm["main"](runtime.tensor(x)).numpy()


def test_export_uses_the_tuned_tiles_and_matches_torch(tmp_path, monkeypatch):
    """Tiles tuned beforehand (as a profile leaves them) are what the export compiles; output exact."""
    import torch

    from hwmpq.records import BitPlan
    from hwmpq.targets.tvm import export as E
    from hwmpq.targets.tvm.dotconv import TILES_ATTR
    from hwmpq.zoo import create_model

    target = TvmTarget("host", work_dir=str(tmp_path / "w"))
    _needs_dot_kernel(target)
    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    x = torch.randn(1, 1, 8, 8)
    plan = BitPlan.from_dict({n: W8A8 for n in ("conv1", "conv2", "dw", "pw", "fc")})
    qmodel, _ = E.prepare_model(model, plan, x)
    specs = {n: E._spec_of(n, m.layer) for n, m in qmodel.named_modules() if hasattr(m, "layer")}
    db_dir = tmp_path / "w" / "tuning-host"
    mod = E.build_relax(qmodel, x, specs, target.dot_intrin)
    assert len(dot_tuning.tune(mod, target.tvm_target, db_dir, 3)) == 4  # conv1, conv2, pw, fc
    compiled = []
    real = dot_tuning.apply_database
    monkeypatch.setattr(dot_tuning, "apply_database", lambda m, d: compiled.append(real(m, d)) or compiled[-1])
    res = target.export(model, plan, x, str(tmp_path / "out"))
    manifest = json.loads(open(res.manifest).read())
    assert manifest["verified"] and manifest["verification"]["max_lsb"] < 1e-6, manifest["verification"]
    assert manifest["int8_kernel"] == "vnni-tiled" and manifest["dot_layers"] == ["conv1", "conv2", "pw", "fc"]
    db = dot_tuning.load_db(db_dir)
    used = {wl.key(): str(compiled[-1][gv].attrs[TILES_ATTR]) for gv, wl in dot_tuning.kernels_of(compiled[-1])}
    assert used == {k: f"{r['tile_w']}x{r['tile_o']}" for k, r in db.items()}
