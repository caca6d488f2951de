"""`teacal sweep` and `teacal report` on the tiny model, and the oracle's guarantee."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import calib.report as report_module
from calib.cli import app
from calib.fit import FitRequest, fit
from calib.metrics import Metrics
from calib.simulate import oracle_schedule, schedule_error, simulate
from calib.sweep import SweepRequest, parse_thresholds, sweep
from teacache.preset import Preset

runner = CliRunner()


@pytest.fixture(scope="module")
def temb_preset(recorded_run, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("preset") / "tiny-temb.json"
    fit(FitRequest((str(recorded_run),), str(path), signal="temb", degree=2), echo=lambda *_: None)
    return str(path)


@pytest.fixture(scope="module")
def swept(recorded_run, temb_preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    request = SweepRequest(temb_preset, str(recorded_run), "0,0.02,0.1,0.5,2", out=str(out), baselines=("identity",), lpips_random_backbone=True)
    return out, sweep(request, echo=lambda *_: None)


def test_threshold_zero_is_the_uncached_image(swept):
    _, table = swept
    zero = table[(table["method"] == "teacache") & (table["threshold"] == 0)]
    assert (zero["skipped"] == 0).all() and (zero["ideal_speedup"] == 1).all()
    assert np.isinf(zero["psnr"]).all() and (zero["lpips"] == 0).all() and (zero["ssim"] > 0.9999).all()
    assert (zero["speedup"] > 0).all()


def test_computed_calls_never_increase_with_threshold(swept):
    _, table = swept
    for method in ("teacache", "baseline"):
        per_threshold = table[table["method"] == method].groupby(["prompt_id", "seed", "threshold"])["computed"].first().unstack()
        assert (per_threshold.diff(axis=1).fillna(0) <= 0).all().all()
    teacache = table[table["method"] == "teacache"].groupby("threshold")["computed"].mean()
    assert teacache.iloc[-1] < teacache.iloc[0]  # the sweep really reached skipping thresholds


def test_predicted_calls_equal_measured_for_temb(swept):
    _, table = swept
    rows = table[table["method"].isin(["teacache", "baseline"])]
    assert (rows["predicted_computed"] == rows["computed"]).all()


def test_oracle_and_parts_on_disk(swept):
    out, table = swept
    oracle = table[table["method"] == "oracle"]
    assert len(oracle) > 0 and (oracle["computed"] == oracle["budget"] * 2).all()
    assert (out / "sweep.parquet").exists() and pd.read_parquet(out / "sweep.parquet").shape == table.shape
    # Thresholds with identical schedules on every prompt were measured once.
    assert (table["measured_as"] != table["config"]).any()


def test_resumed_sweep_runs_nothing_new(swept, recorded_run, temb_preset):
    out, table = swept
    lines = []
    again = sweep(SweepRequest(temb_preset, str(recorded_run), "0,0.02,0.1,0.5,2", out=str(out), baselines=("identity",), lpips_random_backbone=True), echo=lines.append)
    assert any("0 generations to run" in line for line in lines)
    pd.testing.assert_frame_equal(again, table)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1000), steps=st.integers(6, 24), threshold=st.floats(0.01, 3.0))
def test_oracle_never_worse_than_teacache_at_the_same_budget(seed, steps, threshold):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.01, 0.3, steps)
    y[0] = np.nan
    x = y * rng.uniform(0.5, 1.5, steps)
    trace = pd.DataFrame({"prompt_id": "p", "seed": 0, "branch": "cond", "step": range(steps), "x_temb": x, "y_output": y})
    preset = Preset(model="m", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1)
    schedule = simulate(trace, preset, threshold)["computed"].to_numpy()
    forced = np.array([i < 1 or i >= steps - 1 for i in range(steps)])
    oracle = oracle_schedule(y, int(schedule.sum()), forced)
    assert oracle.sum() == schedule.sum() and oracle[forced].all()
    assert schedule_error(np.nan_to_num(y), oracle) <= schedule_error(np.nan_to_num(y), schedule) + 1e-12


def test_lpips_wiring_with_a_random_backbone():
    metrics = Metrics(("lpips", "psnr", "ssim"), lpips_random_backbone=True)
    a = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    same, different = metrics(a, a), metrics(a, b)
    assert same["lpips"] == 0 and np.isinf(same["psnr"])
    assert different["lpips"] > 0 and different["psnr"] < 20


@pytest.mark.parametrize("spec", ["0.3:0.1", "a:b", "0.1:0.3:-0.05", "", ",", "0.1:0.3:0", "-0.1,0.2", "nan"])
def test_bad_threshold_ranges_exit_2(spec, recorded_run, temb_preset, tmp_path):
    result = runner.invoke(app, ["sweep", "--preset", temb_preset, "--run", str(recorded_run), "--thresh", spec, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--thresh" in result.output and result.output.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_threshold_range_parsing():
    assert parse_thresholds("0.1:0.3") == [0.1, 0.15, 0.2, 0.25, 0.3]
    assert parse_thresholds("0.1:0.3:0.1") == [0.1, 0.2, 0.3]
    assert parse_thresholds("0.25,0.1,0.1") == [0.1, 0.25]


def test_preset_for_another_model_is_refused_before_any_run(recorded_run, temb_preset, tmp_path):
    other = tmp_path / "other.json"
    Preset.load(temb_preset).replace(model="qwen-image-edit-2511").save(other)
    result = runner.invoke(app, ["sweep", "--preset", str(other), "--run", str(recorded_run), "--thresh", "0.1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "calibrated for 'qwen-image-edit-2511', not 'tiny-qwen-image-edit'" in result.output


def test_lpips_required_but_unavailable_exits_before_generating(recorded_run, temb_preset, tmp_path, monkeypatch):
    monkeypatch.setattr("calib.metrics.alexnet_weights", lambda: tmp_path / "absent" / "alexnet.pth")
    monkeypatch.setattr("calib.metrics.ALEXNET_URL", "http://127.0.0.1:9/alexnet.pth")  # nothing listens there
    result = runner.invoke(app, ["sweep", "--preset", temb_preset, "--run", str(recorded_run), "--thresh", "0.1", "--metrics", "lpips,psnr", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "LPIPS needs the AlexNet ImageNet weights" in result.output
    assert not (tmp_path / "o" / "sweep").exists()


def test_target_recommendation_writes_threshold_and_table(swept, recorded_run, temb_preset, tmp_path):
    out, _ = swept
    preset_copy = tmp_path / "p.json"
    Preset.load(temb_preset).save(preset_copy)
    sweep(SweepRequest(str(preset_copy), str(recorded_run), "0,0.02,0.1,0.5,2", out=str(out), baselines=("identity",), target_psnr=25.0, lpips_random_backbone=True), echo=lambda *_: None)
    updated = Preset.load(preset_copy)
    assert [t["threshold"] for t in updated.thresholds] == [0, 0.02, 0.1, 0.5, 2]
    meeting = [t for t in updated.thresholds if t["psnr_worst"] >= 25.0]
    assert updated.threshold == max(meeting, key=lambda t: (t["speedup"], -t["threshold"]))["threshold"]


def test_report_writes_readable_figures(swept, monkeypatch):
    out, _ = swept  # a sweep in its own folder: the report finds the recording through sweep.json
    figures = {}
    original = report_module._save

    def keep(fig, path):
        figures[path.name] = [(len(ax.lines) + len(ax.collections) + len(ax.images), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return original(fig, path)

    monkeypatch.setattr(report_module, "_save", keep)
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    folder = out / "report"
    for name in ("pareto_lpips.png", "pareto_psnr.png", "fit.png", "steps.png", "skipmap.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.size[0] > 400
            assert np.asarray(image.convert("L")).std() > 10  # not blank
        assert figures[name] and all(artists > 0 and xlabel for artists, xlabel, _ in figures[name] if xlabel)
    text = (folder / "report.md").read_text()
    assert "Best speedup at equal quality" in text and "teacache-t0.5" in text and "oracle-k" in text


def test_nan_in_the_trace_is_refused_before_any_run(recorded_run, temb_preset, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    part = sorted((run / "trace").glob("*.parquet"))[0]
    frame = pd.read_parquet(part)
    frame.loc[5, "x_temb"] = float("nan")
    frame.to_parquet(part)
    result = runner.invoke(app, ["sweep", "--preset", temb_preset, "--run", str(run), "--thresh", "0.1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "hold NaN or inf" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_sweep_a_subset_of_the_recorded_prompts(recorded_run, temb_preset, tmp_path):
    from tests.conftest import SMALL_PROMPTS, write_prompts

    subset = write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[1:2])
    table = sweep(SweepRequest(temb_preset, str(recorded_run), "0.5", out=str(tmp_path / "o"), oracle="none", prompts=subset, metrics="psnr"), echo=lambda *_: None)
    assert set(table["prompt_id"]) == {SMALL_PROMPTS[1]["id"]}
    assert (table["computed_cond"] + table["computed_uncond"] == table["computed"]).all()
    stranger = write_prompts(tmp_path / "x.jsonl", [dict(SMALL_PROMPTS[0], id="never-recorded")])
    result = runner.invoke(app, ["sweep", "--preset", temb_preset, "--run", str(recorded_run), "--thresh", "0.1", "--prompts", stranger, "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "'never-recorded' was not recorded" in result.output
