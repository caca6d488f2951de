"""The file contracts of a run folder: run.json, the trace, probes and sweep tables (load, validate, merge). No torch.

Every stage writes one complete file per finished unit of work (a (prompt, seed) generation), so a killed
run leaves only complete files and rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from calib.errors import UserError
from teacache._files import atomic_write

RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
TRACE_COLUMNS = ["prompt_id", "seed", "step", "branch", "timestep", "sigma", "x_temb", "x_modin", "y_output", "y_residual", "seconds"]


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


# -- record: run.json and the trace -------------------------------------------------------------------------
def pair_name(prompt_id: str, seed: int) -> str:
    return f"{prompt_id}-{seed}"


def load_run(run: str | Path) -> dict:
    path = Path(run) / RUN_FILE
    if not path.exists():
        raise UserError(f"{run}: no {RUN_FILE}; is this a `teacal record` output folder?")
    return read_json(path)


def load_trace(run: str | Path) -> pd.DataFrame:
    """Every finished part of a run (all shards), in a stable order."""
    run = Path(run)
    frame = read_parts(run / "trace")
    if frame is None:
        if not (run / "trace.parquet").exists():
            raise UserError(f"{run}: no trace found; run `teacal record --out {run}` first")
        frame = pd.read_parquet(run / "trace.parquet")
    return frame.sort_values(["prompt_id", "seed", "branch", "step"]).reset_index(drop=True)


def check_finite(trace: pd.DataFrame, run: str | Path) -> None:
    """Signals and targets are finite everywhere but a series' first step, which has no previous value."""
    numeric = trace[[c for c in trace.columns if c.startswith(("x_", "y_"))]].to_numpy(dtype=float)
    bad = trace[np.isinf(numeric).any(axis=1) | (np.isnan(numeric).any(axis=1) & (trace["step"] > 0).to_numpy())]
    if len(bad):
        row = bad.iloc[0]
        raise UserError(f"{run}: {len(bad)} trace row(s) hold NaN or inf (first: prompt {row['prompt_id']}, seed {row['seed']}, "
                        f"step {row['step']}, branch {row['branch']}); re-record them")



# -- sweep tables -------------------------------------------------------------------------------------------
def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    finite_psnr = table.assign(psnr=table["psnr"].replace(np.inf, 100.0))  # identical images: PSNR is infinite
    return finite_psnr.groupby(["method", "label", "config"], sort=False).agg(
        threshold=("threshold", "first"), budget=("budget", "first"), computed=("computed", "mean"),
        predicted=("predicted_computed", "mean"), calls=("calls", "mean"), speedup=("speedup", "mean"),
        ideal_speedup=("ideal_speedup", "mean"), lpips=("lpips", "mean"), lpips_worst=("lpips", "max"),
        psnr=("psnr", "mean"), psnr_worst=("psnr", "min"), ssim=("ssim", "mean"),
    ).reset_index()
