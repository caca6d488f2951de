"""`teacal fit`: the rescale polynomial, fitted to what a skip costs the final image, into a preset. No torch.

TeaCache computes step ``i`` once its accumulator ``Σ_{m=j+1..i} poly(x_m)`` (``j`` the last computed step, ``x``
the signal's rel-L1 between consecutive steps) reaches the threshold. So the accumulator should predict what skipping
``j+1..i`` costs: the window cost ``W(j, i) = Σ_m cost(skip m after j)`` of `calib.simulate.CostModel` (recorded reuse
errors, weighted by the probed sensitivity of the final image). A threshold then marks windows of equal cost, which
is what spends a compute budget best when a window's cost grows with its length. For a fixed set of windows this is
linear least squares in the `np.poly1d` coefficients: the features of a window are the sums of ``x_m^d``.

Because the rule only compares the accumulator with a threshold, any increasing function of ``W`` gives the same
family of schedules. ``sqrt(W)`` (`root`) grows about linearly with the window length, as a sum of per-step terms
does, and usually fits far better than ``W`` itself (`cost`); both are candidates.

Candidates (signal x reuse target x transform x degree) are cross-validated by prompt: fitted on some prompts, their
TeaCache schedules are simulated on the others over a dense threshold grid, and the modelled quality at each compute
budget (20%..75% of the calls) is compared with the best static schedule of the training prompts there (the
oracle). Within a signal, the candidate closest to, or above, that oracle on the held-out prompts wins. The held-out
error of the fitted quantity (R², MAE of the accumulator against the window cost, with the runtime's clamp) is
reported too.

Between signals, each signal's winner is fitted on every prompt and its simulated front compared with the oracle's
(plain reuse, the rule tune and the sweeps compare). On a signal read from the timestep alone (`temb`, `sigma`) every
step has a fixed distance, so the polynomial only weighs the steps, and least squares on window costs can weigh them
far from what the schedules need: `search_shape` first searches the weighting in simulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
from scipy.optimize import least_squares, minimize, minimize_scalar

from calib.errors import UserError
from calib.progress import progress
from calib.runfiles import (
    SWEEP_FILE,
    check_finite,
    check_output_file,
    library_versions,
    load_probes,
    load_run,
    load_trace,
    missing_units,
    now_iso,
    read_json,
    read_prompt_rows,
    read_table,
    static_configs,
)
from calib.simulate import (
    EXACT_SIGNALS,
    CostModel,
    UnitSeries,
    db_at_budgets,
    decibels,
    forced_steps,
    oracle_schedules,
    schedule_cost,
    schedule_text,
    simulated_front,
    threshold_for_speedup,
    thresholds_for_budgets,
    unit_series,
)
from teacache._files import remove_stale_temp_files
from teacache.forecast import NO_FORECAST, Forecast
from teacache.policy import TeaCachePolicy
from teacache.preset import SIGNALS, Preset

LOSSES = ("linear", "soft_l1", "huber", "cauchy")
TARGETS = ("residual", "output")
TRANSFORMS = ("root", "cost")
SETTINGS_THAT_MUST_MATCH = ("model", "backend", "cfg", "dtype", "weights", "sizes")
BUDGETS = (0.2, 0.75)  # the compute budgets candidates are compared at, as fractions of the calls
WEAK_R2 = 0.5
MOVES = (0.1, -0.1, 0.3, -0.3)  # one knot's log-value moved by this much, every knot in turn; halved after a pass without gain
SHAPE_POWERS = (0.25, 0.5, 0.75, 1.0, 1.5)  # x**p: where the simulated shape search starts, besides the least-squares fit
SHAPE_TRIALS = 60  # polynomials the simulated shape search tries per signal (each a simulated front per step count)
# Between signals every finalist is simulated on one cost model, so that their gaps to the oracle are on one scale:
# the output's reuse error (the transformer output is what the sampler integrates). On the tiny model's calibration run
# the two targets' models rank the measured static schedules about alike (rank correlation 0.87 and 0.90).
YARDSTICK = "output"
MISSING_DB = -10.0  # a budget a schedule family cannot reach, in the shape search's score


# -- the polynomial ---------------------------------------------------------------------------------------------------
def fit_polynomial(features: np.ndarray, y: np.ndarray, loss: str = "linear", positive_on: tuple[float, float] | None = None,
                   floor: float = 0.0) -> np.ndarray:
    """Coefficients (highest power first, np.poly1d order) minimising ``features @ c - y``.

    With one point per window of one step, `features` is the Vandermonde matrix and `linear` equals `np.polyfit`.
    `positive_on`: the polynomial must stay at or above `floor` over that range (the calibrated signal range, into
    which the runtime clamps): a fit that dips below it there is refitted under that constraint (SLSQP), since an
    estimate of 0 would skip for free.
    """
    if loss not in LOSSES:
        raise UserError(f"--loss {loss!r}: expected one of {', '.join(LOSSES)}")
    scale = np.sqrt((features * features).sum(axis=0))  # column scaling, as np.polyfit does, for conditioning
    scale[scale == 0] = 1.0
    start = scipy.linalg.lstsq(features / scale, y)[0] / scale
    if loss == "linear":
        result = start
    else:
        # Robust losses down-weight outlier windows; f_scale is the residual size where that starts.
        f_scale = float(np.median(np.abs(features @ start - y))) or 1e-3
        result = least_squares(lambda c: features @ c - y, start, loss=loss, f_scale=f_scale, x_scale=np.abs(start) + 1e-12, method="trf").x
    if positive_on is None:
        return result
    grid = np.vander(np.linspace(*positive_on, 128), features.shape[1])
    if (grid @ result).min() >= floor:
        return result
    scaled = minimize(lambda c: float(np.sum((features @ (c / scale) - y) ** 2)), result * scale, method="SLSQP",
                      constraints=[{"type": "ineq", "fun": lambda c: grid @ (c / scale) - floor}], options={"maxiter": 500, "ftol": 1e-12})
    return scaled.x / scale


def r2(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else float("nan")


def group_folds(groups: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds of indices; all entries of one group (prompt) fall in the same fold."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(unique)
    folds = []
    for i in range(k):
        test = np.isin(groups, order[i::k])
        folds.append((np.flatnonzero(~test), np.flatnonzero(test)))
    return folds


# -- windows --------------------------------------------------------------------------------------------------------
@dataclass
class Windows:
    """Every skip window of some units: the accumulator's inputs (the signal's per-step x) and the window cost."""

    unit: np.ndarray  # index into the unit list, per window
    x: list[np.ndarray]  # the window's x_m, m = j+1..i
    cost: np.ndarray  # W(j, i)

    def features(self, degree: int, clamp: tuple[float, float] | None = None) -> np.ndarray:
        rows = []
        for x in self.x:
            x = np.clip(x, *clamp) if clamp else x
            rows.append(np.vander(x, degree + 1).sum(axis=0))
        return np.array(rows).reshape(len(self.x), degree + 1)

    def subset(self, index: np.ndarray) -> Windows:
        return Windows(self.unit[index], [self.x[i] for i in index], self.cost[index])


def skip_windows(units: list[UnitSeries], matrices: dict, signal: str, shared: bool, ret_steps: int, cutoff_steps: int) -> Windows:
    """Windows (j computed; j+1..i skipped, none of them forced; i - j up to the recorded max gap) of every unit.

    Shared decisions: one window per (j, i) with the branches' mean cost; per-branch: one per branch.
    """
    probe = Preset(model="-", signal=signal, coefficients=[1.0, 0.0], ret_steps=ret_steps, cutoff_steps=cutoff_steps)
    unit_index, xs, costs = [], [], []
    for u, unit in enumerate(units):
        matrix = matrices[unit.key]  # [b, m, j, p]
        forced = forced_steps(probe, unit.steps)
        x = unit.x[signal]
        branches = [None] if shared else range(len(unit.branches))
        for b in branches:
            for j in range(unit.steps):
                running = 0.0
                for i in range(j + 1, min(unit.steps, j + unit.max_gap + 1)):
                    if forced[i]:
                        break
                    p = min(i - j, matrix.shape[3] - 1)  # the computed step before j: a gap like this one
                    step_cost = matrix[:, i, j, p].mean() if b is None else matrix[b, i, j, p]
                    if not math.isfinite(step_cost):
                        break
                    running += step_cost
                    unit_index.append(u)
                    xs.append(x[0 if b is None else b, j + 1 : i + 1])
                    costs.append(running)
    return Windows(np.array(unit_index, int), xs, np.array(costs))


def step_floor(windows: Windows, y: np.ndarray) -> float:
    """The least a step may add to the accumulator: 5% of the mean per-step share of the fitted quantity."""
    return 0.05 * float(np.mean(y / np.array([len(x) for x in windows.x])))


def transform(cost: np.ndarray, kind: str) -> np.ndarray:
    return np.sqrt(cost) if kind == "root" else cost


# -- candidates -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    signal: str
    target: str
    transform: str
    degree: int
    branch_mode: str


@dataclass
class Scored:
    candidate: Candidate
    r2: float  # held-out, of the accumulator against the transformed window cost
    mae: float
    db_gap: float  # held-out simulated dB against the training prompts' oracle, mean over the budgets


def x_range(units: list[UnitSeries], signal: str) -> tuple[float, float]:
    values = np.concatenate([u.x[signal][np.isfinite(u.x[signal])] for u in units])
    return float(values.min()), float(values.max())


def candidate_preset(model: str, candidate: Candidate, coefficients, units: list[UnitSeries], ret_steps: int, cutoff_steps: int) -> Preset:
    lo, hi = x_range(units, candidate.signal)
    return Preset(model=model, signal=candidate.signal, coefficients=[float(c) for c in coefficients], ret_steps=ret_steps,
                  cutoff_steps=cutoff_steps, branch_mode=candidate.branch_mode, domain={"x_range": {candidate.signal: [lo, hi]}})


def budget_grid(steps: int) -> np.ndarray:
    low, high = math.ceil(BUDGETS[0] * steps), math.floor(BUDGETS[1] * steps)
    return np.arange(low, high + 1) / steps


def modelled_db(matrices: dict, units: list[UnitSeries], schedule: np.ndarray) -> float:
    """Mean over `units` of the modelled dB of one static schedule, shared by every branch."""
    return float(np.mean([decibels(schedule_cost(matrices[u.key], np.tile(schedule, (len(u.branches), 1)))) for u in units]))


def oracle_db(train: list[UnitSeries], test: list[UnitSeries], matrices: dict, forced: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Modelled dB on `test` of the best static schedules of `train` (one step count), at each budget."""
    mean = np.mean([matrices[u.key].mean(axis=0) for u in train], axis=0)
    schedules = oracle_schedules(mean, forced)
    n = len(forced)
    out = []
    for budget in budgets:
        k = round(budget * n)
        schedule = schedules.get(k)
        if schedule is None:
            out.append(np.nan)
            continue
        out.append(modelled_db(matrices, test, schedule))
    return np.array(out)


def gap_to_oracle(preset: Preset, train: list[UnitSeries], test: list[UnitSeries], matrices: dict, steps: int) -> np.ndarray:
    """At each budget of `steps`: the modelled dB on `test` of the preset's front (thresholds placed on `train`) minus
    that of `train`'s best static schedules."""
    budgets = budget_grid(steps)
    front = simulated_front(test, None, preset, thresholds_for_budgets(train, preset, budgets), matrices)
    return db_at_budgets(front, budgets) - oracle_db(train, test, matrices, forced_steps(preset, steps), budgets)


def evaluate(candidate: Candidate, units: list[UnitSeries], matrices: dict, windows: Windows, groups: np.ndarray, k: int,
             loss: str, model: str, ret_steps: int, cutoff_steps: int) -> Scored:
    """Cross-validated by prompt: the fitted quantity's held-out error and the simulated held-out dB gap to the oracle."""
    unit_groups = np.array([u.group for u in units])
    y = transform(windows.cost, candidate.transform)
    predicted = np.full(len(y), np.nan)
    gaps = []
    for train_units, test_units in group_folds(unit_groups, k):
        train = [units[i] for i in train_units]
        test = [units[i] for i in test_units]
        train_rows = np.flatnonzero(np.isin(windows.unit, train_units))
        test_rows = np.flatnonzero(np.isin(windows.unit, test_units))
        if len(train_rows) <= candidate.degree or not len(test_rows):
            continue
        fitted = windows.subset(train_rows)
        coefficients = fit_polynomial(fitted.features(candidate.degree), y[train_rows], loss, x_range(train, candidate.signal), step_floor(fitted, y[train_rows]))
        preset = candidate_preset(model, candidate, coefficients, train, ret_steps, cutoff_steps)
        policy = TeaCachePolicy(preset, 0.0)  # its clamp and rescale, exactly as the runtime applies them
        predicted[test_rows] = [sum(policy.estimate(float(v)) for v in windows.x[r]) for r in test_rows]
        for steps in sorted({u.steps for u in test}):
            test_n = [u for u in test if u.steps == steps]
            train_n = [u for u in train if u.steps == steps] or train
            gaps.append(gap_to_oracle(preset, train_n, test_n, matrices, steps))
    done = np.isfinite(predicted)
    gap = np.concatenate(gaps) if gaps else np.array([np.nan])
    return Scored(candidate, r2(y[done], predicted[done]) if done.any() else float("nan"),
                  float(np.mean(np.abs(y[done] - predicted[done]))) if done.any() else float("nan"),
                  float(np.nanmean(gap)) if np.isfinite(gap).any() else float("-inf"))


def knots_of(preset: Preset, units: list) -> np.ndarray:
    """`degree + 1` knots where the recorded signal lies (its 5%..95% quantiles over every step of `units`, clamped
    into the calibrated range): a move of one knot changes the weight of the steps whose signal is near it."""
    low, high = preset.x_range
    x = np.concatenate([u.x[preset.signal][0] for u in units])
    x = np.clip(x[np.isfinite(x)], low, high)
    knots = np.unique(np.round(np.quantile(x, np.linspace(0.05, 0.95, len(preset.coefficients))), 6))
    if len(knots) < len(preset.coefficients):  # a signal with too few distinct values: spread over the range
        knots = np.linspace(low, high, len(preset.coefficients))
    return knots


def candidate(preset: Preset, knots: np.ndarray, log_values: np.ndarray) -> Preset | None:
    """The polynomial through exp(log_values) at the knots, or None when it is not positive over the signal's range."""
    if not np.all(np.isfinite(log_values)):
        return None
    coefficients = np.polyfit(knots, np.exp(log_values), len(knots) - 1)
    low, high = preset.x_range
    if not np.all(np.isfinite(coefficients)) or np.polyval(coefficients, np.linspace(low, high, 200)).min() <= 0:
        return None
    return preset.replace(coefficients=[float(c) for c in coefficients])


def log_values_at(preset: Preset, knots: np.ndarray) -> np.ndarray:
    """The logarithm of the preset's polynomial at the knots: where `candidate` and `pattern_search` start from it."""
    return np.log(np.maximum(np.polyval(preset.coefficients, knots), 1e-12))


def pattern_search(start: Preset, knots: np.ndarray, log_values: np.ndarray, score: Callable[[Preset], float], trials: int,
                   advance: Callable[[], None], on_gain: Callable[[int, Preset, float], None] = lambda *_: None) -> tuple[Preset, float]:
    """The deterministic search of tune (on generations) and of fit's shape search (on the cost model): each trial
    moves one knot's log-value by a `MOVES` step times the scale, every knot in turn; a move that raises the score is
    kept; the scale halves after a whole pass without gain. `start` is the polynomial through `log_values`."""
    best, best_preset = score(start), start
    moves = [(k, d) for d in MOVES for k in range(len(knots))]
    scale, since_gain = 1.0, 0
    for trial_number in range(trials):
        knot, move = moves[trial_number % len(moves)]
        trial = log_values.copy()
        trial[knot] += move * scale
        moved = candidate(start, knots, trial)
        since_gain += 1
        if moved is not None and (value := score(moved)) > best + 1e-6:
            best, best_preset, log_values, since_gain = value, moved, trial, 0
            on_gain(trial_number, moved, value)
        if since_gain >= len(moves):
            scale, since_gain = scale / 2, 0
        advance()
    return best_preset, best


def simulated_gaps(preset: Preset, units: list[UnitSeries], matrices: dict) -> np.ndarray:
    """The preset's simulated front minus the oracle, in modelled dB, at every budget of every step count of `units`."""
    gaps = []
    for steps in sorted({u.steps for u in units}):
        same = [u for u in units if u.steps == steps]
        gap = gap_to_oracle(preset, same, same, matrices, steps)
        gaps.append(np.where(np.isfinite(gap), gap, MISSING_DB))
    return np.concatenate(gaps)


def shape_score(gaps: np.ndarray) -> float:
    """Twice the worst gap plus the mean: at par everywhere first (tune scores its measured fronts alike)."""
    return float(2 * np.min(gaps) + np.mean(gaps))


def search_shape(preset: Preset, units: list[UnitSeries], matrices: dict) -> tuple[Preset, np.ndarray, np.ndarray]:
    """The polynomial whose simulated front is closest to the oracle, for a signal read from the timestep alone.

    Least squares fits the window costs, not the schedules: on such a signal every step has a fixed distance, so the
    polynomial only sets each step's weight, and its best shape can be far from the fitted one (on the tiny model,
    `sigma` fitted: -1.5 dB against the oracle, -6.5 at the worst budget; searched: -1.0 and -2.2). Starts: the fitted polynomial and x**p
    (`SHAPE_POWERS`); then tune's pattern search over the log-values at the knots, `SHAPE_TRIALS` polynomials, on the
    cost model instead of generations. Returns the best preset, and the fitted and the best polynomial's gaps.
    """
    simulated: dict[tuple[float, ...], np.ndarray] = {}  # each polynomial's front is simulated once

    def gaps_of(candidate_preset: Preset) -> np.ndarray:
        if candidate_preset.coefficients not in simulated:
            simulated[candidate_preset.coefficients] = simulated_gaps(candidate_preset, units, matrices)
        return simulated[candidate_preset.coefficients]

    knots = knots_of(preset, units)
    fitted_gaps = gaps_of(preset)
    best, best_preset = shape_score(fitted_gaps), preset
    log_values = log_values_at(preset, knots)
    low, high = preset.x_range
    grid = np.geomspace(max(low, 1e-6), high, 64)
    for power in SHAPE_POWERS:  # x**p in the preset's degree, relative error least squares over the calibrated range
        shaped = preset.replace(coefficients=[float(c) for c in np.polyfit(grid, grid**power, len(knots) - 1, w=grid**-power)])
        if np.polyval(shaped.coefficients, grid).min() > 0 and (score := shape_score(gaps_of(shaped))) > best:
            best, best_preset = score, shaped
            log_values = log_values_at(shaped, knots)
    with progress(f"fit: shape search, {preset.signal}", SHAPE_TRIALS) as advance:
        best_preset, _ = pattern_search(best_preset, knots, log_values, lambda p: shape_score(gaps_of(p)), SHAPE_TRIALS, advance)
    return best_preset, fitted_gaps, gaps_of(best_preset)


# -- the cost model from probes ---------------------------------------------------------------------------------------
def _unit_gains(units: list[UnitSeries], singles: pd.DataFrame, target: str) -> dict[tuple, dict[int, float]]:
    """Per probed unit: g_m = (final latents' rel-L1 with only step m skipped) / (e(m, m-1) · Δσ_m)."""
    by_key = {u.key: u for u in units}
    out: dict[tuple, dict[int, float]] = {}
    for r in singles.itertuples():
        unit = by_key.get((r.prompt_id, r.seed, r.steps, r.width, r.height))
        if unit is None:
            continue
        e = float(np.nanmean(unit.reuse[target][:, r.first, 1]))
        step = abs(unit.sigma[r.first] - (unit.sigma[r.first + 1] if r.first + 1 < unit.steps else 0.0))
        if e > 0 and step > 0 and r.image_rmse > 0:
            out.setdefault(unit.key, {})[r.first] = r.image_rmse / e / step
    return out


def _gain_curve(per_step: dict[int, list[float]], steps: int) -> np.ndarray:
    """Geometric mean over units at each probed step (mean PSNR averages log errors), interpolated to every step."""
    firsts = sorted(per_step)
    return np.interp(np.arange(steps), firsts, [float(np.exp(np.mean(np.log(per_step[m])))) for m in firsts])


def cost_model(units: list[UnitSeries], probes: pd.DataFrame | None, target: str, forecast: Forecast = NO_FORECAST,
               forecast_ratio: tuple = ()) -> CostModel:
    """Sensitivity per step from single-step probes, compounding γ from longer ones (see `calib.simulate`)."""
    if probes is None or probes.empty:
        return CostModel(target=target, forecast=forecast, forecast_ratio=forecast_ratio)
    probes = probes[probes["kind"] == "window"] if "kind" in probes else probes
    unit_gains = _unit_gains(units, probes[probes["length"] == 1], target)
    by_key = {u.key: u for u in units}
    gain: dict[int, dict[str, list[float]]] = {}
    for steps in sorted({key[2] for key in unit_gains}):
        per_step: dict[int, list[float]] = {}
        for key, gains in unit_gains.items():
            if key[2] == steps:
                for m, g in gains.items():
                    per_step.setdefault(m, []).append(g)
        sigma = next(by_key[key].sigma for key in unit_gains if key[2] == steps)
        gain[int(steps)] = {"sigma": [float(v) for v in sigma], "gain": [float(g) for g in _gain_curve(per_step, int(steps))]}
    model = CostModel(target=target, gain=gain, forecast=forecast, forecast_ratio=forecast_ratio)
    # Compounding is measured against each probed unit's own sensitivity, so prompt-to-prompt differences in
    # sensitivity do not pass for (or hide) it.
    rows = []
    for r in probes[probes["length"] > 1].itertuples():
        key = (r.prompt_id, r.seed, r.steps, r.width, r.height)
        unit = by_key.get(key)
        if unit is None or key not in unit_gains or r.first + r.length > unit.steps:
            continue
        own = CostModel(target=target, gain={unit.steps: {"sigma": list(unit.sigma), "gain": list(_gain_curve({m: [g] for m, g in unit_gains[key].items()}, unit.steps))}})
        base = own.matrix(unit)  # γ = 0
        j = r.first - 1
        terms = [(float(base[:, m, j, 0].mean()), m - j - 1) for m in range(r.first, r.first + r.length)]
        if all(math.isfinite(t) and t > 0 for t, _ in terms) and r.image_rmse > 0:
            rows.append((r.image_rmse, terms))

    def misfit(gamma: float) -> float:
        return sum((math.log(measured) - math.log(sum(t * (1 + gamma * d) for t, d in terms))) ** 2 for measured, terms in rows)


    if rows:
        model.gamma = float(minimize_scalar(misfit, bounds=(0.0, 2.0), method="bounded").x)
    return model


# -- the reuse rule ---------------------------------------------------------------------------------------------------
@dataclass
class ForecastFit:
    forecast: Forecast
    ratio: tuple[tuple[float, float], ...]  # [sigma span, final error with the forecast / without], for the cost model
    table: pd.DataFrame  # per probed budget: its sigma span, the measured error per damping, the best damping


def _best_damping(errors: pd.Series) -> float:
    """The damping of least measured error, refined by a parabola through it and its neighbours."""
    alphas, values = errors.index.to_numpy(float), np.log(errors.to_numpy(float))
    i = int(np.argmin(values))
    if 0 < i < len(alphas) - 1:
        a, b, c = np.polyfit(alphas[i - 1 : i + 2], values[i - 1 : i + 2], 2)
        if a > 0:
            return float(np.clip(-b / (2 * a), alphas[i - 1], alphas[i + 1]))
    return float(alphas[i])


def forecast_from_probes(units: list[UnitSeries], probes: pd.DataFrame | None) -> ForecastFit | None:
    """The linear forecast's damping per sigma reach, from forecast probes (`teacal probe --forecast`).

    Each probe runs an evenly spaced static schedule with a constant damping; the slope of every window after the
    first is measured over the window before it and carried across a window as long, so the schedule's mean span
    stands for the reaches it used (`teacache.forecast.Forecast.reach`). For each
    probed budget the damping of least final error (geometric mean over the probed prompts) becomes a knot. Where
    no damping beats plain reuse the knot is 0, so the fitted rule never does worse on what was measured.
    """
    if probes is None or "kind" not in probes or not (probes["kind"] == "forecast").any():
        return None
    from calib.simulate import uniform_schedule

    rows = []
    for (steps, budget), group in probes[probes["kind"] == "forecast"].groupby(["steps", "budget"]):
        sigma = next(u.sigma for u in units if u.steps == steps)
        computed = np.flatnonzero(uniform_schedule(int(steps), int(budget)))
        spans = sigma[computed[:-1]] - sigma[computed[1:]]
        errors = group.groupby("alpha")["image_rmse"].apply(lambda v: float(np.exp(np.mean(np.log(v)))))
        if 0.0 not in errors.index:
            continue
        best = _best_damping(errors)
        measured_best = float(errors.min())
        rows.append({"steps": int(steps), "budget": int(budget), "span": float(np.mean(spans[:-1])) if len(spans) > 1 else float(spans[0]),
                     "alpha": round(best if measured_best < errors[0.0] else 0.0, 4), "ratio": min(1.0, measured_best / errors[0.0]),
                     **{f"error a={a:g}": v for a, v in errors.items()}})
    if not rows:
        return None
    table = pd.DataFrame(rows).sort_values("span").reset_index(drop=True)
    knots = table.groupby(table["span"].round(4)).agg(alpha=("alpha", "mean"), ratio=("ratio", "mean")).reset_index()
    ratio = tuple((float(r.span), float(r.ratio)) for r in knots.itertuples())
    if not (knots["alpha"] > 0).any():
        return ForecastFit(NO_FORECAST, (), table)
    forecast = Forecast("linear", "step", tuple((float(r.span), float(r.alpha)) for r in knots.itertuples()),
                        fit={"probes": int((probes["kind"] == "forecast").sum()), "budgets": table[["steps", "budget", "span", "alpha", "ratio"]].round(5).to_dict("records")})
    return ForecastFit(forecast, ratio, table)


# -- the oracle, verified by generating -------------------------------------------------------------------------------
ORACLE_CANDIDATES = 3  # schedules per budget a sweep generates as oracle candidates: the calibration's best and runners-up


def measured_static(sweeps: tuple[Path, ...], runs: list[Path]) -> pd.DataFrame:
    """Every static schedule that sweeps of the calibration runs measured on all their prompts: steps, schedule, mean
    PSNR over the prompts. Only sweeps of the runs being fitted are accepted: what is measured on held-out prompts
    must never tune the calibration."""
    fitted = {Path(r).resolve() for r in runs}
    rows = []
    for folder in map(Path, sweeps):
        info_path, table_path = folder / SWEEP_FILE, folder / "sweep.parquet"
        if not info_path.is_file() or not table_path.is_file():
            raise UserError(f"--oracle-from {folder}: no finished sweep here (sweep.json and sweep.parquet); run `teacal sweep RUN --out {folder}` first")
        info = read_json(info_path)
        measured_run = (folder / info.get("run", ".")).resolve()
        if measured_run not in fitted:
            raise UserError(f"--oracle-from {folder}: it measured {measured_run}, which is not a run being fitted; "
                            "the oracle is chosen on the calibration prompts only, never on held-out ones")
        table = read_table(table_path)
        schedules = static_configs(table)
        psnr = table["psnr"].where(np.isfinite(table["psnr"]), 100.0)  # identical images: 100 dB, as good as it gets
        means = psnr[table["config"].isin(schedules.index)].groupby(table["config"]).mean()
        rows += [(int(info["settings"]["steps"]), schedules[config], float(value)) for config, value in means.items()]
    if not rows:
        raise UserError(f"--oracle-from {', '.join(map(str, sweeps))}: no static schedule measured on every prompt")
    frame = pd.DataFrame(rows, columns=["steps", "schedule", "psnr"])
    return frame.groupby(["steps", "schedule"], as_index=False)["psnr"].max()


def measured_oracle(measured: pd.DataFrame, echo=print) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, list[str]]]]:
    """The best *measured* static schedule per step count and budget, from sweeps of the calibration runs
    (`measured_static`), and the runners-up: the next ORACLE_CANDIDATES - 1 by mean PSNR.

    The cost model's schedule (dynamic programming) is a candidate among others: a sweep of the calibration run measures
    it next to every other static schedule (calibrated TeaCache on a latent-independent signal, the borrowed sets on
    it, uniform spacing). The oracle at a budget is the candidate of the best mean PSNR over the calibration prompts,
    so there it is at or above every static method by construction, and it was verified by generating. Why runners-up:
    on other prompts near-equal schedules change places, so a sweep generates them too and its report's oracle is the
    best static schedule measured on the prompts it swept.
    """
    table = measured.assign(budget=measured["schedule"].str.count("x")).sort_values(["psnr", "schedule"], ascending=[False, True])
    ranked = table.groupby(["steps", "budget"], sort=True).head(ORACLE_CANDIDATES)
    best: dict[str, dict[str, str]] = {}
    runners_up: dict[str, dict[str, list[str]]] = {}
    for steps, rows in ranked.groupby("steps"):
        tops = rows.groupby("budget", sort=True).head(1)
        echo(f"oracle at {steps} steps, verified by generating on the calibration prompts: "
             + ", ".join(f"{r.budget} steps {r.psnr:.1f} dB" for r in tops.itertuples()))
        best[str(steps)] = {str(r.budget): r.schedule for r in tops.itertuples()}
        runners_up[str(steps)] = {str(b): list(g["schedule"].iloc[1:]) for b, g in rows.groupby("budget", sort=True) if len(g) > 1}
    return best, runners_up


def check_cost_model(matrices: dict, units: list[UnitSeries], measured: pd.DataFrame) -> dict:
    """How well the cost model ranks the static schedules a sweep of the calibration prompts measured.

    Per step count and budget (20%..75% of the steps): does the schedule the model rates best have the best measured
    mean PSNR, and how much does it lose if not; the rank correlation between modelled dB and measured PSNR inside a
    budget (what choosing a schedule needs); and the RMS error of the modelled dB after one offset per step count (the
    model predicts latent error, the sweep measures 8-bit images).
    """
    from scipy.stats import spearmanr

    rows = []
    for steps in sorted(set(measured["steps"]) & {u.steps for u in units}):
        same = [u for u in units if u.steps == steps]
        for r in measured[measured["steps"] == steps].itertuples():
            schedule = np.array([c == "x" for c in r.schedule])
            if len(schedule) != steps or not BUDGETS[0] <= schedule.mean() <= BUDGETS[1]:
                continue  # outside the compared budgets; near no skips, 8-bit rounding decides the PSNR
            rows.append((steps, int(schedule.sum()), r.psnr, modelled_db(matrices, same, schedule)))
    table = pd.DataFrame(rows, columns=["steps", "budget", "measured", "modelled"])
    if table.empty:
        return {}
    offsets = table.groupby("steps").apply(lambda g: (g["measured"] - g["modelled"]).mean(), include_groups=False)
    error = table["measured"] - table["modelled"] - table["steps"].map(offsets)
    picks, losses, correlations = 0, [], []
    budgets = [g for _, g in table.groupby(["steps", "budget"]) if len(g) > 1]
    for g in budgets:
        loss = float(g["measured"].max() - g.loc[g["modelled"].idxmax(), "measured"])
        picks += loss <= 1e-9
        losses.append(loss)
        if g["measured"].nunique() > 2:
            correlations.append(spearmanr(g["modelled"], g["measured"]).statistic)
    return {"schedules": len(table), "budgets": len(budgets), "best_is_measured_best": int(picks),
            "worst_loss_db": round(max(losses, default=0.0), 4), "rank_correlation": round(float(np.nanmean(correlations)), 4) if correlations else None,
            "rms_db": round(float(np.sqrt(np.mean(error**2))), 4)}


# -- the stage --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitRequest:
    runs: tuple[Path, ...]
    out: Path
    signal: str = "auto"
    degree: int = 4
    target: str = "auto"
    branch_mode: str = "auto"
    loss: str = "linear"
    folds: int = 5
    ret_steps: int = 1
    cutoff_steps: int = -1
    speedup: float = 1.6
    partial: bool = False  # fit an unfinished recording anyway
    oracle_from: tuple[Path, ...] = ()  # sweeps of these runs whose measured static schedules verify the oracle


def prompt_identities(run: Path, info: dict) -> dict[str, str]:
    """prompt_id -> what the prompt is (its text, negative prompt and image), so one prompt in two runs is one group."""
    return {row["id"]: f"{row['prompt']}\0{row.get('negative_prompt', '')}\0{row.get('image_sha256', row.get('image'))}"
            for row in read_prompt_rows(run / info["prompt_file"])}


def load_traces(request: FitRequest, echo=print) -> tuple[pd.DataFrame, dict, dict[str, str], list[Path]]:
    if not request.runs:
        raise UserError("give at least one run folder written by `teacal record`")
    frames, settings, groups, runs = [], None, {}, []
    for run in map(Path, request.runs):
        info = load_run(run)
        current = {k: info["settings"].get(k) for k in SETTINGS_THAT_MUST_MATCH}
        if settings is not None and current != settings:
            diff = ", ".join(f"{k}: {settings[k]!r} vs {current[k]!r}" for k in current if current[k] != settings[k])
            raise UserError(f"{run}: recorded with other settings than {request.runs[0]} ({diff}); fit one model and setting at a time")
        settings = current
        missing = missing_units(info)
        if missing and not request.partial:
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
        runs.append(run)
    trace = pd.concat(frames, ignore_index=True)
    steps = sorted({int(s) for s in trace["steps"].unique()})
    return trace, dict(settings, steps=steps), groups, runs


def signal_is_branch_independent(units: list[UnitSeries], signal: str) -> bool:
    """Qwen's image-stream signals do not see the text, so cond and uncond carry the same x."""
    for unit in units:
        x = unit.x[signal]
        if len(x) > 1 and not np.allclose(x[0][1:], x[1][1:], rtol=1e-4, atol=1e-7):
            return False
    return True


def fit(request: FitRequest, echo=print) -> Preset:
    out = check_output_file(request.out, "--out", "preset.json")
    if request.signal not in ("auto", *SIGNALS):
        raise UserError(f"--signal {request.signal!r}: expected auto, {', '.join(SIGNALS)}")
    if request.target not in ("auto", *TARGETS):
        raise UserError(f"--target {request.target!r}: expected auto, {', '.join(TARGETS)}")
    if request.branch_mode not in ("auto", "per-branch", "shared"):
        raise UserError(f"--branch-mode {request.branch_mode!r}: expected auto, per-branch or shared")
    if not 1 <= request.degree <= 8:
        raise UserError(f"--degree {request.degree}: expected 1 to 8")
    if request.folds < 2:
        raise UserError(f"--folds {request.folds}: need at least 2")
    if not math.isfinite(request.speedup) or request.speedup < 1:
        raise UserError(f"--speedup {request.speedup}: expected a finite number >= 1")
    trace, settings, groups, runs = load_traces(request, echo)
    remove_stale_temp_files(out.parent, [out.name])  # a killed fit's half-written preset
    model_name = settings["model"]
    # Only ret_steps and cutoff_steps matter here: the cutoff check now, the forced steps of the oracle below.
    step_rules = Preset(model=model_name, signal="temb", coefficients=[1.0, 0.0], ret_steps=request.ret_steps, cutoff_steps=request.cutoff_steps)
    for steps in settings["steps"]:
        try:
            step_rules.resolve_cutoff(steps)
        except ValueError as err:
            raise UserError(str(err).replace("preset <memory>: ", "")) from None
    measured = measured_static(request.oracle_from, runs) if request.oracle_from else None  # checked before the fit
    measured_best, runners_up = measured_oracle(measured, echo=echo) if measured is not None else ({}, {})
    units = unit_series(trace, groups)
    n_groups = len({u.group for u in units})
    if n_groups < 2:
        raise UserError(f"cross-validation by prompt needs at least 2 prompts; the recording has {n_groups}")
    probes = _probes_of(runs)
    if probes is None:
        echo("note: no probes (`teacal probe RUN`): the cost model weighs every step's reuse error alike, without the final image's sensitivity")
    forecast_fit = forecast_from_probes(units, probes)
    if forecast_fit is not None:
        echo("reuse rule, from forecast probes (final image RMSE against the reference, geometric mean over the probed prompts):")
        echo(forecast_fit.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        echo(f"chose forecast {forecast_fit.forecast.rule}" + (f", damping per sigma reach {[list(k) for k in forecast_fit.forecast.alpha]}" if forecast_fit.forecast.extrapolates else ""))
    forecast = forecast_fit.forecast if forecast_fit is not None else NO_FORECAST
    # One cost model with the reuse rule as a parameter: the polynomial is fitted for the rule the preset will run.
    models = {target: cost_model(units, probes, target, forecast, forecast_fit.ratio if forecast_fit else ()) for target in TARGETS}
    matrices = {target: {u.key: models[target].matrix(u) for u in units} for target in TARGETS}
    plain_models = {target: cost_model(units, probes, target) for target in TARGETS}  # once: it fits the compounding
    plain = {target: {u.key: plain_models[target].matrix(u) for u in units} for target in TARGETS}
    k = min(request.folds, n_groups)

    candidates = []
    for signal in SIGNALS if request.signal == "auto" else (request.signal,):
        mode = request.branch_mode
        if mode == "auto":
            mode = "shared" if signal_is_branch_independent(units, signal) else "per-branch"
        for target in TARGETS if request.target == "auto" else (request.target,):
            for kind in TRANSFORMS:
                for degree in sorted({1, 2, 3, request.degree}):
                    if degree <= request.degree:
                        candidates.append(Candidate(signal, target, kind, degree, mode))
    window_cache: dict = {}
    scored = []
    for candidate in candidates:
        key = (candidate.signal, candidate.target, candidate.branch_mode)
        if key not in window_cache:
            window_cache[key] = skip_windows(units, matrices[candidate.target], candidate.signal, candidate.branch_mode == "shared", request.ret_steps, request.cutoff_steps)
        windows = window_cache[key]
        if len(windows.cost) < 2 * (candidate.degree + 1):
            raise UserError(f"only {len(windows.cost)} skip windows for degree {candidate.degree}: record more prompts or steps, or lower --degree")
        groups_of_windows = np.array([units[i].group for i in windows.unit])
        scored.append(evaluate(candidate, units, matrices[candidate.target], windows, groups_of_windows, k, request.loss, model_name,
                               request.ret_steps, request.cutoff_steps))

    echo(f"{'signal':<7}{'target':<9}{'fit':<6}{'degree':>6}{'held-out R2':>13}{'MAE':>10}{'dB vs oracle':>14}   (held-out prompts; budgets "
         f"{BUDGETS[0]:.0%}..{BUDGETS[1]:.0%} of calls)")
    for s in scored:
        c = s.candidate
        echo(f"{c.signal:<7}{c.target:<9}{c.transform:<6}{c.degree:>6}{s.r2:>13.4f}{s.mae:>10.5f}{s.db_gap:>+14.2f}   ({c.branch_mode})")
    at_degree = [s for s in scored if s.candidate.degree == request.degree] or scored

    def fitted_on_every_prompt(c: Candidate) -> list[float]:
        windows = window_cache[(c.signal, c.target, c.branch_mode)]
        target = transform(windows.cost, c.transform)
        return list(fit_polynomial(windows.features(c.degree), target, request.loss, x_range(units, c.signal), step_floor(windows, target)))

    finalists: dict[str, Scored] = {}  # per signal, its best cross-validated candidate
    lines: list[str] = []
    for s in at_degree:
        if s.candidate.signal not in finalists or s.db_gap > finalists[s.candidate.signal].db_gap:
            finalists[s.candidate.signal] = s
    # Between signals: each finalist fitted on every prompt, its simulated front against the oracle on one cost model
    # (YARDSTICK, plain reuse as tune and the sweeps compare); a timestep-only signal gets the shape search first.
    by_signal: dict[str, dict] = {}
    for signal, s in finalists.items():
        fitted = candidate_preset(model_name, s.candidate, fitted_on_every_prompt(s.candidate), units, request.ret_steps, request.cutoff_steps)
        if signal in EXACT_SIGNALS:
            fitted, fitted_gaps, gaps = search_shape(fitted, units, plain[YARDSTICK])
        else:
            gaps = fitted_gaps = simulated_gaps(fitted, units, plain[YARDSTICK])
        line = f"{signal:<7}{s.candidate.target:<9}{s.candidate.transform:<6}{np.mean(fitted_gaps):>+9.2f}{np.min(fitted_gaps):>+8.2f}"
        if signal in EXACT_SIGNALS:
            line += f"{np.mean(gaps):>+11.2f}{np.min(gaps):>+8.2f}"
        by_signal[signal] = {"target": s.candidate.target, "transform": s.candidate.transform, "coefficients": list(fitted.coefficients),
                             "fitted_db": _rounded(np.mean(fitted_gaps)), "fitted_worst_db": _rounded(np.min(fitted_gaps)),
                             "db": _rounded(np.mean(gaps)), "worst_db": _rounded(np.min(gaps))}
        lines.append(line)
    echo(f"each signal's best candidate, fitted on every calibration prompt: simulated dB against the oracle (mean, worst budget); "
         f"for {', '.join(EXACT_SIGNALS)} also after the shape search ({SHAPE_TRIALS} more polynomials)")
    echo(f"{'signal':<7}{'target':<9}{'fit':<6}{'fitted':>9}{'worst':>8}{'searched':>11}{'worst':>8}")
    for line in lines:
        echo(line)
    chosen_signal = max(by_signal, key=lambda signal: by_signal[signal]["db"])
    best = finalists[chosen_signal]
    chosen = best.candidate
    windows = window_cache[(chosen.signal, chosen.target, chosen.branch_mode)]
    coefficients = by_signal[chosen_signal]["coefficients"]
    model = models[chosen.target]
    steps_list = settings["steps"]
    domain = {"steps": steps_list, "sizes": settings["sizes"], "dtype": settings["dtype"],
              "x_range": {s: list(x_range(units, s)) for s in SIGNALS}}
    oracle = {}
    for steps in steps_list:  # the static ceiling of plain reuse: what sweep runs as the oracle
        same = [u for u in units if u.steps == steps]
        mean = np.mean([plain[chosen.target][u.key].mean(axis=0) for u in same], axis=0)
        forced = forced_steps(step_rules, steps)
        oracle[str(steps)] = {str(b): schedule_text(s) for b, s in oracle_schedules(mean, forced).items()}
    oracle_source, measured_check = "cost model", {}
    if measured is not None:
        for steps, by_budget in measured_best.items():
            oracle.setdefault(steps, {}).update(by_budget)
        oracle_source = "measured on the calibration prompts: " + ", ".join(str(p) for p in request.oracle_from)
        measured_check = check_cost_model(plain[chosen.target], units, measured)
        if measured_check:
            c = measured_check
            echo(f"cost model against {c['schedules']} static schedules measured on the calibration prompts: its best is the measured best at "
                 f"{c['best_is_measured_best']} of {c['budgets']} budgets (worst loss {c['worst_loss_db']:.2f} dB), rank correlation inside a budget "
                 f"{c['rank_correlation']}, RMS error {c['rms_db']:.2f} dB after one offset per step count")
    preset = Preset(
        model=model_name,
        signal=chosen.signal,
        coefficients=[float(c) for c in coefficients],
        ret_steps=request.ret_steps,
        cutoff_steps=request.cutoff_steps,
        branch_mode=chosen.branch_mode,
        threshold=0.2,
        forecast=forecast,
        domain=domain,
        calibration={
            "runs": [str(r) for r in request.runs], "backend": settings["backend"], "steps": steps_list, "sizes": settings["sizes"],
            "cfg": settings["cfg"], "dtype": settings["dtype"], "prompts": n_groups, "units": len(units), "windows": int(len(windows.cost)),
            "target": chosen.target, "transform": chosen.transform, "loss": request.loss,
            "cost_model": {"probed": model.probed, "gamma": round(model.gamma, 6), "gain": model.gain, "measured_check": measured_check,
                           "forecast_ratio": [list(k) for k in model.forecast_ratio]},
            "oracle": oracle, "oracle_runners_up": runners_up, "oracle_source": oracle_source, "versions": library_versions(), "date": now_iso(),
        },
        fit={
            "r2_heldout": _rounded(best.r2), "mae_heldout": _rounded(best.mae), "db_vs_oracle_heldout": _rounded(best.db_gap), "folds": k,
            "signals": by_signal,
            "candidates": [{"signal": s.candidate.signal, "target": s.candidate.target, "transform": s.candidate.transform,
                            "degree": s.candidate.degree, "r2_heldout": _rounded(s.r2), "mae_heldout": _rounded(s.mae),
                            "db_vs_oracle_heldout": _rounded(s.db_gap)} for s in scored],
        },
        source=str(out),
    )
    threshold, reached = threshold_for_speedup(units, preset, request.speedup)
    if reached + 1e-9 < request.speedup:
        echo(f"note: --speedup {request.speedup:g} is out of reach on this recording; the fastest threshold ({threshold:g}) gives {reached:.2f}x")
    preset = preset.replace(threshold=threshold, fit=dict(preset.fit, default_threshold_speedup=round(reached, 4), requested_speedup=request.speedup))
    preset.save(out)
    echo(f"chose signal {chosen.signal}, target {chosen.target} ({chosen.transform}), degree {chosen.degree}, {chosen.branch_mode}: "
         f"held-out R2 {best.r2:.4f}, {best.db_gap:+.2f} dB against the oracle"
         + f" (cross-validated); {by_signal[chosen.signal]['db']:+.2f} on every prompt" + (" with the searched shape" if chosen.signal in EXACT_SIGNALS else "")
         + f"; default threshold {preset.threshold:.4g} (simulated {reached:.2f}x)")
    if not best.r2 >= WEAK_R2:
        echo(f"warning: the fit is weak (held-out R2 {best.r2:.2f} < {WEAK_R2}): record more prompts or seeds, probe (`teacal probe`), "
             "or try --signal modin / a lower --degree")
    echo(f"wrote {out}")
    return preset


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None  # JSON has no NaN: a constant target has no R²


def _probes_of(runs: list[Path]) -> pd.DataFrame | None:
    frames = []
    for run in runs:
        probes = load_probes(run)
        if probes is not None:
            frames.append(probes.assign(prompt_id=str(run) + ":" + probes["prompt_id"]))
    return pd.concat(frames, ignore_index=True) if frames else None
