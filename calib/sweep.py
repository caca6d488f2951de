"""`teacal sweep RUN`: what each configuration buys, measured against the recorded uncached references.

For one recorded step count and every (prompt, seed) of the run, it generates with every configuration (calibrated
TeaCache at each threshold and reuse rule, uncalibrated coefficient sets, static schedules: the preset's oracle
candidates (per budget, its calibration's best schedule and the runners-up) and uniform spacing; and the peer caches
of `calib.peers`) through the runtime users get,
and compares each image with the reference: LPIPS, PSNR, SSIM.

Measured like with like
    The run's own inputs (its `inputs/` copy), model, weights, dtype and device kind; a sweep that would differ is
    refused, unless `--remake-references` (it then measures against its own uncached images). Every uncached
    generation is checked against the recorded reference, bit for bit, and a mismatch stops the sweep.
Timing
    Work is grouped by (prompt, seed): the uncached run and every configuration of one prompt run in the same
    process, `--repeats` times in a rotated order, keeping each one's fastest repeat; a configuration's speedup
    is the uncached time over its time, and a configuration's headline speedup is the ratio of the total times
    over the prompts. The uncached run is the backend's `plain()` one: the model's stock path with no TeaCache work
    (on LightX2V its own infer class's ``infer``, not TeaCache's at threshold 0), so speedups include TeaCache's
    per-call overhead. Recommendations rank by computed calls, which timing noise cannot reorder.
Files (under `--out`, default the run folder; the run folder itself is never written to when `--out` is elsewhere)
    sweep.json (settings: the resume key), sweep-preset.json (the preset measured), sweep/<config>/<unit>.json (one
    part per generation), sweep.parquet (merged once every part exists), magcache.json, recommended-preset.json.
Scale
    `--shard i/K` (or torchrun's RANK/WORLD_SIZE): each shard takes every K-th (prompt, seed) with all its
    configurations; the shard that finishes last merges.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from calib import peers
from calib.backends import Recording, open_recording, reference_mismatch
from calib.configs import (
    MAX_CONFIGS,
    STATIC,
    Config,
    Wanted,
    configurations,
    load_baseline,
    parse_forecast,
    parse_thresholds,
    shared_runs,
)
from calib.errors import UserError
from calib.metrics import METRICS, Metrics, lpips_unavailable_reason, parse_metrics
from calib.progress import progress
from calib.prompts import load_prompts
from calib.runfiles import (
    SWEEP_FILE,
    SWEEP_TABLE,
    check_finite,
    check_output_file,
    check_output_folder,
    check_same_settings,
    load_trace,
    now_iso,
    read_array,
    read_json,
    resolve_shard,
    settings_hash,
    unit_name,
    write_array,
    write_json,
    write_png,
    write_table,
)
from calib.simulate import StaticSchedulePolicy, schedule_text, unit_series
from calib.tables import check_same_pairs, recommend, summary, with_earlier_sweeps
from teacache._files import atomic_write, remove_stale_temp_files
from teacache.preset import Preset, PresetError


@dataclass
class SweepRequest:
    run: Path
    preset: Path
    thresholds: str = "auto"  # TeaCache's and the baselines': auto (each method its own, one per budget) or a grid
    out: Path | None = None
    metrics: tuple[str, ...] = METRICS
    metrics_explicit: bool = False
    baselines: tuple[str, ...] = ()
    oracle: str = "auto"  # auto | none | comma list of budgets (computed calls of the total)
    forecasts: tuple[str, ...] = ("preset",)
    target_lpips: float | None = None
    target_psnr: float | None = None
    save_preset: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    model_path: Path | None = None
    lightx2v_config: Path | None = None  # default: the one the run was recorded with
    lpips_random_backbone: bool = False  # wiring tests only: never a figure
    methods: tuple[str, ...] = ("teacache",)  # --method values; see calib.peers.METHODS
    peer_grids: tuple[str, ...] = ()  # --peer-grid values: METHOD.PARAM=V1,V2 (calib.peers.GRIDS)
    prompts: Path | None = None  # a subset of the recorded prompt set (default: all of it)
    steps: int | None = None  # which recorded step count (needed when the run has several)
    remake_references: bool = False
    repeats: int = 1
    shard: str | None = None
    yes: bool = False  # run a grid past MAX_CONFIGS configurations


def subset_of_recorded(chosen, recorded, run: Path):
    """The items of `chosen`, each of which must be in the recorded set unchanged (its references exist)."""
    by_id = {item.id: item for item in recorded.items}
    for item in chosen.items:
        same = by_id.get(item.id)
        if same is None:
            raise UserError(f"{chosen.path}: prompt {item.id!r} was not recorded in {run}")
        if not same.same_request(item):
            raise UserError(f"{chosen.path}: prompt {item.id!r} differs from the one recorded in {run}")
    return tuple(by_id[item.id] for item in chosen.items)


@dataclass
class Plan:
    recording: Recording
    steps: int
    cfg: float
    size: tuple[int, int]
    items: tuple
    configs: list[Config]
    runs_as: dict[str, str]
    predicted: dict[str, pd.DataFrame]
    metric_names: tuple[str, ...]
    out: Path
    settings: dict


def check_flags(request: SweepRequest) -> Preset:
    """The flags that need no run, and the preset."""
    if request.repeats < 1:
        raise UserError(f"--repeats {request.repeats}: expected at least 1")
    if request.target_lpips is not None and request.target_psnr is not None:
        raise UserError("give --target-lpips or --target-psnr, not both")
    for name, value in (("--target-lpips", request.target_lpips), ("--target-psnr", request.target_psnr)):
        if value is not None and (not math.isfinite(value) or value < 0):
            raise UserError(f"{name} {value}: expected a finite number >= 0")
    preset_path = Path(request.preset)
    if preset_path.is_dir():
        raise UserError(f"--preset {preset_path}: is a folder; give the preset JSON that `teacal fit` wrote")
    preset = Preset.load(preset_path)
    if request.save_preset is not None:
        if Path(request.save_preset).resolve() == preset_path.resolve():
            raise UserError(f"--save-preset {request.save_preset}: that is the input preset; sweep never edits its inputs, choose another file")
        check_output_file(request.save_preset, "--save-preset", "recommended-preset.json")
    return preset


def wanted_of(request: SweepRequest, preset: Preset) -> Wanted:
    """What the flags ask to measure, parsed; a recommendation must be chosen by the preset's own reuse rule."""
    methods = peers.parse_methods(request.methods)
    peer_settings = peers.settings_grid(methods, peers.parse_peer_grids(request.peer_grids, methods))
    peers.check_installed(methods)
    thresholds = parse_thresholds(request.thresholds)
    forecasts = [parse_forecast(spec, preset) for spec in dict.fromkeys(request.forecasts)]
    target_flag = "--target-lpips" if request.target_lpips is not None else "--target-psnr" if request.target_psnr is not None else None
    if target_flag is not None:  # the recommended preset runs with its own reuse rule: only that rule's measurements may choose it
        own_rule = parse_forecast("preset", preset)[0]
        if "teacache" not in methods:
            raise UserError(f"{target_flag}: recommends a threshold of calibrated TeaCache; add --method teacache")
        if own_rule not in [label for label, _ in forecasts]:
            raise UserError(f"{target_flag}: the recommended preset runs with its own reuse rule ({own_rule}), which this sweep does not "
                            f"measure (--forecast {', '.join(label for label, _ in forecasts)}); add --forecast preset")
    baselines = [load_baseline(name, preset) for name in request.baselines if name not in STATIC]
    statics = [name for name in dict.fromkeys(request.baselines) if name in STATIC]
    return Wanted(methods, thresholds, forecasts, baselines, statics, request.oracle, peer_settings)


def swept_units(request: SweepRequest, recording: Recording) -> tuple[int, tuple, pd.DataFrame]:
    """The recorded step count, the prompts to sweep (all, or a --prompts subset) and their trace."""
    run, settings = recording.run, recording.settings
    recorded_steps = settings["steps"]
    if request.steps is None and len(recorded_steps) > 1:
        raise UserError(f"{run} holds {', '.join(map(str, recorded_steps))} steps; choose one with --steps")
    steps = recorded_steps[0] if request.steps is None else request.steps
    if steps not in recorded_steps:
        raise UserError(f"--steps {steps}: {run} recorded {', '.join(map(str, recorded_steps))} steps")
    items = recording.prompts.items
    if request.prompts is not None:
        items = subset_of_recorded(load_prompts(request.prompts, need_image=recording.spec.edit), recording.prompts, run)
    names = [unit_name(i.id, s, steps, recording.size) for i in items for s in settings["seeds"]]
    missing = [name for name in names if not (run / "refs" / f"{name}.npy").exists()]
    if missing:
        raise UserError(f"{run}: no reference for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; finish `teacal record {run}` first")
    trace = load_trace(run)
    check_finite(trace, run)
    return steps, items, trace[(trace["steps"] == steps) & trace["prompt_id"].isin([i.id for i in items])]


def metrics_of(request: SweepRequest) -> tuple[str, ...]:
    """The metrics asked for; by default what can run here (LPIPS needs AlexNet weights that may be missing)."""
    names = parse_metrics(",".join(request.metrics))
    if "lpips" in names and not request.lpips_random_backbone:
        reason = lpips_unavailable_reason()
        if reason is not None:
            if request.metrics_explicit or request.target_lpips is not None:
                raise UserError(reason)
            names = tuple(m for m in names if m != "lpips")  # the summary says so
    if request.target_lpips is not None and "lpips" not in names:
        raise UserError("--target-lpips needs the lpips metric")
    return names


def plan(request: SweepRequest, echo=print) -> Plan:
    """Every check and every configuration, before a model loads."""
    preset = check_flags(request)
    wanted = wanted_of(request, preset)
    recording = open_recording(request.run, request.model_path, request.lightx2v_config, request.device, request.dtype,
                               allow_other_precision=request.remake_references, what="sweep")
    run, settings = recording.run, recording.settings
    preset.require_model(settings["model"])
    peers.check_backend(wanted.methods, recording.backend)
    steps, items, trace = swept_units(request, recording)
    metric_names = metrics_of(request)
    try:
        preset.resolve_cutoff(steps)
    except PresetError as err:
        raise UserError(str(err)) from None
    outside = preset.outside_domain(steps, recording.size)
    if outside:
        echo(f"warning: preset {preset.source} was not calibrated for this run ({'; '.join(outside)}); its schedules here are extrapolated")
    out = check_output_folder(request.out or run, "--out")
    units = unit_series(trace)
    branches = 2 if settings["cfg"] > 1 else 1
    lemica_sigma = None
    if "lemica" in wanted.statics:  # LeMiCa's 50 steps under the run's own shift, to map its schedules by sigma
        from calib.backends.loop import qwen_sigmas, shift_of
        from calib.simulate import LEMICA_STEPS

        lemica_sigma = qwen_sigmas(LEMICA_STEPS, shift_of(units[0].sigma))
    configs = configurations(wanted, preset, units, branches, lemica_sigma)
    if len(configs) > MAX_CONFIGS and not request.yes:
        raise UserError(f"{len(configs)} configurations x {len(items) * len(settings['seeds'])} generations each: pass --yes to run them, or a coarser --thresh")
    predicted, runs_as = shared_runs(configs, units)
    sweep_settings = {
        "record": {k: settings[k] for k in ("model", "backend", "cfg", "sizes", "seeds", "dtype", "device", "inputs_sha256", "weights")},
        "steps": steps, "dtype": str(recording.dtype).removeprefix("torch.") if recording.dtype is not None else settings["dtype"],
        "device": recording.device.split(":")[0], "preset_sha256": settings_hash(preset.to_dict()),
        "baselines": {name: list(b.coefficients) for name, b in wanted.baselines}, "metrics": list(metric_names),
        "lpips_random_backbone": request.lpips_random_backbone, "remake_references": request.remake_references,
        "lightx2v_config_sha256": settings.get("lightx2v_config_sha256"),
    }
    return Plan(recording, steps, settings["cfg"], recording.size, items, configs, runs_as, predicted, metric_names, out, sweep_settings)


def sweep(request: SweepRequest, echo=print) -> pd.DataFrame:
    """Plan, check the output folder, generate what is not measured yet, merge when every part exists."""
    p = plan(request, echo)
    pairs = [(item, seed) for item in p.items for seed in p.recording.settings["seeds"]]
    prepare_output(request, p, pairs)
    shard_index, shard_count = resolve_shard(request.shard)
    runnable = [c for c in p.configs if p.runs_as.get(c.id, c.id) == c.id]
    mine = [pair for i, pair in enumerate(pairs) if i % shard_count == shard_index]
    todo = [(item, seed, [c for c in runnable if c.method != "uncached" and not part_path(p, c, item, seed).exists()]) for item, seed in mine]
    todo = [(item, seed, configs) for item, seed, configs in todo if configs or not part_path(p, p.configs[0], item, seed).exists()]
    echo(f"sweep {p.settings['record']['model']}: {len(pairs)} generations per configuration, {p.steps} steps, {p.size[0]}x{p.size[1]}, "
         f"CFG {p.cfg}; metrics {', '.join(p.metric_names)}; {len(p.configs)} configurations ({len(runnable)} distinct runs)")
    if shard_count > 1:
        echo(f"shard {shard_index}/{shard_count}: {len(mine)} of the {len(pairs)} (prompt, seed) pairs")
    config_runs = sum(len(configs) for _, _, configs in todo)
    echo(f"{config_runs} generations to run, and {len(todo)} uncached ones timed beside them"
         f"{f' ({request.repeats} repeats each)' if request.repeats > 1 else ''}; {len(mine) * (len(runnable) - 1) - config_runs} already done")
    write_json(p.out / SWEEP_FILE, {"kind": "sweep", "settings": p.settings, "run": os.path.relpath(p.recording.run.resolve(), p.out.resolve()),
                                    "preset": "sweep-preset.json", "preset_source": str(request.preset), "updated": now_iso(),
                                    "target": {"psnr": request.target_psnr, "lpips": request.target_lpips}})
    atomic_write(p.out / "sweep-preset.json", json.dumps(Preset.load(request.preset).to_dict(), indent=2) + "\n")
    if todo:
        generate(request, p, pairs, todo, echo)
    if not all(part_path(p, c, item, seed).exists() for c in runnable for item, seed in pairs):
        echo("other shards still have generations to run; the last one to finish merges sweep.parquet")
        return pd.DataFrame()
    table = with_earlier_sweeps(merge(p.out / "sweep", p, pairs), p.out, echo)
    write_table(p.out / SWEEP_TABLE, table)
    echo(summary(table))
    echo(f"wrote {p.out / SWEEP_TABLE}")
    target = ("lpips", request.target_lpips) if request.target_lpips is not None else ("psnr", request.target_psnr) if request.target_psnr is not None else None
    if target is not None:
        recommend(table, Preset.load(request.preset), request.save_preset or p.out / "recommended-preset.json", *target, echo=echo)
    return table


def part_path(p: Plan, c: Config, item, seed: int) -> Path:
    return p.out / "sweep" / c.id / f"{unit_name(item.id, seed, p.steps, p.size)}.json"


def prepare_output(request: SweepRequest, p: Plan, pairs: list[tuple]) -> None:
    """The output folder holds this sweep's settings (or none) and its prompts; what a killed sweep left half-written
    (its parts, its own files, remade references) goes."""
    run, out = p.recording.run, p.out
    check_same_settings(out / SWEEP_FILE, p.settings, "sweep", flag="another --out", files={
        "preset_sha256": f"--preset {request.preset}: other contents than {out / 'sweep-preset.json'}, the preset measured there",
        "record.inputs_sha256": f"the recording's prompt set {run / 'inputs'}: other text or images than swept",
        "lightx2v_config_sha256": f"LightX2V config {p.recording.settings.get('lightx2v_config')}: other contents"})
    remove_stale_temp_files(out / "sweep")
    remove_stale_temp_files(out, [SWEEP_FILE, "sweep-preset.json", SWEEP_TABLE, peers.MAGCACHE_FILE, "recommended-preset.json"])
    if request.save_preset is not None:
        remove_stale_temp_files(Path(request.save_preset).parent, [Path(request.save_preset).name])
    if request.remake_references:
        remove_stale_temp_files(out / "refs")
    check_same_pairs(out, pairs)


def generate(request: SweepRequest, p: Plan, pairs: list[tuple], todo: list[tuple], echo=print) -> None:
    """Every (prompt, seed) of `todo` with its configurations, in this process, after one warm-up generation."""
    metrics = Metrics(p.metric_names, lpips_random_backbone=request.lpips_random_backbone)
    backend = p.recording.load()
    process = uuid.uuid4().hex[:12]
    try:
        item, seed = todo[0][0], todo[0][1]
        backend.run(item, seed, p.steps, p.cfg, p.size)  # warm-up: first-call costs stay out of every timing
        peer_data = {}
        if any(c.method == "magcache" for _, _, configs in todo for c in configs):
            key = {"record": p.settings["record"], "steps": p.steps, "device": p.settings["device"], "dtype": p.settings["dtype"],
                   "diffusers": peers.diffusers_version()}
            peer_data["mag_ratios"] = peers.mag_ratios(backend, p.out, key, pairs, p.steps, p.cfg, p.size, echo=echo)
        with progress("sweep", sum(len(c) + 1 for _, _, c in todo)) as advance:
            for item, seed, configs in todo:
                sweep_pair(backend, p, item, seed, configs, metrics, peer_data, request, process, advance)
    finally:
        backend.close()


def sweep_pair(backend, p: Plan, item, seed: int, configs: list[Config], metrics: Metrics, peer_data: dict, request: SweepRequest,
               process: str, advance) -> None:
    """The uncached run and `configs` for one (prompt, seed), in this process, each `--repeats` times in a rotated
    order (fastest repeat kept); then one part per configuration."""
    run, out = p.recording.run, p.out
    name = unit_name(item.id, seed, p.steps, p.size)
    order = [p.configs[0], *configs]
    results: dict[str, dict] = {}
    for repeat in range(request.repeats):
        shift = repeat % len(order)
        for c in order[shift:] + order[:shift]:
            row = run_config(backend, c, item, seed, p.steps, p.cfg, p.size, peer_data)
            if c.id in results:
                results[c.id]["seconds"] = min(results[c.id]["seconds"], row["seconds"])
            else:
                results[c.id] = row
                if repeat == 0:
                    advance(f"sweep {c.id} {name}")
    uncached = results["uncached"]
    reference_latents = out / "refs" / f"{name}.npy" if request.remake_references else run / "refs" / f"{name}.npy"
    if request.remake_references:
        if not reference_latents.exists():
            write_png(out / "refs" / f"{name}.png", uncached["image"])
            write_array(reference_latents, uncached["latents"])
    mismatch = reference_mismatch(uncached["generation"], read_array(reference_latents))
    if mismatch is not None:
        raise UserError(f"{name}: the uncached run does not reproduce the recorded reference in {reference_latents.parent} ({mismatch}): the "
                        "weights, inputs, library versions, device or dtype differ from the recording's; sweep where it was recorded, "
                        "or pass --remake-references to measure against this machine's own uncached images")
    with Image.open(reference_latents.with_suffix(".png")) as ref:
        reference = ref.convert("RGB")
        for c in order:
            row = results[c.id]
            row.update(metrics(row.pop("image"), reference))
            row.pop("latents"), row.pop("generation")
            row.update(uncached_seconds=uncached["seconds"], process=process, repeats=request.repeats)
            write_json(out / "sweep" / c.id / f"{name}.json", row)


def run_config(backend, config: Config, item, seed: int, steps: int, cfg: float, size, peer_data: dict | None = None) -> dict:
    row = {"config": config.id, "prompt_id": item.id, "seed": seed}
    if config.method in peers.PEERS:
        with peers.applied(backend.transformer, config.method, dict(config.params), steps, cfg, **(peer_data or {})) as counter:
            generation = backend.run(item, seed, steps, cfg, size)
        row.update(counter.row())
    elif config.method == "uncached":
        with backend.plain():  # the model's stock path, no TeaCache work: the baseline of every speedup
            generation = backend.run(item, seed, steps, cfg, size)
        calls = steps * (2 if cfg > 1 else 1)
        row.update(computed=calls, skipped=0, block_forwards=calls * backend.num_blocks,
                   computed_cond=steps, computed_uncond=steps if cfg > 1 else 0)
    else:
        policy = StaticSchedulePolicy(config.preset, np.array(config.schedule)) if config.schedule else None
        with backend.caching(config.preset, config.threshold, policy) as cache:
            generation = backend.run(item, seed, steps, cfg, size)
            stats = cache.stats()
            per_branch = stats.per_branch()
            row.update(computed=stats.computed, skipped=stats.skipped, block_forwards=cache.block_forwards(),
                       computed_cond=per_branch.get("cond", {}).get("computed", 0),
                       computed_uncond=per_branch.get("uncond", {}).get("computed", 0),
                       schedule=schedule_text(stats.schedule("cond")), outside_domain="; ".join(stats.outside_domain))
    row.update(seconds=generation.denoise_seconds, image=generation.image, latents=generation.latents, generation=generation)
    return row


def merge(parts: Path, p: Plan, pairs) -> pd.DataFrame:
    rows = []
    for c in p.configs:
        source = p.runs_as.get(c.id, c.id)
        for item, seed in pairs:
            path = parts / source / f"{unit_name(item.id, seed, p.steps, p.size)}.json"
            row = read_json(path)
            row.update(config=c.id, method=c.method, label=c.label, threshold=c.threshold, budget=c.budget, forecast=c.forecast, measured_as=source)
            if c.id in p.predicted:
                pred = p.predicted[c.id]
                row["predicted_computed"] = int(pred[(pred["prompt_id"] == item.id) & (pred["seed"] == seed)]["computed"].sum())
            rows.append(row)
    table = pd.DataFrame(rows)
    table["speedup"] = table["uncached_seconds"] / table["seconds"]  # within one process, per prompt
    table["calls"] = table["computed"] + table["skipped"]
    # Zero-overhead speedup from the blocks that ran: some peers skip per block (FirstBlockCache and DBCache always
    # run block 0), so calls / computed would flatter them. For whole-call skips both ratios are the same.
    blocks_per_call = (table["block_forwards"] / table["calls"])[table["method"] == "uncached"].max()
    table["ideal_speedup"] = table["calls"] * blocks_per_call / table["block_forwards"]
    for metric in METRICS:
        if metric not in table:
            table[metric] = np.nan
    columns = ["method", "label", "config", "threshold", "budget", "forecast", "prompt_id", "seed", "computed", "skipped", "calls",
               "computed_cond", "computed_uncond", "predicted_computed", "block_forwards", "seconds", "uncached_seconds", "speedup",
               "ideal_speedup", "lpips", "psnr", "ssim", "schedule", "outside_domain", "measured_as", "process", "repeats"]
    return table.reindex(columns=columns)


