"""What TeaCache decides, and the static schedules it is compared with, from recorded traces, without running the
model. No torch. What a schedule costs the final image is `calib.costmodel`.

* `unit_series`: a trace as one series per recorded generation (per branch: the signals' distances, the reuse errors).
* `teacache_schedules`: what TeaCache would decide, feeding recorded distances to the same `TeaCachePolicy` the
  runtimes use. Exact for `temb` and `sigma` (read from the timestep alone, not the latents); an estimate for `modin`
  and for an adaptive preset, whose observed residual changes are the uncached run's (reach up to the recording's
  max gap; a longer window is not observed).
* `thresholds_for_budgets`, `threshold_for_speedup`: thresholds placed by simulation (`refined_thresholds`: where a
  step function of the threshold changes).
* `uniform_schedule`, `lemica_schedule`: static schedules (evenly spaced; LeMiCa's published ones);
  `StaticSchedulePolicy` runs any static schedule through the runtime.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pandas as pd

from teacache.policy import TeaCachePolicy
from teacache.preset import SIGNALS, Preset

T = TypeVar("T")

BRANCH_ORDER = ("cond", "uncond")  # the order the pipelines call them in each step
UNIT = ["prompt_id", "seed", "steps", "width", "height"]


@dataclass
class UnitSeries:
    """One recorded generation, as the cost model and the simulators need it."""

    key: tuple  # (prompt_id, seed, steps, width, height)
    group: str  # the prompt's identity: cross-validation keeps all of a prompt's units on one side
    branches: tuple[str, ...]
    sigma: np.ndarray  # [n]
    x: dict[str, np.ndarray]  # signal -> [branches, n] rel-L1 against the previous step (NaN at step 0)
    reuse: dict[str, np.ndarray]  # target -> [branches, n, K + 1]: [b, m, k] = e(m, m - k); NaN where m < k

    @property
    def steps(self) -> int:
        return len(self.sigma)

    @property
    def max_gap(self) -> int:
        return next(iter(self.reuse.values())).shape[2] - 1


def unit_series(trace: pd.DataFrame, groups: dict[str, str] | None = None) -> list[UnitSeries]:
    """The trace, one `UnitSeries` per unit. `groups` maps prompt_id to its identity (default: the id)."""
    gaps = sorted({int(c.rsplit("_", 1)[1]) for c in trace.columns if c.startswith("r_residual_")})
    max_gap = max(gaps, default=1)
    out = []
    for key, unit in trace.groupby(UNIT, sort=True):
        branches = tuple(b for b in BRANCH_ORDER if b in set(unit["branch"])) or tuple(sorted(set(unit["branch"])))
        n = int(key[2])
        rows = {b: unit[unit["branch"] == b].sort_values("step") for b in branches}
        sigma = rows[branches[0]]["sigma"].to_numpy(float)
        x = {s: np.stack([rows[b][f"x_{s}"].to_numpy(float) for b in branches]) for s in SIGNALS}
        reuse = {}
        for target in ("residual", "output"):
            e = np.full((len(branches), n, max_gap + 1), np.nan)
            for bi, b in enumerate(branches):
                e[bi, :, 1] = rows[b][f"y_{target}"].to_numpy(float)
                for k in gaps:
                    e[bi, :, k] = rows[b][f"r_{target}_{k}"].to_numpy(float)
            reuse[target] = e
        group = (groups or {}).get(key[0], str(key[0]))
        out.append(UnitSeries(tuple(key), group, branches, sigma, x, reuse))
    return out


def schedule_text(schedule) -> str:
    """A schedule as the files and reports write it: x computed, . skipped."""
    return "".join("x" if c else "." for c in schedule)


def uniform_schedule(steps: int, budget: int, forced: np.ndarray | None = None) -> np.ndarray:
    """`budget` computed steps spread evenly over the run, the forced ones (default: the first and the last) included."""
    if forced is None:
        forced = np.zeros(steps, bool)
        forced[[0, -1]] = True
    schedule = np.asarray(forced, bool).copy()
    free = budget - int(schedule.sum())
    if free > 0:
        candidates = np.flatnonzero(~schedule)
        picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, free + 2)[1:-1]).astype(int))
        schedule[candidates[picks]] = True
    return schedule


# LeMiCa's published static schedules for Qwen-Image at 50 steps, true CFG 4, one mask for both CFG branches
# (LeMiCa4QwenImage/inference_qwenimage.py): its graph search computes the early steps densely. On the real
# Qwen-Image-2512 they measure 29.2 / 24.3 / 17.8 dB PSNR (MeanCache's README).
LEMICA_STEPS = 50
LEMICA = {
    "slow": (*range(20), 26, 33, 36, 42, 49),
    "medium": (*range(11), 15, 22, 29, 36, 42, 49),
    "fast": (0, 1, 3, 7, 14, 21, 28, 35, 42, 49),
}


def lemica_schedule(name: str, sigma: np.ndarray, published_sigma: np.ndarray) -> np.ndarray:
    """LeMiCa's `name` schedule on a run whose steps have these sigmas. At 50 steps as published; at another step count
    each published computed step maps to the run's step of nearest sigma (`published_sigma`: the 50-step sigmas under
    the run's own shift), so the schedule computes where in the noise it did; the first and last steps stay computed,
    and steps that map to the same one merge (fewer calls at fewer steps)."""
    published = np.zeros(LEMICA_STEPS, bool)
    published[list(LEMICA[name])] = True
    if len(sigma) == LEMICA_STEPS:
        return published
    schedule = np.zeros(len(sigma), bool)
    schedule[[int(np.argmin(np.abs(np.asarray(sigma) - s))) for s in np.asarray(published_sigma)[published]]] = True
    schedule[[0, -1]] = True
    return schedule


# Signals read from the timestep alone: their recorded distances depend neither on skipped steps nor on the prompt, so
# a simulated schedule is exact and the same for every unit.
EXACT_SIGNALS = ("temb", "sigma")


# -- TeaCache's own schedules ------------------------------------------------------------------------------------
def teacache_schedules(unit: UnitSeries, preset: Preset, thresholds) -> np.ndarray:
    """``[thresholds, branches, n]``: what TeaCache computes, from the unit's recorded distances (see module notes)."""
    out = np.zeros((len(thresholds), len(unit.branches), unit.steps), bool)
    for t, threshold in enumerate(thresholds):
        out[t] = simulate_policy(unit, TeaCachePolicy(preset, float(threshold)))
    return out


def simulate_policy(unit: UnitSeries, policy: TeaCachePolicy) -> np.ndarray:
    """``[branches, n]``: one generation of the unit through `policy`, fed the recorded signal distances and, after each
    computed call of an `adapt` preset, the recorded residual change over the window it closed."""
    x = unit.x[policy.preset.signal]
    out = np.zeros((len(unit.branches), unit.steps), bool)
    policy.start(unit.steps)
    last_computed = [None] * len(unit.branches)
    for m in range(unit.steps):
        for b, branch in enumerate(unit.branches):
            out[b, m] = policy.decide_distance(m, branch, float(x[b, m]) if math.isfinite(x[b, m]) else None)
            if out[b, m]:
                if policy.preset.adapt and last_computed[b] is not None and m - last_computed[b] <= unit.max_gap:
                    policy.observe_change(m, branch, float(unit.reuse["residual"][b, m, m - last_computed[b]]))
                last_computed[b] = m
    return out


def shared_schedule(preset: Preset) -> bool:
    """Whether every prompt gets the same schedule at a threshold: a signal read from the timestep alone, and no
    per-prompt ratio (`Preset.adapt`)."""
    return preset.signal in EXACT_SIGNALS and not preset.adaptive


def computed_fraction(units: list[UnitSeries], preset: Preset, threshold: float) -> float:
    return float(np.mean([teacache_schedules(u, preset, [threshold]).mean() for u in units]))


THRESHOLD_GRID = np.unique(np.round(np.geomspace(1e-4, 50.0, 120), 6))


def threshold_for_speedup(units: list[UnitSeries], preset: Preset, speedup: float) -> tuple[float, float]:
    """The smallest threshold whose simulated schedules reach `speedup` (calls / computed calls), and the speedup it
    gives; where no threshold reaches it, the fastest one and its speedup."""
    best = (float(THRESHOLD_GRID[0]), 1.0)
    for threshold in THRESHOLD_GRID:
        reached = 1.0 / computed_fraction(units, preset, float(threshold))
        if reached > best[1] + 1e-12:
            best = (float(threshold), reached)
        if reached >= speedup:
            return float(threshold), reached
    return best


def forced_steps(preset: Preset, steps: int) -> np.ndarray:
    cutoff = preset.resolve_cutoff(steps)
    return np.array([m < preset.ret_steps or m >= cutoff for m in range(steps)])


def refined_thresholds(grid, value: Callable[[float], T], differ: Callable[[T, T], bool], min_ratio: float) -> dict[float, T]:
    """`value` at every threshold of the ascending `grid`, and at the geometric midpoint of any two neighbours whose
    values `differ`, recursively, until such neighbours are within `min_ratio` of each other: where a step function of
    the threshold (the computed share, the schedule) changes, which a fixed grid misses."""
    seen: dict[float, T] = {}

    def at(threshold: float) -> T:
        if threshold not in seen:
            seen[threshold] = value(threshold)
        return seen[threshold]

    pending = list(zip(grid[:-1], grid[1:], strict=True))
    while pending:
        lo, hi = pending.pop()
        if differ(at(lo), at(hi)) and hi / lo > min_ratio:
            mid = math.sqrt(lo * hi)
            pending += [(lo, mid), (mid, hi)]
    return seen


def thresholds_for_budgets(units: list[UnitSeries], preset: Preset, budgets) -> list[float]:
    """For each budget (fraction of calls computed), the threshold whose simulated schedules compute the most without
    exceeding it, on average over the units.

    The threshold -> computed-calls map is a step function, not always monotone, whose steps a fixed grid misses (and
    whose place depends on the coefficients' scale). A log grid is refined by bisection wherever neighbouring
    thresholds differ by more than one computed step. With `temb` every unit has the same schedule, so one unit
    stands for all; a signal read from the latents (`modin`) gives each prompt its own, so all of them are averaged:
    a sample of three put the mean of 24 prompts above the budget (16.1 calls for 16), and the front had no point there.
    Thresholds that give the same schedules are returned once.
    """
    sample = units[:1] if shared_schedule(preset) else units
    resolution = 1.0 / max(u.steps for u in sample)

    @functools.cache
    def fraction(threshold: float) -> float:
        return float(np.mean([teacache_schedules(u, preset, [threshold]).mean() for u in sample]))

    grid = list(np.geomspace(1e-6, 1e3, 40))
    while fraction(grid[-1]) > min(budgets) and grid[-1] < 1e9:
        grid.append(grid[-1] * 10)
    seen = refined_thresholds(grid, fraction, lambda a, b: abs(a - b) > resolution + 1e-9, 1 + 1e-6)
    points = sorted(seen.items())
    chosen = []
    for budget in budgets:
        ok = [(f, -t) for t, f in points if f <= budget + 1e-9]
        if ok:
            chosen.append(float(f"{-max(ok)[1]:.6g}"))
    return sorted(set(chosen))


class StaticSchedulePolicy(TeaCachePolicy):
    """Computes exactly the steps a fixed schedule names, for every branch: how oracle schedules and probes run.

    Only the rule is replaced; ordering checks, residual guards and stats stay TeaCachePolicy's.
    """

    def __init__(self, preset: Preset, schedule: np.ndarray) -> None:
        super().__init__(preset.replace(branch_mode="shared", domain={}), threshold=0.0)
        self.schedule = np.asarray(schedule, bool)

    def start(self, num_steps: int) -> None:
        if num_steps != len(self.schedule):
            raise ValueError(f"the schedule has {len(self.schedule)} steps, the run {num_steps}")
        super().start(num_steps)

    def _rule(self, series, step: int, distance: float | None) -> tuple[bool, str]:
        return bool(self.schedule[step]), "schedule"


def typical_log_ratio(units: list[UnitSeries], preset: Preset, threshold: float) -> float:
    """The median over these units' windows of log(observed / predicted residual change) under the preset's schedules
    at `threshold`: what `Preset.adapt["typical"]` calls a typical prompt's pace (the windows a run closes, not single
    steps: a residual's change over a window is less than the sum of its steps' changes)."""
    probe = preset.replace(adapt={"strength": 0.0, "typical": 0.0, "clip": 1.0})  # observes, never scales
    ratios = []
    for unit in units:
        policy = TeaCachePolicy(probe, threshold)
        simulate_policy(unit, policy)
        ratios += [r for branch in unit.branches for r in policy.log_ratios(branch)]
    if not ratios:
        raise ValueError("no window was observed: the recordings hold no residual change over the windows this threshold closes")
    return float(np.median(ratios))
