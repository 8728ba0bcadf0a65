"""``hwmpq search`` (the closed loop) and ``hwmpq demo``. Heavy imports happen inside the commands."""

from __future__ import annotations

from typing import Annotated

import typer

from hwmpq.cli_core import DATA_HELP

Opt = typer.Option


def search_command(
    method: Annotated[str | None, Opt(help="dnas | ssps | saq | nemo | ilp | uniform (default ssps; --ptq: ilp)")] = None,
    model: Annotated[str, Opt(help="zoo name or path/to/file.py:factory")] = "resnet20",
    num_classes: Annotated[int | None, Opt(help="classes of a zoo model (default: the data's; unlabelled: 10)")] = None,
    data: Annotated[str, Opt(help=DATA_HELP)] = "fashion-mnist",
    target: Annotated[str, Opt(help="ort-x86 | tvm:PRESET | fake")] = "ort-x86",
    lut: Annotated[str | None, Opt(help="LUT file profiled for this model's layers at the data's input shape")] = None,
    budget: Annotated[str | None, Opt(help="0.6x (of the fp32 plan's LUT latency), 0.5range (fastest..fp32) or ms")] = None,
    budget_ms: Annotated[float | None, Opt(help="latency budget in ms")] = None,
    budget_mj: Annotated[float | None, Opt(help="energy budget in mJ")] = None,
    out: Annotated[str, Opt(help="plan JSON; <out>.trace.json and <out>.report.json go beside it")] = "plan.json",
    export: Annotated[str | None, Opt("--export", help="export folder (default: <out stem>_export)")] = None,
    bits: Annotated[str, Opt(help="uniform: precision (8, w4a8, fp32, ...)")] = "8",
    candidates: Annotated[str | None, Opt(help="search only these precisions, e.g. fp32,w8a8 (default: all)")] = None,
    weights: Annotated[str | None, Opt(help="trained float weights")] = None,
    pretrain_epochs: Annotated[int, Opt(help="train the float model first when no --weights")] = 0,
    data_limit: Annotated[int | None, Opt(help="keep this many training images (fashion-mnist)")] = None,
    epochs: Annotated[int, Opt(help="search epochs (nemo: generations)")] = 4,
    warmup_epochs: Annotated[int, Opt(help="weight-only epochs before architecture steps")] = 1,
    limit_batches: Annotated[int | None, Opt(help="train batches per search epoch")] = None,
    search_batch_size: Annotated[int, Opt(help="search batch size")] = 64,
    cost_loss: Annotated[str, Opt(help="hinge: CE + lam*relu(E[lat]/B-1) | mult: CE*beta*log(E[lat])^gamma")] = "hinge",
    lam: Annotated[float, Opt(help="hinge weight")] = 2.0,
    a_lr: Annotated[float, Opt(help="architecture logits learning rate (Adam)")] = 0.05,
    w_lr: Annotated[float, Opt(help="supernet weights learning rate (Adam)")] = 5e-4,
    fix_every: Annotated[int | None, Opt(help="SSPS: architecture steps between fixings")] = None,
    certainty: Annotated[str, Opt(help="SSPS: maxprob | entropy")] = "maxprob",
    checkpoint: Annotated[str | None, Opt(help="supernet checkpoint (kept at the last good epoch)")] = None,
    finetune_epochs: Annotated[int | None, Opt(help="QAT epochs after the search (default 1; --ptq: 0)")] = None,
    finetune_lr: Annotated[float, Opt(help="QAT learning rate (SGD; 0.01 wrecks LSQ step sizes)")] = 0.001,
    finetune_limit_batches: Annotated[int | None, Opt(help="QAT batches per epoch")] = None,
    sam: Annotated[bool, Opt(help="QAT with sharpness-aware minimisation")] = False,
    rho: Annotated[float, Opt(help="SAM radius")] = 0.05,
    stat_assist: Annotated[bool, Opt(help="FrostNet StatAssist")] = False,
    grad_boost: Annotated[bool, Opt(help="FrostNet GradBoost")] = False,
    ptq: Annotated[bool, Opt(help="post-training: train nothing; the plan from per-layer sensitivity (ilp) or "
                                  "a proxy (nemo) under the LUT budget, calibrated, not fine-tuned; for "
                                  "pretrained networks and unlabelled data")] = False,
    calibration_batches: Annotated[int, Opt(help="--ptq: training batches each plan is calibrated on")] = 4,
    profile_missing: Annotated[bool, Opt(help="measure LUT entries the model needs and the LUT lacks")] = False,
    precisions: Annotated[str, Opt(help="--profile-missing measures these: 'native' (the target's real kernels), "
                                        "'all', or labels like fp32,w8a8 (as hwmpq profile --precisions)")] = "native",
    force_lut: Annotated[bool, Opt(help="use a LUT of another device knowingly")] = False,
    warmup: Annotated[int, Opt(help="MeasureConfig warmup (as the LUT was profiled)")] = 30,
    repeat: Annotated[int, Opt(help="MeasureConfig repeat (as the LUT was profiled)")] = 100,
    threads: Annotated[int, Opt(help="target threads")] = 1,
    baseline: Annotated[list[str] | None, Opt(help="also run uniform baselines (repeatable: --baseline 8)")] = None,
    ray: Annotated[str | None, Opt(help="nemo/ilp: Ray address (local, auto, ray://...) for evaluations")] = None,
    seed: int = 0,
    quiet: Annotated[bool, Opt(help="no progress bars")] = False,
) -> None:
    """Search bit-widths under a budget, QAT-fine-tune the plan, export it, measure it, print the table.

    --ptq trains nothing (no pre-training, supernet or fine-tune): the plan's model is the float model
    quantized and calibrated, and the table gives test accuracy (labelled data) and top-1 agreement with the
    float model. Unlabelled data: the float model's own predictions serve as the sensitivities' labels.

    Runs under torchrun too (supernet training with DDP, gloo): torchrun --nproc_per_node 2 -m hwmpq.search.cli ...
    """
    from .loop import LoopConfig, run_loop

    method = method or ("ilp" if ptq else "ssps")
    search = {"epochs": epochs, "warmup_epochs": warmup_epochs, "limit_batches": limit_batches,
              "batch_size": search_batch_size, "cost_loss": cost_loss, "lam": lam, "a_lr": a_lr, "w_lr": w_lr,
              "checkpoint": checkpoint}
    if method == "ssps":
        search.update(fix_every=fix_every, certainty=certainty)
    qat = {k: v for k, v in {"sam": sam, "rho": rho, "stat_assist": stat_assist, "grad_boost": grad_boost}.items()
           if v} if (sam or stat_assist or grad_boost) else {}
    cfg = LoopConfig(method=method, model=model, num_classes=num_classes, data=data, data_limit=data_limit,
                     weights=weights, pretrain_epochs=pretrain_epochs, target=target, threads=threads, lut=lut,
                     profile_missing=profile_missing, precisions=precisions, force_lut=force_lut, warmup=warmup, repeat=repeat, budget=budget,
                     budget_ms=budget_ms, budget_mj=budget_mj, bits=bits, search=search,
                     candidates=tuple(c for c in (candidates or "").split(",") if c),
                     finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                     finetune_limit_batches=finetune_limit_batches, qat=qat, out=out, export_dir=export,
                     baselines=tuple(baseline or ()), ptq=ptq, calibration_batches=calibration_batches, ray=ray,
                     seed=seed, progress=not quiet)
    _run(run_loop, cfg)


def _run(fn, *args) -> None:
    """User errors (ValueError, LookupError, missing files) end with the message and exit code 2, no trace."""
    try:
        fn(*args)
    except (ValueError, LookupError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def demo_command(
    full: Annotated[bool, Opt(help="the full run: all data, longer training and search (hours on 2 cores)")] = False,
    workdir: Annotated[str, Opt(help="where the LUT, weights, plans and exports go")] = "runs/demo",
    method: Annotated[str, Opt(help="ssps | dnas")] = "ssps",
    budget: Annotated[str, Opt(help="latency budget: 0.5range (halfway from the fastest plan to fp32), 0.7x (of fp32) or ms")] = "0.5range",
    train_images: Annotated[int | None, Opt(help="training images used (default 6000; --full: all)")] = None,
    pretrain_epochs: Annotated[int | None, Opt(help="float pre-training epochs (default 2; --full: 30)")] = None,
    search_epochs: Annotated[int | None, Opt(help="search epochs (default 3; --full: 20)")] = None,
    finetune_epochs: Annotated[int | None, Opt(help="QAT epochs per plan (default 1; --full: 10)")] = None,
    repeat: Annotated[int | None, Opt(help="timed repeats per LUT entry (default 30; --full: 100)")] = None,
    weights: Annotated[str | None, Opt(help="start from these float weights (e.g. runs/resnet20_fmnist.pt)")] = None,
    seed: int = 0,
    quiet: Annotated[bool, Opt(help="no progress bars")] = False,
) -> None:
    """Profile, search, fine-tune, export and measure resnet20 on Fashion-MNIST with this CPU (ort-x86),
    then print budget, predicted and measured latency, and accuracy for the searched plan, fp32 and uniform
    int8. The default (short) schedule: 6000 training images, 2 float epochs, a 3-epoch search over fp32/w8a8
    per layer (12 batches an epoch), 1 QAT epoch of 30 batches per plan, 30 timed repeats per LUT entry; it aims
    at <= 15 minutes on 2 idle cores. --full is what a real run looks like (all data, every precision the
    target offers, 30/20/10 epochs, 100 repeats: hours on 2 cores). Files are reused from --workdir (float
    weights, LUT rows), so a second run skips pre-training and profiling."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.make(full=full, workdir=workdir, method=method, budget=budget, train_images=train_images,
                          pretrain_epochs=pretrain_epochs, search_epochs=search_epochs,
                          finetune_epochs=finetune_epochs, repeat=repeat, weights=weights, seed=seed,
                          progress=not quiet)
    _run(run_demo, cfg)


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
    app.command("demo")(demo_command)


def torchrun_main(argv: list[str] | None = None) -> None:
    """``hwmpq search`` on more than one process, launched by torchrun::

        torchrun --nproc_per_node 2 -m hwmpq.search.cli --method ssps --model resnet20 --data fashion-mnist \\
            --target ort-x86 --lut lut.sqlite --budget 0.6x --out plan.json

    takes the options of ``hwmpq search``. Every process trains the supernet on its shard of the train and
    val splits (hwmpq/search/distributed.py); DDP averages the gradients of the weights, quantizer scales and
    architecture logits, so the logits, the Gumbel noise (same seed everywhere) and the SSPS fixing decisions
    are identical on all ranks. Rank 0 alone fine-tunes, exports, measures and writes files."""
    import sys

    import torch

    from .distributed import init_from_env, is_dist

    init_from_env()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    try:
        app(["search", *(argv if argv is not None else sys.argv[1:])])
    finally:
        if is_dist():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torchrun_main()
