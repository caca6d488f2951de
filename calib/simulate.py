"""Schedules from a recorded trace, without running the model.

* `simulate`: what TeaCache would decide at a threshold, by feeding the recorded signal distances to the same
  `TeaCachePolicy` the runtimes use. Exact for `temb` (the timestep embedding does not depend on the latents);
  an estimate for `modin`, whose inputs change once steps are skipped.
* `oracle_schedule`: the best static schedule for a compute budget, by dynamic programming.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from teacache.policy import TeaCachePolicy
from teacache.preset import Preset

BRANCH_ORDER = {"cond": 0, "uncond": 1}  # the order the pipelines call them in each step


def simulate(trace: pd.DataFrame, preset: Preset, threshold: float) -> pd.DataFrame:
    """One row per recorded call: prompt_id, seed, branch, step, computed."""
    x_col = f"x_{preset.signal}"
    policy = TeaCachePolicy(preset, threshold)
    rows = []
    ordered = trace.assign(_order=trace["branch"].map(BRANCH_ORDER).fillna(9)).sort_values(["prompt_id", "seed", "step", "_order", "branch"])
    for (prompt_id, seed), series in ordered.groupby(["prompt_id", "seed"], sort=False):
        policy.start(int(series["step"].max()) + 1)
        for step, branch, x in zip(series["step"], series["branch"], series[x_col], strict=True):
            distance = None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
            computed = policy.decide_distance(int(step), branch, distance)
            rows.append((prompt_id, seed, branch, int(step), computed))
    return pd.DataFrame(rows, columns=["prompt_id", "seed", "branch", "step", "computed"])


def computed_fraction(trace: pd.DataFrame, preset: Preset, threshold: float) -> float:
    return float(simulate(trace, preset, threshold)["computed"].mean())


def threshold_for_speedup(trace: pd.DataFrame, preset: Preset, speedup: float) -> float:
    """The smallest threshold whose simulated schedule skips enough calls for `speedup` (calls / computed)."""
    candidates = np.unique(np.round(np.geomspace(1e-3, 5.0, 60), 4))
    for threshold in candidates:
        if 1.0 / computed_fraction(trace, preset, float(threshold)) >= speedup:
            return float(threshold)
    return float(candidates[-1])


def schedule_error(y: np.ndarray, computed: np.ndarray) -> float:
    """Total output error of a schedule under the recorded per-step output changes `y` (rel-L1, step i-1 -> i).

    A skipped step reuses the residual of the last computed step, so its error is the output change
    accumulated since then (triangle inequality: the sum of per-step changes bounds it).
    """
    total, since = 0.0, 0.0
    for i, compute in enumerate(computed):
        if compute:
            since = 0.0
        else:
            since += y[i]
            total += since
    return total


def oracle_schedule(y: np.ndarray, budget: int, forced: np.ndarray) -> np.ndarray:
    """The static schedule with `budget` computed steps (forced ones included) of least `schedule_error`.

    Dynamic programming over (step, last computed step, steps computed so far): O(n² · budget).
    """
    y = np.nan_to_num(np.asarray(y, float))
    n = len(y)
    forced = np.asarray(forced, bool)
    if not forced[0]:
        forced = forced.copy()
        forced[0] = True  # nothing to reuse before the first computed step
    budget = max(budget, int(forced.sum()))
    if budget >= n:
        return np.ones(n, bool)
    # cost[j, i]: error of skipping steps j+1 .. i-1 after computing j
    prefix = np.concatenate([[0.0], np.cumsum(y)])
    inf = math.inf
    best = np.full((n, budget + 1), inf)  # best[i, c]: least error with step i computed as the c-th computed step
    parent = np.full((n, budget + 1), -1, int)
    best[0, 1] = 0.0
    for i in range(1, n):
        for j in range(i - 1, -1, -1):
            gap_cost = sum(prefix[m + 1] - prefix[j + 1] for m in range(j + 1, i))
            for c in range(2, budget + 1):
                if best[j, c - 1] + gap_cost < best[i, c]:
                    best[i, c] = best[j, c - 1] + gap_cost
                    parent[i, c] = j
            if forced[j]:
                break  # a forced step cannot be skipped, so no earlier j may jump over it
    # The tail after the last computed step is skipped up to the end.
    finish = np.full(n, inf)
    for i in range(n):
        if forced[i + 1 :].any():
            continue
        tail = sum(prefix[m + 1] - prefix[i + 1] for m in range(i + 1, n))
        finish[i] = best[i, budget] + tail
    last = int(np.argmin(finish))
    schedule = np.zeros(n, bool)
    c = budget
    while last >= 0:
        schedule[last] = True
        last, c = parent[last, c], c - 1
    return schedule


class StaticSchedulePolicy(TeaCachePolicy):
    """Computes exactly the steps a fixed schedule names, for every branch: how the oracle is run.

    Only the rule is replaced; ordering checks, residual guards and stats stay TeaCachePolicy's.
    """

    def __init__(self, preset: Preset, schedule: np.ndarray) -> None:
        super().__init__(preset.replace(branch_mode="shared"), threshold=0.0)
        self.schedule = np.asarray(schedule, bool)

    def start(self, num_steps: int) -> None:
        if num_steps != len(self.schedule):
            raise ValueError(f"the schedule has {len(self.schedule)} steps, the run {num_steps}")
        super().start(num_steps)

    def _rule(self, series, step: int, distance: float | None) -> tuple[bool, str]:
        return bool(self.schedule[step]), "schedule"
