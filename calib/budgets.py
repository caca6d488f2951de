"""The compute budgets every stage compares at, and "the best result within a budget". No torch.

A budget is how much of a generation is computed: in calls of the total where a user reads it (both CFG branches
count), in computed steps per branch inside the schedules. Fit's candidates, tune's search, the oracle and the report's
equal-calls table all compare over `COMPARED`; `sweep --thresh auto` places thresholds over the wider `SWEPT`, so every
compared budget has a measured point at or below it.
"""

from __future__ import annotations

import math

import numpy as np

COMPARED = (0.2, 0.75)  # the budgets compared: 20% to 75% of the calls (few-step schedules: up to all but one)
SWEPT = (0.15, 0.8)  # `sweep --thresh auto`: a threshold for every budget in this share
IDENTICAL_DB = 100.0  # an image identical to its reference (PSNR infinite) counts as this much in means and scores


FEW_STEPS = 8  # a distilled model's schedule: every skip count up to one is a budget users pick (7 of 8 computed)


def budget_steps(steps: int, share: tuple[float, float] = COMPARED) -> list[int]:
    """The computed steps per branch from `share[0]` to `share[1]` of `steps`; at FEW_STEPS or fewer, up to all but one."""
    return list(range(math.ceil(share[0] * steps), (steps - 1 if steps <= FEW_STEPS else math.floor(share[1] * steps)) + 1))


def best_within(costs, values, budgets) -> np.ndarray:
    """For each budget, the index of the best (largest, NaN never) value among points that cost no more; -1 where none does.

    A method's measured front at equal compute: its best configuration within the budget, a step function of it."""
    costs, values = np.asarray(costs, float), np.asarray(values, float)
    out = np.full(len(budgets), -1)
    for i, budget in enumerate(budgets):
        ok = np.flatnonzero((costs <= budget + 1e-9) & ~np.isnan(values))
        if len(ok):
            out[i] = ok[np.argmax(values[ok])]
    return out


def values_within(costs, values, budgets, empty: float = np.nan) -> np.ndarray:
    """For each budget, the best value among points that cost no more (`best_within`), `empty` where none does."""
    index = best_within(costs, values, budgets)
    values = np.asarray(values, float)
    return np.where(index >= 0, values[np.maximum(index, 0)] if len(values) else empty, empty)


def front_at(points: list[tuple[int, float]], budgets: list[int], empty: float) -> np.ndarray:
    """For each budget, the best value among (computed steps, value) points computing no more; `empty` where none does."""
    return values_within([k for k, _ in points], [v for _, v in points], budgets, empty)


# What "the quality" of a method over several prompts is: their mean, the worst prompt, or the mean of the worst
# fifth (a tail mean, CVaR at 20%). Fit and tune optimise the one a preset is made for (`--objective`).
OBJECTIVES = ("mean", "worst", "cvar")
CVAR_SHARE = 0.2


def over_prompts(values, objective: str = "mean") -> float:
    """One number for a method's per-prompt values (dB; higher is better) under `objective`."""
    values = np.sort(np.asarray(values, float))
    if objective == "worst":
        return float(values[0])
    if objective == "cvar":
        return float(values[: max(1, math.ceil(CVAR_SHARE * len(values)))].mean())
    return float(values.mean())
