"""`teacal tune` on the tiny model: the tuned polynomial measures at least as well as the fitted one against the other
methods on the calibration prompts, what it reports is what its schedules give when swept, it resumes without
generating, and bad input exits 2 before any generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from calib.backends import open_recording
from calib.budgets import IDENTICAL_DB, budget_steps
from calib.cli import app
from calib.fit import FitRequest, fit
from calib.sweep import SweepRequest, sweep
from calib.tune import Search, TuneRequest, best_other, others_front, tune
from teacache.forecast import Forecast
from teacache.preset import Preset
from tests.conftest import SMALL_PROMPTS, write_prompts

runner = CliRunner()
QUIET = dict(echo=lambda *_: None)


@pytest.fixture(scope="module")
def calibrated(recorded_run, tmp_path_factory):
    """A copy of the small recording (tune writes its parts into the run), a fitted temb preset, and a sweep of the
    run against identity and uniform spacing."""
    base = tmp_path_factory.mktemp("tune")
    run = base / "run"
    shutil.copytree(recorded_run, run)
    preset = base / "fitted.json"
    fit(FitRequest(runs=(run,), out=preset, signal="temb", target="residual", degree=2, folds=2), **QUIET)
    against = base / "sweep"
    sweep(SweepRequest(run=run, preset=preset, out=against, baselines=("identity", "uniform"), oracle="none", forecasts=("none",),
                       metrics=("psnr",), metrics_explicit=True), **QUIET)
    lines: list[str] = []
    tuned = tune(TuneRequest(run=run, preset=preset, against=(against,), out=base / "tuned.json", rounds=12), echo=lines.append)
    return run, preset, against, tuned, lines


def test_the_tuned_polynomial_measures_at_least_as_well_as_the_fitted_one(calibrated):
    _, preset, _, tuned, lines = calibrated
    gaps = tuned.calibration["tune"]["gaps_db"]["6"]
    fitted = {int(b): np.nan if g["fitted"] is None else g["fitted"] for b, g in gaps.items()}
    after = {int(b): np.nan if g["tuned"] is None else g["tuned"] for b, g in gaps.items()}
    assert sorted(after) == budget_steps(6)
    as_dict = {6: np.array([after[b] for b in sorted(after)])}
    before = {6: np.array([fitted[b] for b in sorted(fitted)])}
    assert Search.score(as_dict) >= Search.score(before) - 1e-3  # never worse than the fitted polynomial, as measured
    assert tuned.signal == "temb" and tuned.calibration["tune"]["from_coefficients"] == list(Preset.load(preset).coefficients)
    assert any(line.startswith("measured ") and " generations in " in line for line in lines)


def test_what_tune_reports_is_what_a_sweep_of_the_tuned_preset_measures(calibrated, tmp_path):
    """The gap tune reports at each budget is the tuned preset's measured front minus the best other method's: a
    sweep of the tuned preset on the same prompts gives that front (deterministic generation, the same references)."""
    run, _, against, tuned, _ = calibrated
    path = tmp_path / "tuned.json"
    tuned.save(path)
    table = sweep(SweepRequest(run=run, preset=path, out=tmp_path / "s", oracle="none", forecasts=("none",), metrics=("psnr",), metrics_explicit=True), **QUIET)
    rows = table[table["method"] == "teacache"].assign(psnr=lambda t: t["psnr"].where(np.isfinite(t["psnr"]), IDENTICAL_DB))
    per_config = rows.groupby("config").agg(computed=("computed", "mean"), psnr=("psnr", "mean"))
    others = others_front((against,), open_recording(run))[6]
    for budget, gap in tuned.calibration["tune"]["gaps_db"]["6"].items():
        if gap["tuned"] is None:
            continue
        front = per_config.loc[per_config["computed"] / 2 <= int(budget), "psnr"].max()
        assert front == pytest.approx(gap["tuned"] + best_other(others, int(budget))[0], abs=2e-3), budget


def test_a_second_tune_generates_nothing_and_writes_the_same_polynomial(calibrated, tmp_path):
    run, preset, against, tuned, _ = calibrated
    lines: list[str] = []
    again = tune(TuneRequest(run=run, preset=preset, against=(against,), out=tmp_path / "again.json", rounds=12), echo=lines.append)
    assert again.coefficients == tuned.coefficients and again.calibration["oracle"] == tuned.calibration["oracle"]
    assert any(line.startswith("measured 0 generations") for line in lines)


def test_the_oracle_after_tune_is_the_best_schedule_measured_per_budget(calibrated):
    run, _, _, tuned, _ = calibrated
    measured = {p.stem.replace("-", "."): json.loads(p.read_text())["psnr"] for p in (run / "tune" / "6").glob("*.json")}
    oracle = tuned.calibration["oracle"]["6"]
    for schedule, value in measured.items():
        best = oracle[str(schedule.count("x"))]
        assert measured.get(best, -np.inf) >= value or best not in measured  # a sweep-measured schedule may be the best
    # the runners-up, which sweeps generate beside the pick: the next best measured at the same budget, best first
    assert tuned.calibration["oracle_runners_up"]["6"]
    for budget, schedules in tuned.calibration["oracle_runners_up"]["6"].items():
        assert 1 <= len(schedules) <= 2 and all(s.count("x") == int(budget) and s != oracle[budget] for s in schedules)
        values = [measured[s] for s in schedules if s in measured]
        assert values == sorted(values, reverse=True) and all(v <= measured.get(oracle[budget], np.inf) for v in values)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--preset", "{tmp}", "is a folder"),
        ("--out", "{preset}", "that is the input preset"),
        ("--against", "{tmp}/nothing", "no finished sweep here"),
        ("--rounds", "-1", "Invalid value for '--rounds'"),
    ],
)
def test_bad_tune_input_exits_2_with_one_line_before_any_generation(calibrated, tmp_path, option, value, message):
    run, preset, against, _, _ = calibrated
    options = {"--preset": str(preset), "--against": str(against), "--out": str(tmp_path / "out.json")}
    options[option] = value.format(tmp=tmp_path, preset=preset)
    before = sorted(p.name for p in (run / "tune" / "6").glob("*.json"))
    result = runner.invoke(app, ["tune", str(run), *[x for kv in options.items() for x in kv]])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert sorted(p.name for p in (run / "tune" / "6").glob("*.json")) == before


def test_tune_refuses_a_latent_dependent_signal_and_sweeps_of_other_runs(calibrated, recorded_run, tmp_path):
    run, preset, against, _, _ = calibrated
    modin = tmp_path / "modin.json"
    Preset.load(preset).replace(signal="modin").save(modin)
    result = runner.invoke(app, ["tune", str(run), "--preset", str(modin), "--against", str(against), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "tune needs a signal that does not depend on the latents" in result.output
    result = runner.invoke(app, ["tune", str(recorded_run), "--preset", str(preset), "--against", str(against), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "never on held-out ones" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o.json").exists()


def test_the_reuse_rule_is_the_best_measured_candidate_and_plain_reuse_when_none_gains(calibrated):
    """tune measures constant dampings (and dampings per reach) on the tuned schedules and keeps the candidate of the
    best score; plain reuse scores 0, so a rule that gains nothing is never chosen."""
    from calib.reuse_rule import forecast_score

    _, _, _, tuned, lines = calibrated
    record = tuned.calibration["tune"]["forecast"]
    scores = {name: forecast_score({int(s): np.array([np.nan if v is None else v for v in g]) for s, g in by_steps.items()})
              for name, by_steps in record["gains_db"].items()}
    assert {"linear:0.15", "linear:0.3", "linear:0.5"} <= set(scores)
    if record["chosen"] == "none":
        assert max(scores.values()) <= 0 and not tuned.forecast.extrapolates
    else:
        assert scores[record["chosen"]] == max(scores.values()) > 0 and tuned.forecast.extrapolates
        assert tuned.forecast.fit["chosen"] == record["chosen"]
    assert any(line.startswith("chose") and "reuse" in line for line in lines)


def test_the_mean_reach_of_a_schedule_is_that_of_its_extrapolated_skips():
    from calib.reuse_rule import mean_reach

    sigma = np.array([1.0, 0.9, 0.7, 0.6, 0.4, 0.0])
    # computed 0, 1, 3, 5: the skip at 2 extrapolates from 0 and 1, reach max(0.1, 0.2) = 0.2; the skip at 4 from
    # 1 and 3, reach max(0.3, 0.2) = 0.3
    assert mean_reach("xx.x.x", sigma) == pytest.approx(0.25)
    assert np.isnan(mean_reach("x....x", sigma))  # no slope before any skip


def test_tune_refuses_a_sweep_of_part_of_the_prompts_or_without_psnr(calibrated, tmp_path):
    """Tune measures on every prompt and seed of the run, so the bar must be measured on all of them, with PSNR."""
    run, preset, _, _, _ = calibrated
    subset = write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[1:2])
    part = tmp_path / "part-sweep"
    sweep(SweepRequest(run=run, preset=preset, thresholds="0.5", out=part, oracle="none", prompts=Path(subset), metrics=("psnr",),
                       metrics_explicit=True), **QUIET)
    result = runner.invoke(app, ["tune", str(run), "--preset", str(preset), "--against", str(part), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "pairs; sweep all of them" in result.output and result.output.count("\n") == 1
    no_psnr = tmp_path / "ssim-sweep"
    sweep(SweepRequest(run=run, preset=preset, thresholds="0.5", out=no_psnr, oracle="none", metrics=("ssim",), metrics_explicit=True), **QUIET)
    result = runner.invoke(app, ["tune", str(run), "--preset", str(preset), "--against", str(no_psnr), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "no PSNR measured" in result.output
    assert not (tmp_path / "o.json").exists()


def test_a_reuse_rule_that_costs_a_schedule_its_worst_prompt_is_out(calibrated):
    """The forecast must be safe per prompt: a rule whose worst prompt loses more than 0.5 dB on any tuned schedule
    against plain reuse is never chosen, whatever its mean gain."""
    from calib.reuse_rule import WORST_FLOOR_DB, worst_loss

    class Table:
        """A Measurer of fixed per-prompt PSNRs: plain reuse 40/40/40; the rule 46/46/39 (mean +3.7, worst -1)."""

        def __init__(self, ruled_worst: float) -> None:
            self.ruled_worst = ruled_worst

        def under(self, objective, steps, schedule, forecast=None):
            if forecast is None or not forecast.extrapolates:
                return 40.0
            return self.ruled_worst if objective == "worst" else 46.0

    rule = Forecast("linear", "step", ((0.0, 0.3),))
    losing, within = worst_loss(Table(39.0), {6: ["xx.x.x"]}, rule), worst_loss(Table(39.8), {6: ["xx.x.x"]}, rule)
    assert losing == pytest.approx(-1.0) and losing < WORST_FLOOR_DB
    assert within == pytest.approx(-0.2) and within > WORST_FLOOR_DB
    assert worst_loss(Table(41.0), {6: ["xx.x.x"]}, rule) == 0.0
    _, _, _, tuned, lines = calibrated
    header = next(line for line in lines if line.startswith("reuse rule"))
    assert "worst prompt" in header and "is out" in header  # tune printed the per-prompt check it applied


def test_tune_sharded_over_two_processes_finds_the_preset_of_one(calibrated, tmp_path):
    """`--shard i/K`: every process runs the same search and generates its share of each schedule; together they
    write the one-process preset, each generating only its share of the prompts."""
    run, preset, against, tuned, lines = calibrated
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("tune", "tune.json"))
    shutil.copytree(against, tmp_path / "sweep")
    shutil.copy(preset, tmp_path / "fitted.json")
    args = ["tune", "run", "--preset", "fitted.json", "--against", "sweep", "--out", "sharded.json", "--rounds", "12"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shards = [subprocess.Popen([sys.executable, "-m", "calib.cli", *args, "--shard", f"{i}/2"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [shard.communicate(timeout=900) for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], [err[-3000:] for _, err in outputs]
    for _, err in outputs:  # choosing the reuse rule generates too: it shows progress, to the end
        rule_lines = [line for line in err.splitlines() if line.startswith("tune: reuse rule, constant and probe-fitted dampings: ")]
        assert rule_lines and "(100%)" in rule_lines[-1], err[-3000:]

    def generated(text: str) -> int:
        return int(next(line for line in text.splitlines() if line.startswith("measured ")).split()[1])

    alone, recorded = generated("\n".join(lines)), json.loads((run / "run.json").read_text())
    pairs = len(recorded["status"]) // len(recorded["settings"]["steps"])
    share = [len(range(i, pairs, 2)) for i in range(2)]  # every 2nd (prompt, seed) from i
    assert alone > 0 and [generated(out) for out, _ in outputs] == [alone // pairs * n for n in share]

    def without_paths(data: dict) -> dict:
        calibration = {k: v for k, v in data["calibration"].items() if k != "oracle_source"}
        calibration["tune"] = {k: v for k, v in calibration["tune"].items() if k != "against"}
        return {**data, "calibration": calibration}

    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert without_paths(sharded) == without_paths(tuned.to_dict())
    parts = [p.name.split(".")[-2] for p in (tmp_path / "run" / "tune").rglob("*.shard-*.json")]
    assert parts.count("shard-0of2") == parts.count("shard-1of2") > 0  # each shard's share of every generated schedule
