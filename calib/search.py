"""The polynomial searches fit and tune share. No torch.

On a signal read from the timestep alone (`temb`, `sigma`) every step has a fixed distance, so a polynomial only sets
each step's weight, and TeaCache's schedules at all thresholds follow from it. Both searches move the polynomial's
log-values at `degree + 1` knots where the recorded signal lies (`knots_of`; the interpolating polynomial is the
candidate, skipped when it is not positive over the calibrated range) with one deterministic pattern search
(`pattern_search`): fit scores each candidate on the cost model (`search_shape`), tune by generating.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import numpy as np

from calib.budgets import OBJECTIVES, budget_steps
from calib.costmodel import decibels, schedule_cost
from calib.oracle import gap_to_oracle
from calib.progress import progress
from calib.simulate import UnitSeries, teacache_schedules, thresholds_for_budgets
from teacache.preset import Preset

MOVES = (0.1, -0.1, 0.3, -0.3)  # one knot's log-value moved by this much, every knot in turn; halved after a pass without gain


SHAPE_POWERS = (0.25, 0.5, 0.75, 1.0, 1.5)  # x**p: where the simulated shape search starts, besides the least-squares fit


SHAPE_TRIALS = 60  # polynomials the simulated shape search tries per signal (each a simulated front per step count)


MISSING_DB = -10.0  # a budget a schedule family cannot reach, in the shape search's score


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


def simulated_gaps(preset: Preset, units: list[UnitSeries], matrices: dict, objective: str = "mean") -> np.ndarray:
    """The preset's simulated front minus the oracle, in modelled dB, at every budget of every step count of `units`."""
    gaps = []
    for steps in sorted({u.steps for u in units}):
        same = [u for u in units if u.steps == steps]
        gap = gap_to_oracle(preset, same, same, matrices, steps, objective)
        gaps.append(np.where(np.isfinite(gap), gap, MISSING_DB))
    return np.concatenate(gaps)


def shape_score(gaps: np.ndarray) -> float:
    """Twice the worst gap plus the mean: at par everywhere first (tune scores its measured fronts alike)."""
    return float(2 * np.min(gaps) + np.mean(gaps))


def search_shape(preset: Preset, units: list[UnitSeries], matrices: dict, objective: str = "mean", trials: int = SHAPE_TRIALS,
                 quiet: bool = False) -> tuple[Preset, np.ndarray, np.ndarray]:
    """The polynomial whose simulated front is closest to the oracle, for a signal read from the timestep alone.

    Least squares fits the window costs, not the schedules: on such a signal every step has a fixed distance, so the
    polynomial only sets each step's weight, and its best shape can be far from the fitted one (on the tiny model,
    `sigma` fitted: -1.5 dB against the oracle, -6.5 at the worst budget; searched: -1.0 and -2.2). Starts: the fitted polynomial and x**p
    (`SHAPE_POWERS`); then tune's pattern search over the log-values at the knots, `trials` polynomials, on the
    cost model instead of generations. Returns the best preset, and the fitted and the best polynomial's gaps.
    """
    simulated: dict[tuple[float, ...], np.ndarray] = {}  # each polynomial's front is simulated once

    def gaps_of(candidate_preset: Preset) -> np.ndarray:
        if candidate_preset.coefficients not in simulated:
            simulated[candidate_preset.coefficients] = simulated_gaps(candidate_preset, units, matrices, objective)
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
    watched = contextlib.nullcontext(lambda label=None: None) if quiet else progress(f"fit: shape search, {preset.signal}", trials)
    with watched as advance:
        best_preset, _ = pattern_search(best_preset, knots, log_values, lambda p: shape_score(gaps_of(p)), trials, advance)
    return best_preset, fitted_gaps, gaps_of(best_preset)


OBJECTIVE_FOLDS = 3  # folds of the calibration prompts on which `choose_objective` compares the objectives
OBJECTIVE_TRIALS = SHAPE_TRIALS // 3  # each fold's shape search: the objectives' fronts part early in the search
# Another objective replaces the mean only when it beats it on the folds by this much (the scores of one recording
# move by about 0.1 dB with the search's length).
OBJECTIVE_MARGIN_DB = 0.25
UNCOSTED_DB = 0.0  # a held-out prompt's schedule with a gap the recording cannot cost (beyond its max gap): as bad as it gets


def choose_objective(folds: list[tuple[np.ndarray, np.ndarray]], units: list[UnitSeries], fold_fit: Callable[[np.ndarray], Preset | None],
                     matrices: dict) -> tuple[str, dict[str, float]]:
    """The objective (`calib.budgets.OBJECTIVES`) whose shape search, run on each fold's training prompts (`fold_fit`:
    the polynomial fitted on them, the threshold of each budget placed on them), does best on the prompts it never saw.

    Every calibration prompt is held out once: its modelled dB at each budget is pooled over the folds, and an
    objective scores the mean over budgets of (mean prompt + worst prompt) / 2, so the worst of all the calibration
    prompts counts, not the worst of three. Budgets some objective cannot reach on every fold are left out. Held-out
    prompts never enter; the mean stays unless another beats it by `OBJECTIVE_MARGIN_DB`. Returns it and every
    objective's score (none, and the mean, where no budget was reached on every fold)."""
    pooled: dict[str, dict[tuple[int, int], list[float]]] = {o: {} for o in OBJECTIVES}
    with progress("fit: objective, by folds of the calibration prompts", len(OBJECTIVES) * len(folds)) as advance:
        for objective in OBJECTIVES:
            for train_units, test_units in folds:
                fitted = fold_fit(train_units)
                if fitted is not None:
                    train, test = [units[i] for i in train_units], [units[i] for i in test_units]
                    searched = search_shape(fitted, train, matrices, objective, OBJECTIVE_TRIALS, quiet=True)[0]
                    for (steps, budget), values in held_out_db(searched, train, test, matrices).items():
                        pooled[objective].setdefault((steps, budget), []).extend(values)
                advance()
    units_at = Counter(u.steps for u in units)  # every unit held out once: a budget every objective reached on every fold
    common = [key for key in pooled["mean"] if all(len(pooled[o].get(key, ())) == units_at[key[0]] for o in OBJECTIVES)]
    if not common:  # too few prompts or steps for every objective to reach a budget on every fold
        return "mean", {}
    scores = {o: round(float(np.mean([(np.mean(pooled[o][key]) + np.min(pooled[o][key])) / 2 for key in common])), 4) for o in OBJECTIVES}
    best = max(OBJECTIVES, key=lambda o: (scores[o], -OBJECTIVES.index(o)))
    return (best if scores[best] >= scores["mean"] + OBJECTIVE_MARGIN_DB else "mean"), scores


def held_out_db(preset: Preset, train: list[UnitSeries], test: list[UnitSeries], matrices: dict) -> dict[tuple[int, int], list[float]]:
    """Per (step count, budget in computed steps): the modelled dB of each `test` unit under the preset's schedule at
    the threshold placed for that budget on `train` (the most computed calls within it; UNCOSTED_DB where the schedule
    skips longer than the recording measured)."""
    out = {}
    for steps in sorted({u.steps for u in test}):
        train_n, test_n = [u for u in train if u.steps == steps] or train, [u for u in test if u.steps == steps]
        for budget in budget_steps(steps):
            placed = thresholds_for_budgets(train_n, preset, [budget / steps])
            if placed:
                db = [decibels(schedule_cost(matrices[u.key], teacache_schedules(u, preset, placed[-1:])[0])) for u in test_n]
                out[steps, budget] = [v if np.isfinite(v) else UNCOSTED_DB for v in db]
    return out
