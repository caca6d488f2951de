"""Atomic file writes: a reader never sees half a file, even if the writer is killed."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, then `os.replace` it.

    The file gets the mode a plain ``open(path, "w")`` would give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # The writer's pid in the name lets a later run tell a killed writer's leftovers from a live one's file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no temp file behind on failure (or Ctrl-C) so the folder holds only complete files.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


STALE_AFTER_SECONDS = 3600.0  # a temp file whose writer cannot be checked (another host) counts as stale after this


def _writer_is_gone(temp: Path) -> bool:
    pid = temp.name.removesuffix(TEMP_SUFFIX).rsplit(".", 2)[-2]
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return time.time() - temp.stat().st_mtime > STALE_AFTER_SECONDS


def remove_stale_temp_files(folder: str | os.PathLike, names: Iterable[str] | None = None) -> int:
    """Delete the temp files that writers killed mid-write (kill -9) left under `folder`; returns how many.

    With `names`, only the temp files of those files directly in `folder` (a stage's own outputs in a shared folder);
    else every temp file in the folder tree. A temp file of a writer that still runs (another shard writing into the
    same folder) is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    if names is None:
        temps = folder.rglob(f".*{TEMP_SUFFIX}")
    else:
        temps = (t for name in dict.fromkeys(names) for t in folder.glob(f".{glob.escape(name)}.*{TEMP_SUFFIX}"))
    removed = 0
    for temp in temps:
        with contextlib.suppress(FileNotFoundError):
            if temp.is_file() and _writer_is_gone(temp):
                temp.unlink()
                removed += 1
    return removed
