"""`teacal sweep` and `teacal report` on the tiny model: like with like, resumable, sharded, and what the report says."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import calib.report as report_module
from calib.cli import app
from calib.fit import FitRequest, fit
from calib.metrics import Metrics
from calib.sweep import SweepRequest, parse_thresholds, sweep
from calib.tables import aggregate, static_configs
from teacache.preset import Preset
from tests.conftest import SMALL_PROMPTS, write_prompts

runner = CliRunner()
THRESH = "0,0.02,0.1,0.5,2"


@pytest.fixture(scope="module")
def temb_preset(recorded_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("preset") / "tiny-temb.json"
    fit(FitRequest(runs=(recorded_run,), out=path, signal="temb", target="residual", degree=2, folds=2), echo=lambda *_: None)
    return path


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def swept(recorded_run, temb_preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    before = (_tree_digest(recorded_run), temb_preset.read_bytes())
    request = SweepRequest(run=recorded_run, preset=temb_preset, thresholds=THRESH, out=out, baselines=("identity", "uniform"), lpips_random_backbone=True)
    table = sweep(request, echo=lambda *_: None)
    return out, table, before


def test_a_sweep_elsewhere_leaves_the_recording_and_the_preset_byte_identical(swept, recorded_run, temb_preset):
    out, _, (run_digest, preset_bytes) = swept
    assert _tree_digest(recorded_run) == run_digest and temb_preset.read_bytes() == preset_bytes
    assert (out / "sweep-preset.json").exists() and json.loads((out / "sweep.json").read_text())["preset"] == "sweep-preset.json"


def test_threshold_zero_is_the_uncached_image(swept):
    _, table, _ = swept
    zero = table[(table["method"] == "teacache") & (table["threshold"] == 0)]
    assert (zero["skipped"] == 0).all() and (zero["ideal_speedup"] == 1).all()
    assert np.isinf(zero["psnr"]).all() and (zero["lpips"] == 0).all() and (zero["ssim"] > 0.9999).all()
    assert (zero["speedup"] > 0).all() and (zero["uncached_seconds"] > 0).all()


def test_computed_calls_never_increase_with_threshold(swept):
    _, table, _ = swept
    for method in ("teacache", "baseline"):
        per_threshold = table[table["method"] == method].groupby(["prompt_id", "seed", "threshold"])["computed"].first().unstack()
        assert (per_threshold.diff(axis=1).fillna(0) <= 0).all().all()
    teacache = table[table["method"] == "teacache"].groupby("threshold")["computed"].mean()
    assert teacache.iloc[-1] < teacache.iloc[0]  # the sweep really reached skipping thresholds


def test_predicted_calls_equal_measured_for_temb(swept):
    _, table, _ = swept
    rows = table[table["method"].isin(["teacache", "baseline"])]
    assert (rows["predicted_computed"] == rows["computed"]).all()


def test_oracle_and_static_schedules_come_from_the_preset_and_run_as_told(swept, temb_preset):
    out, table, _ = swept
    oracle = table[table["method"] == "oracle"]
    schedules = Preset.load(temb_preset).calibration["oracle"]["6"]
    assert len(oracle) > 0 and (oracle["computed"] == oracle["budget"]).all()  # budgets in computed calls, both branches
    assert all(oracle.loc[oracle["budget"] == b, "schedule"].eq(schedules[str(int(b) // 2)]).all() for b in oracle["budget"].unique())
    assert "probed" not in oracle["label"].iloc[0] and "recorded reuse cost model" in oracle["label"].iloc[0]
    uniform = table[table["method"] == "static"]
    assert len(uniform) > 0 and (uniform["computed"] == uniform["budget"]).all()
    assert (out / "sweep.parquet").exists() and pd.read_parquet(out / "sweep.parquet").shape == table.shape
    assert (table["measured_as"] != table["config"]).any()  # identical schedules were measured once


def test_resumed_sweep_runs_nothing_new(swept, recorded_run, temb_preset):
    out, table, _ = swept
    lines = []
    again = sweep(SweepRequest(run=recorded_run, preset=temb_preset, thresholds=THRESH, out=out, baselines=("identity", "uniform"), lpips_random_backbone=True),
                  echo=lines.append)
    assert any(line.startswith("0 generations to run") for line in lines)
    pd.testing.assert_frame_equal(again, table)


def test_speedups_compare_times_of_one_process(swept):
    _, table, _ = swept
    assert table["process"].nunique() == 1
    assert np.allclose(table["speedup"], table["uncached_seconds"] / table["seconds"])


@pytest.mark.parametrize("spec", ["0.3:0.1", "a:b", "0.1:0.3:-0.05", "", ",", "0.1:0.3:0", "-0.1,0.2", "nan", "0.1:0.3:0.0000001"])
def test_bad_threshold_ranges_exit_2(spec, recorded_run, temb_preset, tmp_path):
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", spec, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--thresh" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_threshold_range_parsing():
    assert parse_thresholds("0.1:0.3") == [0.1, 0.15, 0.2, 0.25, 0.3]
    assert parse_thresholds("0.1:0.3:0.1") == [0.1, 0.2, 0.3]
    assert parse_thresholds("0.25,0.1,0.1") == [0.1, 0.25]
    assert parse_thresholds("auto") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "bfloat16"], "was recorded in float32; its references would differ by the precision alone"),
        (["--target-psnr", "nan"], "Invalid value for '--target-psnr'"),
        (["--target-psnr", "-5"], "Invalid value for '--target-psnr': Input should be greater than or equal to 0"),
        (["--thresh", "0:100:0.01"], "pass --yes to run them"),
        (["--steps", "7"], "--steps 7: "),
        (["--preset", "."], "is a folder"),
        (["--baseline", "nope"], "not one of constant, identity"),
        (["--forecast", "calibrated"], "has no fitted forecast"),
        (["--method", "fastcache"], "'fastcache' is not one of"),
    ],
)
def test_bad_sweep_input_exits_2_with_one_line_before_any_run(recorded_run, temb_preset, tmp_path, args, message):
    preset = [] if "--preset" in args else ["--preset", str(temb_preset)]
    result = runner.invoke(app, ["sweep", str(recorded_run), *preset, "--thresh", "0.1", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o" / "sweep").exists()


@pytest.mark.parametrize(("where", "schedule"), [("oracle", "x.x"), ("oracle", "..xx.x"), ("oracle_runners_up", ["xxxx.x"]), ("oracle_runners_up", "x..x.x")])
def test_a_malformed_oracle_schedule_in_the_preset_is_refused_before_any_run(recorded_run, temb_preset, tmp_path, where, schedule):
    """A hand-edited preset whose oracle schedule has another length, budget or first step exits 2 with one line."""
    preset = json.loads(temb_preset.read_text())
    preset["calibration"].setdefault(where, {}).setdefault("6", {})["3"] = schedule
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(preset))
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(path), "--thresh", "0.1", "--oracle", "6", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert f"calibration.{where}[6][3] = " in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o" / "sweep").exists()


def test_preset_for_another_model_is_refused_before_any_run(recorded_run, temb_preset, tmp_path):
    other = tmp_path / "other.json"
    Preset.load(temb_preset).replace(model="qwen-image-edit-2511").save(other)
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(other), "--thresh", "0.1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "calibrated for 'qwen-image-edit-2511', not 'tiny-qwen-image-edit'" in result.output


def test_lpips_required_but_unavailable_exits_before_generating(recorded_run, temb_preset, tmp_path, monkeypatch):
    monkeypatch.setattr("calib.metrics.alexnet_weights", lambda: tmp_path / "absent" / "alexnet.pth")
    monkeypatch.setattr("calib.metrics.ALEXNET_URL", "http://127.0.0.1:9/alexnet.pth")  # nothing listens there
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", "0.1", "--metrics", "lpips", "--metrics", "psnr",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "LPIPS needs the AlexNet ImageNet weights" in result.output
    assert not (tmp_path / "o" / "sweep").exists()


def test_lpips_wiring_with_a_random_backbone():
    metrics = Metrics(("lpips", "psnr", "ssim"), lpips_random_backbone=True)
    a = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    b = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    same, different = metrics(a, a), metrics(a, b)
    assert same["lpips"] == 0 and np.isinf(same["psnr"])
    assert different["lpips"] > 0 and different["psnr"] < 20


def test_the_recommendation_is_a_new_preset_and_never_the_input(swept, recorded_run, temb_preset, tmp_path):
    out, _, _ = swept
    request = dict(run=recorded_run, thresholds=THRESH, out=out, baselines=("identity", "uniform"), lpips_random_backbone=True, target_psnr=25.0)
    sweep(SweepRequest(preset=temb_preset, **request), echo=lambda *_: None)
    recommended = Preset.load(out / "recommended-preset.json")
    assert [t["threshold"] for t in recommended.thresholds] == [0, 0.02, 0.1, 0.5, 2]
    meeting = [t for t in recommended.thresholds if t["identical"] or (t["psnr_worst"] >= 25.0 and t["psnr"] >= 25.0)]
    assert recommended.threshold == min(meeting, key=lambda t: (t["computed_fraction"], -t["speedup"]))["threshold"]
    assert Preset.load(temb_preset).thresholds == ()  # the input preset is untouched
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", THRESH, "--out", str(out), "--baseline", "identity",
                                 "--baseline", "uniform", "--target-psnr", "25", "--save-preset", str(temb_preset)])
    assert result.exit_code == 2 and "that is the input preset" in result.output


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_moved_run_folder_sweeps_from_anywhere(recorded_run, temb_preset, tmp_path, monkeypatch):
    moved = _copy(recorded_run, tmp_path / "elsewhere" / "run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    table = sweep(SweepRequest(run=Path("run"), preset=temb_preset, thresholds="0.5", oracle="none", prompts=None, metrics=("psnr",), out=Path("sw")),
                  echo=lambda *_: None)
    assert len(table) == 2 * 8 and (Path("sw") / "sweep.parquet").exists()
    assert moved.exists()


def test_sweep_refuses_changed_inputs_and_references_that_do_not_reproduce(recorded_run, temb_preset, tmp_path):
    changed = _copy(recorded_run, tmp_path / "changed")
    image = next((changed / "inputs").rglob("*.png"), None)
    rows = [json.loads(line) for line in (changed / "inputs" / "prompts.jsonl").read_text().splitlines()]
    assert image is None and rows[0]["image"].startswith("skimage:")  # this recording's images are bundled ones: edit the prompt instead
    rows[0]["prompt"] += " please"
    (changed / "inputs" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["sweep", str(changed), "--preset", str(temb_preset), "--thresh", "0.5", "--out", str(tmp_path / "o1")])
    assert result.exit_code == 2 and "changed since they were recorded" in result.output
    elsewhere = _copy(recorded_run, tmp_path / "elsewhere")
    reference = elsewhere / "refs" / "coffee-green-1-6st-64x64.npy"
    np.save(reference, np.load(reference) + 1e-4)  # as if recorded on another machine
    result = runner.invoke(app, ["sweep", str(elsewhere), "--preset", str(temb_preset), "--thresh", "0.5", "--oracle", "none", "--metrics", "psnr",
                                 "--out", str(tmp_path / "o2")])
    last = result.output.strip().splitlines()[-1]  # found while generating: after the progress lines, one error line
    assert result.exit_code == 2 and last.startswith("error: coffee-green-1-6st-64x64: the uncached run does not reproduce the recorded reference")
    assert "--remake-references" in last and result.output.count("error:") == 1
    remade = sweep(SweepRequest(run=elsewhere, preset=temb_preset, thresholds="0.5", oracle="none", metrics=("psnr",), out=tmp_path / "o3",
                                remake_references=True), echo=lambda *_: None)
    assert np.isinf(remade[remade["method"] == "uncached"]["psnr"]).all()  # against its own references
    assert (tmp_path / "o3" / "refs" / "coffee-green-1-6st-64x64.npy").exists()


def test_an_edited_baseline_file_is_a_new_sweep_not_a_silent_reuse(recorded_run, temb_preset, tmp_path):
    baseline = tmp_path / "mine.json"
    baseline.write_text("[1.0, 0.0]")
    common = dict(run=recorded_run, preset=temb_preset, thresholds="0.5", oracle="none", metrics=("psnr",), out=tmp_path / "o")
    sweep(SweepRequest(baselines=(str(baseline),), **common), echo=lambda *_: None)
    baseline.write_text("[4.0, 0.0]")
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", "0.5", "--oracle", "none", "--metrics", "psnr",
                                 "--out", str(tmp_path / "o"), "--baseline", str(baseline)])
    assert result.exit_code == 2 and "already holds a sweep with other settings (baselines.mine: [1.0, 0.0] -> [4.0, 0.0])" in result.output


def _single_process_table(recorded_run, temb_preset, out):
    return sweep(SweepRequest(run=recorded_run, preset=temb_preset, thresholds="0.1,0.5", oracle="none", metrics=("psnr", "ssim"), out=out), echo=lambda *_: None)


def test_torchrun_sweep_merges_to_the_single_process_table(recorded_run, temb_preset, tmp_path):
    single = _single_process_table(recorded_run, temb_preset, tmp_path / "single")
    out = tmp_path / "torchrun"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--module", "calib.cli"]
    done = subprocess.run([*launch, "sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", "0.1,0.5", "--oracle", "none", "--metrics", "psnr",
                           "--metrics", "ssim", "--out", str(out)], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 0/2" in done.stdout and "shard 1/2" in done.stdout
    merged = pd.read_parquet(out / "sweep.parquet")
    columns = ["config", "prompt_id", "seed", "computed", "skipped", "psnr", "ssim", "schedule"]
    key = ["config", "prompt_id", "seed"]
    pd.testing.assert_frame_equal(single[columns].sort_values(key).reset_index(drop=True), merged[columns].sort_values(key).reset_index(drop=True))
    assert merged.groupby(["prompt_id", "seed"])["process"].nunique().eq(1).all()  # each prompt's timings come from one process


def test_repeats_keep_the_fastest_and_rotate(recorded_run, temb_preset, tmp_path):
    subset = write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[:1])
    table = sweep(SweepRequest(run=recorded_run, preset=temb_preset, thresholds="0.5", oracle="none", metrics=("psnr",), out=tmp_path / "o", repeats=3,
                               prompts=Path(subset)), echo=lambda *_: None)
    assert (table["repeats"] == 3).all() and len(table) == 2 * 2


def test_report_writes_readable_figures_and_the_equal_calls_table(swept, monkeypatch):
    out, _, _ = swept  # a sweep in its own folder: the report finds the recording through sweep.json
    figures = {}
    original = report_module._save

    def keep(fig, path):
        figures[path.name] = [(len(ax.lines) + len(ax.collections) + len(ax.images), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return original(fig, path)

    monkeypatch.setattr(report_module, "_save", keep)
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "and 7 figures" in result.output
    folder = out / "report"
    for name in ("pareto_lpips.png", "pareto_psnr.png", "calls_psnr.png", "calls_psnr_worst.png", "fit.png", "steps.png", "skipmap.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.size[0] > 400
            assert np.asarray(image.convert("L")).std() > 10  # not blank
        assert figures[name] and all(artists > 0 and xlabel for artists, xlabel, _ in figures[name] if xlabel)
    assert not list(folder.glob(".*.tmp"))
    text = (folder / "report.md").read_text()
    assert "Each method at equal computed calls" in text and "| computed calls |" in text and "static: uniform spacing" in text
    assert "Best speedup at equal quality" in text and "teacache-t0.5" in text and "oracle-6" in text


def test_the_report_oracle_is_the_best_static_schedule_measured_on_the_swept_prompts(recorded_run, temb_preset, tmp_path):
    """The sweep generates the preset's oracle runners-up beside its pick; the report's oracle is, at every budget, at
    or above every static configuration measured (the pick, the runners-up, uniform spacing, TeaCache and a borrowed
    set on temb), and the pick keeps its own column."""
    preset = json.loads(temb_preset.read_text())
    pick = preset["calibration"]["oracle"]["6"]["3"]
    others = [s for s in ("xx...x", "x..x.x", "x.x..x", "x...xx") if s != pick][:2]
    preset["calibration"]["oracle_runners_up"] = {"6": {"3": others}}
    path = tmp_path / "with-runners-up.json"
    path.write_text(json.dumps(preset))
    table = sweep(SweepRequest(run=recorded_run, preset=path, thresholds="0.1,0.5,2", oracle="6,8", out=tmp_path / "o", baselines=("identity", "uniform"),
                               metrics=("psnr",)), echo=lambda *_: None)
    runners = table[table["config"].isin(["oracle-6-2", "oracle-6-3"])]
    assert sorted(runners.groupby("config")["schedule"].first()) == sorted(others) and (runners["computed_cond"] == 3).all()
    result = runner.invoke(app, ["report", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "o" / "report" / "report.md").read_text()
    section = text.split("## Each method at equal computed calls")[1].splitlines()
    first = next(i for i, line in enumerate(section) if line.startswith("|"))
    rows = [line.strip(" |").split(" | ") for line in itertools.takewhile(lambda line: line.startswith("|"), section[first:])]
    equal = pd.DataFrame(rows[2:], columns=rows[0])  # the PSNR table: its head, a rule, a row per budget
    oracle = next(c for c in equal.columns if c.startswith("oracle (best of"))
    assert "oracle pick (best static schedule, recorded reuse cost model)" in equal.columns
    static = aggregate(table)
    static = static[static["config"].isin(static_configs(table).index)]
    calls = [int(c.split(" of ")[0]) for c in equal["computed calls"]]
    for budget, value in zip(calls, equal[oracle], strict=True):
        below = static[static["computed"] <= budget]
        if not below.empty:
            assert float(value.split(" ")[0]) == pytest.approx(below["psnr"].replace(np.inf, np.nan).max(), abs=0.006)


def test_nan_in_the_trace_is_refused_before_any_run(recorded_run, temb_preset, tmp_path):
    run = _copy(recorded_run, tmp_path / "run")
    part = sorted((run / "trace").glob("*.parquet"))[0]
    frame = pd.read_parquet(part)
    frame.loc[5, "x_temb"] = float("nan")
    frame.to_parquet(part)
    result = runner.invoke(app, ["sweep", str(run), "--preset", str(temb_preset), "--thresh", "0.1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "hold NaN or inf" in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_sweep_a_subset_of_the_recorded_prompts(recorded_run, temb_preset, tmp_path):
    subset = write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[1:2])
    table = sweep(SweepRequest(run=recorded_run, preset=temb_preset, thresholds="0.5", out=tmp_path / "o", oracle="none", prompts=Path(subset), metrics=("psnr",)),
                  echo=lambda *_: None)
    assert set(table["prompt_id"]) == {SMALL_PROMPTS[1]["id"]}
    assert (table["computed_cond"] + table["computed_uncond"] == table["computed"]).all()
    stranger = write_prompts(tmp_path / "x.jsonl", [dict(SMALL_PROMPTS[0], id="never-recorded")])
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", "0.1", "--prompts", stranger, "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "'never-recorded' was not recorded" in result.output


def _teacache_hooks(transformer) -> list[str]:
    """The diffusers hooks on `transformer` and its submodules (TeaCache's are registered by name there)."""
    return [name for module in transformer.modules() for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})]


def test_the_uncached_configuration_runs_plain(tiny, monkeypatch):
    """sweep's uncached configuration runs inside `backend.plain()`, its cached ones do not. On the tiny (and diffusers)
    backend plain() switches nothing: no hook is on the transformer there, and the image is a bare run's."""
    import contextlib

    from calib.backends import recording_preset
    from calib.prompts import PromptItem
    from calib.sweep import Config, run_config

    item = PromptItem("cat-hat", "put a hat on the cat", "skimage:chelsea", "", Path("."))
    steps, size = 4, (48, 48)
    bare = tiny.run(item, 0, steps, 4.0, size)
    seen: list[tuple[bool, list[str]]] = []
    inside = [False]
    plain, run = tiny.plain, tiny.run

    def watched_plain():
        with plain():
            inside[0] = True
            try:
                yield
            finally:
                inside[0] = False

    def watched_run(*args, **kwargs):
        seen.append((inside[0], _teacache_hooks(tiny.transformer)))
        return run(*args, **kwargs)

    monkeypatch.setattr(tiny, "plain", contextlib.contextmanager(watched_plain))
    monkeypatch.setattr(tiny, "run", watched_run)
    uncached = run_config(tiny, Config("uncached", "uncached", "uncached"), item, 0, steps, 4.0, size)
    preset = recording_preset(tiny.model_name)
    zero = run_config(tiny, Config("teacache-0", "teacache", "TeaCache 0", threshold=0.0, preset=preset), item, 0, steps, 4.0, size)
    assert seen[0] == (True, []) and seen[1][0] is False and seen[1][1]  # plain: no hook; TeaCache: its hooks
    assert np.array_equal(uncached["latents"], bare.latents) and np.array_equal(zero["latents"], bare.latents)
    assert uncached["computed"] == 2 * steps and uncached["block_forwards"] == 2 * steps * tiny.num_blocks
    assert _teacache_hooks(tiny.transformer) == []


def _equal_calls_columns(report_md: Path) -> list[str]:
    section = report_md.read_text().split("## Each method at equal computed calls")[1].splitlines()
    head = next(line for line in section if line.startswith("| computed calls"))
    return head.strip(" |").split(" | ")[1:]


# Each shape of table a sweep writes: one method, peers only (no TeaCache, no oracle), the oracle's static schedules
# alone beside a peer, one prompt. The report draws every one and names every method it holds.
TABLE_SHAPES = {
    "teacache only": dict(methods=("teacache",), oracle="none"),
    "peers only": dict(methods=("fbcache", "magcache"), oracle="none", peer_grids=("fbcache.threshold=0.2", "magcache.threshold=0.1")),
    "a peer and the oracle": dict(methods=("magcache",), oracle="6,8", peer_grids=("magcache.threshold=0.1",)),
    "one prompt": dict(methods=("teacache", "fbcache"), oracle="auto", peer_grids=("fbcache.threshold=0.2",)),
}


@pytest.mark.parametrize("shape", list(TABLE_SHAPES))
def test_report_draws_every_shape_of_table_a_sweep_writes(shape, recorded_run, temb_preset, tmp_path):
    options = dict(TABLE_SHAPES[shape])
    if shape == "one prompt":
        options["prompts"] = Path(write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[:1]))
    table = sweep(SweepRequest(run=recorded_run, preset=temb_preset, thresholds="0.1,0.5", out=tmp_path / "o", metrics=("psnr",), **options),
                  echo=lambda *_: None)
    result = runner.invoke(app, ["report", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    columns = _equal_calls_columns(tmp_path / "o" / "report" / "report.md")
    labels = set(table.loc[table["method"] != "uncached", "label"])
    assert labels - {"oracle candidates (runners-up on the calibration prompts)"} <= {c for c in columns if not c.startswith("oracle (best of")}
    assert (tmp_path / "o" / "report" / "calls_psnr.png").exists()


def test_sweeps_of_one_method_each_into_one_folder_report_every_method(recorded_run, temb_preset, tmp_path):
    """The issue's four commands: a sweep per method into the same folder, then the report. Each sweep keeps what the
    earlier ones measured there; a sweep of other prompts into that folder is refused before anything is written."""
    out = tmp_path / "o"
    args = ["sweep", str(recorded_run), "--preset", str(temb_preset), "--thresh", "0:0.4:0.2", "--metrics", "psnr", "--out", str(out)]
    tables = []
    for method in ("teacache", "fbcache", "magcache"):
        result = runner.invoke(app, [*args, "--method", method])
        assert result.exit_code == 0, result.output
        tables.append(pd.read_parquet(out / "sweep.parquet"))
    assert set(tables[-1]["method"]) == {"uncached", "teacache", "oracle", "fbcache", "magcache"}
    first = tables[0][tables[0]["method"] == "teacache"].reset_index(drop=True)
    kept = tables[-1][tables[-1]["method"] == "teacache"].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, kept.astype(first.dtypes))  # the first sweep's rows, as measured
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    columns = _equal_calls_columns(out / "report" / "report.md")
    assert {"teacache (calibrated)", "FirstBlockCache (diffusers)", "MagCache (diffusers)"} <= set(columns)

    before = (out / "sweep.parquet").read_bytes()
    one = write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[:1])
    result = runner.invoke(app, [*args, "--method", "fbcache", "--prompts", one])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "sweep into another --out" in result.output, result.output
    assert (out / "sweep.parquet").read_bytes() == before


def test_baseline_lemica_runs_the_published_schedules_mapped_to_the_recorded_steps(recorded_run, temb_preset, tmp_path):
    table = sweep(SweepRequest(run=recorded_run, preset=temb_preset, thresholds="0.5", out=tmp_path / "o", baselines=("lemica",), oracle="none",
                               methods=(), metrics=("psnr",)), echo=lambda *_: None)
    lemica = table[table["config"].str.startswith("lemica-")]
    assert set(lemica["label"]) == {"static: LeMiCa (published Qwen-Image schedules)"} and set(lemica["method"]) == {"static"}
    schedules = lemica.groupby("config")["schedule"].first()
    assert all(s[0] == "x" and s[-1] == "x" and len(s) == 6 for s in schedules)  # 6 recorded steps: mapped, first and last computed
    assert (lemica["computed"] == lemica["budget"]).all() and (lemica["computed_cond"] == lemica["computed_uncond"]).all()


def test_with_cfg_off_there_is_one_branch_from_record_to_report(tmp_path):
    """A distilled model runs without CFG: one branch, cond. Record, fit, sweep (TeaCache, a borrowed set, a static
    schedule, a peer) and report handle it, and budgets count its calls (one per step)."""
    from calib.record import RecordRequest, record

    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:2])
    run = record(RecordRequest(out=tmp_path / "run", prompts=Path(prompts), steps=(8,), cfg=1.0, size=(64, 64), max_gap=4), echo=lambda *_: None)
    trace = pd.read_parquet(run / "trace.parquet")
    assert set(trace["branch"]) == {"cond"}
    fit(FitRequest(runs=(run,), out=tmp_path / "p.json", degree=2, folds=2), echo=lambda *_: None)
    table = sweep(SweepRequest(run=run, preset=tmp_path / "p.json", thresholds="0.1,1", baselines=("identity", "uniform"), methods=("teacache", "fbcache"),
                               peer_grids=("fbcache.threshold=0.3",), metrics=("psnr",)), echo=lambda *_: None)
    assert (table["calls"] == 8).all() and (table["computed_uncond"] == 0).all() and (table["computed_cond"] == table["computed"]).all()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    columns = _equal_calls_columns(run / "report" / "report.md")
    assert {"teacache (calibrated)", "baseline: identity", "static: uniform spacing", "FirstBlockCache (diffusers)"} <= set(columns)
    assert "| 2 of 8 |" in (run / "report" / "report.md").read_text()


def test_without_cfg_the_static_schedules_are_found_for_the_oracle(tmp_path, temb_preset):
    """A CFG-off generation runs no uncond branch (its computed_uncond is 0): its static schedules still count, so
    tune's oracle (`--oracle-from`) has schedules to choose from on a distilled model (it found none: calibrate failed)."""
    from calib.oracle import measured_static
    from calib.record import RecordRequest, record

    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:2])
    run = tmp_path / "run"
    record(RecordRequest(out=run, prompts=Path(prompts), steps=(6,), size=(64, 64), cfg=1.0), echo=lambda *_: None)
    table = sweep(SweepRequest(run=run, preset=temb_preset, thresholds="0.1,2", oracle="none", out=run / "calib-sweep-6", baselines=("uniform",),
                               metrics=("psnr",)), echo=lambda *_: None)
    assert (table.loc[table["method"] != "uncached", "computed_uncond"] == 0).all()
    static = static_configs(table)
    assert sum(config.startswith("uniform-") for config in static.index) >= 2
    measured = measured_static((run / "calib-sweep-6",), [run])
    assert len(measured) == len(set(static)) and (measured["steps"] == 6).all()
