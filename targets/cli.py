"""``hwmpq export``: a trained (or calibrated) mixed-precision model to the target's deployable artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hwmpq.cli_core import DATA_HELP, ChannelsOpt, ImageSizeOpt, MeanOpt, StdOpt, data_options


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code=2)


def load_for_export(model: str, weights: str | None, plan, input_shape: str | None, data: str | None,
                    target=None, data_kw: dict | None = None):
    """(model, example input, specs, calibration splits, notes) for :func:`hwmpq.api.export`. Weights with
    trained quantizer scales give the model quantized in the target's placement (splits None); a float
    checkpoint (or none) gives the float model and the splits of ``data`` its quantizers are calibrated on
    (``load_data`` with ``data_kw``; an image folder defaults to the model's input size), with a printed
    warning (never silently)."""
    from hwmpq.graph import analyse
    from hwmpq.modelspec import load_model_and_input, load_weights_for_plan
    from hwmpq.qmodules import placement_of

    net, x = load_model_and_input(model, input_shape)
    net.eval()
    specs, _ = analyse(net, x)
    allowed = {s.fqn: target.precisions.for_layer(s) for s in specs} if target is not None else None
    plan.validate_against([s.fqn for s in specs], allowed)  # before any work
    placement = target.placement if target is not None else "tensor"
    net = load_weights_for_plan(net, plan, weights, placement=placement,
                                target=f"{target.id if target is not None else 'this target'}'s exporter")
    if placement_of(net) is not None:  # trained quantizer scales: exported as they are
        return net.eval(), x, specs, None, []
    if data is None:
        raise ValueError("the weights hold no trained quantizer scales (a float checkpoint or none): give "
                         "--data (a dataset name, an image folder, a .npz or file.py:factory) to calibrate "
                         "them, or --weights of a QAT-trained model")
    from hwmpq.data import check_input_shape, is_image_folder, load_data

    kw = dict(data_kw or {})
    if kw.get("image_size") is None and is_image_folder(data):
        kw["image_size"] = tuple(x.shape[2:])
    splits = load_data(data, **kw)
    check_input_shape(splits, tuple(x.shape))
    msg = (f"WARNING: {'no weights given' if not weights else f'{weights} is a float checkpoint'}; calibrating "
           f"the quantizers on one batch of {data} (post-training, no QAT): accuracy may be lower than a trained plan")
    typer.echo(msg, err=True)
    return net, x, specs, splits, [msg]


def predict_with_lut(lut: str, target, model: str, x, specs, plan) -> dict:
    """{"predicted_latency_ms", "lut"} from the LUT's latency model (rows of its main protocol); ``specs``
    are the float model's (as profiled: BatchNorm not folded)."""
    from collections import Counter

    from hwmpq.lut.model import build_table, edges_through_merges
    from hwmpq.lut.store import LutStore
    from hwmpq.modelspec import load_model

    plain = load_model(model, in_chans=x.shape[1]).eval()  # the float graph, as profiled
    with LutStore.open(lut, target=target.id, device=target.device()) as store:
        configs = Counter(m.config for m in store.measurements("layer"))
        if not configs:
            raise ValueError(f"{lut} holds no layer measurements; run `hwmpq profile` first")
        table = build_table(store, specs, edges_through_merges(plain, x), configs.most_common(1)[0][0], target)
    return {"predicted_latency_ms": table.predict(plan)[0], "lut": lut}


def export_command(
    model: Annotated[str, typer.Option(help="zoo name or path/to/file.py:factory")],
    plan: Annotated[str, typer.Option(help="plan.json (a BitPlan)")],
    out: Annotated[str, typer.Option(help="output folder")],
    target: Annotated[str, typer.Option(help="target id")] = "ort-x86",
    weights: Annotated[str | None, typer.Option(help="state dict: quantized (with scales) or float")] = None,
    input_shape: Annotated[str | None, typer.Option(help="N,C,H,W (default: the zoo model's)")] = None,
    data: Annotated[str | None, typer.Option(help=f"calibrate a float checkpoint on: {DATA_HELP}")] = None,
    threads: Annotated[int, typer.Option(help="intra-op threads of the optimized model")] = 1,
    lut: Annotated[str | None, typer.Option(help="LUT of this device: puts the predicted latency in the manifest")] = None,
    rpc: Annotated[str | None, typer.Option(help="tvm: HOST:PORT of the board's RPC server (verification run)")] = None,
    tracker: Annotated[str | None, typer.Option(help="tvm: HOST:PORT of an RPC tracker (with --key)")] = None,
    key: Annotated[str | None, typer.Option(help="tvm: device key at the tracker")] = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    channels: ChannelsOpt = None,
) -> None:
    """Write the deployable artifact into OUT with manifest.json: for ort-x86 model.onnx (QDQ with the
    trained scales) and model.opt.onnx; for tvm:PRESET model.so (cross-compiled for the board), verified
    over --rpc/--tracker against the torch fake-quant model; a board preset without --rpc/--tracker
    writes model.so and a manifest marked "verified": false (with the reason) and warns."""
    import warnings

    from hwmpq.api import export as export_model
    from hwmpq.records import load_plan
    from hwmpq.targets import get_target

    try:
        bit_plan = load_plan(plan)
        remote = {k: v for k, v in {"rpc": rpc, "tracker": tracker, "key": key}.items() if v is not None}
        if remote and not target.startswith("tvm:"):
            raise ValueError("--rpc/--tracker/--key are for tvm:PRESET targets")
        tgt = get_target(target, threads=threads, **remote)
        if not tgt.capabilities.export:
            raise ValueError(f"target {target!r} has no exporter")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net, x, specs, splits, notes = load_for_export(model, weights, bit_plan, input_shape, data, tgt,
                                                           data_options(image_size, mean, std, channels))
        extra = {"model": model, "weights": weights, "notes": notes}
        if lut:
            extra.update(predict_with_lut(lut, tgt, model, x, specs, bit_plan))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # quantized by the plan and calibrated there when float (its calibration warning is the one above)
            result = export_model(net, bit_plan, target=tgt, out=out, example_input=x, data=splits,
                                  manifest_extra=extra)
    except (ValueError, LookupError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    for w in caught:
        if "did not turn" in str(w.message):
            typer.echo(f"warning: {w.message}", err=True)
    for note in result.warnings:
        typer.echo(f"warning: {note}", err=True)
    extra_files = ", ".join(str(p) for p in sorted(Path(out).glob("*.opt.onnx")))
    typer.echo(f"wrote {result.artifact}, {extra_files + ', ' if extra_files else ''}{result.manifest}")
    if "predicted_latency_ms" in extra:
        typer.echo(f"predicted latency (LUT {lut}): {extra['predicted_latency_ms']:.3f} ms")
    typer.echo(f"integer kernels ({len(result.integer_layers)}): {', '.join(result.integer_layers) or '-'}")
    typer.echo(f"float ({len(result.float_layers)}): {', '.join(result.float_layers) or '-'}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
