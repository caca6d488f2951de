"""`teacal record` and `teacal fit` on the tiny model: real runs, real files, real fits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from calib.cli import app
from calib.fit import FitRequest, fit, fit_polynomial, group_folds
from calib.runfiles import load_trace
from teacache.diffusers import apply_teacache, remove_teacache, teacache_stats
from teacache.preset import Preset
from tests.conftest import SMALL_PROMPTS, pixels, write_prompts

runner = CliRunner()
TEACAL = [sys.executable, "-m", "calib.cli"]
SMALL_ARGS = ["--steps", "6", "--size", "64x64"]


def test_trace_follows_the_contract(recorded_run):
    trace = load_trace(recorded_run)
    assert list(trace.columns) == ["prompt_id", "seed", "step", "branch", "timestep", "sigma", "x_temb", "x_modin", "y_output", "y_residual", "seconds"]
    assert len(trace) == len(SMALL_PROMPTS) * 2 * 6 * 2  # prompts x seeds x steps x branches
    first = trace[trace["step"] == 0]
    assert first[["x_temb", "x_modin", "y_output", "y_residual"]].isna().all().all()  # null, never 0
    later = trace[trace["step"] > 0]
    assert later[["x_temb", "x_modin", "y_output", "y_residual"]].notna().all().all()
    assert (later["y_output"] > 0).all()
    # The image-stream signals do not see the text: both branches carry the same x, their outputs differ.
    wide = later.pivot_table(index=["prompt_id", "seed", "step"], columns="branch", values=["x_modin", "y_output"])
    assert np.allclose(wide["x_modin"]["cond"], wide["x_modin"]["uncond"])
    assert not np.allclose(wide["y_output"]["cond"], wide["y_output"]["uncond"])
    run = json.loads((recorded_run / "run.json").read_text())
    assert set(run["status"].values()) == {"done"} and run["settings"]["steps"] == 6
    assert (recorded_run / "trace.parquet").exists() and len(list((recorded_run / "refs").glob("*.png"))) == 8


def test_recording_does_not_change_the_image(recorded_run, tiny):
    from calib.prompts import load_prompts

    item = load_prompts(recorded_run.parent / "prompts.jsonl").items[1]
    plain, _ = tiny.run(item, 1, 6, 4.0, (64, 64))
    from PIL import Image

    assert np.array_equal(pixels(plain), pixels(Image.open(recorded_run / "refs" / f"{item.id}-1.png")))


def test_record_then_fit_gives_a_preset_the_runtime_applies(recorded_run, tmp_path, tiny, reference_image):
    out = tmp_path / "presets" / "tiny.json"
    result = runner.invoke(app, ["fit", str(recorded_run), "--out", str(out), "--degree", "2"])
    assert result.exit_code == 0, result.output
    assert "held-out R2" in result.output
    preset = Preset.load(out)
    assert preset.model == "tiny-qwen-image-edit" and len(preset.coefficients) == 3
    assert preset.calibration["points"] > 0 and "r2_heldout" in preset.fit
    apply_teacache(tiny.transformer, preset, threshold=preset.threshold)
    try:
        tiny.generate("make it night", reference_image, seed=0, steps=6, size=(64, 64))
        assert teacache_stats(tiny.transformer).computed > 0
    finally:
        remove_teacache(tiny.transformer)


def _record_cmd(prompts, out, *extra):
    return [*TEACAL, "record", "--prompts", prompts, "--out", str(out), *SMALL_ARGS, *extra]


def test_resume_after_a_real_kill_gives_the_same_trace(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS)
    full = tmp_path / "full"
    subprocess.run(_record_cmd(prompts, full), check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_record_cmd(prompts, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "trace").glob("*.parquet"))) < 1:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    parts = list((killed / "trace").glob("*"))
    assert 1 <= len(parts) < len(SMALL_PROMPTS)
    assert all(p.suffix == ".parquet" for p in parts)  # no half-written temp file left
    assert not (killed / "trace.parquet").exists()
    resumed = subprocess.run(_record_cmd(prompts, killed), check=True, capture_output=True, text=True)
    assert f"{len(SMALL_PROMPTS) - len(parts)} to run, {len(parts)} done" in resumed.stdout
    columns = ["prompt_id", "seed", "step", "branch", "x_temb", "x_modin", "y_output", "y_residual"]
    pd.testing.assert_frame_equal(load_trace(full)[columns], load_trace(killed)[columns])


def test_two_process_sharded_record_merges_to_the_single_process_trace(tmp_path, recorded_run):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS)
    out = tmp_path / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen(_record_cmd(prompts, out, "--seeds", "0,1", "--shard", f"{i}/2"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    columns = ["prompt_id", "seed", "step", "branch", "x_temb", "x_modin", "y_output", "y_residual"]
    pd.testing.assert_frame_equal(load_trace(recorded_run)[columns], load_trace(out)[columns])
    assert (out / "trace.parquet").exists()


def test_record_under_torchrun_merges_to_the_single_process_trace(tmp_path, recorded_run):
    """`torchrun --nproc-per-node 2 ... record`: each rank takes its slice from RANK/WORLD_SIZE; the merge is the whole."""
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS)
    out = tmp_path / "torchrun"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--module", *TEACAL[2:]]
    done = subprocess.run([*launch, "record", "--prompts", prompts, "--out", str(out), *SMALL_ARGS, "--seeds", "0,1"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 0/2: 4 to run" in done.stdout and "shard 1/2: 4 to run" in done.stdout
    columns = ["prompt_id", "seed", "step", "branch", "x_temb", "x_modin", "y_output", "y_residual"]
    pd.testing.assert_frame_equal(load_trace(recorded_run)[columns], load_trace(out)[columns])


def test_linear_fit_equals_polyfit_and_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    truth = np.array([30.0, -12.0, 2.5, 0.01])
    x = rng.uniform(0.0, 0.4, 400)
    y = np.polyval(truth, x)
    assert np.allclose(fit_polynomial(x, y, 3), truth, rtol=1e-6, atol=1e-9)
    noisy = y + rng.normal(0, 0.01, x.size)
    assert np.allclose(fit_polynomial(x, noisy, 3), np.polyfit(x, noisy, 3), rtol=1e-7, atol=1e-9)
    outliers = noisy.copy()
    outliers[::20] += 5.0  # robust losses shrug off a few wild steps; least squares does not
    robust = fit_polynomial(x, outliers, 3, loss="soft_l1")
    plain = fit_polynomial(x, outliers, 3)
    assert np.abs(np.polyval(robust, x) - y).mean() < np.abs(np.polyval(plain, x) - y).mean() / 3


def test_folds_never_split_a_prompt():
    groups = np.repeat([f"p{i}" for i in range(7)], 13)
    folds = group_folds(groups, 3)
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(groups.size))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])


def _bad(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('{"id": "a", "prompt": "x", "image": "skimage:cat"}\n{"id": "a", "prompt": "y", "image": "skimage:cat"}\n', "p.jsonl:2: duplicate id 'a' (first on line 1)"),
        ('{"id": "a", "prompt": "x", "image": "missing.png"}\n', "p.jsonl:1: image not found"),
        ('{"id": "a", "prompt": "x", "image": "skimage:eagle"}\n', "p.jsonl:1: unknown skimage image 'eagle'"),
        ('{"id": "a", "prompt": "x", "image": "skimage:cat"}\n{"id": "b", "prompt": \n', "p.jsonl:2: bad JSON"),
        ('{"id": "a", "prompt": "x"}\n', "p.jsonl:1: this model edits an image, so field 'image' is required"),
    ],
)
def test_bad_prompt_files_exit_2_with_file_and_line(tmp_path, rows, message):
    result = runner.invoke(app, ["record", "--prompts", _bad(tmp_path / "p.jsonl", rows), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "flux-dev"], "unknown model 'flux-dev'"),
        (["--size", "100x64"], "multiples of 16"),
        (["--seeds", "0,a"], "--seeds '0,a'"),
        (["--backend", "lightx2v"], "is the embedded tiny model; it runs on its own backend, not lightx2v"),
        (["--model", "qwen-image-edit", "--model-path", "/nonexistent/weights"], "--model-path /nonexistent/weights: not a folder"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--shard", "2/2"], "need 0 <= i < K"),
    ],
)
def test_bad_record_options_exit_2(tmp_path, args, message):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:1])
    result = runner.invoke(app, ["record", "--prompts", prompts, "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def test_rerun_with_other_settings_is_refused_and_keeps_the_run(recorded_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (recorded_run / "trace").iterdir()}
    result = runner.invoke(app, ["record", "--prompts", str(recorded_run.parent / "prompts.jsonl"), "--out", str(recorded_run), "--steps", "7", "--size", "64x64", "--seeds", "0,1"])
    assert result.exit_code == 2 and "other settings (steps: 6 -> 7)" in result.output
    assert before == {p.name: p.stat().st_mtime_ns for p in (recorded_run / "trace").iterdir()}


def _copy_run(src: Path, dst: Path, edit=None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def test_fit_refusals(recorded_run, tmp_path):
    out = str(tmp_path / "p.json")
    # NaN in a trace
    def poison(run):
        part = sorted((run / "trace").glob("*.parquet"))[0]
        frame = pd.read_parquet(part)
        frame.loc[3, "x_modin"] = np.nan
        frame.to_parquet(part)
    nan_run = _copy_run(recorded_run, tmp_path / "nan", poison)
    result = runner.invoke(app, ["fit", str(nan_run), "--out", out])
    assert result.exit_code == 2 and "hold NaN or inf" in result.output
    # too few points for the degree
    result = runner.invoke(app, ["fit", str(recorded_run), "--out", out, "--degree", "8", "--ret-steps", "2", "--cutoff-steps", "-3"])
    assert result.exit_code == 2 and "fit points for degree 8" in result.output
    # traces from different settings
    def other_model(run):
        info = json.loads((run / "run.json").read_text())
        info["settings"]["steps"] = 30
        (run / "run.json").write_text(json.dumps(info))
    other = _copy_run(recorded_run, tmp_path / "other", other_model)
    result = runner.invoke(app, ["fit", str(recorded_run), str(other), "--out", out])
    assert result.exit_code == 2 and "recorded with other settings" in result.output
    result = runner.invoke(app, ["fit", str(tmp_path / "nothing"), "--out", out])
    assert result.exit_code == 2 and "no run.json" in result.output
    assert not Path(out).exists()


def test_fit_reports_both_signals_and_picks_the_best_held_out(recorded_run, tmp_path):
    preset = fit(FitRequest((str(recorded_run),), str(tmp_path / "p.json"), degree=2), echo=lambda *_: None)
    candidates = {(c["signal"], c["degree"]): c for c in preset.fit["candidates"]}
    assert {("temb", 2), ("modin", 2)} <= set(candidates)
    best = min((c for c in candidates.values() if c["degree"] == 2), key=lambda c: c["mae_heldout"])
    assert preset.signal == best["signal"] and preset.branch_mode == "shared"
