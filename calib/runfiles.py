"""The file contracts of a run folder: run.json, the trace, probes and sweep tables (load, validate, merge). No torch.

Every stage writes one complete file per finished unit of work (a (prompt, seed) generation), so a killed
run leaves only complete files and rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from calib.errors import UserError
from teacache._files import atomic_write
from teacache.preset import SIGNALS

RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
SWEEP_TABLE = "sweep.parquet"  # beside it in a sweep's --out folder, once every part is merged
PROBE_FILE = "probe.json"
# kind "window": only steps first..first+length-1 skipped; kind "forecast": the uniform schedule of `budget` computed
# steps, with a linear forecast of constant damping `alpha` (0: plain reuse)
# image_rmse: of the float image (before 8-bit rounding) against the reference's, what the cost model predicts
PROBE_COLUMNS = ["prompt_id", "seed", "steps", "width", "height", "kind", "first", "length", "budget", "alpha", "latent_rel_l1", "image_rmse", "psnr", "seconds", "calls"]
UNIT_COLUMNS = ["prompt_id", "seed", "steps", "width", "height"]  # one generation; its steps are a series per branch
TRACE_COLUMNS = [*UNIT_COLUMNS, "step", "branch", "timestep", "sigma", *(f"x_{s}" for s in SIGNALS), "y_output", "y_residual", "seconds"]
REUSE_TARGETS = ("output", "residual")


def reuse_columns(max_gap: int) -> list[str]:
    """`r_<target>_<k>`: rel-L1 of this step's output (residual) against the one k steps back, k = 2..max_gap.

    k = 1 is `y_<target>`. These are what a skip really substitutes: a call skipped k steps after the last computed
    one gets that step's residual. Null where the series has no step k back.
    """
    return [f"r_{target}_{k}" for target in REUSE_TARGETS for k in range(2, max_gap + 1)]


def trace_columns(max_gap: int) -> list[str]:
    return [*TRACE_COLUMNS[:-1], *reuse_columns(max_gap), "seconds"]


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_json(path: Path, name: str | None = None, expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON object, or one line naming the file (as `name`, e.g. the flag that gave it) and what is wrong with it."""
    name = name or str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{name}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{name}: expected {expected}")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _leaves(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        out: dict[str, Any] = {}
        for key, value in settings.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): settings}


_ABSENT = object()
# A content hash and the setting that names its file: when the name changed too, the name says it all.
_HASH_NAMED_BY = {"inputs_sha256": "prompts", "lightx2v_config_sha256": "lightx2v_config"}


def _short(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def settings_difference(old: dict[str, Any], new: dict[str, Any], files: dict[str, str] | None = None) -> str:
    """The settings that differ, leaf by leaf, shortly: `steps: [20] -> [40], dtype: 'float32' -> 'bfloat16'`.

    A content hash (a `*sha256` leaf) is never shown: `files` says in words which file changed (leaf -> e.g. "prompt set
    p.jsonl: other text or images"), else `<name>: other contents`; it is left out when the setting naming the file
    changed too.
    """
    files = files or {}
    before, after = _leaves(old), _leaves(new)
    changed = sorted(k for k in set(before) | set(after) if before.get(k, _ABSENT) != after.get(k, _ABSENT))
    parts = []
    for key in changed:
        if key.endswith("sha256"):
            head, _, leaf = key.rpartition(".")
            named_by = _HASH_NAMED_BY.get(leaf)
            if named_by is not None and f"{head}.{named_by}".lstrip(".") in changed:
                continue
            parts.append(files.get(key) or f"{key.removesuffix('sha256').rstrip('_.')}: other contents")
        else:
            parts.append(f"{key}: {_short(before.get(key, _ABSENT))} -> {_short(after.get(key, _ABSENT))}")
    return ", ".join(parts[:4]) + (f" (and {len(parts) - 4} more)" if len(parts) > 4 else "")


def check_same_settings(path: Path, settings: dict[str, Any], what: str, flag: str = "another output folder",
                        files: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The settings already in `path`, or None; a mismatch is an error naming what differs, so runs never mix.

    `files` names the files behind content hashes in `settings` (see `settings_difference`)."""
    if not path.exists():
        return None
    existing = read_json(path)
    old = existing.get("settings", {})
    if settings_hash(_given(old)) != settings_hash(_given(settings)):
        raise UserError(f"{path.parent}: already holds a {what} with other settings ({settings_difference(old, settings, files)}); choose {flag}")
    return existing


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings without their unset (None) entries: a file written before a setting existed (no "lora" key) holds the
    same run as one that records it unset."""
    return {key: value for key, value in settings.items() if value is not None}


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.parents:  # the nearest existing folder above must be a folder, or nothing can be written there
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            return


def check_output_file(path: str | os.PathLike, flag: str, example: str = "out.json") -> Path:
    """A file a stage will write: not a folder, and under a folder (or where one can be made). Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name, e.g. {path / example}")
    _check_parents(path, flag)
    return path


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """A folder a stage will write into: a folder, or nothing yet (and under a folder). Checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is a file, not a folder")
    _check_parents(path, flag)
    return path


def write_table(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue())


def write_png(path: Path, image: Image.Image) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def write_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())


def read_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy array ({type(err).__name__}); delete it and rerun the stage that wrote it") from None


def read_table(path: Path) -> pd.DataFrame:
    """A parquet table, or one line naming the file when it is empty, truncated or not parquet at all."""
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable parquet table ({first}); delete it and rerun the stage that wrote it") from None


def read_parts(folder: Path) -> pd.DataFrame | None:
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return None
    return pd.concat([read_table(p) for p in parts], ignore_index=True)


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


def json_number(value: float) -> float | None:
    """A measured dB for a JSON file: rounded to 3 decimals, None where not finite (JSON has no NaN or infinity)."""
    return round(float(value), 3) if math.isfinite(value) else None


def wait_for(done, what: str, echo=print, poll: float = 2.0) -> None:
    """Other shards' work: poll until `done()`; say once what is awaited."""
    if done():
        return
    echo(f"waiting for other shards: {what}")
    while not done():
        time.sleep(poll)


# -- record: run.json and the trace -------------------------------------------------------------------------
def unit_name(prompt_id: str, seed: int, steps: int, size: tuple[int, int] | list[int]) -> str:
    """Names one generation's files: `<prompt>-<seed>-<steps>st-<W>x<H>`."""
    return f"{prompt_id}-{seed}-{steps}st-{size[0]}x{size[1]}"


def load_run(run: str | Path) -> dict:
    path = Path(run) / RUN_FILE
    if not Path(run).is_dir():
        raise UserError(f"{run}: no such run folder")
    if not path.exists():
        raise UserError(f"{run}: no {RUN_FILE}; is this a `teacal record` output folder?")
    return read_json(path)


def read_prompt_rows(path: Path) -> list[dict]:
    """A run's copied prompt set as rows, each image file's sha256 added (`image_sha256`); no validation, no PIL."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            row = json.loads(line)
            image = row.get("image")
            if image and not image.startswith("skimage:") and (path.parent / image).is_file():
                row["image_sha256"] = hashlib.sha256((path.parent / image).read_bytes()).hexdigest()
            rows.append(row)
    return rows


def missing_units(run: Path, info: dict) -> list[str]:
    """The generations a run's run.json lists that are not recorded yet (an unfinished or partly sharded record).

    A generation is done when its trace part is on disk: parts are written atomically, while run.json's status is one
    shard's snapshot, which a shard finishing at the same moment can overwrite with an older view (a torchrun calibrate
    then waited for the recording forever). Without parts (a run folder holding only trace.parquet) the status is read."""
    parts = Path(run) / "trace"
    if not parts.is_dir():
        return sorted(name for name, status in info.get("status", {}).items() if status != "done")
    return sorted(name for name in info.get("status", {}) if not (parts / f"{name}.parquet").exists())


def load_trace(run: str | Path) -> pd.DataFrame:
    """Every finished part of a run (all shards), in a stable order."""
    run = Path(run)
    frame = read_parts(run / "trace")
    if frame is None:
        if not (run / "trace.parquet").exists():
            raise UserError(f"{run}: no trace found; run `teacal record {run}` first")
        frame = read_table(run / "trace.parquet")
    missing = [c for c in TRACE_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{run}: the trace lacks column(s) {', '.join(missing)}; it was written by another teacal version, record again")
    return frame.sort_values([*UNIT_COLUMNS, "branch", "step"]).reset_index(drop=True)


def check_finite(trace: pd.DataFrame, run: str | Path) -> None:
    """Signals and targets are finite where they exist; only a series' first steps (no step back) are null."""
    signals = trace[[c for c in trace.columns if c.startswith(("x_", "y_"))]].to_numpy(dtype=float)
    reuse = trace[[c for c in trace.columns if c.startswith("r_")]].to_numpy(dtype=float)
    gaps = np.array([int(c.rsplit("_", 1)[1]) for c in trace.columns if c.startswith("r_")], dtype=int)
    step = trace["step"].to_numpy()[:, None]
    bad = (np.isinf(signals).any(axis=1) | (np.isnan(signals).any(axis=1) & (step[:, 0] > 0))
           | np.isinf(reuse).any(axis=1) | (np.isnan(reuse) & (step >= gaps[None, :])).any(axis=1))
    if bad.any():
        row = trace[bad].iloc[0]
        raise UserError(f"{run}: {int(bad.sum())} trace row(s) hold NaN or inf (first: prompt {row['prompt_id']}, seed {row['seed']}, "
                        f"{row['steps']} steps, step {row['step']}, branch {row['branch']}); re-record them")


def max_gap(trace: pd.DataFrame) -> int:
    gaps = [int(c.rsplit("_", 1)[1]) for c in trace.columns if c.startswith("r_residual_")]
    return max(gaps, default=1)


# -- several runs as one calibration ---------------------------------------------------------------------
SETTINGS_THAT_MUST_MATCH = ("model", "backend", "cfg", "dtype", "weights", "sizes")


def _identity(row: dict) -> str:
    return f"{row['prompt']}\0{row.get('negative_prompt', '')}\0{row.get('image_sha256', row.get('image'))}"


def prompt_identities(run: Path, info: dict) -> dict[str, str]:
    """prompt_id -> what the prompt is (its text, negative prompt and image), so one prompt in two runs is one group."""
    return {row["id"]: _identity(row) for row in read_prompt_rows(run / info["prompt_file"])}


def identity_hash(identity: str) -> str:
    """A prompt's identity (`prompt_identities`) as a preset records it: which prompts calibrated it, without the text."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def prompt_set_identities(path: Path) -> dict[str, str]:
    """prompt_id -> `identity_hash` of every prompt of a prompt file, as `prompt_identities` names them."""
    return {row["id"]: identity_hash(_identity(row)) for row in read_prompt_rows(Path(path))}


def load_traces(runs: tuple[Path, ...], partial: bool = False, echo=print) -> tuple[pd.DataFrame, dict, dict[str, str], list[Path]]:
    """The traces of several runs of one model and setting as one table (each prompt id prefixed by its run), the
    settings they share with their step counts and the date the last of them was recorded (`recorded`), each prompt's
    identity (`prompt_identities`), and the runs."""
    if not runs:
        raise UserError("give at least one run folder written by `teacal record`")
    frames, settings, groups, loaded, dates = [], None, {}, [], []
    for run in map(Path, runs):
        info = load_run(run)
        dates.append(str(info.get("created", "")))
        current = {k: info["settings"].get(k) for k in SETTINGS_THAT_MUST_MATCH}
        if settings is not None and current != settings:
            diff = ", ".join(f"{k}: {settings[k]!r} vs {current[k]!r}" for k in current if current[k] != settings[k])
            raise UserError(f"{run}: recorded with other settings than {runs[0]} ({diff}); calibrate one model and setting at a time")
        settings = current
        missing = missing_units(run, info)
        if missing and not partial:
            raise UserError(f"{run}: the recording is unfinished ({len(missing)} of {len(info['status'])} generations missing, "
                            f"e.g. {missing[0]}); finish `teacal record {run}`, or pass --partial to fit on what is there")
        if missing:
            echo(f"warning: {run}: fitting on a partial recording, {len(missing)} of {len(info['status'])} generations missing")
        frame = load_trace(run)
        check_finite(frame, run)
        identities = prompt_identities(run, info)
        groups.update({f"{run}:{pid}": identities.get(pid, pid) for pid in frame["prompt_id"].unique()})
        frame["prompt_id"] = str(run) + ":" + frame["prompt_id"]
        frames.append(frame)
        loaded.append(run)
    trace = pd.concat(frames, ignore_index=True)
    steps = sorted({int(s) for s in trace["steps"].unique()})
    return trace, dict(settings, steps=steps, recorded=max(dates)), groups, loaded


# -- probes -------------------------------------------------------------------------------------------------
def load_probes(run: str | Path) -> pd.DataFrame | None:
    """Every finished probe of a run (its uncached checks left out), or None when it has none."""
    folder = Path(run) / "probes"
    parts = sorted(folder.glob("*/*.json")) if folder.is_dir() else []
    if parts:
        frame = pd.DataFrame([read_json(p) for p in parts])
    elif (Path(run) / "probes.parquet").exists():
        frame = read_table(Path(run) / "probes.parquet")
    else:
        return None
    frame = frame.reindex(columns=PROBE_COLUMNS)
    frame = frame[(frame["kind"] == "forecast") | (frame["length"] > 0)]  # the uncached checks are not probes
    return frame.sort_values(["prompt_id", "seed", "steps", "kind", "length", "first", "budget", "alpha"]).reset_index(drop=True)


def load_probes_of(runs: list[Path]) -> pd.DataFrame | None:
    """The probes of several runs as one table (prompt ids prefixed as `load_traces` does), or None when none has any."""
    frames = []
    for run in runs:
        probes = load_probes(run)
        if probes is not None:
            frames.append(probes.assign(prompt_id=str(run) + ":" + probes["prompt_id"]))
    return pd.concat(frames, ignore_index=True) if frames else None
