"""A run folder (`results/<run>/`): its settings file, atomic table and image writes, and progress display.

Every stage writes one complete file per finished unit of work (a (prompt, seed) generation), so a killed
run leaves only complete files and rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from calib.errors import UserError
from teacache._files import atomic_write

RUN_FILE = "run.json"


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def check_same_settings(path: Path, settings: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The settings already in `path`, or None; a mismatch is an error, so runs never mix."""
    if not path.exists():
        return None
    existing = read_json(path)
    old = existing.get("settings", {})
    if settings_hash(old) != settings_hash(settings):
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
        raise UserError(f"{path.parent}: already holds a {what} with other settings ({detail}); choose another --out")
    return existing


def write_table(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue())


def write_png(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def read_parts(folder: Path) -> pd.DataFrame | None:
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return None
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("teacal", "torch", "diffusers", "numpy", "scipy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolve_shard(shard: str | None) -> tuple[int, int]:
    """`--shard i/K`, else torchrun's RANK/WORLD_SIZE, else the whole set."""
    if shard is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        shard, source = f"{rank}/{world}", "RANK/WORLD_SIZE"
    else:
        source = "--shard"
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise UserError(f"{source} {shard!r}: expected i/K, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"{source} {shard!r}: need 0 <= i < K")
    return index, count


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

