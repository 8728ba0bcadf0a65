"""Foundation commands: ``hwmpq zoo list``, ``hwmpq graph``, ``hwmpq train`` (float and QAT).

Heavy imports (torch, the zoo, data) happen inside the commands, so ``hwmpq --help`` stays fast. Errors the
user can fix (bad --model, missing dataset, malformed plan) are printed as one line and exit with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

MODEL_HELP = "zoo name (see `hwmpq zoo list`) or path/to/file.py:factory"
SHAPE_HELP = "input shape N,C,H,W (default: the zoo model's own; required for a file model)"
DATA_HELP = ("fashion-mnist | digits | an image folder (DIR/<class>/*.png, or DIR/*.png unlabelled) | "
             "FILE.npz (x, y) | path/to/file.py:factory (returning torch Datasets)")

# The options that shape the user's data, declared once for every command taking --data (see data_options)
ImageSizeOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--image-size", help="image folder: resize (shorter side, then centre crop) to N or H,W pixels (default 224)")]
MeanOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--mean", help="per-channel mean to subtract, 0.5 or 0.485,0.456,0.406 (image folder default: ImageNet's; "
    ".npz: none)")]
StdOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--std", help="per-channel std to divide by (image folder default: ImageNet's 0.229,0.224,0.225; .npz: none)")]
ChannelsOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--channels", help="image folder: convert every image to 1 (grayscale) or 3 (RGB) channels (default: as the "
    "files are; a mix must be converted)")]


def data_options(image_size: str | None, mean: str | None, std: str | None, channels: int | None) -> dict:
    """``load_data`` keyword arguments from the --image-size/--mean/--std/--channels text."""
    from .data import parse_floats, parse_image_size

    return {"image_size": parse_image_size(image_size), "mean": parse_floats(mean, "--mean"),
            "std": parse_floats(std, "--std"), "channels": channels}


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code=2)


def _user_errors() -> tuple[type[Exception], ...]:
    """Exception types whose message is meant for the user (every one a ValueError/FileNotFoundError)."""
    from .data import DatasetMissingError
    from .graph import UnsupportedModelError
    from .modelspec import ModelLoadError
    from .records import RecordError
    from .train import CheckpointError, NonFiniteLossError

    return (DatasetMissingError, UnsupportedModelError, ModelLoadError, RecordError, CheckpointError,
            NonFiniteLossError, ValueError)


def zoo_list(pattern: str = typer.Argument("*", help="glob over model names, e.g. '*resnet*'")) -> None:
    """List the zoo models matching PATTERN with their default input shapes."""
    from .zoo.registry import default_input_shape, list_models

    names = list_models(pattern)
    if not names:
        _fail(f"no zoo model matches {pattern!r}; known: {', '.join(list_models())}")
    for name in names:
        typer.echo(f"{name:<20} {','.join(map(str, default_input_shape(name)))}")


def graph(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
          input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),  # noqa: UP045
          weights: Optional[str] = typer.Option(None, "--weights", help="state dict to load (weights only)"),  # noqa: UP045
          json_out: Optional[Path] = typer.Option(None, "--json", help="also write the LayerSpecs as JSON"),  # noqa: UP045
          ) -> None:
    """Print the layer table (fqn, kind, input/output shape, MACs, params) and totals."""
    from rich.console import Console
    from rich.table import Table

    from .graph import layer_graph
    from .modelspec import load_model_and_input
    from .records import atomic_write_text, to_json

    try:
        m, x = load_model_and_input(model, input_shape, weights)
        specs = layer_graph(m, x)
    except _user_errors() as e:
        _fail(str(e))
    table = Table(title=f"{model} @ {'x'.join(map(str, x.shape))}")
    for col in ("fqn", "kind", "in", "out", "k/s/g", "MACs", "params"):
        table.add_column(col, justify="right" if col in ("MACs", "params") else "left")
    for s in specs:
        table.add_row(s.fqn, s.kind, "x".join(map(str, s.input_shape)), "x".join(map(str, s.output_shape)),
                      f"{s.kernel[0]}x{s.kernel[1]}/{s.stride[0]}/{s.groups}", f"{s.macs:,}", f"{s.params:,}")
    total_macs, total_params = sum(s.macs for s in specs), sum(s.params for s in specs)
    table.add_section()
    table.add_row(f"total ({len(specs)} layers)", "", "", "", "", f"{total_macs:,}", f"{total_params:,}")
    Console(width=160).print(table)
    typer.echo(f"layers={len(specs)} macs={total_macs} params={total_params}")
    if json_out:
        atomic_write_text(json_out, to_json(specs) + "\n")


def _load_plan_for(model, example, plan_path: Path):
    """The plan in ``plan_path``, checked against the model's quantizable layers (errors name the file)."""
    from .graph import fqns, layer_graph
    from .records import RecordError, load_plan

    plan = load_plan(plan_path)
    try:
        plan.validate_against(fqns(layer_graph(model, example)))
    except RecordError as e:
        raise RecordError(f"{plan_path}: {e}") from None
    return plan


def _qat_options(a: dict):
    """QATOptions from the flags (hwmpq.qat_options), or None for plain QAT."""
    if not (a["sam"] or a["stat_assist"] or a["grad_boost"]):
        return None
    from .qat_options import QATOptions

    return QATOptions(sam=a["sam"], rho=a["rho"], stat_assist=a["stat_assist"], grad_boost=a["grad_boost"])


def _summary(out: Path, args: dict, result, test_acc: float, wall_s: float) -> dict:
    from .records import atomic_write_text, to_jsonable

    summary = {"args": args, "test_acc": test_acc, "wall_s": wall_s, "result": to_jsonable(result)}
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    return summary


def train(model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
          data: str = typer.Option(..., "--data", help=DATA_HELP),
          epochs: int = typer.Option(..., "--epochs", help="total epochs (a resumed run counts the done ones)"),
          out: Path = typer.Option(..., "--out", help="checkpoint, rewritten atomically after every epoch; "
                                   "a summary goes to the same name with .json"),
          resume: bool = typer.Option(False, "--resume", help="continue from --out if it exists"),
          lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default 0.05, QAT 0.001: 0.01 wrecks LSQ step sizes once BN is folded)"),  # noqa: UP045
          batch_size: int = typer.Option(128, "--batch-size"),
          seed: int = typer.Option(0, "--seed"),
          limit: Optional[int] = typer.Option(None, "--limit", help="use only N training/test images"),  # noqa: UP045
          weights: Optional[str] = typer.Option(None, "--weights", help="initial weights (e.g. the float model for QAT)"),  # noqa: UP045
          save_weights: Optional[Path] = typer.Option(None, "--save-weights", help="also write the final state dict here"),  # noqa: UP045
          qat: bool = typer.Option(False, "--qat", help="quantize by --plan, calibrate, then fine-tune"),
          plan: Optional[Path] = typer.Option(None, "--plan", help="BitPlan JSON (with --qat)"),  # noqa: UP045
          sam: bool = typer.Option(False, "--sam", help="QAT with sharpness-aware minimisation"),
          rho: float = typer.Option(0.05, "--rho", help="SAM neighbourhood radius"),
          stat_assist: bool = typer.Option(False, "--stat-assist", help="FrostNet StatAssist"),
          grad_boost: bool = typer.Option(False, "--grad-boost", help="FrostNet GradBoost gradient noise"),
          placement: str = typer.Option("tensor", "--placement", help="where QAT puts activation quantizers: "
                                        "'tensor' (one per tensor, for ort-x86) or 'layer' (per layer, for tvm:*)"),
          progress: bool = typer.Option(True, "--progress/--no-progress"),
          image_size: ImageSizeOpt = None,
          mean: MeanOpt = None,
          std: StdOpt = None,
          channels: ChannelsOpt = None,
          ) -> None:
    """Train a model (float), or QAT fine-tune it with --qat --plan; prints val/test accuracy."""
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    if qat != (plan is not None):
        _fail("--qat and --plan go together: --qat --plan plan.json")
    if (sam or stat_assist or grad_boost) and not qat:
        _fail("--sam/--stat-assist/--grad-boost apply to QAT: add --qat --plan plan.json")
    try:
        summary = _train(args, lr if lr is not None else (0.001 if qat else 0.05))
    except _user_errors() as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {out} holds the last finished epoch; continue with the same command and "
                   "--resume", err=True)
        raise typer.Exit(code=130) from None
    typer.echo(f"val acc {summary['result']['_data']['val_acc']:.4f}  test acc {summary['test_acc']:.4f}  "
               f"wall {summary['wall_s']:.1f} s  checkpoint {out}")


def _train(a: dict, lr: float) -> dict:
    import time

    import torch

    from .data import load_data, require_labels
    from .modelspec import load_model_for_data, load_weights, load_weights_for_plan
    from .train import evaluate, fit, save_weights

    t0 = time.perf_counter()
    splits = load_data(a["data"], seed=a["seed"], limit=a["limit"],
                       **data_options(a["image_size"], a["mean"], a["std"], a["channels"]))
    require_labels(splits, "training")
    torch.manual_seed(a["seed"])  # the initial weights too: two runs of one command give the same model
    model = load_model_for_data(a["model"], splits)
    fit_kw = dict(epochs=a["epochs"], lr=lr, batch_size=a["batch_size"], seed=a["seed"], progress=a["progress"],
                  checkpoint=a["out"], resume=a["resume"])
    if a["qat"]:
        from .qat_options import run_qat

        plan = _load_plan_for(model, torch.zeros(1, *splits.input_shape), Path(a["plan"]))
        # float weights load into the float model; a QAT checkpoint's (with scales) into the quantized one
        model = load_weights_for_plan(model, plan, a["weights"], placement=a["placement"],
                                      target=f"--placement {a['placement']}")
        resumed = a["resume"] and Path(a["out"]).is_file()  # a resumed QAT run has had its warm-up
        model, result = run_qat(model, plan, splits, _qat_options(a), placement=a["placement"],
                                warm_up=not resumed, **fit_kw)
    else:
        if a["weights"]:
            load_weights(model, a["weights"])
        result = fit(model, splits, **fit_kw)
    test_acc = evaluate(model, splits.loader("test", batch_size=512))
    if a["save_weights"]:
        save_weights(model, a["save_weights"])
    return _summary(Path(a["out"]), {**a, "lr": lr}, result, test_acc, time.perf_counter() - t0)


def register(app: typer.Typer) -> None:
    zoo_app = typer.Typer(help="The model zoo.", no_args_is_help=True)
    zoo_app.command("list")(zoo_list)
    app.add_typer(zoo_app, name="zoo")
    app.command("graph")(graph)
    app.command("train")(train)
