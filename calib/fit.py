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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from calib.budgets import COMPARED, OBJECTIVES
from calib.costmodel import CostModels, cost_models, last_step_rule
from calib.errors import UserError
from calib.oracle import gap_to_oracle, measured_static, preset_oracle
from calib.regression import Windows, fit_polynomial, group_folds, r2, skip_windows, step_floor, transform
from calib.runfiles import check_output_file, identity_hash, library_versions, load_probes_of, load_traces
from calib.search import OBJECTIVE_FOLDS, SHAPE_TRIALS, choose_objective, search_shape, simulated_gaps
from calib.simulate import EXACT_SIGNALS, UnitSeries, threshold_for_speedup, typical_log_ratio, unit_series
from teacache._files import remove_stale_temp_files
from teacache.policy import TeaCachePolicy
from teacache.preset import BRANCH_MODES, SIGNALS, Preset

TARGETS = ("residual", "output")
TRANSFORMS = ("root", "cost")
WEAK_R2 = 0.5
# Between signals every finalist is simulated on one cost model, so that their gaps to the oracle are on one scale:
# the output's reuse error (the transformer output is what the sampler integrates). On the tiny model's calibration run
# the two targets' models rank the measured static schedules about alike (rank correlation 0.87 and 0.90).
YARDSTICK = "output"
ADAPT_CLIP = 2.0  # --adapt: a prompt's pace counts up to twice (or half) the calibration prompts'


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


def fold_preset(candidate: Candidate, units: list[UnitSeries], windows: Windows, y: np.ndarray, train_units: np.ndarray, loss: str, model: str,
                ret_steps: int, cutoff_steps: int) -> Preset | None:
    """The candidate's polynomial fitted on the windows of `train_units` only (None: too few windows for its degree)."""
    train_rows = np.flatnonzero(np.isin(windows.unit, train_units))
    if len(train_rows) <= candidate.degree:
        return None
    train = [units[i] for i in train_units]
    fitted = windows.subset(train_rows)
    coefficients = fit_polynomial(fitted.features(candidate.degree), y[train_rows], loss, x_range(train, candidate.signal), step_floor(fitted, y[train_rows]))
    return candidate_preset(model, candidate, coefficients, train, ret_steps, cutoff_steps)


def evaluate(candidate: Candidate, units: list[UnitSeries], matrices: dict, windows: Windows, groups: np.ndarray, k: int,
             loss: str, model: str, ret_steps: int, cutoff_steps: int, objective: str = "mean") -> Scored:
    """Cross-validated by prompt: the fitted quantity's held-out error and the simulated held-out dB gap to the oracle."""
    unit_groups = np.array([u.group for u in units])
    y = transform(windows.cost, candidate.transform)
    predicted = np.full(len(y), np.nan)
    gaps = []
    for train_units, test_units in group_folds(unit_groups, k):
        train = [units[i] for i in train_units]
        test = [units[i] for i in test_units]
        test_rows = np.flatnonzero(np.isin(windows.unit, test_units))
        preset = fold_preset(candidate, units, windows, y, train_units, loss, model, ret_steps, cutoff_steps)
        if preset is None or not len(test_rows):
            continue
        policy = TeaCachePolicy(preset, 0.0)  # its clamp and rescale, exactly as the runtime applies them
        predicted[test_rows] = [sum(policy.estimate(float(v)) for v in windows.x[r]) for r in test_rows]
        for steps in sorted({u.steps for u in test}):
            test_n = [u for u in test if u.steps == steps]
            train_n = [u for u in train if u.steps == steps] or train
            gaps.append(gap_to_oracle(preset, train_n, test_n, matrices, steps, objective))
    done = np.isfinite(predicted)
    gap = np.concatenate(gaps) if gaps else np.array([np.nan])
    return Scored(candidate, r2(y[done], predicted[done]) if done.any() else float("nan"),
                  float(np.mean(np.abs(y[done] - predicted[done]))) if done.any() else float("nan"),
                  float(np.nanmean(gap)) if np.isfinite(gap).any() else float("-inf"))


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
    cutoff_steps: int | None = None  # None: the last step (-1), unless few-step probes measure it the cheapest to skip
    speedup: float = 1.6
    partial: bool = False  # fit an unfinished recording anyway
    oracle_from: tuple[Path, ...] = ()  # sweeps of these runs whose measured static schedules verify the oracle
    adapt: float = 0.0  # strength of the per-prompt ratio (Preset.adapt); 0: off
    objective: str = "auto"  # what is optimised over the prompts: mean, worst, cvar (calib.budgets.OBJECTIVES); auto: by folds


def signal_is_branch_independent(units: list[UnitSeries], signal: str) -> bool:
    """Qwen's image-stream signals do not see the text, so cond and uncond carry the same x."""
    for unit in units:
        x = unit.x[signal]
        if len(x) > 1 and not np.allclose(x[0][1:], x[1][1:], rtol=1e-4, atol=1e-7):
            return False
    return True


@dataclass
class Calibration:
    """What fit works on: the recorded units of the runs, their settings and probes, and the measured oracle."""

    runs: list[Path]
    settings: dict  # SETTINGS_THAT_MUST_MATCH and the recorded step counts
    units: list[UnitSeries]
    probes: pd.DataFrame | None
    measured: pd.DataFrame | None  # static schedules measured by sweeps of the runs (--oracle-from)
    step_rules: Preset  # ret_steps and cutoff_steps, for the forced steps
    objective_folds: dict | None = None  # with --objective auto: each objective's score on folds (`choose_objective`)

    @property
    def prompts(self) -> int:
        return len({u.group for u in self.units})


def check_request(request: FitRequest) -> Path:
    """Every flag, before anything is read."""
    out = check_output_file(request.out, "--out", "preset.json")
    for flag, value, choices in (("--signal", request.signal, SIGNALS), ("--target", request.target, TARGETS),
                                 ("--branch-mode", request.branch_mode, BRANCH_MODES)):
        if value not in ("auto", *choices):
            raise UserError(f"{flag} {value!r}: expected auto, {', '.join(choices)}")
    if request.objective not in ("auto", *OBJECTIVES):
        raise UserError(f"--objective {request.objective!r}: expected auto, {', '.join(OBJECTIVES)}")
    if not 1 <= request.degree <= 8:
        raise UserError(f"--degree {request.degree}: expected 1 to 8")
    if request.folds < 2:
        raise UserError(f"--folds {request.folds}: need at least 2")
    if not math.isfinite(request.adapt) or request.adapt < 0:
        raise UserError(f"--adapt {request.adapt}: expected a finite number >= 0 (0: off)")
    if not math.isfinite(request.speedup) or request.speedup < 1:
        raise UserError(f"--speedup {request.speedup}: expected a finite number >= 1")
    return out


def load_calibration(request: FitRequest, echo=print) -> Calibration:
    trace, settings, groups, runs = load_traces(request.runs, request.partial, echo)
    probes = load_probes_of(runs)
    cutoff = request.cutoff_steps if request.cutoff_steps is not None else last_step_rule(settings, probes, echo)
    step_rules = Preset(model=settings["model"], signal="temb", coefficients=[1.0, 0.0], ret_steps=request.ret_steps, cutoff_steps=cutoff)
    for steps in settings["steps"]:
        try:
            step_rules.resolve_cutoff(steps)
        except ValueError as err:
            raise UserError(str(err).replace("preset <memory>: ", "")) from None
    measured = measured_static(request.oracle_from, runs) if request.oracle_from else None  # checked before the fit
    calibration = Calibration(runs, settings, unit_series(trace, groups), probes, measured, step_rules)
    if calibration.prompts < 2:
        raise UserError(f"cross-validation by prompt needs at least 2 prompts; the recording has {calibration.prompts}")
    if calibration.probes is None:
        echo("note: no probes (`teacal probe RUN`): the cost model weighs every step's reuse error alike, without the final image's sensitivity")
    return calibration


def candidates_of(request: FitRequest, units: list[UnitSeries]) -> list[Candidate]:
    """Signal x reuse target x transform x degree (1, 2, 3 and --degree); the branch mode per signal."""
    out = []
    for signal in SIGNALS if request.signal == "auto" else (request.signal,):
        mode = request.branch_mode
        if mode == "auto":
            mode = "shared" if signal_is_branch_independent(units, signal) else "per-branch"
        for target in TARGETS if request.target == "auto" else (request.target,):
            out += [Candidate(signal, target, kind, degree, mode) for kind in TRANSFORMS for degree in sorted({1, 2, 3, request.degree})
                    if degree <= request.degree]
    return out


def cross_validate(request: FitRequest, calibration: Calibration, costs: CostModels, echo=print) -> tuple[list[Scored], dict]:
    """Every candidate scored on held-out prompts; returns the scores and the skip windows per (signal, target, mode)."""
    units = calibration.units
    k = min(request.folds, calibration.prompts)
    windows: dict = {}
    scored = []
    for c in candidates_of(request, units):
        key = (c.signal, c.target, c.branch_mode)
        if key not in windows:
            windows[key] = skip_windows(units, costs.rule[c.target], c.signal, c.branch_mode == "shared", request.ret_steps, calibration.step_rules.cutoff_steps)
        if len(windows[key].cost) < 2 * (c.degree + 1):
            raise UserError(f"only {len(windows[key].cost)} skip windows for degree {c.degree}: record more prompts or steps, or lower --degree")
        groups = np.array([units[i].group for i in windows[key].unit])
        scored.append(evaluate(c, units, costs.rule[c.target], windows[key], groups, k, request.loss, calibration.settings["model"],
                               request.ret_steps, calibration.step_rules.cutoff_steps, "mean" if request.objective == "auto" else request.objective))
    echo(f"{'signal':<7}{'target':<9}{'fit':<6}{'degree':>6}{'held-out R2':>13}{'MAE':>10}{'dB vs oracle':>14}   (held-out prompts; budgets "
         f"{COMPARED[0]:.0%}..{COMPARED[1]:.0%} of calls)")
    for s in scored:
        c = s.candidate
        echo(f"{c.signal:<7}{c.target:<9}{c.transform:<6}{c.degree:>6}{s.r2:>13.4f}{s.mae:>10.5f}{s.db_gap:>+14.2f}   ({c.branch_mode})")
    return scored, windows


def compare_signals(request: FitRequest, calibration: Calibration, costs: CostModels, scored: list[Scored], windows: dict,
                    echo=print) -> tuple[Scored, dict]:
    """Each signal's best cross-validated candidate, fitted on every prompt, its simulated front against the oracle on
    one cost model (YARDSTICK, plain reuse as tune and the sweeps compare); a timestep-only signal gets the shape
    search first. Returns the chosen signal's candidate and every signal's record (coefficients, gaps)."""
    units = calibration.units
    at_degree = [s for s in scored if s.candidate.degree == request.degree] or scored
    finalists: dict[str, Scored] = {}
    for s in at_degree:
        if s.candidate.signal not in finalists or s.db_gap > finalists[s.candidate.signal].db_gap:
            finalists[s.candidate.signal] = s
    echo(f"each signal's best candidate, fitted on every calibration prompt: simulated dB against the oracle (mean, worst budget); "
         f"for {', '.join(EXACT_SIGNALS)} also after the shape search ({SHAPE_TRIALS} more polynomials)")
    echo(f"{'signal':<7}{'target':<9}{'fit':<6}{'fitted':>9}{'worst':>8}{'searched':>11}{'worst':>8}")
    by_signal: dict[str, dict] = {}
    for signal, s in finalists.items():
        c = s.candidate
        w = windows[(c.signal, c.target, c.branch_mode)]
        target = transform(w.cost, c.transform)
        coefficients = fit_polynomial(w.features(c.degree), target, request.loss, x_range(units, c.signal), step_floor(w, target))
        fitted = candidate_preset(calibration.settings["model"], c, coefficients, units, request.ret_steps, calibration.step_rules.cutoff_steps)
        if signal in EXACT_SIGNALS:
            fitted, fitted_gaps, gaps = search_shape(fitted, units, costs.plain[YARDSTICK], request.objective)
        else:
            gaps = fitted_gaps = simulated_gaps(fitted, units, costs.plain[YARDSTICK], request.objective)
        searched = f"{np.mean(gaps):>+11.2f}{np.min(gaps):>+8.2f}" if signal in EXACT_SIGNALS else ""
        echo(f"{signal:<7}{c.target:<9}{c.transform:<6}{np.mean(fitted_gaps):>+9.2f}{np.min(fitted_gaps):>+8.2f}{searched}")
        by_signal[signal] = {"target": c.target, "transform": c.transform, "coefficients": list(fitted.coefficients),
                             "fitted_db": _rounded(np.mean(fitted_gaps)), "fitted_worst_db": _rounded(np.min(fitted_gaps)),
                             "db": _rounded(np.mean(gaps)), "worst_db": _rounded(np.min(gaps))}
    chosen = max(by_signal, key=lambda signal: by_signal[signal]["db"])
    return finalists[chosen], by_signal


def objective_by_folds(request: FitRequest, calibration: Calibration, costs: CostModels, scored: list[Scored], windows: dict,
                       echo=print) -> tuple[str, dict]:
    """--objective auto: the objective of the shape search, chosen on folds of the calibration prompts with the best
    cross-validated candidate of a timestep signal (where the search, and so the objective, steers the schedules).
    Returns it and every objective's score on the folds (none where no timestep signal was fitted)."""
    exact = [s for s in scored if s.candidate.signal in EXACT_SIGNALS and s.candidate.degree == request.degree]
    if not exact:
        return "mean", {}
    c = max(exact, key=lambda s: s.db_gap).candidate
    units, w = calibration.units, windows[(c.signal, c.target, c.branch_mode)]
    folds = group_folds(np.array([u.group for u in units]), min(OBJECTIVE_FOLDS, calibration.prompts))
    objective, scores = choose_objective(folds, units, lambda train: fold_preset(
        c, units, w, transform(w.cost, c.transform), train, request.loss, calibration.settings["model"], request.ret_steps,
        calibration.step_rules.cutoff_steps), costs.plain[YARDSTICK])
    listed = ", ".join(f"{o} {v:.2f}" for o, v in scores.items()) or "no budget reached on every fold"
    echo(f"objective {objective}, chosen on folds of the calibration prompts ({c.signal}; modelled dB of every prompt where it was held out, "
         f"(mean + worst prompt) / 2 over budgets: {listed})")
    return objective, scores


def assemble(request: FitRequest, calibration: Calibration, costs: CostModels, scored: list[Scored], best: Scored, by_signal: dict,
             windows: Windows, out: Path, echo=print) -> Preset:
    """The preset: the chosen polynomial (`windows`: its skip windows), its domain, provenance and fit quality, and
    the default threshold."""
    chosen, settings, units = best.candidate, calibration.settings, calibration.units
    oracle, runners_up, source, audit = preset_oracle(units, calibration.step_rules, costs.plain[chosen.target], calibration.measured,
                                                      request.oracle_from, echo)
    model = costs.models[chosen.target]
    preset = Preset(
        model=settings["model"], signal=chosen.signal, coefficients=[float(c) for c in by_signal[chosen.signal]["coefficients"]],
        ret_steps=request.ret_steps, cutoff_steps=calibration.step_rules.cutoff_steps, branch_mode=chosen.branch_mode, forecast=costs.forecast,
        domain={"steps": settings["steps"], "sizes": settings["sizes"], "dtype": settings["dtype"], "x_range": {s: list(x_range(units, s)) for s in SIGNALS}},
        calibration={
            "runs": [str(r) for r in request.runs], "backend": settings["backend"], "steps": settings["steps"], "sizes": settings["sizes"],
            "cfg": settings["cfg"], "dtype": settings["dtype"], "prompts": calibration.prompts, "units": len(units), "windows": len(windows.cost),
            "target": chosen.target, "transform": chosen.transform, "loss": request.loss, "objective": request.objective,
            **({"objective_folds": calibration.objective_folds} if calibration.objective_folds else {}),
            "cost_model": {"probed": model.probed, "gamma": round(model.gamma, 6), "gain": model.gain, "measured_check": audit,
                           "forecast_ratio": [list(k) for k in model.forecast_ratio]},
            "prompt_identities": sorted({identity_hash(u.group) for u in units}),  # `teacal evaluate` refuses these prompts
            "oracle": oracle, "oracle_runners_up": runners_up, "oracle_source": source, "versions": library_versions(),
            "date": settings["recorded"][:10],  # the day the data was recorded: a rerun (or a resumed run) writes the same bytes
        },
        fit={
            "r2_heldout": _rounded(best.r2), "mae_heldout": _rounded(best.mae), "db_vs_oracle_heldout": _rounded(best.db_gap),
            "folds": min(request.folds, calibration.prompts), "signals": by_signal,
            "candidates": [{"signal": s.candidate.signal, "target": s.candidate.target, "transform": s.candidate.transform, "degree": s.candidate.degree,
                            "r2_heldout": _rounded(s.r2), "mae_heldout": _rounded(s.mae), "db_vs_oracle_heldout": _rounded(s.db_gap)} for s in scored],
        },
        source=str(out),
    )
    if request.adapt > 0:  # the calibration prompts' pace, at the threshold of the requested speed-up
        typical = typical_log_ratio(units, preset, threshold_for_speedup(units, preset, request.speedup)[0])
        preset = preset.replace(adapt={"strength": request.adapt, "typical": round(typical, 6), "clip": ADAPT_CLIP})
    threshold, reached = threshold_for_speedup(units, preset, request.speedup)
    if reached + 1e-9 < request.speedup:
        echo(f"note: --speedup {request.speedup:g} is out of reach on this recording; the fastest threshold ({threshold:g}) gives {reached:.2f}x")
    return preset.replace(threshold=threshold, fit=dict(preset.fit, default_threshold_speedup=round(reached, 4), requested_speedup=request.speedup))


def fit(request: FitRequest, echo=print) -> Preset:
    """Load the runs, fit and cross-validate every candidate, choose between signals, write the preset."""
    out = check_request(request)
    calibration = load_calibration(request, echo)
    remove_stale_temp_files(out.parent, [out.name])  # a killed fit's half-written preset
    costs = cost_models(calibration.units, calibration.probes, TARGETS, echo)
    scored, windows = cross_validate(request, calibration, costs, echo)
    if request.objective == "auto":
        objective, scores = objective_by_folds(request, calibration, costs, scored, windows, echo)
        request, calibration = replace(request, objective=objective), replace(calibration, objective_folds=scores)
    best, by_signal = compare_signals(request, calibration, costs, scored, windows, echo)
    chosen = best.candidate
    preset = assemble(request, calibration, costs, scored, best, by_signal, windows[(chosen.signal, chosen.target, chosen.branch_mode)], out, echo)
    preset.save(out)
    echo(f"chose signal {chosen.signal}, target {chosen.target} ({chosen.transform}), degree {chosen.degree}, {chosen.branch_mode}: "
         f"held-out R2 {best.r2:.4f}, {best.db_gap:+.2f} dB against the oracle (cross-validated); {by_signal[chosen.signal]['db']:+.2f} on every prompt"
         + (" with the searched shape" if chosen.signal in EXACT_SIGNALS else "") + f"; default threshold {preset.threshold:.4g} "
         f"(simulated {preset.fit['default_threshold_speedup']:.2f}x)")
    if not best.r2 >= WEAK_R2:
        echo(f"warning: the fit is weak (held-out R2 {best.r2:.2f} < {WEAK_R2}): record more prompts or seeds, probe (`teacal probe`), "
             "or try --signal modin / a lower --degree")
    echo(f"wrote {out}")
    return preset


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None  # JSON has no NaN: a constant target has no R²
