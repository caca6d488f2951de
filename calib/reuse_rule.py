"""Tune's second half: the reuse rule of a skipped call, chosen by generating on the calibration prompts.

The tuned schedules are generated with constant dampings of a linear forecast; each schedule's best damping, keyed by
the mean sigma reach of its skips, gives a table of knots; that table, the constants, the rule fitted from forecast
probes and plain reuse are scored by their mean gain over plain reuse less twice every loss beyond 0.2 dB, a rule that
costs any tuned schedule's worst prompt more than 0.5 dB is out, and the best is kept (plain reuse when nothing gains).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import pandas as pd

from calib.budgets import budget_steps, front_at
from calib.progress import progress
from calib.runfiles import json_number
from teacache.forecast import NO_FORECAST, Forecast


class Measures(Protocol):
    """What the reuse rule is chosen with (`calib.tune.Measurer`): a static schedule's PSNR over the calibration
    prompts, each skipped call formed by `forecast`; and the same under an objective (mean, worst, cvar)."""

    def __call__(self, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> float: ...

    def under(self, objective: str, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> float: ...


CONSTANT_DAMPINGS = (0.15, 0.3, 0.5)  # constant dampings measured on the tuned schedules
FORECAST_FLOOR_DB = -0.2  # a reuse rule may lose at most this much to plain reuse at any budget
WORST_FLOOR_DB = -0.5  # nor this much on the worst prompt of any schedule: the image a user sees is one prompt


def mean_reach(schedule: str, sigma: np.ndarray) -> float:
    """The mean sigma reach (`Forecast.reach`) of the skipped calls that have a slope (two computed steps before)."""
    computed = [m for m, c in enumerate(schedule) if c == "x"]
    reaches = []
    for m, c in enumerate(schedule):
        before = [j for j in computed if j < m]
        if c == "." and len(before) >= 2:
            reaches.append(Forecast.reach(sigma[before[-2]], sigma[before[-1]], sigma[m]))
    return float(np.mean(reaches)) if reaches else math.nan


def gains_of(measure: Measures, schedules: dict[int, list[str]], forecast: Forecast) -> dict[int, np.ndarray]:
    """Per step count and budget: the rule's measured front minus plain reuse's, on the same schedules."""
    out = {}
    for steps, found in schedules.items():
        plain = [(s.count("x"), measure(steps, s)) for s in found]
        ruled = [(s.count("x"), measure(steps, s, forecast)) for s in found]
        out[steps] = front_at(ruled, budget_steps(steps), math.nan) - front_at(plain, budget_steps(steps), math.nan)
    return out


def worst_loss(measure: Measures, schedules: dict[int, list[str]], forecast: Forecast) -> float:
    """The largest loss on a schedule's worst prompt, the rule against plain reuse, over the tuned schedules (dB, <= 0)."""
    losses = [0.0]
    for steps, found in schedules.items():
        for s in found:
            losses.append(min(measure.under("worst", steps, s, forecast) - measure.under("worst", steps, s), 0.0))
    return min(losses)


class Counted:
    """A `Measures` that advances a progress bar once per schedule and rule it has not measured before: each is a
    generation per calibration prompt (minutes on a real model); a repeat is read back."""

    def __init__(self, measure: Measures, advance) -> None:
        self.measure, self.advance, self.seen = measure, advance, set()

    def __call__(self, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> float:
        return self._counted((steps, schedule, forecast), self.measure(steps, schedule, forecast))

    def under(self, objective: str, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> float:
        return self._counted((steps, schedule, forecast), self.measure.under(objective, steps, schedule, forecast))

    def _counted(self, key: tuple, value: float) -> float:
        if key not in self.seen:
            self.seen.add(key)
            self.advance()
        return value


def forecast_score(gains: dict[int, np.ndarray]) -> float:
    """The mean gain over plain reuse, less twice every loss beyond FORECAST_FLOOR_DB."""
    g = np.concatenate(list(gains.values()))
    g = g[np.isfinite(g)]
    return float(g.mean() + 2 * np.minimum(g - FORECAST_FLOOR_DB, 0).sum()) if g.size else 0.0


def tune_forecast(measure: Measures, schedules: dict[int, list[str]], sigmas: dict[int, np.ndarray], fitted: Forecast,
                  echo=print) -> tuple[Forecast, dict]:
    """The reuse rule, chosen by generating: constant dampings on the tuned schedules give each schedule its best
    damping, keyed by the schedule's mean sigma reach; those points, pooled into knots, are one more candidate next to
    the constants, the probe-fitted rule and plain reuse. The candidate of the best `forecast_score` wins; plain reuse
    scores 0, so a rule is kept only where it gains on what was measured."""
    candidates: dict[str, Forecast] = {f"linear:{a:g}": Forecast("linear", "step", ((0.0, a),)) for a in CONSTANT_DAMPINGS}
    if fitted.extrapolates:
        candidates["probe-fitted"] = fitted
    distinct = len({(steps, s) for steps, found in schedules.items() for s in found})
    with progress("tune: reuse rule, constant and probe-fitted dampings", distinct * (len(candidates) + 1)) as advance:
        measure = Counted(measure, advance)
        gains = {name: gains_of(measure, schedules, rule) for name, rule in candidates.items()}
    points = []  # per tuned schedule: the mean reach of its skips and its measured PSNR per constant damping
    for steps, found in schedules.items():
        sigma = sigmas[steps]
        for s in found:
            reach = mean_reach(s, sigma)
            if math.isfinite(reach):
                points.append({"reach": reach, 0.0: measure(steps, s), **{a: measure(steps, s, candidates[f"linear:{a:g}"]) for a in CONSTANT_DAMPINGS}})
    if points:
        table = pd.DataFrame(points).sort_values("reach").reset_index(drop=True)
        dampings = [0.0, *CONSTANT_DAMPINGS]
        # A reach bin's knot: the mean of its schedules' best dampings. (The one damping of the best summed PSNR per
        # bin was tried too: 0.02 better in score on the eval's calibration run, within noise; not kept.)
        groups = [table.iloc[i] for i in np.array_split(np.arange(len(table)), min(6, len(table)))]
        knots = tuple((round(float(b["reach"].mean()), 4), round(float(b[dampings].idxmax(axis=1).astype(float).mean()), 4)) for b in groups if len(b))
        knots = tuple(k for i, k in enumerate(knots) if i == 0 or k[0] > knots[i - 1][0])
        if any(a > 0 for _, a in knots):
            candidates["measured knots"] = Forecast("linear", "step", knots)
            with progress("tune: reuse rule, measured knots", distinct) as measure.advance:
                gains["measured knots"] = gains_of(measure, schedules, candidates["measured knots"])
    scores = {name: forecast_score(g) for name, g in gains.items()}
    worst = {name: worst_loss(measure, schedules, candidates[name]) for name in gains}
    echo(f"{'reuse rule':<16}{'score':>8}{'mean':>8}{'worst':>8}{'worst prompt':>14}   gain over plain reuse (dB) on the calibration prompts, "
         f"budgets 20%..75%; a rule that loses more than {-WORST_FLOOR_DB:g} dB on a schedule's worst prompt is out")
    for name, g in gains.items():
        every = np.concatenate(list(g.values()))
        echo(f"{name:<16}{scores[name]:>8.2f}{np.nanmean(every):>+8.2f}{np.nanmin(every):>+8.2f}{worst[name]:>+14.2f}")
        if worst[name] < WORST_FLOOR_DB:
            scores[name] = -math.inf
    best = max(scores, key=scores.get)
    record = {name: {str(steps): [json_number(v) for v in g[steps]] for steps in g} for name, g in gains.items()}
    if scores[best] <= 0:
        echo("chose plain reuse: no reuse rule gains over it on what was measured")
        return NO_FORECAST, {"chosen": "none", "gains_db": record}
    chosen = candidates[best]
    echo(f"chose the reuse rule {best}: damping per sigma reach {[list(k) for k in chosen.alpha]}")
    fit = {"measured_on": "the calibration prompts, by teacal tune", "chosen": best, "gains_db": record,
           "candidates": {name: [list(k) for k in rule.alpha] for name, rule in candidates.items()}}
    return Forecast("linear", chosen.axis, chosen.alpha, fit=fit), {"chosen": best, "gains_db": record}
