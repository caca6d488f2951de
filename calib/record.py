"""`teacal record`: uncached runs, observed step by step, into `trace/` parts, reference images and run.json.

Layout of a run folder::

    run.json                      settings (hashed: a rerun with other settings is refused) and status
    trace/<prompt>-<seed>.parquet one complete part per finished (prompt, seed); readers concatenate them
    trace.parquet                 all parts merged, written once every pair of the prompt set is done
    refs/<prompt>-<seed>.png      the uncached image: the reference that `sweep` measures against
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from calib.backends import check_backend, load_backend, resolve_device, resolve_dtype, weights_id
from calib.errors import UserError
from calib.models import get_model
from calib.progress import progress
from calib.prompts import load_prompts
from calib.runfiles import (
    RUN_FILE,
    TRACE_COLUMNS,
    check_same_settings,
    library_versions,
    load_trace,
    now_iso,
    pair_name,
    read_json,
    resolve_shard,
    write_json,
    write_png,
    write_table,
)


@dataclass(frozen=True)
class RecordRequest:
    model: str
    prompts: str
    out: str
    steps: int | None = None
    cfg: float | None = None
    size: tuple[int, int] | None = None
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    dtype: str = "auto"
    backend: str | None = None
    model_path: str | None = None
    shard: str | None = None
    lightx2v_config: str | None = None  # --backend lightx2v: the LightX2V JSON config


def record(request: RecordRequest, echo=print) -> Path:
    # Everything a user can get wrong is checked here, before a model is loaded.
    spec = get_model(request.model)
    backend_name = check_backend(spec, request.backend, request.model_path, request.lightx2v_config)
    prompts = load_prompts(request.prompts, need_image=spec.edit)
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    steps = request.steps or spec.steps
    cfg = spec.cfg if request.cfg is None else request.cfg
    size = request.size or spec.size
    if steps < 2:
        raise UserError(f"--steps {steps}: need at least 2 steps to measure a change between steps")
    if not request.seeds:
        raise UserError("--seeds: give at least one seed")
    shard_index, shard_count = resolve_shard(request.shard)

    out = Path(request.out)
    settings = {
        "model": spec.name, "backend": backend_name, "steps": steps, "cfg": cfg, "size": list(size),
        "seeds": list(request.seeds), "dtype": str(dtype).removeprefix("torch."),
        "prompts_sha256": prompts.sha256, "weights": weights_id(spec, backend_name, request.model_path),
    }
    if backend_name == "lightx2v":  # sweep reuses the config; the dtype is LightX2V's own
        from calib.backends.lightx2v import lightx2v_settings

        settings.update(lightx2v_settings(request.lightx2v_config, request.dtype))
    check_same_settings(out / RUN_FILE, settings, "recording")
    all_pairs = [(item, seed) for item in prompts.items for seed in request.seeds]
    mine = [(item, seed) for item, seed in all_pairs if prompts.items.index(item) % shard_count == shard_index]
    todo = [(item, seed) for item, seed in mine if not (out / "trace" / f"{pair_name(item.id, seed)}.parquet").exists()]
    write_run_file(out, settings, prompts.path, all_pairs, device)
    echo(f"record {spec.name} ({backend_name}, {device}, {settings['dtype']}): {len(prompts)} prompts x {len(request.seeds)} seeds, "
         f"{steps} steps, {size[0]}x{size[1]}, CFG {cfg}; shard {shard_index}/{shard_count}: {len(todo)} to run, {len(mine) - len(todo)} done")
    if todo:
        backend = load_backend(spec, backend_name, request.model_path, device, dtype, request.lightx2v_config)
        try:
            with backend.observing() as observer, progress("record", len(todo)) as advance:
                for item, seed in todo:
                    observer.rows.clear()
                    image, _ = backend.run(item, seed, steps, cfg, size)
                    frame = trace_frame(observer.rows, item.id, seed, steps)
                    name = pair_name(item.id, seed)
                    # The reference first, then the trace part that marks the pair as done.
                    write_png(out / "refs" / f"{name}.png", image)
                    write_table(out / "trace" / f"{name}.parquet", frame)
                    write_run_file(out, settings, prompts.path, all_pairs, device)
                    advance(f"record {name}")
        finally:
            backend.close()
    merged = merge_if_complete(out, all_pairs)
    echo(f"wrote {out / ('trace.parquet' if merged else 'trace')} and {out / 'refs'}")
    return out


def trace_frame(rows: list[dict], prompt_id: str, seed: int, steps: int) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    branches = frame["branch"].nunique()
    if len(frame) != steps * branches or sorted(frame["step"].unique()) != list(range(steps)):
        raise RuntimeError(f"observed {len(frame)} transformer calls for {steps} steps x {branches} branches")
    frame.insert(0, "seed", seed)
    frame.insert(0, "prompt_id", prompt_id)
    return frame[TRACE_COLUMNS].sort_values(["step", "branch"]).reset_index(drop=True)


def write_run_file(out: Path, settings: dict, prompt_file: Path, pairs: list, device: str) -> None:
    done = {p.stem for p in (out / "trace").glob("*.parquet")}
    existing = read_json(out / RUN_FILE) if (out / RUN_FILE).exists() else {}
    write_json(out / RUN_FILE, {
        "kind": "record",
        "settings": settings,
        "prompt_file": str(prompt_file),
        "created": existing.get("created", now_iso()),
        "updated": now_iso(),
        "device": device,
        "versions": library_versions(),
        "status": {pair_name(item.id, seed): ("done" if pair_name(item.id, seed) in done else "pending") for item, seed in pairs},
    })


def merge_if_complete(out: Path, pairs: list) -> bool:
    names = {pair_name(item.id, seed) for item, seed in pairs}
    if not all((out / "trace" / f"{name}.parquet").exists() for name in names):
        return False
    write_table(out / "trace.parquet", load_trace(out))
    return True
