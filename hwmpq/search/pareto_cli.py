"""``hwmpq pareto pick`` (the best plan of a front within a budget, saved as a BitPlan for
``hwmpq export``) and ``hwmpq pareto show`` (table and PNG of one or more fronts)."""

from __future__ import annotations

import typer

pareto_app = typer.Typer(help="Pareto fronts from `hwmpq search --method nemo|ilp`: pick a plan, show, plot.",
                         no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


@pareto_app.command("pick")
def pick_cmd(
    front: str = typer.Option(..., "--front", help="front .json (or .csv) written by a NEMO/ILP search"),
    budget_ms: float | None = typer.Option(None, "--budget-ms", help="latency budget (ms)"),
    budget_mj: float | None = typer.Option(None, "--budget-mj", help="energy budget (mJ)"),
    out: str = typer.Option("plan.json", "--out", help="where to write the picked BitPlan"),
    measured: bool = typer.Option(False, "--measured", help="compare measured latency where the front has it"),
) -> None:
    """Write the most accurate plan of FRONT whose latency (and energy) fit the budget."""
    from hwmpq.records import save_plan

    from .pareto import FrontError, NoPlanWithinBudget, load_front, pick

    if budget_ms is None and budget_mj is None:
        _fail("give --budget-ms and/or --budget-mj")
    for name, v in (("--budget-ms", budget_ms), ("--budget-mj", budget_mj)):
        if v is not None and not v > 0:
            _fail(f"{name} must be positive, got {v}")
    try:
        p = pick(load_front(front), budget_ms, budget_mj, use_measured=measured)
    except (FrontError, NoPlanWithinBudget) as e:
        _fail(str(e))
    save_plan(p.plan, out)
    meas = f", measured {p.measured_ms:.4g} ms" if p.measured_ms is not None else ""
    typer.echo(f"picked {p.method or 'plan'}: accuracy {p.accuracy:.4f}, predicted {p.latency_ms:.4g} ms{meas}, "
               f"{p.energy_mj:.4g} mJ, {p.size_bytes / 1024:.1f} KiB -> {out}")


@pareto_app.command("show")
def show_cmd(
    front: list[str] = typer.Option(..., "--front", help="front file(s); repeat to overlay several"),
    plot: str | None = typer.Option(None, "--plot", help="write a PNG (accuracy vs latency)"),
) -> None:
    """Print the points of each front (sorted by latency) and optionally plot them together."""
    from .pareto import FrontError, load_front, plot_fronts

    fronts = {}
    try:
        for f in front:
            pts = sorted(load_front(f), key=lambda p: p.latency_ms)
            fronts[f] = pts
    except FrontError as e:
        _fail(str(e))
    for f, pts in fronts.items():
        typer.echo(f"{f}: {len(pts)} plans")
        typer.echo(f"  {'accuracy':>8} {'pred_ms':>9} {'meas_ms':>9} {'energy_mj':>10} {'KiB':>8}  plan")
        for p in pts:
            meas = f"{p.measured_ms:9.4g}" if p.measured_ms is not None else f"{'-':>9}"
            labels = ",".join(q.label for _f, q in p.plan.layers)
            typer.echo(f"  {p.accuracy:8.4f} {p.latency_ms:9.4g} {meas} {p.energy_mj:10.4g} "
                       f"{p.size_bytes / 1024:8.1f}  {labels}")
    if plot:
        typer.echo(f"plot -> {plot_fronts(fronts, plot)}")


def register(app: typer.Typer) -> None:
    app.add_typer(pareto_app, name="pareto")
