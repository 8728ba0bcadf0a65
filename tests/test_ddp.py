"""Supernet training under torchrun with DDP (gloo, 2 processes on CPU): both ranks end with the same
logits and the same SSPS plan, within budget, and the gradients really were averaged (rank-local data)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from hwmpq.data import load_dataset
    from hwmpq.graph import analyse
    from hwmpq.lut.table import LatencyTable
    from hwmpq.records import FP32, Precision
    from hwmpq.search import SSPSConfig, run_search
    from hwmpq.search.base import Budget, SearchInputs
    from hwmpq.search import distributed as ddp
    from hwmpq.zoo.registry import create_model

    assert ddp.init_from_env("gloo") and ddp.world() == 2
    torch.manual_seed(0)
    model = create_model("test_tiny", in_chans=1)
    specs, _ = analyse(model, torch.zeros(1, 1, 8, 8))
    lat = np.tile([1.0, 0.5, 0.3], (len(specs), 1))
    table = LatencyTable(tuple(s.fqn for s in specs), (FP32, Precision(8, 8), Precision(4, 4)), lat, lat / 10)
    splits = load_dataset("digits")
    inp = SearchInputs(model, splits, table, Budget(latency_ms=3.0), torch.zeros(1, 1, 8, 8), progress=False,
                       log=lambda *_: None)
    r = run_search(inp, SSPSConfig(epochs=2, warmup_epochs=1, batch_size=16, limit_batches=2, fix_every=1))
    w = next(iter(r.model.parameters())).detach().flatten()[:8].tolist()
    out = {"rank": ddp.rank(), "plan": [p.label for _, p in r.plan.layers], "ms": r.predicted_ms,
           "probs": r.trace["epochs"][-1]["probs"], "order": [o["layer"] for o in r.trace["fixing_order"]], "w": w}
    open(sys.argv[1] + f"/rank{ddp.rank()}.json", "w").write(json.dumps(out))
    torch.distributed.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ssps_under_torchrun_gloo_two_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["plan"] == r1["plan"] and r0["order"] == r1["order"]
    assert r0["probs"] == r1["probs"]  # logits averaged by DDP: identical on both ranks
    assert r0["w"] == r1["w"]  # weights too
    assert r0["ms"] <= 3.0 and sorted(r0["order"]) == sorted(["conv1", "conv2", "dw", "pw", "fc"])


def test_torchrun_entry_runs_the_search_command_in_one_process_too():
    """``torchrun -m hwmpq.search.cli`` takes the options of ``hwmpq search``; without torchrun's
    environment it runs as one process."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run([sys.executable, "-m", "hwmpq.search.cli", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--stat-assist" in proc.stdout and "--budget" in proc.stdout
