"""`teacal sweep`: what each threshold buys, measured against the uncached references from `record`.

For every (prompt, seed) of the recorded run it times the uncached generation and every configuration
(TeaCache thresholds, uncalibrated baselines, oracle schedules, and the peer caches of `calib.peers`: diffusers'
FirstBlockCache, MagCache, SeaCache and cache-dit's DBCache) through the runtime users get, and compares
each image with the reference: LPIPS, PSNR, SSIM. One JSON part per (configuration, prompt, seed) is written
atomically, so a killed sweep loses at most the generation in progress; `sweep.parquet` merges them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from calib import peers
from calib.backends import check_backend, load_backend, resolve_device, resolve_dtype, weights_id
from calib.errors import UserError
from calib.metrics import METRICS, Metrics, lpips_unavailable_reason, parse_metrics
from calib.models import get_model
from calib.progress import progress
from calib.prompts import load_prompts
from calib.runfiles import (
    SWEEP_FILE,
    aggregate,
    check_finite,
    check_same_settings,
    load_run,
    load_trace,
    now_iso,
    unit_name,
    write_json,
    write_table,
)
from calib.simulate import StaticSchedulePolicy, oracle_schedule, simulate
from teacache.preset import Preset, PresetError

EXACT_SIGNALS = ("temb",)  # signals whose recorded distances do not depend on skipped steps

# Published coefficients, to show what calibration buys (REFERENCE §4). None keeps the preset's signal.
BASELINES: dict[str, tuple[list[float], str | None]] = {
    "constant": ([1.0], None),  # the original sketch's default: poly1d([1.0]) is the constant 1
    "identity": ([1.0, 0.0], None),
    "flux": ([4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01], "modin"),
    "wan21": ([2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01], "temb"),
    "mlx-qwen": ([45.1442944188745, -52.91131412057809, 17.078368811436963, 0.10393043235768819, 0.0], "modin"),
}


def parse_thresholds(spec: str) -> list[float]:
    """`a:b` (step 0.05), `a:b:step`, or `t1,t2,...`; every value finite and >= 0."""
    text = spec.strip()
    bad = UserError(f"--thresh {spec!r}: expected START:STOP[:STEP] with START <= STOP and STEP > 0, or a comma list of numbers >= 0")
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise bad
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 0.05
            if not all(math.isfinite(v) for v in parts) or start < 0 or stop < start or step <= 0:
                raise bad
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise bad from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise bad
    return sorted(set(values))


@dataclass(frozen=True)
class Config:
    id: str  # names its part folder
    method: str  # uncached | teacache | baseline | oracle | a peer: fbcache | magcache | seacache | dbcache
    label: str  # what the chart's legend says
    threshold: float | None = None
    budget: int | None = None
    preset: Preset | None = None
    schedule: tuple[bool, ...] | None = None
    params: tuple[tuple[str, float | int], ...] = ()  # a peer's own settings (calib.peers.GRIDS)


def load_baseline(name: str, preset: Preset) -> tuple[str, Preset]:
    if name in BASELINES:
        coefficients, signal = BASELINES[name]
        return name, preset.replace(coefficients=coefficients, signal=signal or preset.signal)
    path = Path(name)
    if not path.is_file():
        raise UserError(f"--baseline {name!r}: not one of {', '.join(BASELINES)} and not a file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--baseline {name}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if isinstance(data, dict):
        other = Preset.from_dict(data, source=str(path))
        return path.stem, preset.replace(coefficients=other.coefficients, signal=other.signal)
    if isinstance(data, list) and data and all(isinstance(c, (int, float)) and math.isfinite(c) for c in data):
        return path.stem, preset.replace(coefficients=data)
    raise UserError(f"--baseline {name}: expected a preset or a JSON list of finite coefficients")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


@dataclass
class SweepRequest:
    preset: str
    run: str
    thresholds: str | None  # TeaCache's (and the baselines'); needed when "teacache" is among the methods
    out: str | None = None
    metrics: str = ",".join(METRICS)
    metrics_explicit: bool = False
    baselines: tuple[str, ...] = ()
    oracle: str = "auto"  # auto | none | comma list of budgets
    target_lpips: float | None = None
    target_psnr: float | None = None
    device: str = "auto"
    dtype: str = "auto"
    model_path: str | None = None
    lightx2v_config: str | None = None  # default: the one the run was recorded with
    lpips_random_backbone: bool = False  # wiring tests only: never a figure
    methods: tuple[str, ...] = ("teacache",)  # --method values; see calib.peers.METHODS
    peer_grids: dict[str, str] = field(default_factory=dict)  # peer grid option (e.g. "--magcache-thresh") -> comma list
    prompts: str | None = None  # a subset of the recorded prompt set (default: all of it)


def subset_of_recorded(chosen, recorded, run: str):
    """The items of `chosen`, each of which must be in the recorded set unchanged (its references exist)."""
    by_id = {item.id: item for item in recorded.items}
    for item in chosen.items:
        same = by_id.get(item.id)
        if same is None:
            raise UserError(f"{chosen.path}: prompt {item.id!r} was not recorded in {run}")
        if (same.prompt, same.negative_prompt, same.load_image().tobytes()) != (item.prompt, item.negative_prompt, item.load_image().tobytes()):
            raise UserError(f"{chosen.path}: prompt {item.id!r} differs from the one recorded in {run}")
    return chosen.items


def oracle_budgets(spec: str, teacache_counts: list[int], steps: int, forced: int) -> list[int]:
    if spec == "none":
        return []
    if spec == "auto":
        return sorted({c for c in teacache_counts if forced <= c < steps})
    try:
        budgets = sorted({int(b) for b in spec.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--oracle {spec!r}: expected auto, none or comma-separated step budgets") from None
    if not budgets or budgets[0] < forced or budgets[-1] > steps:
        raise UserError(f"--oracle {spec!r}: budgets must lie between the {forced} forced steps and {steps}")
    return budgets


def sweep(request: SweepRequest, echo=print) -> pd.DataFrame:
    # -- everything checkable is checked before a model loads --------------------------------------------------
    methods = peers.parse_methods(request.methods)
    peer_settings = peers.settings_grid(methods, request.peer_grids)
    peers.check_installed(methods)
    if "teacache" in methods and request.thresholds is None:
        raise UserError("--thresh is required with --method teacache (the default)")
    if request.baselines and request.thresholds is None:
        raise UserError("--baseline needs --thresh: baselines run at TeaCache's thresholds")
    thresholds = parse_thresholds(request.thresholds) if request.thresholds is not None else []
    preset = Preset.load(request.preset)
    info = load_run(request.run)
    settings = info["settings"]
    preset.require_model(settings["model"])
    spec = get_model(settings["model"])
    lightx2v_config = request.lightx2v_config or settings.get("lightx2v_config")
    if request.lightx2v_config is None and lightx2v_config is not None:
        from calib.backends.lightx2v import check_same_lightx2v_config

        check_same_lightx2v_config(settings, request.run)
    backend_name = check_backend(spec, settings["backend"], request.model_path, lightx2v_config)
    recorded_weights = settings.get("weights")
    if recorded_weights is not None and weights_id(spec, backend_name, request.model_path) != recorded_weights:
        raise UserError(f"{request.run}: recorded with weights {recorded_weights}, but this sweep would run {weights_id(spec, backend_name, request.model_path)}; record again (or pass the same --model-path)")
    peers.check_backend(methods, backend_name)
    run = Path(request.run)
    prompts = load_prompts(run / info["prompt_file"], need_image=spec.edit)
    if prompts.sha256 != settings["inputs_sha256"]:
        raise UserError(f"{run / info['prompt_file']}: the prompt set or its images changed since they were recorded in {run}; record again")
    items = prompts.items
    if request.prompts is not None:
        items = subset_of_recorded(load_prompts(request.prompts, need_image=spec.edit), prompts, request.run)
    seeds = settings["seeds"]
    steps, cfg, size = settings["steps"][0], settings["cfg"], tuple(settings["sizes"][0])
    pairs = [(item, seed) for item in items for seed in seeds]
    pair_name = lambda prompt_id, seed: unit_name(prompt_id, seed, steps, size)  # noqa: E731
    missing = [pair_name(i.id, s) for i, s in pairs if not (run / "refs" / f"{pair_name(i.id, s)}.png").exists()]
    if missing:
        raise UserError(f"{run}: no reference image for {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; finish `teacal record` first")
    trace = load_trace(run)
    check_finite(trace, run)
    if request.target_lpips is not None and request.target_psnr is not None:
        raise UserError("give --target-lpips or --target-psnr, not both")
    metric_names = parse_metrics(request.metrics)
    if "lpips" in metric_names and not request.lpips_random_backbone:
        reason = lpips_unavailable_reason()
        if reason is not None:
            if request.metrics_explicit or request.target_lpips is not None:
                raise UserError(reason)
            echo(f"note: {reason}; measuring PSNR and SSIM only")
            metric_names = tuple(m for m in metric_names if m != "lpips")
    if request.target_lpips is not None and "lpips" not in metric_names:
        raise UserError("--target-lpips needs the lpips metric")
    try:
        preset.resolve_cutoff(steps)
    except PresetError as err:
        raise UserError(str(err)) from None
    baselines = [load_baseline(name, preset) for name in request.baselines]
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)

    # -- configurations and their predicted schedules ----------------------------------------------------------
    configs = [Config("uncached", "uncached", "uncached")]
    if "teacache" in methods:
        configs += [Config(f"teacache-t{t:g}", "teacache", "teacache (calibrated)", threshold=t, preset=preset) for t in thresholds]
    for name, base in baselines:
        configs += [Config(_slug(f"baseline-{name}-t{t:g}"), "baseline", f"baseline: {name}", threshold=t, preset=base) for t in thresholds]
    predicted: dict[str, pd.DataFrame] = {c.id: simulate(trace, c.preset, c.threshold) for c in configs if c.method in ("teacache", "baseline")}
    forced_mask = np.array([s < preset.ret_steps or s >= preset.resolve_cutoff(steps) for s in range(steps)])
    counts = [round(predicted[c.id].groupby(["prompt_id", "seed", "branch"])["computed"].sum().mean()) for c in configs if c.method == "teacache"]
    budgets = oracle_budgets(request.oracle, counts, steps, int(forced_mask.sum()))
    step_error = trace.groupby(["step", "prompt_id", "seed"])["y_output"].max().groupby("step").mean().reindex(range(steps)).fillna(0).to_numpy()
    for k in budgets:
        configs.append(Config(f"oracle-k{k}", "oracle", "oracle (best static schedule, recorded error)", budget=k, preset=preset, schedule=tuple(bool(b) for b in oracle_schedule(step_error, k, forced_mask))))
    configs += [Config(s.id, s.method, s.label, threshold=s.threshold, params=s.params) for s in peer_settings]

    # Thresholds that give the same schedule on every recorded series share one run when the signal is exact.
    runs_as: dict[str, str] = {}
    if preset.signal in EXACT_SIGNALS:
        seen: dict[tuple, str] = {}
        for c in configs:
            if c.id in predicted and c.preset.signal in EXACT_SIGNALS:
                key = (c.preset.branch_mode, tuple(predicted[c.id]["computed"]))
                runs_as[c.id] = seen.setdefault(key, c.id)

    out = Path(request.out or request.run)
    sweep_settings = {
        "record": settings, "run": str(run), "signal": preset.signal, "coefficients": list(preset.coefficients),
        "ret_steps": preset.ret_steps, "cutoff_steps": preset.cutoff_steps, "branch_mode": preset.branch_mode,
        "max_consecutive_skips": preset.max_consecutive_skips, "metrics": list(metric_names),
        "lpips_random_backbone": request.lpips_random_backbone, "device": device,
    }
    check_same_settings(out / SWEEP_FILE, sweep_settings, "sweep")
    write_json(out / SWEEP_FILE, {"kind": "sweep", "settings": sweep_settings, "preset": str(request.preset), "updated": now_iso()})

    echo(f"sweep {spec.name}: {len(pairs)} generations per configuration, {steps} steps, {size[0]}x{size[1]}, CFG {cfg}; metrics {', '.join(metric_names)}")
    echo(f"{'configuration':<34}{'predicted computed calls':>26}")
    for c in configs:
        if c.id in predicted:
            shared = f"  (same schedule as {runs_as[c.id]})" if runs_as.get(c.id, c.id) != c.id else ""
            echo(f"{c.id:<34}{int(predicted[c.id]['computed'].sum()):>14} of {len(predicted[c.id]):<9}{shared}")

    # -- run -------------------------------------------------------------------------------------------------
    parts = out / "sweep"
    work = [(c, item, seed) for item, seed in pairs for c in configs if runs_as.get(c.id, c.id) == c.id]
    todo = [(c, item, seed) for c, item, seed in work if not (parts / c.id / f"{pair_name(item.id, seed)}.json").exists()]
    echo(f"{len(todo)} generations to run, {len(work) - len(todo)} already done")
    if todo:
        metrics = Metrics(metric_names, lpips_random_backbone=request.lpips_random_backbone)
        backend = load_backend(spec, backend_name, request.model_path, device, dtype, lightx2v_config)
        try:
            item, seed = todo[0][1], todo[0][2]
            backend.run(item, seed, steps, cfg, size)  # warm-up: first-call costs stay out of every timing
            peer_data = {}
            if any(c.method == "magcache" for c, _, _ in todo):
                key = {"record": settings, "device": device, "dtype": str(dtype), "diffusers": peers.diffusers_version()}
                peer_data["mag_ratios"] = peers.mag_ratios(backend, run, key, pairs, steps, cfg, size, echo=echo)
            with progress("sweep", len(todo)) as advance:
                for c, item, seed in todo:
                    name = pair_name(item.id, seed)
                    row = run_config(backend, c, item, seed, steps, cfg, size, peer_data)
                    with Image.open(run / "refs" / f"{name}.png") as ref:
                        row.update(metrics(row.pop("image"), ref.convert("RGB")))
                    write_json(parts / c.id / f"{name}.json", row)
                    advance(f"sweep {c.id} {name}")
        finally:
            backend.close()

    table = merge(parts, configs, runs_as, pairs, predicted)
    write_table(out / "sweep.parquet", table)
    echo(summary(table))
    echo(f"wrote {out / 'sweep.parquet'}")
    target = ("lpips", request.target_lpips) if request.target_lpips is not None else ("psnr", request.target_psnr) if request.target_psnr is not None else None
    if target is not None:
        recommend(table, preset, request.preset, *target, echo=echo)
    return table


def run_config(backend, config: Config, item, seed: int, steps: int, cfg: float, size, peer_data: dict | None = None) -> dict:
    row = {"config": config.id, "prompt_id": item.id, "seed": seed}
    if config.method in peers.PEERS:
        with peers.applied(backend.transformer, config.method, dict(config.params), steps, cfg, **(peer_data or {})) as counter:
            image, timing = backend.run(item, seed, steps, cfg, size)
        row.update(counter.row())
    elif config.method == "uncached":
        image, timing = backend.run(item, seed, steps, cfg, size)
        calls = steps * (2 if cfg > 1 else 1)
        row.update(computed=calls, skipped=0, block_forwards=calls * backend.num_blocks,
                   computed_cond=steps, computed_uncond=steps if cfg > 1 else 0)
    else:
        policy = StaticSchedulePolicy(config.preset, np.array(config.schedule)) if config.schedule else None
        with backend.caching(config.preset, config.threshold, steps, policy) as cache:
            image, timing = backend.run(item, seed, steps, cfg, size)
            stats = cache.stats()
            per_branch = stats.per_branch()
            row.update(computed=stats.computed, skipped=stats.skipped, block_forwards=cache.block_forwards(),
                       computed_cond=per_branch.get("cond", {}).get("computed", 0),
                       computed_uncond=per_branch.get("uncond", {}).get("computed", 0),
                       schedule="".join("x" if c else "." for c in stats.schedule("cond")))
    row.update(seconds=timing["denoise_seconds"], image=image)
    return row


def merge(parts: Path, configs: list[Config], runs_as: dict[str, str], pairs, predicted: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for c in configs:
        source = runs_as.get(c.id, c.id)
        for item, seed in pairs:
            path = parts / source / f"{pair_name(item.id, seed)}.json"
            if not path.exists():
                continue
            row = json.loads(path.read_text())
            row.update(config=c.id, method=c.method, label=c.label, threshold=c.threshold, budget=c.budget, measured_as=source)
            if c.id in predicted:
                p = predicted[c.id]
                row["predicted_computed"] = int(p[(p["prompt_id"] == item.id) & (p["seed"] == seed)]["computed"].sum())
            rows.append(row)
    table = pd.DataFrame(rows)
    uncached = table[table["method"] == "uncached"].set_index(["prompt_id", "seed"])["seconds"]
    table["speedup"] = [uncached.get((p, s), np.nan) / sec for p, s, sec in zip(table["prompt_id"], table["seed"], table["seconds"], strict=True)]
    table["calls"] = table["computed"] + table["skipped"]
    # Zero-overhead speedup from the blocks that ran: some peers skip per block (FirstBlockCache and DBCache always
    # run block 0), so calls / computed would flatter them. For whole-call skips both ratios are the same.
    blocks_per_call = (table["block_forwards"] / table["calls"])[table["method"] == "uncached"].max()
    table["ideal_speedup"] = table["calls"] * blocks_per_call / table["block_forwards"]
    for metric in METRICS:
        if metric not in table:
            table[metric] = np.nan
    columns = ["method", "label", "config", "threshold", "budget", "prompt_id", "seed", "computed", "skipped", "calls", "computed_cond", "computed_uncond", "predicted_computed",
               "block_forwards", "seconds", "speedup", "ideal_speedup", "lpips", "psnr", "ssim", "schedule", "measured_as"]
    return table.reindex(columns=columns)


def summary(table: pd.DataFrame) -> str:
    view = aggregate(table)
    lines = [f"{'configuration':<32}{'computed':>9}{'predicted':>10}{'speedup':>9}{'ideal':>7}{'LPIPS':>8}{'PSNR':>7}{'SSIM':>7}"]
    for r in view.itertuples():
        predicted = "" if math.isnan(r.predicted) else f"{r.predicted:.1f}"
        lines.append(f"{r.config:<32}{r.computed:>9.1f}{predicted:>10}{r.speedup:>8.2f}x{r.ideal_speedup:>6.2f}x{r.lpips:>8.4f}{r.psnr:>7.2f}{r.ssim:>7.4f}")
    return "\n".join(lines)


def recommend(table: pd.DataFrame, preset: Preset, preset_path: str, metric: str, target: float, echo=print) -> float | None:
    """The fastest calibrated threshold that meets `target` on the mean and on the worst prompt; saved in the preset."""
    view = aggregate(table[table["method"] == "teacache"])
    if metric == "lpips":
        ok = view[(view["lpips"] <= target) & (view["lpips_worst"] <= target)]
    else:
        ok = view[(view["psnr"] >= target) & (view["psnr_worst"] >= target)]
    measured = [
        {k: (None if isinstance(v, float) and math.isnan(v) else round(float(v), 6)) for k, v in
         dict(threshold=r.threshold, speedup=r.speedup, computed_fraction=r.computed / r.calls,
              lpips=r.lpips, lpips_worst=r.lpips_worst, psnr=r.psnr, psnr_worst=r.psnr_worst, ssim=r.ssim).items()}
        for r in view.itertuples()
    ]
    if ok.empty:
        echo(f"no threshold meets {metric} {'<=' if metric == 'lpips' else '>='} {target} on the mean and the worst prompt; preset unchanged")
        return None
    best = ok.sort_values(["speedup", "threshold"], ascending=[False, True]).iloc[0]
    updated = preset.replace(threshold=float(best["threshold"]), thresholds=measured)
    updated.save(preset_path)
    echo(f"recommended threshold {best['threshold']:g}: {best['speedup']:.2f}x, {metric} mean {best[metric]:.4g}, worst {best[metric + '_worst']:.4g}; written to {preset_path}")
    return float(best["threshold"])

