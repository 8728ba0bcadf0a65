"""``hwmpq lut show | export | import | merge | validate``."""

from __future__ import annotations

import contextlib
import warnings
from typing import Annotated

import typer

lut_app = typer.Typer(help="Inspect, share and validate latency lookup tables.", no_args_is_help=True)


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {message}")
    return typer.Exit(code)


@contextlib.contextmanager
def _user_errors_and_warnings():
    """A ValueError ends the command with its message (exit 2); warnings raised inside are printed after."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except ValueError as e:
            raise _fail(str(e)) from None
    console = _console()
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")


def _header(store, df) -> str:
    d = store.device_details
    details = ", ".join(f"{k}={v}" for k, v in d.items()) if d else "no details"
    ok = int(df["ok"].sum()) if len(df) else 0
    line = (f"[bold]{store.path}[/]  schema v{store.schema_version}  target [bold]{store.target}[/]  device "
            f"{store.device} ({details})\n{len(df)} rows: {ok} ok, {len(df) - ok} failed")
    if len(df) and df["emulated"].any():
        line += "\n[yellow]emulated device: these timings are NOT latencies[/]"
    return line


def _model_order(model: str, input_shape: str | None) -> list[tuple[str, str]]:
    from hwmpq.profilers.cli import load_model_and_graph

    _, _, specs, _ = load_model_and_graph(model, input_shape, None)
    return [(s.fqn, s.signature) for s in specs]


def _matrix_table(matrix, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("layer")
    for c in matrix.columns:
        table.add_column(c, justify="right")
    for i, label in enumerate(matrix.rows):
        cells = []
        for j in range(len(matrix.columns)):
            v = matrix.values[i, j]
            cells.append(f"{v:.4f}" if v == v else ("[red]failed[/]" if matrix.failed[i, j] else "-"))
        table.add_row(label, *cells)
    return table


def _transition_table(df):
    from rich.table import Table

    from .plot import _column_order, short_shape

    tr = df[df["kind"] == "transition"].sort_values("time_unix")
    if tr.empty:
        return None
    dsts = _column_order(tr["precision"].tolist())
    src_rank = {p: i for i, p in enumerate(_column_order(tr["src_precision"].tolist()))}
    sig_rank = {s: i for i, s in enumerate(dict.fromkeys(tr["signature"]))}
    table = Table(title="transitions: latency_ms of handing a tensor from src to dst precision", title_justify="left")
    table.add_column("tensor")
    table.add_column("src")
    for d in dsts:
        table.add_column(f"-> {d}", justify="right")
    groups = sorted(tr.groupby(["signature", "src_precision"]), key=lambda kv: (sig_rank[kv[0][0]], src_rank[kv[0][1]]))
    for (_sig, src), g in groups:
        vals = {r.precision: (f"{r.latency_ms:.4f}" if r.ok else "[red]failed[/]") for r in g.itertuples()}
        table.add_row(short_shape(g["shape"].iloc[0]), str(src), *(vals.get(d, "-") for d in dsts))
    return table


@lut_app.command("show")
def show_command(
    path: Annotated[str, typer.Argument(help="LUT file")],
    plot: Annotated[str | None, typer.Option(help="also write a layer x precision heatmap PNG here")] = None,
    model: Annotated[str | None, typer.Option(help="order rows by this model's layers")] = None,
    input_shape: Annotated[str | None, typer.Option(help="N,C,H,W for --model")] = None,
    value: Annotated[str, typer.Option(help="latency_ms | p10_ms | p90_ms | energy_mj")] = "latency_ms",
) -> None:
    """Print the LUT as a layer x precision table (plus transitions and the per-model overhead)."""
    from .plot import layer_matrix, pick_config, plot_heatmap
    from .store import LutStore

    try:
        with LutStore.read(path) as store:
            df_all = store.frame()
            head = _header(store, df_all)
        order = _model_order(model, input_shape) if model else None
    except ValueError as e:
        raise _fail(str(e)) from None
    df, other = pick_config(df_all)
    console = _console()
    console.print(head)
    if other:
        console.print(f"[yellow]showing config {df['config_key'].iloc[0]}; rows of other measurement configs "
                      f"{other} are not shown[/]")
    try:
        matrix = layer_matrix(df, order, value)
    except ValueError as e:
        raise _fail(str(e)) from None
    note = f" ({', '.join(sorted(set(df['energy_source'])))})" if value == "energy_mj" and len(df) else ""
    console.print(_matrix_table(matrix, f"layers: {value}{note}"))
    tr = _transition_table(df)
    if tr is not None:
        console.print(tr)
    for r in df[df["kind"] == "overhead"].itertuples():
        console.print("per-model overhead: " + (f"{r.latency_ms:.4f} ms" if r.ok else f"failed ({r.error_msg})"))
    kernels = df[df["kind"] == "kernel"]  # profilers/context.py
    if len(kernels):
        by = kernels.groupby("precision").size()
        console.print("kernels in context (in the uniform and mixed context plans and alone, profilers/context.py): "
                      + ", ".join(f"{p} {n // 2} layers" for p, n in by.items()))
    if plot:
        try:
            plot_heatmap(matrix, plot, title=f"{path}: {df_all['target'].iloc[0] if len(df_all) else ''}")
        except ValueError as e:
            raise _fail(str(e)) from None
        console.print(f"heatmap written to {plot}")


@lut_app.command("export")
def export_command(
    path: Annotated[str, typer.Argument(help="LUT file")],
    out: Annotated[str, typer.Option(help="file to write")],
    format: Annotated[str | None, typer.Option(help="parquet | csv (default: from --out's suffix)")] = None,
) -> None:
    """Write every row of the LUT to Parquet (with the LUT meta) or CSV."""
    from .io import export_lut
    from .store import LutStore

    fmt = format or ("csv" if out.lower().endswith(".csv") else "parquet")
    try:
        with LutStore.read(path) as store:
            n = export_lut(store, out, fmt)
    except ValueError as e:
        raise _fail(str(e)) from None
    _console().print(f"{n} rows written to {out} ({fmt})")


def _store_for_import(into: str, src: str, force: bool):
    """The LUT to import into: the existing file, or a new one with the identity the export names."""
    import json
    from pathlib import Path

    from hwmpq.targets.base import DeviceInfo

    from .io import read_export
    from .store import LutError, LutStore

    if Path(into).exists():
        return LutStore.read(into)
    df, meta = read_export(src)
    if not meta:
        ids = df[["device", "target"]].drop_duplicates() if {"device", "target"} <= set(df.columns) else df[:0]
        if len(ids) != 1 and not force:
            raise LutError(f"{src} holds rows of {len(ids)} device/target pairs; import it into an existing LUT")
        if len(ids) == 0:
            raise LutError(f"{src} has no rows to import")
        meta = {"device": str(ids["device"].iloc[0]), "target": str(ids["target"].iloc[0])}
    if not meta.get("device") or not meta.get("target"):
        raise LutError(f"{src}: its LUT meta names no device/target; import it into an existing LUT")
    details = meta.get("device_details", "{}")
    device = DeviceInfo(meta["device"], json.loads(details) if isinstance(details, str) else dict(details),
                        emulated=str(meta.get("emulated", "0")) in ("1", "True", "true"))
    return LutStore.open(into, target=meta["target"], device=device, force=force)


@lut_app.command("import")
def import_command(
    file: Annotated[str, typer.Argument(help="exported .parquet or .csv")],
    into: Annotated[str, typer.Option(help="LUT to add the rows to (created if absent)")],
    force: Annotated[bool, typer.Option(help="take rows of another device/target/schema knowingly")] = False,
) -> None:
    """Add an exported LUT's rows to a LUT (refusing another device's rows unless --force)."""
    from .io import import_lut

    with _user_errors_and_warnings(), _store_for_import(into, file, force) as store:
        rep = import_lut(file, store, force=force)
    _console().print(f"{file} -> {into}: {rep.added} added, {rep.replaced} replaced, {rep.kept} kept as they were")


@lut_app.command("merge")
def merge_command(
    a: Annotated[str, typer.Argument(help="first LUT (its device and target name the result)")],
    b: Annotated[str, typer.Argument(help="second LUT")],
    out: Annotated[str, typer.Option(help="merged LUT to write (must not exist)")],
    force: Annotated[bool, typer.Option(help="merge a LUT of another device/target/schema knowingly")] = False,
) -> None:
    """Merge two LUTs into a new file; for a key both hold, an ok row beats a failed one, else the newer wins."""
    from .io import copy_lut, merge
    from .store import LutStore

    with _user_errors_and_warnings(), LutStore.read(a) as sa, LutStore.read(b) as sb:
        copy_lut(sa, out)
        with LutStore.read(out) as so:
            rep = merge(so, sb, force=force)
    _console().print(f"{out}: {a} + {b}: {rep.added} added, {rep.replaced} replaced, {rep.kept} kept")


@lut_app.command("validate")
def validate_command(
    lut: Annotated[str, typer.Option(help="LUT file of this device")],
    model: Annotated[str, typer.Option(help="zoo name or path/to/file.py:factory")],
    input_shape: Annotated[str | None, typer.Option(help="N,C,H,W (default: the zoo model's)")] = None,
    plans: Annotated[int, typer.Option(help="random plans to build and time end to end")] = 20,
    json_out: Annotated[str | None, typer.Option("--json", help="write the report as JSON here")] = None,
    threads: Annotated[int, typer.Option(help="intra-op threads (must match the LUT's)")] = 1,
    seed: Annotated[int, typer.Option(help="seed of the random plans")] = 0,
    warmup: Annotated[int | None, typer.Option(help="default: the LUT's measurement protocol")] = None,
    repeat: Annotated[int | None, typer.Option(help="default: the LUT's measurement protocol")] = None,
    rounds: Annotated[int | None, typer.Option(
        help="interleaved rounds the repeats are spread over (default: the LUT's); on a machine whose slow "
             "spells last seconds, e.g. --repeat 400 --rounds 20")] = None,
    statistic: Annotated[str, typer.Option(help="latency quoted for layers and whole models: p10 or median")] = "p10",
    force: Annotated[bool, typer.Option(help="use a LUT of another device knowingly")] = False,
    speed_tolerance: Annotated[float, typer.Option(
        help="time the plans again when a speed probe runs this much slower than its LUT row")] = 0.10,
    speed_retries: Annotated[int, typer.Option(
        help="at most this many more timings while the machine is slower than at profile time")] = 2,
) -> None:
    """Measure real end-to-end latency of random plans and report the LUT's prediction error."""
    import dataclasses

    from hwmpq.targets import get_target

    from .store import LutStore
    from .validate import validate

    try:
        with LutStore.read(lut) as peek:
            target_id = peek.target
            lut_config = dataclasses.replace(main_config(peek, threads), statistic=statistic)
        target = get_target(target_id, threads=threads)
        net, x, _, _ = _load(model, input_shape)
        store = LutStore.open(lut, target=target.id, device=target.device(), force=force)
    except ValueError as e:
        raise _fail(str(e)) from None
    measure = dataclasses.replace(lut_config, **{k: v for k, v in (("warmup", warmup), ("repeat", repeat),
                                                                   ("rounds", rounds)) if v is not None})
    with store:
        try:
            report = validate(store, net, x, plans, lut_config, seed, json_out, target=target, model_name=model,
                              allow_foreign=force, measure_config=measure, speed_tolerance=speed_tolerance,
                              speed_retries=speed_retries)
        except (ValueError, LookupError) as e:  # foreign or incomplete LUT, bad model
            raise _fail(str(e)) from None
    from .validate import format_report

    _console().print(format_report(report))
    if json_out:
        _console().print(f"report written to {json_out}")


def main_config(store, threads: int):
    """The measurement protocol of most of the LUT's rows at this thread count (lookups need the same)."""
    import dataclasses
    from collections import Counter

    from hwmpq.records import MeasureConfig

    default = MeasureConfig().statistic  # rows differing only in the statistic share one protocol
    configs = Counter(dataclasses.replace(m.config, statistic=default) for m in store.measurements(all_rows=True)
                      if m.config.threads == threads)
    return configs.most_common(1)[0][0] if configs else MeasureConfig(threads=threads)


def _load(model: str, input_shape: str | None):
    from hwmpq.profilers.cli import load_model_and_graph

    return load_model_and_graph(model, input_shape, None)


def register(app: typer.Typer) -> None:
    app.add_typer(lut_app, name="lut")
