"""Schedules and what they cost the final image, from recorded traces and probes, without running the model. No torch.

The cost model
    A call at step ``m`` skipped after the branch's last computed step ``j`` adds ``r̂`` (the reuse rule's residual)
    instead of its own residual ``r_m``. Its error is the recorded reuse error ``e(m, j)``: the rel-L1 of ``r_m``
    against ``r_j`` (trace columns ``y_residual`` / ``r_residual_<m-j>``; with a forecast, against the forecast from
    ``r_j`` and the computed step before it). How much that moves the *final* image depends on when it happens:
    ``teacal probe`` skips single steps and measures the final latents, giving a sensitivity ``s_m`` per step; longer
    probed windows show that errors inside one window compound, by ``1 + γ·(m - j - 1)``. So::

        cost(skip m after j) = s_m · e(m, j) · (1 + γ·(m - j - 1))
        cost(schedule)       = mean over branches of the sum over skipped calls

    predicts the final image's RMSE against the uncached one, before 8-bit rounding (on the tiny model: log-correlation
    0.99 for probed windows of 2-3 steps), so ``-20·log10(cost)`` is its PSNR. Image, not latents: the VAE passes a late
    step's latent error on about half as strongly as a middle step's. Without probes, ``s = 1, γ = 0``.

* `teacache_schedules`: what TeaCache would decide, feeding recorded distances to the same `TeaCachePolicy` the
  runtimes use. Exact for `temb` and `sigma` (read from the timestep alone, not the latents); an estimate for `modin`.
* `oracle_schedules`: for every budget at once, the static schedule of least cost (dynamic programming).
* `uniform_schedule`: evenly spaced computed steps, the simplest static schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from teacache.forecast import NO_FORECAST, Forecast
from teacache.policy import TeaCachePolicy
from teacache.preset import SIGNALS, Preset

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


# -- the cost model -------------------------------------------------------------------------------------------------
@dataclass
class CostModel:
    """``cost(skip m after j) = s_m · e(m, j) · (1 + γ·(m - j - 1))``; see the module notes."""

    target: str = "residual"  # which reuse error: of the block residual (what a skip substitutes) or of the output
    gain: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # steps -> {"sigma", "gain"}: s_m = g(σ_m) · Δσ_m
    gamma: float = 0.0
    forecast: Forecast = NO_FORECAST
    # with a forecast: [sigma span of the slope, final error with the forecast / without] knots, from forecast probes
    forecast_ratio: tuple[tuple[float, float], ...] = ()

    @property
    def probed(self) -> bool:
        return bool(self.gain)

    def sensitivity(self, sigma: np.ndarray) -> np.ndarray:
        """s_m for a series with these sigmas: the probed gain per unit of sigma step, interpolated in sigma."""
        n = len(sigma)
        if not self.gain:
            return np.ones(n)
        step = _sigma_step(sigma)
        if n in self.gain:
            return np.asarray(self.gain[n]["gain"], float) * step
        # the gain is per unit of sigma step, so it transfers across step counts: interpolate it over sigma
        points = sorted((s, g) for probed in self.gain.values() for s, g in zip(probed["sigma"], probed["gain"], strict=True) if math.isfinite(g))
        xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
        return np.interp(sigma, xs, ys) * step

    def matrix(self, unit: UnitSeries) -> np.ndarray:
        """``c[b, m, j, p]``: the cost of skipping m after computing j, when the computed step before j is j - p
        (p = 0: none). Infinite where the gap exceeds the recorded max gap. Without a forecast p does not matter;
        with one, the plain cost is scaled by the measured ratio at the forecast's reach (`forecast_ratio`)."""
        e = self.reuse_errors(unit)  # [b, m, j]
        n, width = unit.steps, unit.max_gap + 1
        gap = np.arange(n)[:, None] - np.arange(n)[None, :]  # m - j
        factor = self.sensitivity(unit.sigma)[:, None] * (1 + self.gamma * np.maximum(gap - 1, 0))
        plain = (e * factor[None])[..., None]
        if not self.forecast.extrapolates or not self.forecast_ratio:
            return np.broadcast_to(plain, (*plain.shape[:3], width))
        # [m, j, p]: the ratio at the forecast's reach (`Forecast.reach`), as the runtime looks up its damping
        spans, ratios = zip(*self.forecast_ratio, strict=True)
        sigma = np.asarray(unit.sigma, float)
        j, p = np.arange(n)[:, None], np.arange(width)[None, :]
        span = np.abs(sigma[np.clip(j - p, 0, None)] - sigma[j])  # [j, p]
        ahead = np.abs(sigma[None, :] - sigma[:, None])  # [m, j]
        ratio = np.interp(np.maximum(span[None], ahead[:, :, None]), spans, ratios)
        ratio[:, ~((p >= 1) & (p <= j))] = 1.0  # no slope yet (p = 0) or none recorded
        return plain * ratio[None]

    def reuse_errors(self, unit: UnitSeries) -> np.ndarray:
        """``e[b, m, j]``, the recorded reuse error of skipping m after j; infinite beyond the recorded max gap."""
        n, max_gap = unit.steps, unit.max_gap
        recorded = unit.reuse[self.target]  # [b, m, k]
        e = np.full((len(unit.branches), n, n), np.inf)
        for k in range(1, max_gap + 1):
            m = np.arange(k, n)
            values = recorded[:, m, k]
            e[:, m, m - k] = np.where(np.isfinite(values), values, np.inf)
        return e


def _sigma_step(sigma: np.ndarray) -> np.ndarray:
    """Δσ_m = σ_m - σ_{m+1}, the Euler step that step m's prediction drives (the last step goes to 0)."""
    return np.abs(sigma - np.append(sigma[1:], 0.0))


def schedule_cost(matrix: np.ndarray, schedules: np.ndarray) -> float:
    """Modelled cost of per-branch schedules ``[b, n]`` (True = computed) under ``matrix[b, m, j, p]``."""
    total = 0.0
    for b, schedule in enumerate(np.atleast_2d(schedules)):
        last, gap_before = None, 0
        for m, computed in enumerate(schedule):
            if computed:
                gap_before = 0 if last is None else m - last
                last = m
            elif last is None:
                return math.inf
            else:
                total += matrix[b, m, last, min(gap_before, matrix.shape[3] - 1)]
    return total / len(np.atleast_2d(schedules))


def decibels(cost: float) -> float:
    """``-20·log10(cost)``: the cost as a PSNR up to a constant (100 for a schedule that skips nothing)."""
    return 100.0 if cost <= 0 else -20 * math.log10(cost)


def oracle_schedules(matrix: np.ndarray, forced: np.ndarray) -> dict[int, np.ndarray]:
    """For each budget k (computed steps, forced ones included), the static schedule of least summed cost.

    `matrix` is ``c[m, j, p]`` for one shared schedule (the mean over branches and units). Dynamic programming over
    (last computed step j, its gap p to the one before, steps computed): O(n² · K · budgets).
    """
    n, _, width = matrix.shape
    forced = np.asarray(forced, bool).copy()
    forced[0] = True  # nothing to reuse before the first computed step
    # window[j, p, i]: cost of computing j (gap p before it), skipping j+1..i-1, computing i next (i = n: to the end)
    window = np.full((n, width, n + 1), np.inf)
    for j in range(n):
        running = np.zeros(width)
        window[j, :, j + 1] = 0.0
        for i in range(j + 2, n + 1):
            if forced[i - 1]:
                break
            running = running + matrix[i - 1, j, :]
            window[j, :, i] = running
    budgets = n + 1
    best = np.full((n, width, budgets), np.inf)  # best[j, p, c]: least cost so far, j computed as the c-th step
    parent = np.full((n, width, budgets, 2), -1, int)
    best[0, 0, 1] = 0.0
    for j in range(n):
        for p in range(width):
            row = best[j, p]
            if not np.isfinite(row).any():
                continue
            for i in range(j + 1, n):
                cost = window[j, p, i]
                if not math.isfinite(cost):
                    continue
                q = min(i - j, width - 1)
                candidate = np.full(budgets, np.inf)
                candidate[1:] = row[:-1] + cost
                better = candidate < best[i, q]
                best[i, q][better] = candidate[better]
                parent[i, q][better] = (j, p)
    out = {}
    for budget in range(int(forced.sum()), n + 1):
        finish = best[:, :, budget] + window[:, :, n]
        if not np.isfinite(finish).any():
            continue
        j, p = np.unravel_index(int(np.argmin(finish)), finish.shape)
        schedule = np.zeros(n, bool)
        c = budget
        while j >= 0:
            schedule[j] = True
            j, p = parent[j, p, c]
            c -= 1
        out[budget] = schedule
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
    x = unit.x[preset.signal]
    out = np.zeros((len(thresholds), len(unit.branches), unit.steps), bool)
    for t, threshold in enumerate(thresholds):
        policy = TeaCachePolicy(preset, float(threshold))
        policy.start(unit.steps)
        for m in range(unit.steps):
            for b, branch in enumerate(unit.branches):
                distance = None if not math.isfinite(x[b, m]) else float(x[b, m])
                out[t, b, m] = policy.decide_distance(m, branch, distance)
    return out


def simulate(trace: pd.DataFrame, preset: Preset, threshold: float) -> pd.DataFrame:
    """One row per recorded call: the unit's identifiers, branch, step and whether TeaCache computes it."""
    rows = []
    for unit in unit_series(trace):
        schedule = teacache_schedules(unit, preset, [threshold])[0]
        for b, branch in enumerate(unit.branches):
            for m in range(unit.steps):
                rows.append((*unit.key, branch, m, bool(schedule[b, m])))
    return pd.DataFrame(rows, columns=[*UNIT, "branch", "step", "computed"])


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


def simulated_front(units: list[UnitSeries], model: CostModel, preset: Preset, thresholds=THRESHOLD_GRID,
                    matrices: dict | None = None) -> pd.DataFrame:
    """Per threshold: mean computed calls per branch (as a fraction of steps) and mean modelled dB over the units."""
    rows = []
    for unit in units:
        matrix = matrices[unit.key] if matrices is not None else model.matrix(unit)
        for threshold, schedules in zip(thresholds, teacache_schedules(unit, preset, thresholds), strict=True):
            rows.append((float(threshold), schedules.mean(), decibels(schedule_cost(matrix, schedules))))
    frame = pd.DataFrame(rows, columns=["threshold", "computed_fraction", "db"])
    return frame.groupby("threshold", as_index=False).mean()


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
    sample = units[:1] if preset.signal in EXACT_SIGNALS else units
    resolution = 1.0 / max(u.steps for u in sample)
    seen: dict[float, float] = {}

    def fraction(threshold: float) -> float:
        if threshold not in seen:
            seen[threshold] = float(np.mean([teacache_schedules(u, preset, [threshold]).mean() for u in sample]))
        return seen[threshold]

    grid = list(np.geomspace(1e-6, 1e3, 40))
    while fraction(grid[-1]) > min(budgets) and grid[-1] < 1e9:
        grid.append(grid[-1] * 10)
    pending = list(zip(grid[:-1], grid[1:], strict=True))
    while pending:
        lo, hi = pending.pop()
        if abs(fraction(lo) - fraction(hi)) > resolution + 1e-9 and hi / lo > 1 + 1e-6:
            mid = math.sqrt(lo * hi)
            pending += [(lo, mid), (mid, hi)]
    points = sorted(seen.items())
    chosen = []
    for budget in budgets:
        ok = [(f, -t) for t, f in points if f <= budget + 1e-9]
        if ok:
            chosen.append(float(f"{-max(ok)[1]:.6g}"))
    return sorted(set(chosen))


def db_at_budgets(front: pd.DataFrame, budgets: np.ndarray) -> np.ndarray:
    """For each budget (fraction of calls computed), the best modelled dB among points that compute no more."""
    out = []
    for budget in budgets:
        ok = front[front["computed_fraction"] <= budget + 1e-9]
        out.append(float(ok["db"].max()) if len(ok) else np.nan)
    return np.array(out)


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
