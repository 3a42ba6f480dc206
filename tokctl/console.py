"""Shared rich console and progress bar, so every command reports the same way."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[callable]:
    """Yield ``advance(n=1, **fields)``; the bar goes to stderr so stdout stays parseable."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=err_console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            if info is not None:
                progress.update(task, info=info)
            progress.advance(task, n)

        yield advance


@contextmanager
def step(doing: str, expect: str = "") -> Iterator[None]:
    """A status line on stderr for a step that takes more than a couple of seconds: what it
    does and roughly how long, before it starts; how long it took, once done."""
    start = time.perf_counter()
    err_console.print(f"[dim]{doing}" + (f" ({expect})" if expect else "") + " ...[/]",
                      soft_wrap=True)
    yield
    err_console.print(f"[dim]  ... done in {time.perf_counter() - start:.1f} s[/]", soft_wrap=True)
