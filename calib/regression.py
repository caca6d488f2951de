"""What `teacal fit` regresses: the skip windows of the recorded units, and the least-squares polynomial. No torch.

A window is a computed step ``j`` followed by the skipped steps ``j+1..i``; its features are the sums of the signal's
``x_m^d`` over the window, its target the window cost (`calib.costmodel`), so the accumulator of TeaCache's rule
predicts what skipping the window costs (`calib.fit`'s notes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.optimize import least_squares, minimize

from calib.errors import UserError
from calib.simulate import UnitSeries, forced_steps
from teacache.preset import Preset

LOSSES = ("linear", "soft_l1", "huber", "cauchy")


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
        rows = [np.vander(np.clip(x, *clamp) if clamp else x, degree + 1).sum(axis=0) for x in self.x]
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
