"""`teacal fit`: real scipy fits on real recordings, and the window-sum model it fits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from calib.cli import app
from calib.costmodel import CostModel
from calib.fit import FitRequest, fit
from calib.regression import Windows, fit_polynomial, group_folds, skip_windows, transform
from calib.search import search_shape, simulated_gaps
from calib.simulate import UnitSeries
from teacache.diffusers import apply_teacache, remove_teacache, teacache_stats
from teacache.policy import TeaCachePolicy
from teacache.preset import Preset

runner = CliRunner()


def test_one_step_windows_are_np_polyfit_and_robust_losses_shrug_off_outliers():
    rng = np.random.default_rng(0)
    truth = np.array([30.0, -12.0, 2.5, 0.01])
    x = rng.uniform(0.0, 0.4, 400)
    y = np.polyval(truth, x)
    features = np.vander(x, 4)
    assert np.allclose(fit_polynomial(features, y), truth, rtol=1e-6, atol=1e-9)
    noisy = y + rng.normal(0, 0.01, x.size)
    assert np.allclose(fit_polynomial(features, noisy), np.polyfit(x, noisy, 3), rtol=1e-7, atol=1e-9)
    outliers = noisy.copy()
    outliers[::20] += 5.0
    robust = fit_polynomial(features, outliers, loss="soft_l1")
    plain = fit_polynomial(features, outliers)
    assert np.abs(np.polyval(robust, x) - y).mean() < np.abs(np.polyval(plain, x) - y).mean() / 3


def _window_sum_unit(p_true: np.ndarray, n: int = 14, seed: int = 0) -> UnitSeries:
    """A unit whose reuse errors make every window's cost exactly (Σ_m p(x_m))²: e(m, j) = P(j, m)² - P(j, m-1)²."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([[np.nan], rng.uniform(0.05, 0.4, n - 1)])
    per_step = np.polyval(p_true, x)
    e = np.full((1, n, n), np.nan)  # [b, m, k]
    for m in range(1, n):
        for k in range(1, m + 1):
            j = m - k
            before = per_step[j + 1 : m].sum()
            e[0, m, k] = (before + per_step[m]) ** 2 - before**2
    return UnitSeries(("p", seed, n, 16, 16), f"p{seed}", ("cond",), np.linspace(1, 0.05, n), {"temb": x[None], "modin": x[None], "sigma": x[None]},
                      {"residual": e, "output": e})


def test_the_fit_recovers_a_known_window_sum_model_exactly():
    p_true = np.array([2.0, -0.5, 0.3])
    units = [_window_sum_unit(p_true, seed=s) for s in range(3)]
    model = CostModel()  # no probes: cost = reuse error
    matrices = {u.key: model.matrix(u) for u in units}
    windows = skip_windows(units, matrices, "temb", shared=True, ret_steps=1, cutoff_steps=-1)
    assert len(windows.cost) > 100 and max(len(x) for x in windows.x) > 5  # long windows too, not just single steps
    fitted = fit_polynomial(windows.features(2), transform(windows.cost, "root"))
    assert np.allclose(fitted, p_true, rtol=1e-8, atol=1e-10)
    # the accumulator the runtime builds from it predicts every window's cost
    policy = TeaCachePolicy(Preset(model="m", signal="temb", coefficients=list(fitted), ret_steps=1, cutoff_steps=-1), 0.0)
    predicted = np.array([sum(policy.estimate(float(v)) for v in x) for x in windows.x])
    assert np.allclose(predicted**2, windows.cost, rtol=1e-8)


def test_a_polynomial_that_dips_below_zero_in_range_is_refitted_positive():
    x = np.linspace(0.05, 0.4, 50)
    y = np.polyval([40.0, -20.0, 2.4], x)  # negative between 0.2 and 0.3
    fitted = fit_polynomial(np.vander(x, 3), y, positive_on=(0.05, 0.4), floor=0.01)
    assert np.polyval(fitted, np.linspace(0.05, 0.4, 1000)).min() > 0.009  # the floor holds at the constraint points, nearly between them
    assert np.polyval(fit_polynomial(np.vander(x, 3), y), 0.25) < 0  # unconstrained, it would skip for free there


def test_folds_never_split_a_prompt():
    groups = np.repeat([f"p{i}" for i in range(7)], 13)
    folds = group_folds(groups, 3)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(groups.size))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])


@pytest.fixture(scope="module")
def fitted(recorded_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "preset.json"
    lines = []
    preset = fit(FitRequest(runs=(recorded_run,), out=out, degree=2, folds=2), echo=lines.append)
    return preset, out, lines


def test_fit_writes_a_preset_the_runtime_applies(fitted, tiny, reference_image):
    preset, out, lines = fitted
    assert Preset.load(out) == preset and preset.model == "tiny-qwen-image-edit" and len(preset.coefficients) == 3
    assert preset.branch_mode == "shared"  # the image-stream signals are the same in both branches
    assert preset.domain["steps"] == [6] and preset.domain["sizes"] == [[64, 64]] and preset.domain["dtype"] == "float32"
    low, high = preset.x_range
    assert 0 < low < high
    assert preset.calibration["oracle"]["6"]["3"].count("x") == 3
    assert {(c["signal"], c["target"], c["transform"]) for c in preset.fit["candidates"]} >= {("temb", "residual", "root"), ("modin", "output", "cost")}
    assert any("dB vs oracle" in line for line in lines) and any("no probes" in line for line in lines)
    apply_teacache(tiny.transformer, preset, threshold=preset.threshold)
    try:
        tiny.generate("make it night", reference_image, seed=0, steps=6, size=(64, 64))
        assert teacache_stats(tiny.transformer).computed > 0
    finally:
        remove_teacache(tiny.transformer)


def test_fit_chooses_by_simulated_quality(fitted):
    preset, _, lines = fitted
    # the signal: each signal's best candidate, simulated against the oracle on every prompt (the timestep-only
    # signals after the shape search, which never loses to the fitted polynomial it starts from)
    signals = preset.fit["signals"]
    assert set(signals) == {"temb", "modin", "sigma"} and preset.signal == max(signals, key=lambda s: signals[s]["db"])
    for name in ("temb", "sigma"):
        assert 2 * signals[name]["worst_db"] + signals[name]["db"] >= 2 * signals[name]["fitted_worst_db"] + signals[name]["fitted_db"] - 1e-6
    assert signals["modin"]["db"] == signals["modin"]["fitted_db"]
    assert list(preset.coefficients) == signals[preset.signal]["coefficients"]
    # within the signal, the candidate closest to the oracle on held-out prompts (cross-validated)
    candidates = [c for c in preset.fit["candidates"] if c["degree"] == 2 and c["signal"] == preset.signal]
    best = max(candidates, key=lambda c: c["db_vs_oracle_heldout"])
    assert (preset.calibration["target"], preset.calibration["transform"]) == (best["target"], best["transform"])
    assert any(line.startswith("sigma ") for line in lines) and any("shape search" in line for line in lines)
    # the objective (--objective auto): the one whose shape search did best on folds of the calibration prompts
    folds = preset.calibration["objective_folds"]
    best = max(folds, key=lambda o: (folds[o], o == "mean"))
    assert set(folds) == {"mean", "worst", "cvar"} and preset.calibration["objective"] == (best if folds[best] >= folds["mean"] + 0.25 else "mean")
    assert any(line.startswith(f"objective {preset.calibration['objective']}, chosen on folds") for line in lines)


def test_fit_adapt_writes_the_calibration_prompts_pace_and_an_adaptive_rule(recorded_run, tmp_path):
    from calib.runfiles import load_trace
    from calib.simulate import teacache_schedules, typical_log_ratio, unit_series

    preset = fit(FitRequest(runs=(recorded_run,), out=tmp_path / "p.json", degree=2, folds=2, signal="sigma", objective="mean", adapt=1.0),
                 echo=lambda *_: None)
    assert Preset.load(tmp_path / "p.json") == preset and "objective_folds" not in preset.calibration  # an explicit objective: no folds
    assert preset.adapt["strength"] == 1.0 and preset.adapt["clip"] == 2.0 and preset.adaptive
    units = unit_series(load_trace(recorded_run))
    # `typical` is the median pace over the calibration prompts: about as many windows run faster as slower
    plain = preset.replace(adapt={})
    assert preset.adapt["typical"] == pytest.approx(typical_log_ratio(units, plain, fit_threshold(plain, units)), abs=1e-6)
    # a timestep signal alone gives every prompt one schedule; the ratio gives each its own at some threshold
    thresholds = np.geomspace(0.05, 2.0, 12)
    assert len({teacache_schedules(u, plain, thresholds).tobytes() for u in units}) == 1
    assert len({teacache_schedules(u, preset, thresholds).tobytes() for u in units}) > 1


def fit_threshold(preset: Preset, units) -> float:
    from calib.simulate import threshold_for_speedup

    return threshold_for_speedup(units, preset, 1.6)[0]


def _copy_run(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def test_one_prompt_recorded_in_two_runs_is_one_group(recorded_run, tmp_path):
    copy = _copy_run(recorded_run, tmp_path / "copy")
    preset = fit(FitRequest(runs=(recorded_run, copy), out=tmp_path / "p.json", degree=2, folds=2, signal="temb", target="residual"), echo=lambda *_: None)
    assert preset.calibration["prompts"] == 4 and preset.calibration["units"] == 16


def test_fit_refusals(recorded_run, tmp_path):
    out = str(tmp_path / "p.json")

    def poison(run):
        part = sorted((run / "trace").glob("*.parquet"))[0]
        frame = pd.read_parquet(part)
        frame.loc[3, "x_modin"] = np.nan
        frame.to_parquet(part)

    result = runner.invoke(app, ["fit", str(_copy_run(recorded_run, tmp_path / "nan", poison)), "--out", out])
    assert result.exit_code == 2 and "hold NaN or inf" in result.output

    def other_cfg(run):
        info = json.loads((run / "run.json").read_text())
        info["settings"]["cfg"] = 7.0
        (run / "run.json").write_text(json.dumps(info))

    result = runner.invoke(app, ["fit", str(recorded_run), str(_copy_run(recorded_run, tmp_path / "other", other_cfg)), "--out", out])
    assert result.exit_code == 2 and "recorded with other settings" in result.output and "cfg: 4.0 vs 7.0" in result.output

    def unfinished(run):
        info = json.loads((run / "run.json").read_text())
        name = next(iter(info["status"]))
        info["status"][name] = "pending"
        (run / "run.json").write_text(json.dumps(info))
        (run / "trace" / f"{name}.parquet").unlink()

    partial = _copy_run(recorded_run, tmp_path / "partial", unfinished)
    result = runner.invoke(app, ["fit", str(partial), "--out", out])
    assert result.exit_code == 2 and "unfinished (1 of 8 generations missing" in result.output and "--partial" in result.output
    result = runner.invoke(app, ["fit", str(partial), "--out", out, "--partial", "--degree", "1", "--folds", "2"])
    assert result.exit_code == 0 and "partial recording, 1 of 8 generations missing" in result.output
    Path(out).unlink()
    result = runner.invoke(app, ["fit", str(tmp_path / "nothing"), "--out", out])
    assert result.exit_code == 2 and "no such run folder" in result.output
    result = runner.invoke(app, ["fit", str(recorded_run), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output
    result = runner.invoke(app, ["fit", str(recorded_run), "--out", out, "--signal", "clip"])
    assert result.exit_code == 2 and "'clip' is not one of 'auto', 'temb', 'modin'" in result.output and result.output.count("\n") == 1
    assert not Path(out).exists()


def test_an_unreachable_speedup_is_one_line_and_the_preset_says_what_it_reaches(recorded_run, tmp_path):
    lines = []
    preset = fit(FitRequest(runs=(recorded_run,), out=tmp_path / "p.json", degree=1, folds=2, speedup=50.0), echo=lines.append)
    note = [line for line in lines if "--speedup 50" in line]
    assert len(note) == 1 and "out of reach" in note[0]
    assert 1 < preset.fit["default_threshold_speedup"] < 50 and preset.fit["requested_speedup"] == 50.0


def test_a_constant_target_reports_no_r2_instead_of_crashing(tmp_path):
    from calib.fit import Candidate, evaluate

    units = [_window_sum_unit(np.array([0.0, 0.1]), seed=s) for s in range(4)]  # every step adds the same: constant per length
    for u in units:
        u.reuse["residual"][:] = np.where(np.isnan(u.reuse["residual"]), np.nan, 0.01)
    matrices = {u.key: CostModel().matrix(u) for u in units}
    windows = Windows(np.array([0, 1, 2, 3]), [np.array([0.1])] * 4, np.full(4, 0.01))
    scored = evaluate(Candidate("temb", "residual", "cost", 1, "shared"), units, matrices, windows, np.array([u.group for u in units]), 2,
                      "linear", "m", 1, -1)
    assert math.isnan(scored.r2)
    preset = Preset(model="m", signal="temb", coefficients=[1.0], ret_steps=1, cutoff_steps=-1, fit={"r2_heldout": None})
    preset.save(tmp_path / "p.json")  # JSON has no NaN: the preset says null
    assert Preset.load(tmp_path / "p.json").fit["r2_heldout"] is None


def test_the_fitted_damping_recovers_a_known_one_per_sigma_span():
    """Forecast probes whose final error is a known function of the damping, minimal at α*(span): `fit` recovers α*
    at every probed span (between the probed dampings, by the parabola through the best three), and where every
    damping loses to plain reuse it keeps α = 0, so the fitted rule never does worse than reuse on what was measured."""
    from calib.costmodel import forecast_from_probes
    from calib.probe import PROBE_DAMPINGS
    from calib.simulate import uniform_schedule

    steps = 20
    sigma = np.linspace(1.0, 0.05, steps)
    unit = UnitSeries(("p", 0, steps, 48, 48), "p", ("cond", "uncond"), sigma, {}, {})
    best_by_budget = {10: 0.5, 7: 0.3, 4: -1.0}  # -1: every positive damping hurts
    rows = []
    for budget, best in best_by_budget.items():
        for alpha in PROBE_DAMPINGS:
            error = 0.01 * math.exp(3.0 * (alpha - best) ** 2)  # log error is a parabola in α, least at `best`
            rows.append({"kind": "forecast", "prompt_id": "p", "seed": 0, "steps": steps, "budget": budget, "alpha": alpha, "image_rmse": error})
    fitted = forecast_from_probes([unit], pd.DataFrame(rows))
    assert fitted.forecast.rule == "linear"
    spans = {}
    for budget in best_by_budget:
        computed = np.flatnonzero(uniform_schedule(steps, budget))
        gaps = sigma[computed[:-1]] - sigma[computed[1:]]
        spans[budget] = float(np.mean(gaps[:-1]))
    for budget, best in best_by_budget.items():
        assert fitted.forecast.damping(spans[budget]) == pytest.approx(max(best, 0.0), abs=1e-3), budget
    # the gain the cost model uses: the best measured damping's error over plain reuse's, 1 where reuse is best
    ratios = {round(span, 4): ratio for span, ratio in fitted.ratio}
    assert ratios[round(spans[4], 4)] == pytest.approx(1.0)
    assert ratios[round(spans[10], 4)] == pytest.approx(math.exp(3.0 * (0.1**2 - 0.5**2)), rel=1e-6)  # best probed: 0.4 and 0.6


def test_at_few_steps_the_forecast_stops_beyond_the_longest_probed_reach():
    """The forecast probes run 3 or more computed steps, so at 8 steps the lowest budgets carry a slope further than any
    probe did: there the fitted damping falls to 0 (plain reuse) just beyond the longest probed reach; at 20 steps,
    where the probes span the budgets, the last knot is held as before."""
    from calib.costmodel import STOP_BEYOND, forecast_from_probes
    from calib.probe import PROBE_DAMPINGS

    def fitted(steps: int, budgets: list[int]):
        sigma = np.linspace(1.0, 0.05, steps)
        unit = UnitSeries(("p", 0, steps, 48, 48), "p", ("cond",), sigma, {}, {})
        rows = [{"kind": "forecast", "prompt_id": "p", "seed": 0, "steps": steps, "budget": b, "alpha": a,
                 "image_rmse": 0.01 * math.exp(3.0 * (a - 0.5) ** 2)} for b in budgets for a in PROBE_DAMPINGS]
        return forecast_from_probes([unit], pd.DataFrame(rows)).forecast

    few, many = fitted(8, [3, 4]), fitted(20, [4, 6, 8])
    longest = few.alpha[-2][0]
    assert few.damping(longest) == pytest.approx(0.5, abs=1e-3) and few.damping(longest + STOP_BEYOND) == 0.0 and few.damping(0.9) == 0.0
    assert many.damping(0.9) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("steps, kept", [(8, 0.4), (20, 0.8)])
def test_the_fitted_damping_costs_the_probed_prompts_no_more_than_half_a_db(steps, kept):
    """Three probed prompts gain from a strong damping and a fourth, easy one (a quarter of their error) loses: at 8
    steps or fewer the rule is the strongest damping under which that prompt stays within 0.5 dB of plain reuse; above,
    the one under which the worst probed prompt does, and the easy prompt's loss leaves it better than the worst."""
    from calib.costmodel import PROMPT_LOSS_DB, forecast_from_probes
    from calib.probe import PROBE_DAMPINGS

    budget = steps // 2
    sigma = np.linspace(1.0, 0.05, steps)
    unit = UnitSeries(("a", 0, steps, 48, 48), "a", ("cond",), sigma, {}, {})
    loses_db = {0.0: 0.0, 0.2: 0.1, 0.4: 0.45, 0.6: 1.5, 0.8: 3.0}  # the fourth prompt's loss against plain reuse
    rows = []
    for alpha in PROBE_DAMPINGS:
        for prompt in "abc":
            rows.append({"kind": "forecast", "prompt_id": prompt, "seed": 0, "steps": steps, "budget": budget, "alpha": alpha, "image_rmse": 0.02 * (1 - alpha)})
        rows.append({"kind": "forecast", "prompt_id": "d", "seed": 0, "steps": steps, "budget": budget, "alpha": alpha,
                     "image_rmse": 0.005 * 10 ** (loses_db[alpha] / 20)})
    table = pd.DataFrame(rows)
    geometric = table.groupby("alpha")["image_rmse"].apply(lambda v: np.exp(np.log(v).mean()))
    assert geometric.idxmin() == 0.8  # what the mean alone would choose
    fitted = forecast_from_probes([unit], table)
    assert fitted.forecast.alpha[0][1] == kept
    if steps <= 8:
        assert loses_db[kept] <= PROMPT_LOSS_DB < loses_db[0.6]
    worst = table.groupby("alpha")["image_rmse"].max()
    assert 20 * np.log10(worst[kept] / worst[0.0]) <= PROMPT_LOSS_DB


def test_the_last_step_is_freed_only_where_few_step_probes_measure_it_cheapest():
    """TeaCache's seed forces the last step. At 8 steps or fewer the probes measure it alone: fit frees it (cutoff =
    the step count) when skipping it costs the final image less than any middle step, at every step count; a dearer
    last step, a longer schedule or no probe of it keeps it forced."""
    from calib.costmodel import last_step_rule
    from calib.probe import window_starts

    assert window_starts(4, 1) == [1, 2, 3] and window_starts(8, 1, 5) == [1, 6, 7] and 19 not in window_starts(20, 1)  # what probe runs
    def probes(steps: int, last_cost: float) -> pd.DataFrame:
        rows = [{"kind": "window", "length": 1, "steps": steps, "first": first, "prompt_id": p, "image_rmse": 0.03 + 0.001 * first}
                for first in range(1, steps - 1) for p in "ab"]
        rows += [{"kind": "window", "length": 1, "steps": steps, "first": steps - 1, "prompt_id": p, "image_rmse": last_cost} for p in "ab"]
        return pd.DataFrame(rows)

    quiet = dict(echo=lambda *_: None)
    assert last_step_rule({"steps": [4]}, probes(4, 0.003), **quiet) == 4
    assert last_step_rule({"steps": [4, 8]}, pd.concat([probes(4, 0.003), probes(8, 0.003)]), **quiet) == 8
    assert last_step_rule({"steps": [4, 8]}, pd.concat([probes(4, 0.003), probes(8, 0.05)]), **quiet) == -1
    assert last_step_rule({"steps": [20]}, probes(20, 0.003), **quiet) == -1  # many steps: the seed's rule stands
    assert last_step_rule({"steps": [4]}, probes(4, 0.003).query("first < 3"), **quiet) == -1  # not probed
    assert last_step_rule({"steps": [4]}, None, **quiet) == -1


def _sweep_folder(folder: Path, run: Path, rows: list[tuple[str, str, str, list[float]]], steps: int = 6) -> Path:
    """A sweep's files as `teacal sweep --out folder` writes them: (method, config, schedule per prompt, PSNR per prompt)."""
    from calib.runfiles import write_json, write_table

    records = [{"method": "uncached", "config": "uncached", "forecast": "none", "prompt_id": p, "schedule": None, "psnr": math.inf,
                "computed_cond": steps, "computed_uncond": steps} for p in ("a", "b")]
    for method, config, schedules, psnrs in rows:
        for p, schedule, psnr in zip(("a", "b"), schedules.split(","), psnrs, strict=True):
            records.append({"method": method, "config": config, "forecast": "none", "prompt_id": p, "schedule": schedule, "psnr": psnr,
                            "computed_cond": schedule.count("x"), "computed_uncond": schedule.count("x")})
    folder.mkdir(parents=True)
    write_json(folder / "sweep.json", {"kind": "sweep", "run": str(Path("..") / run.name), "settings": {"steps": steps}})
    write_table(folder / "sweep.parquet", pd.DataFrame(records))
    return folder


def test_the_measured_oracle_is_the_best_static_schedule_measured_on_the_calibration_prompts(tmp_path):
    """The oracle verified by generating: per budget, the static schedule of the best mean PSNR in a sweep of the
    calibration run (the cost model's schedule one candidate among the others); adaptive configurations (another
    schedule per prompt) are no static schedules; a sweep of any other run (held-out prompts) is refused."""
    from calib.errors import UserError
    from calib.oracle import measured_oracle, measured_static

    calib_run, heldout_run = tmp_path / "calib", tmp_path / "heldout"
    rows = [
        ("oracle", "oracle-k3", "xx...x,xx...x", [30.0, 32.0]),
        ("teacache", "teacache-t0.1", "x.x..x,x.x..x", [33.0, 31.5]),  # 32.25 > 31.0: beats the cost model's choice
        ("baseline", "baseline-identity-t1", "x..x.x,x..x.x", [29.0, 30.0]),
        ("baseline", "baseline-flux-t1", "x..x.x,xx.x.x", [50.0, 50.0]),  # adaptive: not a static schedule
        ("static", "uniform-k4", "xx.x.x,xx.x.x", [40.0, math.inf]),  # identical on one prompt: counts as 100 dB
        ("teacache", "teacache-t0.2", "x....x,x....x", [20.0, 21.0]),
    ]
    sweep = _sweep_folder(tmp_path / "calib-sweep", calib_run, rows)
    oracle, runners_up = measured_oracle(measured_static((sweep,), [calib_run]))
    assert oracle == {"6": {"3": "x.x..x", "4": "xx.x.x", "2": "x....x"}}
    assert runners_up == {"6": {"3": ["xx...x", "x..x.x"]}}  # by mean PSNR: 31.0, then 29.5
    other = _sweep_folder(tmp_path / "heldout-sweep", heldout_run, rows)
    with pytest.raises(UserError, match="not a run being fitted; the oracle is chosen on the calibration prompts only"):
        measured_static((other,), [calib_run])
    with pytest.raises(UserError, match="no finished sweep here"):
        measured_static((tmp_path / "nothing",), [calib_run])


def test_the_cost_model_check_tells_a_model_that_ranks_measured_schedules_right_from_one_that_does_not():
    """`fit --oracle-from` says how the cost model ranks the schedules the calibration sweep measured: the measured
    PSNR is the modelled dB plus an offset -> every budget's best is the measured best, no loss, RMS 0; measured in
    the opposite order inside each budget -> the model's best is never the measured best, and the loss is stated."""
    from calib.costmodel import decibels, schedule_cost
    from calib.oracle import check_cost_model

    n = 10
    units = [_window_sum_unit(np.array([1.0, 0.2]), n=n, seed=s) for s in range(3)]
    units = [UnitSeries(u.key, u.group, u.branches, u.sigma, u.x, {t: e[:, :, :4] for t, e in u.reuse.items()}) for u in units]  # max gap 3
    model = CostModel(target="output")
    schedules = ["x.x.x.x..x", "x..x.x.x.x", "xx.x.x...x", "x.x..x..xx", "x..x..x..x", "x..x.x...x", "x.x...x..x", "xx...x...x"]
    modelled = [np.mean([decibels(schedule_cost(model.matrix(u), np.array([[c == "x" for c in s]]))) for u in units]) for s in schedules]
    right = pd.DataFrame({"steps": n, "schedule": schedules, "psnr": np.array(modelled) + 7.0})
    matrices = {u.key: model.matrix(u) for u in units}
    check = check_cost_model(matrices, units, right)
    assert check["schedules"] == 8 and check["budgets"] == 2  # 5 and 4 computed steps
    assert check["best_is_measured_best"] == 2 and check["worst_loss_db"] == 0 and check["rms_db"] < 1e-9
    budget = right["schedule"].str.count("x")
    flipped = right.assign(psnr=right.groupby(budget)["psnr"].transform(lambda v: v.max() + v.min() - v))  # reversed inside a budget
    check = check_cost_model(matrices, units, flipped)
    assert check["best_is_measured_best"] == 0 and check["worst_loss_db"] > 0 and check["rank_correlation"] == -1.0


def test_the_shape_search_moves_the_computed_steps_to_where_skipping_costs():
    """On a timestep-only signal each step has a fixed distance, so the polynomial only weighs steps. A polynomial that
    weighs the early steps (decreasing in |Δσ|/σ) when the late ones are the costly skips is far from the oracle;
    the simulated search finds an increasing one and closes most of the gap."""
    n = 20
    sigma = np.linspace(1.0, 0.05, n)
    x = np.full(n, np.nan)
    x[1:] = np.abs(np.diff(sigma)) / sigma[:-1]
    late = np.linspace(0.01, 0.2, n)  # a skip late in the schedule costs 20x one early
    reuse = np.full((1, n, n), np.nan)
    for m in range(1, n):
        reuse[0, m, 1 : m + 1] = late[m] * np.arange(1, m + 1)
    units = [UnitSeries(("p", seed, n, 16, 16), f"p{seed}", ("cond",), sigma, {"temb": x[None], "modin": x[None], "sigma": x[None]},
                        {"residual": reuse, "output": reuse}) for seed in range(2)]
    matrices = {u.key: CostModel().matrix(u) for u in units}
    low, high = float(np.nanmin(x)), float(np.nanmax(x))
    decreasing = Preset(model="m", signal="sigma", coefficients=[-1.0, 1.0], ret_steps=1, cutoff_steps=-1, branch_mode="shared",
                        domain={"x_range": {"sigma": [low, high]}})
    searched, fitted_gaps, gaps = search_shape(decreasing, units, matrices)
    assert np.array_equal(fitted_gaps, simulated_gaps(decreasing, units, matrices))
    assert np.mean(gaps) > np.mean(fitted_gaps) + 1.0 and np.min(gaps) > np.min(fitted_gaps)
    weights = np.polyval(searched.coefficients, np.linspace(low, high, 50))
    assert weights.min() > 0 and weights[-1] > weights[0]  # it now weighs the late steps more
