"""A new user's first hour (issue 16): every bad input is one `error:` line naming the file, line or flag, exit code 2,
before any expensive work and without losing what is already written; progress without a terminal; tidy files
(atomic, no stale temp files, normal modes); a report that reads well. Real runs of the tiny model, real files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.text import Annotation
from PIL import Image
from typer.testing import CliRunner

import calib.report as report_module
from calib.cli import app
from calib.fit import FitRequest, fit
from calib.progress import progress
from tests.conftest import SMALL_PROMPTS, write_prompts

runner = CliRunner()
TEACAL = [sys.executable, "-m", "calib.cli"]
DEAD = 99999999  # no process has this pid: a temp file named with it is a killed writer's
HASH = re.compile(r"[0-9a-f]{16}")


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def modes(folder: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def stale_temp(folder: Path, name: str) -> Path:
    """What kill -9 in the middle of writing `folder/name` leaves."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{name}.{DEAD}.k1ll3d.tmp"
    temp.write_bytes(b"half a file")
    return temp


@pytest.fixture
def normal_umask():
    previous = os.umask(0o022)
    yield 0o644
    os.umask(previous)


@pytest.fixture(scope="module")
def preset(recorded_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("first-hour-preset") / "tiny.json"
    fit(FitRequest(runs=(recorded_run,), out=path, signal="temb", target="residual", degree=2, folds=2), echo=lambda *_: None)
    return path


# -- prompt sets: encodings, images, folders -------------------------------------------------------------------------
def test_a_prompt_file_that_is_not_utf8_names_its_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"id": "a", "prompt": "x", "image": "skimage:coins"}\n{"id": "b", "prompt": "caf\xe9", "image": "skimage:coins"}\n')
    result = runner.invoke(app, ["record", str(tmp_path / "run"), "--prompts", str(prompts)])
    one_error_line(result, f"{prompts}:2: not UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["text", "truncated png"])
def test_an_image_that_is_not_an_image_fails_while_the_prompt_set_loads_before_the_model(tmp_path, content):
    image = tmp_path / "broken.png"
    if content == "text":
        image.write_text("not an image")
    else:
        good = tmp_path / "good.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(good)
        image.write_bytes(good.read_bytes()[:80])  # what an interrupted copy leaves
    prompts = write_prompts(tmp_path / "p.jsonl", [SMALL_PROMPTS[0], {"id": "b", "prompt": "x", "image": "broken.png"}])
    # weights that cannot load: the image error shows the prompt set was checked before any model load
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model_index.json").write_text("{}")
    result = runner.invoke(app, ["record", str(tmp_path / "run"), "--model", "qwen-image-edit", "--model-path", str(weights), "--prompts", prompts,
                                 "--device", "cpu"])
    one_error_line(result, f"{prompts}:2: image {tmp_path / 'broken.png'} cannot be decoded")
    assert not (tmp_path / "run").exists()


def test_a_folder_given_as_the_prompt_file(tmp_path):
    result = runner.invoke(app, ["record", str(tmp_path / "run"), "--prompts", str(tmp_path)])
    one_error_line(result, f"{tmp_path}: is a folder, not a prompt file")


# -- numbers and paths ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps 0: need at least 2 steps"),
        (["--steps", "1"], "--steps 1: need at least 2 steps"),
        (["--cfg", "nan"], "--cfg nan: expected a finite true-CFG scale >= 1"),
        (["--cfg", "-1"], "--cfg -1.0: expected a finite true-CFG scale >= 1"),
        (["--cfg", "inf"], "--cfg inf: expected a finite"),
        (["--size", "65x64"], "--size '65x64'"),
        (["--seed", "-1"], "--seed [-1]"),
    ],
)
def test_bad_generation_values_exit_2_before_anything_is_written(tmp_path, args, message):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:1])
    result = runner.invoke(app, ["record", str(tmp_path / "run"), "--prompts", prompts, *args])
    one_error_line(result, message)
    assert not (tmp_path / "run").exists()


def test_output_paths_are_checked_before_any_work(recorded_run, preset, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:1])
    one_error_line(runner.invoke(app, ["record", str(a_file), "--prompts", prompts]), f"run folder {a_file}: exists and is a file")
    one_error_line(runner.invoke(app, ["record", str(a_file / "run"), "--prompts", prompts]), f"{a_file} is a file, not a folder")
    # fit checks --out before it reads any run: with no run folder at all, the complaint is still about --out
    one_error_line(runner.invoke(app, ["fit", str(tmp_path / "no-run"), "--out", str(tmp_path)]), f"--out {tmp_path}: is a folder")
    one_error_line(runner.invoke(app, ["fit", str(recorded_run), "--out", str(a_file / "p.json")]), f"--out {a_file / 'p.json'}: {a_file} is a file")
    sweep = ["sweep", str(recorded_run), "--preset", str(preset), "--thresh", "0.1"]
    one_error_line(runner.invoke(app, [*sweep, "--out", str(a_file)]), f"--out {a_file}: exists and is a file")
    one_error_line(runner.invoke(app, [*sweep, "--out", str(tmp_path / "o"), "--target-psnr", "20", "--save-preset", str(tmp_path)]),
                   f"--save-preset {tmp_path}: is a folder")
    one_error_line(runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(tmp_path), "--out", str(tmp_path / "o")]),
                   f"--preset {tmp_path}: is a folder")
    one_error_line(runner.invoke(app, ["export", str(preset), "--out", str(tmp_path)]), f"--out {tmp_path}: is a folder")
    assert a_file.read_text() == "mine" and not (tmp_path / "o").exists()


# (--target-psnr nan and -5, a grid past 400 configurations without --yes, --preset naming a folder: test_sweep_report.py)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-psnr", "inf"], "--target-psnr inf: expected a finite number"),
        (["--target-lpips", "nan"], "--target-lpips"),
        (["--thresh", "0.1:0.3:0.0000001", "--yes"], "2,000,001 thresholds"),
        (["--repeats", "0"], "--repeats"),
        (["--steps", "0"], "--steps 0: "),  # not the recorded step count, silently
    ],
)
def test_bad_sweep_values_exit_2_before_any_generation(recorded_run, preset, tmp_path, args, message):
    result = runner.invoke(app, ["sweep", str(recorded_run), "--preset", str(preset), "--thresh", "0.1", "--oracle", "none", "--out", str(tmp_path / "o"),
                                 *args])
    one_error_line(result, message)
    assert not (tmp_path / "o").exists()


def test_a_recommendation_needs_the_presets_own_reuse_rule_in_the_sweep(recorded_run, preset, tmp_path):
    # It used to sweep for minutes, then say "no threshold meets psnr >= 20" whatever the quality: the recommendation
    # looked only at the preset's own rule (here a forecast), which `--forecast none` never measured.
    forecasting = tmp_path / "forecasting.json"
    forecasting.write_text(json.dumps({**json.loads(Path(preset).read_text()), "forecast": {"rule": "linear", "axis": "step", "alpha": [[0.0, 0.3]]}}))
    sweep = ["sweep", str(recorded_run), "--preset", str(forecasting), "--thresh", "0.1", "--oracle", "none", "--out", str(tmp_path / "o"), "--target-psnr", "20"]
    one_error_line(runner.invoke(app, [*sweep, "--forecast", "none"]),
                   "--target-psnr: the recommended preset runs with its own reuse rule (calibrated), which this sweep does not measure (--forecast none); add --forecast preset")
    one_error_line(runner.invoke(app, [*sweep, "--method", "fbcache"]), "--target-psnr: recommends a threshold of calibrated TeaCache; add --method teacache")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_fit_and_report_on_an_unreadable_trace_name_the_file(recorded_run, tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(recorded_run / "run.json", run / "run.json")
    shutil.copytree(recorded_run / "inputs", run / "inputs")
    whole = (recorded_run / "trace.parquet").read_bytes()
    (run / "trace.parquet").write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    for args in (["fit", str(run), "--out", str(tmp_path / "p.json")], ["report", str(run)]):
        one_error_line(runner.invoke(app, args), f"{run / 'trace.parquet'}: not a readable parquet table", "delete it and rerun")
    assert not (tmp_path / "p.json").exists() and not (run / "report" / "report.md").exists()


# -- refusals name only what differs, with file names -------------------------------------------------------------
def test_other_settings_are_named_by_what_differs_and_by_file_never_by_hash(recorded_run, preset, tmp_path):
    before = tree(recorded_run)
    recorded = recorded_run / "inputs" / "prompts.jsonl"
    same_args = ["--steps", "6", "--size", "64x64", "--seed", "0", "--seed", "1", "--max-gap", "4"]
    other = tmp_path / "other.jsonl"
    shutil.copy(recorded, other)
    text = one_error_line(runner.invoke(app, ["record", str(recorded_run), "--prompts", str(other), *same_args]),
                          "other settings (prompts: 'prompts.jsonl' -> 'other.jsonl'); choose another run folder")
    edited = tmp_path / "edited" / "prompts.jsonl"
    edited.parent.mkdir()
    edited.write_text(recorded.read_text().replace("put a hat on the cat", "put a crown on the cat"))
    text += one_error_line(runner.invoke(app, ["record", str(recorded_run), "--prompts", str(edited), *same_args]),
                           f"other settings (prompt set {edited}: other text or images than recorded)")
    assert tree(recorded_run) == before

    out = tmp_path / "sweep"
    common = ["sweep", str(recorded_run), "--thresh", "0.5", "--oracle", "none", "--metrics", "psnr", "--prompts", write_prompts(tmp_path / "one.jsonl", SMALL_PROMPTS[:1]),
              "--out", str(out)]
    assert runner.invoke(app, [*common, "--preset", str(preset)]).exit_code == 0
    refit = tmp_path / "refit.json"
    fit(FitRequest(runs=(recorded_run,), out=refit, signal="temb", target="residual", degree=1, folds=2), echo=lambda *_: None)
    text += one_error_line(runner.invoke(app, [*common, "--preset", str(refit)]),
                           f"(--preset {refit}: other contents than {out / 'sweep-preset.json'}, the preset measured there); choose another --out")
    text += one_error_line(runner.invoke(app, [*common, "--preset", str(preset), "--baseline", "flux"]), "(baselines.flux: absent -> [498.6")
    assert not HASH.search(text) and "{" not in text


# -- progress without a terminal, file modes, stale temp files --------------------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess:
    """The real command with stderr a pipe (as under nohup, CI or a log), under the usual umask."""
    return subprocess.run([*TEACAL, *args], capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=lambda: os.umask(0o022))


PLAIN = r"{stage}: (\d+)/{total} \(\d+%\), \d+m\d\ds elapsed, ETA \d+m\d\ds"


def test_record_and_probe_report_progress_without_a_terminal_and_write_normal_files(recorded_run, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:2])
    done = _run(["record", str(tmp_path / "run"), "--prompts", prompts, "--steps", "4", "--size", "64x64", "--max-gap", "2"])
    assert done.returncode == 0, done.stderr
    assert re.findall(PLAIN.format(stage="record", total=2), done.stderr) == ["1", "2"]
    assert modes(tmp_path / "run") == {0o644}  # as open() would make them under umask 022, not mkstemp's 0600

    run = tmp_path / "probed"
    shutil.copytree(recorded_run, run)
    leftovers = [stale_temp(run, "probe.json"), stale_temp(run, "probes.parquet"), stale_temp(run / "probes" / "window", "a.json")]
    done = _run(["probe", str(run), "--prompts", "1", "--window", "1"])
    assert done.returncode == 0, done.stderr
    counts = re.findall(PLAIN.format(stage="probe", total=r"(\d+)"), done.stderr)
    assert counts and counts[-1][0] == counts[-1][1]  # the last line says all done
    assert not any(t.exists() for t in leftovers)
    assert modes(run / "probes") == {0o644} and stat.S_IMODE((run / "probes.parquet").stat().st_mode) == 0o644


def test_off_a_terminal_a_line_every_tenth_of_the_work_or_every_few_seconds(monkeypatch):
    lines = []
    with progress("sweep", 40, echo=lines.append) as advance:
        for _ in range(40):
            advance()
    assert [line.split(",")[0] for line in lines] == [f"sweep: {n}/40 ({n / 40:.0%})" for n in range(4, 41, 4)]
    assert all(re.fullmatch(PLAIN.format(stage="sweep", total=40), line) for line in lines)
    monkeypatch.setattr("calib.progress.PLAIN_EVERY_SECONDS", 0.0)  # a slow loop: a line at every tick of that clock
    lines.clear()
    with progress("record", 3, echo=lines.append) as advance:
        for _ in range(3):
            advance()
    assert [line.split(" (")[0] for line in lines] == ["record: 1/3", "record: 2/3", "record: 3/3"]


def test_fit_removes_only_its_own_stale_temp_file(recorded_run, tmp_path):
    out = tmp_path / "presets" / "p.json"
    mine, other = stale_temp(out.parent, "p.json"), stale_temp(out.parent, "someone-else.json")
    fit(FitRequest(runs=(recorded_run,), out=out, signal="temb", target="residual", degree=1, folds=2), echo=lambda *_: None)
    assert not mine.exists() and other.exists() and out.exists()


# -- a sweep elsewhere: inputs untouched, LPIPS unavailable, then the report ----------------------------------------------
@pytest.fixture
def lpips_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr("calib.metrics.alexnet_weights", lambda: tmp_path / "absent" / "alexnet.pth")
    monkeypatch.setattr("calib.metrics.ALEXNET_URL", "http://127.0.0.1:9/alexnet.pth")  # nothing listens there: offline


def test_a_sweep_elsewhere_and_its_report(recorded_run, preset, tmp_path, lpips_unavailable, normal_umask, monkeypatch):
    run_before, preset_before = tree(recorded_run), preset.read_bytes()
    out = tmp_path / "elsewhere"
    args = ["sweep", str(recorded_run), "--preset", str(preset), "--prompts", write_prompts(tmp_path / "two.jsonl", SMALL_PROMPTS[:2]),
            "--thresh", "0,0.05,0.5,2", "--baseline", "identity", "--target-psnr", "15", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # the recording and the input preset are byte-identical; the recommendation is a new file under --out
    assert tree(recorded_run) == run_before and preset.read_bytes() == preset_before
    assert (out / "recommended-preset.json").exists() and (out / "sweep.parquet").exists()
    # progress lines off a terminal, the last one complete
    counts = re.findall(PLAIN.format(stage="sweep", total=r"(\d+)"), result.stderr)
    assert counts and counts[-1][0] == counts[-1][1]
    # LPIPS cannot run here: one note, and no empty LPIPS column
    assert result.output.count("LPIPS not measured") == 1
    header = next(line for line in result.stdout.splitlines() if line.startswith("configuration"))
    assert "LPIPS" not in header and "PSNR" in header
    assert modes(out) == {normal_umask} and not list(out.rglob("*.tmp"))

    # a killed sweep's leftovers go with the next run of the same command, which has nothing new to run
    leftovers = [stale_temp(out, "sweep.json"), stale_temp(out, "sweep.parquet"), stale_temp(out / "sweep" / "uncached", "x.json")]
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 generations to run" in again.output
    assert not any(t.exists() for t in leftovers)

    # the report: figures captured as they are saved
    figures = {}
    original = report_module._save

    def keep(fig, path):
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        figures[path.name] = [
            ([line.get_xydata() for line in ax.lines], ax.get_ylim(), [t.get_text() for t in ax.texts],
             [t.get_window_extent(renderer) for t in ax.texts if isinstance(t, Annotation)]) for ax in fig.axes]
        return original(fig, path)

    monkeypatch.setattr(report_module, "_save", keep)
    stale = stale_temp(out / "report", "fit.png")
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("and 6 figures")  # no LPIPS chart: LPIPS was not measured
    assert not stale.exists() and modes(out / "report") == {normal_umask}
    for name in ("pareto_psnr.png", "calls_psnr.png", "calls_psnr_worst.png"):
        lines, (low, high), texts, labels = figures[name][0]
        plotted = [y for data in lines for _, y in data]
        assert all(abs(y) < 99 for y in plotted) and high < 99  # identical images (PSNR inf) are not plotted at 100...
        assert any("identical to uncached (not plotted)" in t for t in texts)  # ...but marked
        assert labels and not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])  # labels do not collide
    curve = figures["fit.png"][0][0][0][:, 0]
    x = [v for v in json.loads((out / "sweep-preset.json").read_text())["domain"]["x_range"]["temb"]]
    assert x[0] - 1e-12 <= curve.min() and curve.max() <= x[1] + 1e-12  # the curve stays over the recorded x
    text = (out / "report" / "report.md").read_text()
    assert "| lpips |" not in text and "LPIPS <=" not in text and "LPIPS was not measured" in text
    assert "Weak fit" not in text

    # a weak fit is flagged, in words, with what to try
    weak = tmp_path / "weak.json"
    data = json.loads(preset.read_text())
    data["fit"]["r2_heldout"] = 0.3
    weak.write_text(json.dumps(data))
    result = runner.invoke(app, ["report", str(out), "--preset", str(weak)])
    assert result.exit_code == 0 and "warning: weak fit: held-out R² 0.30 is below 0.5" in result.output
    assert "**Weak fit**" in (out / "report" / "report.md").read_text() and "--signal modin" in result.output


def test_a_report_of_one_figure_says_figure(recorded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded_run, run)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0 and result.output.strip().endswith("and 1 figure"), result.output
