"""`teacal calibrate` and `teacal evaluate`: the main job in two commands, a plan before any work, a budget that decides
what is measured, resumable after kill -9 in any stage, the same preset under torchrun, held-out prompts only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from calib.calibrate import LADDER, CalibrateRequest, check_held_out, make_plan, print_plan
from teacache.preset import Preset
from tests.conftest import SMALL_PROMPTS, write_prompts

CALIBRATE = ["calibrate", "run", "--prompts", "calib.jsonl", "--steps", "6", "--size", "64x64", "--budget", "700"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _teacal(args, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calib.cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, str, bytes]:
    """One uninterrupted calibration of three prompts at 6 steps: its folder, output and preset."""
    base = tmp_path_factory.mktemp("calibrated")
    write_prompts(base / "calib.jsonl", SMALL_PROMPTS[:3])
    done = _teacal(CALIBRATE, base)
    assert done.returncode == 0, done.stderr[-3000:]
    return base, done.stdout, (base / "run" / "preset.json").read_bytes()


def test_the_plan_comes_first_and_the_budget_chooses_the_rung(calibrated):
    _, output, _ = calibrated
    lines = output.splitlines()
    assert lines[0].startswith("plan: a budget of 700 transformer calls; recording alone costs 36 (3 generations")  # 3 prompts x 6 steps x 2 branches
    chosen = [line for line in lines[1 : len(LADDER) + 1] if line.startswith("  ->")]
    assert len(chosen) == 1 and "windows of 1/4/8, forecasts" in chosen[0]
    assert "calibrated: run/preset.json" in output


def test_the_planned_calls_are_the_calls_the_runtime_counted(calibrated):
    """A probe calls the transformer only at the steps it computes: the plan counts those, as the hook does."""
    base, output, _ = calibrated
    planned = int(output.split(" calls planned")[0].rsplit("; ", 1)[1].replace(",", ""))
    parts = pd.DataFrame([json.loads(part.read_text()) for part in (base / "run" / "probes").glob("*/*.json")])  # checks included
    assert planned == 3 * 6 * 2 + parts["calls"].sum()  # recording: 3 prompts x 6 steps x 2 branches, every call
    assert (parts["calls"] < parts["steps"] * 2).sum() == len(parts) - 3  # every probe but the 3 uncached checks skips


def test_more_budget_buys_more_measurement_and_never_less():
    request = CalibrateRequest(run=Path("x"))
    chosen = [make_plan(request, (20, 40), 4.0, 12, budget).chosen for budget in (1, 2_000, 5_000, 10_000, 50_000, 10**7)]
    assert chosen == sorted(chosen) and chosen[0] == 0 and chosen[-1] == len(LADDER) - 1
    for steps in ((20,), (50,)):  # the most useful rung the budget affords (at 50 steps a later rung may cost less)
        plan = make_plan(request, steps, 4.0, 12, 10_000)
        assert plan.costs[plan.chosen] <= 10_000 < min(plan.costs[plan.chosen + 1 :])
        assert LADDER[plan.chosen].forecast  # the default budget buys the forecast probes at 20 and at 50 steps


@pytest.mark.parametrize("stage, marker", [("record", "record: 1/"), ("probe", "probe: "), ("fit", "signal target")])
def test_killed_in_any_stage_the_rerun_writes_the_same_preset(calibrated, tmp_path, stage, marker):
    _, _, preset = calibrated
    write_prompts(tmp_path / "calib.jsonl", SMALL_PROMPTS[:3])
    process = subprocess.Popen([sys.executable, "-m", "calib.cli", *CALIBRATE], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith(marker):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=600)
    assert process.returncode == -signal.SIGKILL, f"the calibration ended before its {stage} stage was reached"
    assert not (tmp_path / "run" / "preset.json").exists()
    done = _teacal(CALIBRATE, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "preset.json").read_bytes() == preset


def test_torchrun_gives_the_preset_of_one_process(calibrated, tmp_path):
    _, _, preset = calibrated
    write_prompts(tmp_path / "calib.jsonl", SMALL_PROMPTS[:3])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--module", "calib.cli"]
    done = subprocess.run([*launch, *CALIBRATE], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 0/2" in done.stdout and "shard 1/2" in done.stdout
    assert (tmp_path / "run" / "preset.json").read_bytes() == preset


def test_with_sweeps_and_tune_torchrun_gives_the_preset_of_one_process(tmp_path):
    """The top rung: every rank records, probes, sweeps and tunes its share; rank 0 fits and writes the same preset."""
    args = [*CALIBRATE[:-1], "3000", "--tune-rounds", "2"]  # 3 prompts at 6 steps: 3,000 calls buy sweeps and tune
    presets = []
    for folder, launch in (("one", [sys.executable, "-m", "calib.cli"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--module", "calib.cli"])):
        (tmp_path / folder).mkdir()
        write_prompts(tmp_path / folder / "calib.jsonl", SMALL_PROMPTS[:3])
        done = subprocess.run([*launch, *args], cwd=tmp_path / folder, env=ENV, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "-> + calibration sweeps and tune" in done.stdout and "tune: 2 rounds fit the budget" in done.stdout
        presets.append((tmp_path / folder / "run" / "preset.json").read_bytes())
    assert presets[0] == presets[1] and json.loads(presets[0])["calibration"]["tune"]["rounds"] == 2


def test_evaluate_refuses_the_calibration_prompts_and_leads_with_the_answer(calibrated, tmp_path):
    base, _, _ = calibrated
    refused = _teacal(["evaluate", str(tmp_path / "held"), "--preset", str(base / "run" / "preset.json"), "--prompts", str(base / "calib.jsonl")], tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "3 of its prompts calibrated" in refused.stderr and not (tmp_path / "held").exists()
    held = write_prompts(tmp_path / "held.jsonl", SMALL_PROMPTS[3:])
    done = _teacal(["evaluate", str(tmp_path / "held"), "--preset", str(base / "run" / "preset.json"), "--prompts", held, "--baseline", "identity",
                    "--baseline", "lemica", "--method", "teacache", "--method", "fbcache", "--target-psnr", "20"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "held" / "sweep-6" / "report" / "report.md").read_text()
    answer = text.split("## The answer")[1].split("##")[0]
    assert "(the preset's default)" in answer and "x measured" in answer and "on the worst prompt, at" in answer
    assert "on every prompt" in answer and "static: LeMiCa (published Qwen-Image schedules)" in text


def test_the_shipped_preset_refuses_its_calibration_prompts_and_a_preset_naming_none_is_said(tmp_path):
    """The shipped tiny preset names the prompts that calibrated it, so evaluate refuses them; a preset that names none
    (written elsewhere, or before teacal recorded them) cannot be checked, and evaluate says so instead of staying silent."""
    repo = Path(__file__).resolve().parents[1]
    shipped, calib_prompts = repo / "presets" / "tiny-qwen-image-edit.json", repo / "prompts" / "calib.jsonl"
    refused = _teacal(["evaluate", "held", "--preset", str(shipped), "--prompts", str(calib_prompts)], tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "12 of its prompts calibrated" in refused.stderr and not (tmp_path / "held").exists()
    preset = Preset.load(shipped)
    unnamed = preset.replace(calibration={k: v for k, v in preset.calibration.items() if k != "prompt_identities"})
    said: list[str] = []
    check_held_out(unnamed, calib_prompts, said.append)
    assert len(said) == 1 and "names no calibration prompts" in said[0] and "cannot be checked" in said[0]
    said.clear()
    check_held_out(preset, repo / "prompts" / "heldout.jsonl", said.append)  # held out, and checked: nothing to say
    assert said == []


def test_evaluate_in_two_shards_reports_from_the_first(calibrated, tmp_path):
    """evaluate in two shards (`--shard i/K`, or torchrun): whichever finishes last merges the sweep, the first writes
    the report and says where it is, on the terminal the user watches. Without the oracle and plain reuse (the
    demo's quicker evaluate) neither is measured."""
    base, _, _ = calibrated
    held = write_prompts(tmp_path / "held.jsonl", SMALL_PROMPTS[3:])
    args = [sys.executable, "-m", "calib.cli", "evaluate", "held", "--preset", str(base / "run" / "preset.json"), "--prompts", held,
            "--baseline", "identity", "--method", "teacache", "--no-oracle", "--no-plain-reuse"]
    shards = [subprocess.Popen([*args, "--shard", f"{i}/2"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    outputs = [shard.communicate(timeout=600) for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "report: held/sweep-6/report/report.md" in outputs[0][0] and "report:" not in outputs[1][0]
    assert "## The answer" in (tmp_path / "held" / "sweep-6" / "report" / "report.md").read_text()
    measured = pd.read_parquet(tmp_path / "held" / "sweep-6" / "sweep.parquet")
    assert set(measured["method"]) == {"uncached", "teacache", "baseline"} and measured.loc[measured["method"] == "teacache", "label"].nunique() == 1


def test_the_same_prompts_in_another_order_calibrate_the_same_preset(tmp_path):
    """Which prompts are probed follows from the recording, not from the file's order (2 of 4 probed here)."""
    presets, probed = [], []
    for name, order in (("a", SMALL_PROMPTS), ("b", SMALL_PROMPTS[::-1])):
        (tmp_path / name).mkdir()
        write_prompts(tmp_path / name / "calib.jsonl", order)
        done = _teacal([*CALIBRATE[:-1], "200"], tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "-> + probes: 2 prompts, every 5th step, forecasts" in done.stdout
        probed.append(next(line for line in done.stdout.splitlines() if "spread over" in line).split(": prompts ")[1])
        presets.append((tmp_path / name / "run" / "preset.json").read_bytes())
    assert probed[0] == probed[1] and len(probed[0].split(", ")) == 2
    assert presets[0] == presets[1]


def test_a_plan_short_of_the_forecast_probes_says_which_budget_buys_them():
    request, said = CalibrateRequest(run=Path("x")), []
    print_plan(make_plan(request, (50,), 4.0, 12, 5_000), 5_000, None, echo=said.append)
    assert said[-1] == "note: --budget 5360 would buy the forecast probes, which gained most on held-out prompts"
    said.clear()
    print_plan(make_plan(request, (20,), 4.0, 12, 10_000), 10_000, None, echo=said.append)  # the default buys them here
    assert not any("would buy" in line for line in said)
