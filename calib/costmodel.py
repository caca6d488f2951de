"""What a schedule costs the final image, from recorded traces and probes, without running the model. No torch.

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

* `cost_model`: the model of a run, its sensitivity and compounding fitted to the probes.
* `last_step_rule`: whether the last step stays forced (few-step probes measure it).
* `forecast_from_probes`: the reuse rule's damping per sigma reach, from forecast probes, gated per probed prompt.
* `oracle_schedules`: for every budget at once, the static schedule of least modelled cost (dynamic programming).
* `simulated_front`: TeaCache's schedules at many thresholds (`calib.simulate`) and what each costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from calib.budgets import FEW_STEPS, IDENTICAL_DB, over_prompts, values_within
from calib.simulate import UnitSeries, teacache_schedules, uniform_schedule
from teacache.forecast import NO_FORECAST, Forecast
from teacache.preset import Preset


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


def _geometric_mean(values) -> float:
    """How probed final-image errors are pooled over prompts (errors spread over orders of magnitude)."""
    return float(np.exp(np.mean(np.log(values))))


def decibels(cost: float) -> float:
    """``-20·log10(cost)``: the cost as a PSNR up to a constant (IDENTICAL_DB for a schedule that skips nothing)."""
    return IDENTICAL_DB if cost <= 0 else -20 * math.log10(cost)


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


def simulated_front(units: list[UnitSeries], preset: Preset, thresholds, matrices: dict, objective: str = "mean") -> pd.DataFrame:
    """Per threshold: mean computed calls per branch (as a fraction of steps) and the modelled dB over the units under
    `objective` (`calib.budgets.over_prompts`; `matrices`: each unit's cost matrix)."""
    rows = []
    for unit in units:
        for threshold, schedules in zip(thresholds, teacache_schedules(unit, preset, thresholds), strict=True):
            rows.append((float(threshold), schedules.mean(), decibels(schedule_cost(matrices[unit.key], schedules))))
    frame = pd.DataFrame(rows, columns=["threshold", "computed_fraction", "db"])
    return frame.groupby("threshold", as_index=False).agg(computed_fraction=("computed_fraction", "mean"),
                                                            db=("db", lambda v: over_prompts(v, objective)))


def db_at_budgets(front: pd.DataFrame, budgets: np.ndarray) -> np.ndarray:
    """For each budget (fraction of calls computed), the best modelled dB among points that compute no more."""
    return values_within(front["computed_fraction"], front["db"], budgets)


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
    return np.interp(np.arange(steps), firsts, [_geometric_mean(per_step[m]) for m in firsts])


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


# -- the forced last step --------------------------------------------------------------------------------------------
def last_step_rule(settings: dict, probes: pd.DataFrame | None, echo=print) -> int:
    """`cutoff_steps` when the flag is not given: the last step is forced (-1), as TeaCache's seed has it, unless every
    recorded step count is a few-step one whose probes measured skipping the last step alone costs the final image
    less than skipping any single middle step (geometric mean over the probed prompts); then no step is forced at the
    end of the calibrated step counts (cutoff = the largest; a longer run is forced from there)."""
    steps = settings["steps"]
    if probes is None or "kind" not in probes or max(steps) > FEW_STEPS:
        return -1
    singles = probes[(probes["kind"] == "window") & (probes["length"] == 1)]
    for n in steps:
        cost = singles[singles["steps"] == n].groupby("first")["image_rmse"].apply(_geometric_mean)
        if n - 1 not in cost.index or len(cost) < 2:
            return -1
        middle = cost.drop(n - 1)
        echo(f"last step, {n} steps: skipping it alone costs {cost[n - 1]:.4g} (final image RMSE), a middle step {middle.min():.4g} at least")
        if cost[n - 1] > middle.min():
            return -1
    echo(f"the last step is the cheapest to skip at every calibrated step count: not forced (cutoff_steps {max(steps)})")
    return max(steps)


# -- the reuse rule ---------------------------------------------------------------------------------------------------
@dataclass
class ForecastFit:
    forecast: Forecast
    ratio: tuple[tuple[float, float], ...]  # [sigma span, final error with the forecast / without], for the cost model
    table: pd.DataFrame  # per probed budget: its sigma span, the measured error per damping, the best damping


PROMPT_LOSS_DB = 0.5  # the most a reuse rule may cost the probed prompts against plain reuse (issue 27's bound)


def _safe_dampings(group: pd.DataFrame) -> list[float]:
    """The probed dampings that cost the probed prompts no more than PROMPT_LOSS_DB against plain reuse: the geometric
    mean hides a prompt the rule ruins (on the scenes model's probes, 0.8 lost one prompt 5.5 dB).

    At FEW_STEPS or fewer no probed prompt may lose more (it holds the 8-step student's worst prompt; judging the worst
    prompt alone there cost it 1.3-3.4 dB at 2-4 of 8). Above, the worst probed prompt's error may not rise by more:
    with 4 probed prompts, one the forecast hurts (the scenes model's 003-background) otherwise cut the damping at
    four of six reaches and cost 3-5 dB of held-out mean (docs/eval/README.md, "Which prompts are probed")."""
    per_prompt = group.pivot_table(index=["prompt_id", "seed"], columns="alpha", values="image_rmse")
    if int(group["steps"].iloc[0]) > FEW_STEPS:
        worst_db = 20 * np.log10(per_prompt.max() / per_prompt[0.0].max())
        return [float(a) for a in worst_db.index if worst_db[a] <= PROMPT_LOSS_DB]
    loss_db = 20 * np.log10(per_prompt.div(per_prompt[0.0], axis=0))
    return [float(a) for a in loss_db.columns if (loss_db[a] <= PROMPT_LOSS_DB).all()]


def _best_damping(errors: pd.Series) -> float:
    """The damping of least measured error, refined by a parabola through it and its neighbours (among the dampings
    given: a refinement never leaves them)."""
    alphas, values = errors.index.to_numpy(float), np.log(errors.to_numpy(float))
    i = int(np.argmin(values))
    if 0 < i < len(alphas) - 1 and np.allclose(np.diff(alphas), alphas[1] - alphas[0]):
        a, b, c = np.polyfit(alphas[i - 1 : i + 2], values[i - 1 : i + 2], 2)
        if a > 0:
            return float(np.clip(-b / (2 * a), alphas[i - 1], alphas[i + 1]))
    return float(alphas[i])


STOP_BEYOND = 1e-3  # at few steps the forecast's damping falls to 0 this far (in sigma) beyond the longest probed reach


def forecast_from_probes(units: list[UnitSeries], probes: pd.DataFrame | None) -> ForecastFit | None:
    """The linear forecast's damping per sigma reach, from forecast probes (`teacal probe --forecast`).

    Each probe runs an evenly spaced static schedule with a constant damping; the slope of every window after the
    first is measured over the window before it and carried across a window as long, so the schedule's mean span
    stands for the reaches it used (`teacache.forecast.Forecast.reach`). For each
    probed budget the damping of least final error (geometric mean over the probed prompts), among those that cost no
    probed prompt more than PROMPT_LOSS_DB against plain reuse, becomes a knot. Where no damping beats plain reuse the
    knot is 0, so the fitted rule never does worse on what was measured, on the mean or on any probed prompt. At
    FEW_STEPS or fewer a last knot of 0 just beyond the longest probed reach stops the forecast where no probe went
    (the lowest budgets carry a slope further than the probes' 3 computed steps; held there, the 8-step student's
    damping lost 3.6 dB on the worst prompt at 2 of 8).
    """
    if probes is None or "kind" not in probes or not (probes["kind"] == "forecast").any():
        return None
    rows = []
    for (steps, budget), group in probes[probes["kind"] == "forecast"].groupby(["steps", "budget"]):
        sigma = next(u.sigma for u in units if u.steps == steps)
        computed = np.flatnonzero(uniform_schedule(int(steps), int(budget)))
        spans = sigma[computed[:-1]] - sigma[computed[1:]]
        errors = group.groupby("alpha")["image_rmse"].apply(_geometric_mean)
        if 0.0 not in errors.index:
            continue
        errors = errors[_safe_dampings(group)]  # plain reuse (0) is always safe
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
    alpha = tuple((float(r.span), float(r.alpha)) for r in knots.itertuples())
    if table["steps"].max() <= FEW_STEPS:  # the probes stop short of the lowest budget's reach there: so does the forecast
        alpha += ((round(alpha[-1][0] + STOP_BEYOND, 4), 0.0),)
    forecast = Forecast("linear", "step", alpha,
                        fit={"probes": int((probes["kind"] == "forecast").sum()), "budgets": table[["steps", "budget", "span", "alpha", "ratio"]].round(5).to_dict("records")})
    return ForecastFit(forecast, ratio, table)


@dataclass
class CostModels:
    """The cost model per reuse target with the reuse rule the preset will run (`rule`), and with plain reuse (`plain`),
    as matrices per unit; the forecast fitted from probes."""

    forecast_fit: ForecastFit | None
    models: dict[str, CostModel]
    rule: dict[str, dict]
    plain: dict[str, dict]

    @property
    def forecast(self) -> Forecast:
        return self.forecast_fit.forecast if self.forecast_fit is not None else NO_FORECAST


def cost_models(units: list[UnitSeries], probes: pd.DataFrame | None, targets: tuple[str, ...], echo=print) -> CostModels:
    """The cost models of a calibration, per reuse target: with the reuse rule fitted from forecast probes (the rule the
    preset will run, so the polynomial is fitted for it) and with plain reuse (what tune, the sweeps and the oracle compare)."""
    forecast_fit = forecast_from_probes(units, probes)
    if forecast_fit is not None:
        echo("reuse rule, from forecast probes (final image RMSE against the reference, geometric mean over the probed prompts):")
        echo(forecast_fit.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        rule = forecast_fit.forecast
        echo(f"chose forecast {rule.rule}" + (f", damping per sigma reach {[list(k) for k in rule.alpha]}" if rule.extrapolates else ""))
    forecast = forecast_fit.forecast if forecast_fit is not None else NO_FORECAST
    ratio = forecast_fit.ratio if forecast_fit is not None else ()
    models = {target: cost_model(units, probes, target, forecast, ratio) for target in targets}
    plain_models = {target: cost_model(units, probes, target) for target in targets}  # once: it fits the compounding
    return CostModels(forecast_fit, models, {t: {u.key: models[t].matrix(u) for u in units} for t in targets},
                      {t: {u.key: plain_models[t].matrix(u) for u in units} for t in targets})
