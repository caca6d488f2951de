"""The sweep table: one row per (configuration, prompt, seed), as `teacal sweep` writes it. No torch.

Aggregated one row per configuration (`aggregate`), its static schedules picked out for the oracle (`static_configs`),
kept whole across sweeps into one folder (`with_earlier_sweeps`), printed (`summary`), and read for the threshold to
recommend (`recommend`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from calib.configs import parse_forecast
from calib.errors import UserError
from calib.runfiles import SWEEP_TABLE, read_table
from teacache.preset import Preset


# -- sweep tables -------------------------------------------------------------------------------------------
def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: means over the prompts, the worst prompt, and the headline speedup.

    speedup = total uncached time / total time over the prompts, each prompt's uncached run timed in the same process
    as its configurations. PSNR of an image identical to its reference is infinite: the mean is over the finite
    ones, and `identical` marks configurations whose every image is identical (an uncached run, threshold 0).
    """
    finite = table.assign(psnr=table["psnr"].where(np.isfinite(table["psnr"])), same=~np.isfinite(table["psnr"]))
    keys = ["method", "label", "config"]
    if "forecast" in table:
        keys.append("forecast")
    view = finite.groupby(keys, sort=False, dropna=False).agg(
        threshold=("threshold", "first"), budget=("budget", "first"), computed=("computed", "mean"),
        predicted=("predicted_computed", "mean"), calls=("calls", "mean"), seconds=("seconds", "sum"),
        uncached_seconds=("uncached_seconds", "sum"), ideal_speedup=("ideal_speedup", "mean"), lpips=("lpips", "mean"),
        lpips_worst=("lpips", "max"), psnr=("psnr", "mean"), psnr_worst=("psnr", "min"), ssim=("ssim", "mean"),
        ssim_worst=("ssim", "min"), identical=("same", "all"), prompts=("prompt_id", "count"),
    ).reset_index()
    view["speedup"] = view["uncached_seconds"] / view["seconds"]
    view.loc[view["identical"], ["psnr", "psnr_worst"]] = np.inf
    return view


# The methods whose schedules TeaCache's runtime runs with plain reuse: the oracle's candidates. A peer cache (MagCache,
# FirstBlockCache, ...) may skip the same calls on every prompt, but it is not TeaCache's schedule: never a candidate.
SCHEDULE_METHODS = ("teacache", "baseline", "oracle", "static")


def static_configs(table: pd.DataFrame) -> pd.Series:
    """The configurations of a sweep table that are static schedules: plain reuse, one schedule for both CFG branches,
    the same schedule on every generation the sweep measured (an oracle or uniform schedule, and TeaCache or a borrowed
    set on a timestep-only signal). Adaptive ones (another schedule per prompt), forecasts and peer caches are left
    out. Returns each one's schedule, indexed by config."""
    rows = table[table["method"].isin(SCHEDULE_METHODS) & (table["forecast"].fillna("none") == "none") & table["schedule"].notna()]
    if "computed_uncond" in rows:  # one schedule for both branches; without CFG the uncond branch never runs (0)
        uncond = rows["computed_uncond"]
        rows = rows[uncond.isna() | (uncond == 0) | (rows["computed_cond"] == uncond)]
    generations = int((table["method"] == "uncached").sum())  # one uncached row per (prompt, seed)
    per_config = rows.groupby("config", sort=False)["schedule"].agg(["nunique", "size", "first"])
    static = per_config[(per_config["nunique"] == 1) & (per_config["size"] == generations)]
    return static["first"].rename("schedule")


def with_earlier_sweeps(table: pd.DataFrame, out: Path, echo=print) -> pd.DataFrame:
    """One folder, one table: the configurations that earlier sweeps into `out` measured (another --method, --baseline
    or --thresh, under the same settings, which `check_same_settings` holds to) stay in it beside this sweep's."""
    path = out / SWEEP_TABLE
    if not path.exists():
        return table
    earlier = read_table(path)
    kept = earlier[~earlier["config"].isin(table["config"])]
    if kept.empty:
        return table
    echo(f"{path} keeps {kept['config'].nunique()} configurations that earlier sweeps here measured ({', '.join(sorted(kept['label'].unique()))})")
    return pd.concat([table, kept.reindex(columns=table.columns)], ignore_index=True)


def check_same_pairs(out: Path, pairs: list[tuple]) -> None:
    """A sweep into a folder whose table measured other (prompt, seed) pairs would mix prompt sets in one table."""
    path = out / SWEEP_TABLE
    if not path.exists():
        return
    earlier = read_table(path)
    measured = set(zip(earlier["prompt_id"], earlier["seed"].astype(int), strict=True))
    if measured != {(item.id, int(seed)) for item, seed in pairs}:
        raise UserError(f"{path}: measured other prompts or seeds ({len(measured)} pairs) than this sweep ({len(pairs)}); one table holds one "
                        "prompt set: sweep into another --out")


def summary(table: pd.DataFrame) -> str:
    view = aggregate(table)
    with_lpips = view["lpips"].notna().any()
    lpips_head = f"{'LPIPS':>8}" if with_lpips else ""
    lines = [f"{'configuration':<34}{'computed':>9}{'predicted':>10}{'speedup':>9}{'ideal':>7}{lpips_head}{'PSNR':>7}{'worst':>7}{'SSIM':>7}"]
    for r in view.itertuples():
        predicted = "" if math.isnan(r.predicted) else f"{r.predicted:.1f}"
        lpips = (f"{r.lpips:>8.4f}" if math.isfinite(r.lpips) else f"{'':>8}") if with_lpips else ""
        psnr, worst = ("same", "same") if r.identical else (f"{r.psnr:.2f}", f"{r.psnr_worst:.2f}")
        lines.append(f"{r.config:<34}{r.computed:>9.1f}{predicted:>10}{r.speedup:>8.2f}x{r.ideal_speedup:>6.2f}x{lpips}{psnr:>7}{worst:>7}{r.ssim:>7.4f}")
    if not with_lpips:
        lines.append("(LPIPS not measured: its AlexNet weights are not available here; see the README)")
    return "\n".join(lines)


def recommend(table: pd.DataFrame, preset: Preset, save_to: Path, metric: str, target: float, echo=print) -> float | None:
    """The calibrated threshold with the fewest computed calls that meets `target` on the mean and on the worst prompt,
    written with the measured table as a new preset (never over the input preset)."""
    view = aggregate(table[(table["method"] == "teacache") & (table["forecast"] == parse_forecast("preset", preset)[0])])
    if metric == "lpips":
        ok = view[(view["lpips"] <= target) & (view["lpips_worst"] <= target)]
    else:
        ok = view[(view["psnr"] >= target) & (view["psnr_worst"] >= target)]
    measured = [  # JSON has no infinity: PSNR of identical images is null, with "identical": true
        {**{k: (None if isinstance(v, float) and not math.isfinite(v) else round(float(v), 6)) for k, v in
            dict(threshold=r.threshold, speedup=r.speedup, computed_fraction=r.computed / r.calls,
                 lpips=r.lpips, lpips_worst=r.lpips_worst, psnr=r.psnr, psnr_worst=r.psnr_worst, ssim=r.ssim).items()},
         "identical": bool(r.identical)}
        for r in view.itertuples()
    ]
    if ok.empty:
        echo(f"no threshold meets {metric} {'<=' if metric == 'lpips' else '>='} {target:g} on the mean and the worst prompt; no preset written")
        return None
    # Fewest computed calls first: unlike wall time, calls are not noisy; among equal calls, the faster measurement.
    best = ok.sort_values(["computed", "speedup"], ascending=[True, False]).iloc[0]
    Preset.save(preset.replace(threshold=float(best["threshold"]), thresholds=measured), save_to)
    echo(f"recommended threshold {best['threshold']:g}: {best['computed']:.1f} of {best['calls']:.0f} calls computed, {best['speedup']:.2f}x, "
         f"{metric} mean {best[metric]:.4g}, worst {best[metric + '_worst']:.4g}; written to {save_to}")
    return float(best["threshold"])
