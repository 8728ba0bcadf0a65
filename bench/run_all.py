"""Run every standing benchmark in its quick mode, one after another, and write their CSV/JSON under --out.

    python bench/run_all.py --out runs/bench                 # what `make bench` runs
    python bench/run_all.py --out runs/bench --only export,search
    python bench/run_all.py --list

Each benchmark is its own script (bench/README.md gives the question it answers and its full command);
here each runs with ``--quick``, a documented smaller setting (fewer models, images, epochs and timed
runs), so the whole set finishes in minutes on 2 cores. Quick numbers show that every script still runs
end to end; the tables in the READMEs come from the full commands. A failing benchmark does not stop the
others: its exit code is recorded, and this script exits 1 if any failed. Writes ``<out>/run_all.json``
(per benchmark: command, exit code, wall seconds, output folder). ``validate`` reads the LUT that
``export`` profiles into ``<out>/export``, so it runs after it. Time benchmarks on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# (name, question it answers, script, extra arguments); each writes under <out>/<name>/
STEPS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("train", "float training of a zoo model on Fashion-MNIST (the benches' starting weights)",
     "train_float.py", ("--out", "{out}/resnet20.pt")),
    ("export", "does hwmpq's ORT int8 export run as fast as ORT's quantize_static, and what does the LUT predict?",
     "ort/bench_export.py", ("--out", "{out}")),
    ("validate", "how far is the LUT's prediction from measured whole models (random fp32/w8a8 plans)?",
     "ort/bench_export.py", ("--validate", "2", "--lut-dir", "{base}/export", "--out", "{out}")),
    ("agreement", "does the exported ORT model compute what the torch fake-quant model computes?",
     "ort/bench_export.py", ("--agreement", "--out", "{out}")),
    ("search", "DNAS vs SSPS vs uniform plans: predicted and measured latency, accuracy",
     "search/bench_search.py", ("--out", "{out}")),
    ("qat", "do SAM and StatAssist+GradBoost help QAT; SAQ's plan at a LUT budget",
     "qat/bench_qat.py", ("--out", "{out}")),
    ("pareto", "NEMO, ILP, SSPS and uniform fronts in (accuracy, latency)",
     "pareto/bench_pareto.py", ("--models", "resnet20", "--candidates", "fp32,w8a8", "--out", "{out}")),
    ("real", "a pretrained EfficientNet-Lite0 @224 on real photographs against quantize_static",
     "real/bench_efficientnet.py", ("--out", "{out}")),
    # bench_tvm.py takes /tmp/hwmpq_TIMING itself (it waits while the file exists)
    ("tvm", "tuned TVM (tvm:host) int8/fp32 beside ORT, per layer and on a whole resnet20",
     "tvm/bench_tvm.py", ("--out", "{out}", "--work-dir", "{out}/work")),
)
ALL = STEPS


def command(step: tuple[str, str, str, tuple[str, ...]], base: Path) -> list[str]:
    """The argv of one benchmark, its outputs in ``base/<name>``."""
    name, _, script, extra = step
    out = base / name
    args = [a.format(out=out, base=base) for a in extra]
    return [sys.executable, str(BENCH / script), "--quick", *args]


def select(only: str | None) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """The steps named in ``only`` (comma-separated, in the standing order), or all of them."""
    if not only:
        return list(ALL)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [s[0] for s in ALL]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; use some of {known}")
    return [s for s in ALL if s[0] in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench", help="every benchmark writes under OUT/<name>/")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {[s[0] for s in ALL]}")
    ap.add_argument("--list", action="store_true", help="print each benchmark, its question and command; run none")
    a = ap.parse_args()
    base = Path(a.out).resolve()  # the benchmarks run from the repository root
    steps = select(a.only)
    if a.list:
        for s in steps:
            print(f"{s[0]:<10} {s[1]}\n{'':<10} {' '.join(command(s, base))}")
        return
    base.mkdir(parents=True, exist_ok=True)
    report: list[dict] = []
    for step in steps:
        argv = command(step, base)
        (base / step[0]).mkdir(parents=True, exist_ok=True)
        print(f"\n=== {step[0]}: {step[1]}\n$ {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(argv, cwd=BENCH.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
        wall = time.perf_counter() - t0
        report.append({"name": step[0], "question": step[1], "command": argv, "returncode": rc,
                       "wall_s": round(wall, 1), "out": str(base / step[0])})
        print(f"=== {step[0]}: exit {rc}, {wall:.0f} s", flush=True)
        tmp = base / "run_all.json.tmp"
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(base / "run_all.json")  # rewritten after every step: an interrupted run keeps its record
    print(f"\n{'benchmark':<10} {'exit':>4} {'wall s':>7}")
    for r in report:
        print(f"{r['name']:<10} {r['returncode']:>4} {r['wall_s']:>7.0f}")
    failed = [r["name"] for r in report if r["returncode"] != 0]
    print(f"wrote {base}/run_all.json" + (f"; FAILED: {', '.join(failed)}" if failed else "; all passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
