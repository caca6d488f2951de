"""Progress of long loops: a rich bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A rich progress bar on a terminal; silent otherwise (CI logs stay short)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not sys.stderr.isatty(), transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda label=None: bar.update(task, advance=1, description=label or description)

