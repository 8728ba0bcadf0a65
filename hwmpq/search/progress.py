"""The search's progress bar (rich), or a silent stand-in when progress is off or on a non-main rank."""

from __future__ import annotations

import contextlib


class _NullBar:
    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass


@contextlib.contextmanager
def progress_bar(enabled: bool):
    """A rich Progress with description, bar, done/total, elapsed time and an ``info`` field per task."""
    if not enabled:
        yield _NullBar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as bar:
        yield bar
