"""Progress of long loops: a rich bar on a terminal; elsewhere (a log, CI, nohup) a plain line now and then."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

PLAIN_EVERY_SECONDS = 30.0  # off a terminal: at most one line per this many seconds...
PLAIN_EVERY_FRACTION = 0.1  # ...or per tenth of the work, whichever comes first


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@contextlib.contextmanager
def progress(description: str, total: int, echo: Callable[[str], None] | None = None) -> Iterator[Callable[..., None]]:
    """Yields `advance(label=None)`, to call once per finished unit of work.

    On a terminal: a rich progress bar on stderr. Elsewhere: `description: done/total (percent), elapsed, ETA`
    lines on stderr (or through `echo`), at most every 30 s or every tenth of the work, and once at the end.
    """
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda label=None: bar.update(task, advance=1, description=label or description)
        return
    write = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    started = last = time.monotonic()
    done = 0
    step = max(1, int(total * PLAIN_EVERY_FRACTION))

    def advance(label: str | None = None) -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if done == total or done % step == 0 or now - last >= PLAIN_EVERY_SECONDS:
            last = now
            elapsed = now - started
            eta = elapsed / done * (total - done)
            write(f"{description}: {done}/{total} ({done / total:.0%}), {_duration(elapsed)} elapsed, ETA {_duration(eta)}")

    yield advance
