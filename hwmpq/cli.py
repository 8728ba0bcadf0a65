"""The ``hwmpq`` command. Each part of the package registers its own commands (``register(app)``);
they are collected here when the CLI starts, never at ``import hwmpq``."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(help="hwmpq: profile a device, search bit-widths under a measured budget, export.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# module -> where its register(app) lives; each owns its commands
_COMMAND_MODULES = (
    "hwmpq.cli_core",  # zoo, graph, train
    "hwmpq.profilers.cli",  # profile
    "hwmpq.lut.cli",  # lut show/export/import/merge/validate
    "hwmpq.targets.cli",  # export
    "hwmpq.search.cli",  # search, demo
    "hwmpq.search.pareto_cli",  # pareto pick
)


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part is not built yet
                continue
            raise
        module.register(app)


def main() -> None:
    _register()
    app()
