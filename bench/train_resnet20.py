"""Train ResNet-20 (1x28x28 input) on Fashion-MNIST with `hwmpq train` and record command, wall time, accuracy.

    python bench/train_resnet20.py [--epochs 3] [--threads 1] [--lr 0.1] [--out runs/resnet20_fmnist]

Writes ``<out>.ckpt`` (the training checkpoint, resumable), ``<out>.pt`` (the final float state dict, the
starting point of the other benchmarks) and ``<out>_bench.json`` (command, wall time, test accuracy,
per-epoch history, load average seen: the machine is shared, so wall time is noisy). No timed assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/resnet20_fmnist")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads ran ~3x slower per step)")
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "hwmpq", "train", "--model", "resnet20", "--data", "fashion-mnist",
           "--epochs", str(a.epochs), "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--seed", str(a.seed),
           "--out", f"{a.out}.ckpt", "--save-weights", f"{a.out}.pt", "--no-progress"]
    if a.resume:
        cmd.append("--resume")
    print("$", shlex.join(cmd), flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    wall_s = time.perf_counter() - t0
    load_after = os.getloadavg()
    summary = json.loads(Path(f"{a.out}.json").read_text())
    history = summary["result"]["_data"]["history"]
    report = {
        "command": shlex.join(["hwmpq", *cmd[3:]]), "wall_s": wall_s, "test_acc": summary["test_acc"],
        "val_acc": summary["result"]["_data"]["val_acc"], "epochs": a.epochs, "weights": f"{a.out}.pt",
        "checkpoint": f"{a.out}.ckpt", "history": history, "loadavg_before": load_before,
        "loadavg_after": load_after, "torch_threads": a.threads, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "resumed": a.resume,
    }
    Path(f"{a.out}_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_acc':>8} {'seconds':>8}")
    for h in history:
        print(f"{h['epoch']:>5} {h['train_loss']:>10.4f} {h['train_acc']:>9.4f} {h['val_acc']:>8.4f} "
              f"{h['seconds']:>8.1f}")
    print(f"test accuracy {summary['test_acc']:.4f}, wall {wall_s:.0f} s, load average before {load_before[0]:.2f} "
          f"after {load_after[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
