"""`teacal record` and `teacal probe` on the tiny model: real runs, real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from calib.cli import app
from calib.probe import ProbeRequest, probe
from calib.runfiles import load_probes, load_trace, reuse_columns
from tests.conftest import SMALL_PROMPTS, pixels, write_prompts

runner = CliRunner()
TEACAL = [sys.executable, "-m", "calib.cli"]
SMALL_ARGS = ["--steps", "6", "--size", "64x64", "--max-gap", "4"]
COLUMNS = ["prompt_id", "seed", "steps", "step", "branch", "x_temb", "x_modin", "x_sigma", "y_output", "y_residual", *reuse_columns(4)]


def test_trace_follows_the_contract(recorded_run):
    trace = load_trace(recorded_run)
    assert list(trace.columns) == ["prompt_id", "seed", "steps", "width", "height", "step", "branch", "timestep", "sigma", "x_temb", "x_modin",
                                   "x_sigma", "y_output", "y_residual", *reuse_columns(4), "seconds"]
    assert len(trace) == len(SMALL_PROMPTS) * 2 * 6 * 2  # prompts x seeds x steps x branches
    first = trace[trace["step"] == 0]
    assert first[["x_temb", "x_modin", "x_sigma", "y_output", "y_residual"]].isna().all().all()  # null, never 0
    later = trace[trace["step"] > 0]
    assert later[["x_temb", "x_modin", "x_sigma", "y_output", "y_residual"]].notna().all().all()
    # the sigma signal's distance is the noise level's relative step, |Δσ| / σ, growing towards the end of the schedule
    for _, series in trace.groupby(["prompt_id", "seed", "branch"]):
        sigma = series["sigma"].to_numpy()
        assert np.allclose(series["x_sigma"].to_numpy()[1:], np.abs(np.diff(sigma)) / sigma[:-1], rtol=1e-6)
        assert (np.diff(series["x_sigma"].to_numpy()[1:]) > 0).all()
    assert (later["y_output"] > 0).all()
    # a gap of k steps exists from step k on, and a longer skip substitutes more
    for k in (2, 3, 4):
        assert trace.loc[trace["step"] < k, f"r_residual_{k}"].isna().all() and trace.loc[trace["step"] >= k, f"r_residual_{k}"].notna().all()
    late = trace[trace["step"] >= 4]
    assert (late["r_residual_4"] > late["y_residual"]).mean() > 0.9
    # The image-stream signals do not see the text: both branches carry the same x, their outputs differ.
    wide = later.pivot_table(index=["prompt_id", "seed", "step"], columns="branch", values=["x_modin", "y_output"])
    assert np.allclose(wide["x_modin"]["cond"], wide["x_modin"]["uncond"])
    assert not np.allclose(wide["y_output"]["cond"], wide["y_output"]["uncond"])
    run = json.loads((recorded_run / "run.json").read_text())
    assert set(run["status"].values()) == {"done"} and run["settings"]["steps"] == [6]
    assert len(list((recorded_run / "refs").glob("*.png"))) == 8 and len(list((recorded_run / "refs").glob("*.npy"))) == 8
    sample = np.load(recorded_run / "residuals" / "cat-hat-0-6st-64x64.npy")
    assert sample.shape[:2] == (6, 2) and sample.dtype == np.float16


def test_recording_does_not_change_the_image(recorded_run, tiny):
    from calib.prompts import load_prompts

    item = load_prompts(recorded_run / "inputs" / "prompts.jsonl").items[1]
    plain = tiny.run(item, 1, 6, 4.0, (64, 64))
    assert np.array_equal(pixels(plain.image), pixels(Image.open(recorded_run / "refs" / f"{item.id}-1-6st-64x64.png")))
    assert np.array_equal(plain.latents, np.load(recorded_run / "refs" / f"{item.id}-1-6st-64x64.npy"))


def test_several_step_counts_in_one_run(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:2])
    result = runner.invoke(app, ["record", str(tmp_path / "r"), "--prompts", prompts, "--steps", "4", "--steps", "7", "--size", "48x48", "--max-gap", "3"])
    assert result.exit_code == 0, result.output
    trace = load_trace(tmp_path / "r")
    assert sorted(trace.groupby("steps")["step"].max().items()) == [(4, 3), (7, 6)]
    assert json.loads((tmp_path / "r" / "run.json").read_text())["settings"]["steps"] == [4, 7]


def _record_cmd(prompts, out, *extra):
    return [*TEACAL, "record", str(out), "--prompts", prompts, *SMALL_ARGS, *extra]


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
    parts = list((killed / "trace").glob("*.parquet"))
    assert 1 <= len(parts) < len(SMALL_PROMPTS)
    assert not (killed / "trace.parquet").exists()
    (killed / "trace" / ".cat-hat-0-6st-64x64.parquet.99999999.x.tmp").write_bytes(b"half a file")  # what a kill mid-write leaves
    resumed = subprocess.run(_record_cmd(prompts, killed), check=True, capture_output=True, text=True)
    assert f"{len(SMALL_PROMPTS) - len(parts)} to run, {len(parts)} done" in resumed.stdout
    assert not list(killed.rglob("*.tmp"))  # stale temp files are cleaned by the next run
    pd.testing.assert_frame_equal(load_trace(full)[COLUMNS], load_trace(killed)[COLUMNS])


def test_two_process_sharded_record_merges_to_the_single_process_trace(tmp_path, recorded_run):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS)
    out = tmp_path / "sharded"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen(_record_cmd(prompts, out, "--seed", "0", "--seed", "1", "--shard", f"{i}/2"), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    pd.testing.assert_frame_equal(load_trace(recorded_run)[COLUMNS], load_trace(out)[COLUMNS])
    assert (out / "trace.parquet").exists()


def test_record_under_torchrun_merges_to_the_single_process_trace(tmp_path, recorded_run):
    """`torchrun --nproc-per-node 2 ... record`: each rank takes its slice from RANK/WORLD_SIZE; the merge is the whole."""
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS)
    out = tmp_path / "torchrun"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--module", *TEACAL[2:]]
    done = subprocess.run([*launch, "record", str(out), "--prompts", prompts, *SMALL_ARGS, "--seed", "0", "--seed", "1"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 0/2: 4 to run" in done.stdout and "shard 1/2: 4 to run" in done.stdout
    pd.testing.assert_frame_equal(load_trace(recorded_run)[COLUMNS], load_trace(out)[COLUMNS])


def test_rerun_with_other_settings_names_only_what_differs_and_keeps_the_run(recorded_run):
    before = {p.name: p.stat().st_mtime_ns for p in (recorded_run / "trace").iterdir()}
    result = runner.invoke(app, ["record", str(recorded_run), "--prompts", str(recorded_run.parent / "prompts.jsonl"), "--steps", "7",
                                 "--size", "64x64", "--seed", "0", "--seed", "1", "--max-gap", "4"])
    assert result.exit_code == 2
    assert "other settings (steps: [6] -> [7]); choose another run folder" in result.output and result.output.count("\n") == 1
    assert before == {p.name: p.stat().st_mtime_ns for p in (recorded_run / "trace").iterdir()}


def test_a_recording_from_before_a_setting_existed_resumes(recorded_run, tmp_path):
    """A run folder written before teacal recorded `lora` (the key absent, not null) is the same run as one without a
    LoRA now: rerunning record there resumes with nothing to do, instead of refusing the folder."""
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    info = json.loads((run / "run.json").read_text())
    assert info["settings"].pop("lora") is None
    (run / "run.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["record", str(run), "--prompts", str(recorded_run.parent / "prompts.jsonl"), "--steps", "6",
                                 "--size", "64x64", "--seed", "0", "--seed", "1", "--max-gap", "4"])
    assert result.exit_code == 0, result.output
    assert "0 to run" in result.output


def test_a_shards_stale_status_does_not_hide_a_finished_recording(recorded_run, tmp_path):
    """Two shards finishing together can leave run.json listing a generation as pending whose trace part is written:
    the part decides (calibrate waited on the status forever); a generation without its part is still missing."""
    from calib.runfiles import missing_units

    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    info = json.loads((run / "run.json").read_text())
    name = next(iter(info["status"]))
    info["status"][name] = "pending"  # the view of a shard that wrote run.json before the other's last part landed
    assert missing_units(run, info) == []
    (run / "trace" / f"{name}.parquet").unlink()
    assert missing_units(run, info) == [name]


def test_a_failed_model_load_leaves_nothing_behind(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:1])
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    result = runner.invoke(app, ["record", str(tmp_path / "o"), "--model", "qwen-image-edit", "--model-path", str(folder), "--prompts", prompts, "--device", "cpu"])
    assert result.exit_code == 2 and "cannot load" in result.output
    assert not (tmp_path / "o" / "run.json").exists()


# -- probe ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def probed(recorded_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("probed") / "run"
    shutil.copytree(recorded_run, run)
    lines = []
    probe(ProbeRequest(run=run, prompts=2, windows=(1, 2)), echo=lines.append)
    return run, lines


def test_probe_measures_single_steps_and_windows(probed):
    run, lines = probed
    probes = load_probes(run)
    # 2 prompts x (steps 1..5 single, the last step too at 8 steps or fewer, + windows of 2 at 1, 2, 3)
    assert len(probes) == 2 * (5 + 3) and set(probes["length"]) == {1, 2} and 5 in set(probes["first"])
    assert (probes["latent_rel_l1"] > 0).all() and (probes["psnr"] > 10).all() and np.isfinite(probes["psnr"]).all()
    assert any("generations in all" in line and "min of denoising" in line for line in lines)
    assert (run / "probes.parquet").exists() and (run / "probe.json").exists()
    # skipping two steps costs the final image more than skipping either one alone
    merged = probes.pivot_table(index=["prompt_id", "first"], columns="length", values="latent_rel_l1")
    assert (merged[2] > merged[1]).loc[lambda s: s.index.get_level_values(1) <= 3].mean() > 0.8


def test_which_prompts_are_probed_does_not_depend_on_their_order_in_the_file(recorded_run):
    from calib.probe import probed_prompts
    from calib.prompts import load_prompts

    items = load_prompts(recorded_run / "inputs" / "prompts.jsonl").items
    trace = load_trace(recorded_run)
    picked = [item.id for item in probed_prompts(items, trace, 2)]
    assert len(set(picked)) == 2
    for order in (items[::-1], items[1:] + items[:1], items[2:] + items[:2]):
        assert [item.id for item in probed_prompts(order, trace, 2)] == picked
    # one from the slower half of the prompts, by how far the output moves per step, one from the faster
    moved = trace[trace["step"] > 0].assign(log=lambda t: np.log(t["y_output"])).groupby("prompt_id")["log"].mean().sort_values()
    assert picked[0] in list(moved.index[:2]) and picked[1] in list(moved.index[2:])
    assert [item.id for item in probed_prompts(items, trace, 9)] == [item.id for item in items]


def test_probe_resumes_and_shards_to_the_same_table(probed, tmp_path):
    run, _ = probed
    again = []
    probe(ProbeRequest(run=run, prompts=2, windows=(1, 2)), echo=again.append)
    assert any("0 to run" in line for line in again)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("probes", "probes.parquet", "probe.json"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([*TEACAL, "probe", str(copy), "--prompts", "2", "--window", "1", "--window", "2", "--shard", f"{i}/2"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    counts = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        counts.append([int(n) for n in re.search(r"(\d+) generations in all.*: (-?\d+) to run, (-?\d+) done", out).groups()])
    # the shards split the plan: their counts add up, whatever uncached checks they share (one shard may already have
    # run a check the other owns, which that one then counts as done; it printed "-2 done" before)
    assert all(done >= 0 for _, _, done in counts) and sum(to_run + done for _, to_run, done in counts) == counts[0][0]
    if not (copy / "probes.parquet").exists():  # the shard that finished first could not merge yet
        probe(ProbeRequest(run=copy, prompts=2, windows=(1, 2)), echo=lambda *_: None)
    columns = ["prompt_id", "first", "length", "latent_rel_l1", "psnr"]
    pd.testing.assert_frame_equal(load_probes(run)[columns], load_probes(copy)[columns])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "9"], "longer than the run's --max-gap 4"),
        (["--window", "0"], "expected distinct window lengths >= 1"),
        (["--dtype", "bfloat16"], "was recorded in float32"),
        (["--prompts", "0"], "--prompts"),
    ],
)
def test_bad_probe_input_exits_2_with_one_line(recorded_run, tmp_path, args, message):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    result = runner.invoke(app, ["probe", str(run), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not (run / "probes").exists()


def test_probe_stops_when_the_reference_is_not_reproduced(recorded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    for reference in (run / "refs").glob("*.npy"):
        np.save(reference, np.load(reference) * 1.001)  # as if recorded elsewhere
    result = runner.invoke(app, ["probe", str(run), "--prompts", "1", "--window", "1"])
    assert result.exit_code == 2 and "does not reproduce the recorded reference" in result.output
