"""The `teacal` command: thin; it parses, calls a stage and prints. Bad input exits 2 with one line."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from calib.errors import UserError
from calib.peers import GRIDS, METHODS

app = typer.Typer(
    help=(
        "teacal: calibrate TeaCache for Qwen-Image(-Edit) and measure what each threshold buys.\n\n"
        "The main job: `teacal record` (uncached runs, per-step signals) -> `teacal fit` (rescale polynomial -> "
        "preset JSON) -> `teacal sweep` (speed against LPIPS/PSNR/SSIM) -> `teacal report` (Pareto curves). "
        "`make demo` runs all four on the embedded tiny model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def command(function):
    """Register a subcommand whose user errors become one `error:` line and exit code 2."""
    from calib.models import UnknownModelError
    from teacache.preset import PresetError

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (UserError, PresetError, UnknownModelError) as err:
            fail(str(err))
        except KeyboardInterrupt:
            typer.echo("interrupted: finished files are kept; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return app.command()(wrapper)


def parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 128x128") from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise UserError(f"--size {size!r}: width and height must be multiples of 16, at least 16")
    return width, height


def parse_seeds(seeds: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1") from None
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise UserError(f"--seeds {seeds!r}: expected distinct non-negative integers")
    return values


@command
def models() -> None:
    """List the models teacal knows: name, backend, weights, pipeline and default settings."""
    from calib.models import DEFAULT_MODEL, MODELS

    typer.echo(f"{'name':<24}{'backend':<11}{'weights':<28}{'pipeline':<28}{'steps':>6}{'cfg':>6}  size")
    for spec in MODELS.values():
        mark = " (default)" if spec.name == DEFAULT_MODEL else ""
        typer.echo(f"{spec.name:<24}{spec.backend:<11}{spec.hub_id or 'embedded':<28}{spec.pipeline:<28}{spec.steps:>6}{spec.cfg:>6g}  {spec.size[0]}x{spec.size[1]}{mark}")


@command
def record(
    out: Annotated[str, typer.Option("--out", help="Run folder to write (trace/, refs/, run.json); rerun to resume.")],
    model: Annotated[str, typer.Option(help="Model name from `teacal models`.")] = "tiny-qwen-image-edit",
    prompts: Annotated[str, typer.Option(help="Prompt set (JSONL: id, prompt, image, negative_prompt).")] = "prompts/edit.jsonl",
    model_path: Annotated[str | None, typer.Option(help="Local folder with the weights (diffusers layout); never downloads. Required with --backend lightx2v.")] = None,
    backend: Annotated[str | None, typer.Option(help="diffusers or lightx2v (default: the model's own). lightx2v needs --model-path and --lightx2v-config.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    cfg: Annotated[float | None, typer.Option(help="True-CFG scale (default: the model's).")] = None,
    size: Annotated[str | None, typer.Option(help="Output WIDTHxHEIGHT (default: the model's).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds, each run for every prompt.")] = "0",
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: record every K-th prompt from i (torchrun sets RANK/WORLD_SIZE).")] = None,
    lightx2v_config: Annotated[str | None, typer.Option(help="--backend lightx2v: LightX2V JSON config (e.g. its configs/qwen_image/qwen_image_i2i_2511.json); sweep reuses it.")] = None,
) -> None:
    """Run prompts uncached and record, per step and CFG branch, the signals' and the output's rel-L1."""
    from calib.record import RecordRequest
    from calib.record import record as run_record

    run_record(RecordRequest(model, prompts, out, steps, cfg, parse_size(size), parse_seeds(seeds), device, dtype, backend, model_path, shard, lightx2v_config),
               echo=typer.echo)


@command
def fit(
    runs: Annotated[list[str], typer.Argument(help="Run folders written by `teacal record`.")],
    out: Annotated[str, typer.Option("--out", help="Preset JSON to write, e.g. presets/my-model.json.")],
    signal: Annotated[str, typer.Option(help="auto (best held-out error), temb or modin.")] = "auto",
    degree: Annotated[int, typer.Option(help="Polynomial degree (upstream TeaCache uses 4).")] = 4,
    target: Annotated[str, typer.Option(help="What the polynomial predicts: output or residual rel-L1.")] = "output",
    branch_mode: Annotated[str, typer.Option(help="auto, per-branch or shared (one decision per step for both CFG branches).")] = "auto",
    loss: Annotated[str, typer.Option(help="linear (= np.polyfit) or a robust loss: soft_l1, huber, cauchy.")] = "linear",
    folds: Annotated[int, typer.Option(help="Cross-validation folds, grouped by prompt.")] = 5,
    ret_steps: Annotated[int, typer.Option(help="First steps always computed.")] = 1,
    cutoff_steps: Annotated[int, typer.Option(help="First step always computed again at the end; negative counts from the end.")] = -1,
    speedup: Annotated[float, typer.Option(help="The default threshold is the one simulated to reach this speedup.")] = 1.6,
) -> None:
    """Fit the rescale polynomial (np.poly1d order) with scipy and write a preset with its provenance and fit quality."""
    from calib.fit import FitRequest
    from calib.fit import fit as run_fit

    run_fit(FitRequest(tuple(runs), out, signal, degree, target, branch_mode, loss, folds, ret_steps, cutoff_steps, speedup), echo=typer.echo)


@command
def sweep(
    preset: Annotated[str, typer.Option(help="Preset JSON written by `teacal fit`.")],
    run: Annotated[str, typer.Option(help="Run folder written by `teacal record` (its prompts, seeds and reference images).")],
    thresh: Annotated[str | None, typer.Option(help="TeaCache thresholds: START:STOP[:STEP] (step 0.05 by default) or a comma list. Needed with --method teacache.")] = None,
    out: Annotated[str | None, typer.Option(help="Where sweep.parquet and its parts go (default: the run folder).")] = None,
    prompts: Annotated[str | None, typer.Option(help="Sweep only these prompts (a subset of the recorded set; default: all).")] = None,
    metrics: Annotated[str | None, typer.Option(help="Comma-separated: lpips, psnr, ssim (default: all that can run here).")] = None,
    baseline: Annotated[list[str] | None, typer.Option(help="Uncalibrated coefficients to compare: constant, identity, flux, wan21, mlx-qwen, or a JSON file. Repeatable.")] = None,
    oracle: Annotated[str, typer.Option(help="Oracle static schedules: auto (budgets of the thresholds), none, or step budgets like 8,10,12.")] = "auto",
    target_lpips: Annotated[float | None, typer.Option(help="Recommend the fastest threshold with LPIPS <= this (mean and worst prompt); saved in the preset.")] = None,
    target_psnr: Annotated[float | None, typer.Option(help="Recommend the fastest threshold with PSNR >= this (mean and worst prompt); saved in the preset.")] = None,
    model_path: Annotated[str | None, typer.Option(help="Local folder with the weights (real models; required for a lightx2v run).")] = None,
    lightx2v_config: Annotated[str | None, typer.Option(help="LightX2V JSON config for a lightx2v run (default: the one it was recorded with).")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda when present), cpu or cuda[:N].")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    method: Annotated[list[str] | None, typer.Option(help=f"Caches to measure on the same prompts, seeds and references: {', '.join(METHODS)}. Repeatable or a comma list (default: teacache). dbcache needs `pip install 'teacal\\[peers]'`.")] = None,
    fbcache_thresh: Annotated[str | None, typer.Option(help=f"FirstBlockCache thresholds, a comma list (default {GRIDS['fbcache'][0].default}).")] = None,
    magcache_thresh: Annotated[str | None, typer.Option(help=f"MagCache thresholds (default {GRIDS['magcache'][0].default}); mag_ratios are calibrated on the run's prompts, once.")] = None,
    magcache_max_skip: Annotated[str | None, typer.Option(help=f"MagCache max_skip_steps values (default {GRIDS['magcache'][1].default}).")] = None,
    magcache_retention: Annotated[str | None, typer.Option(help=f"MagCache retention_ratio values (default {GRIDS['magcache'][2].default}).")] = None,
    seacache_thresh: Annotated[str | None, typer.Option(help=f"SeaCache thresholds (default {GRIDS['seacache'][0].default}).")] = None,
    dbcache_thresh: Annotated[str | None, typer.Option(help=f"cache-dit DBCache (F1B0) residual_diff_threshold values (default {GRIDS['dbcache'][0].default}).")] = None,
) -> None:
    """Measure speed against LPIPS/PSNR/SSIM for each threshold, baseline, oracle schedule and peer cache setting."""
    from calib.peers import check_installed, parse_methods

    check_installed(parse_methods(method))  # a missing optional peer fails before the heavy imports
    from calib.metrics import METRICS
    from calib.sweep import SweepRequest
    from calib.sweep import sweep as run_sweep

    run_sweep(SweepRequest(
        preset, run, thresh, out, metrics or ",".join(METRICS), metrics is not None, tuple(baseline or ()), oracle,
        target_lpips, target_psnr, device, dtype, model_path, lightx2v_config=lightx2v_config,
        methods=tuple(method or ("teacache",)),
        peer_grids={"--fbcache-thresh": fbcache_thresh, "--magcache-thresh": magcache_thresh, "--magcache-max-skip": magcache_max_skip,
                    "--magcache-retention": magcache_retention, "--seacache-thresh": seacache_thresh, "--dbcache-thresh": dbcache_thresh},
        prompts=prompts,
    ), echo=typer.echo)


@command
def report(
    run: Annotated[str, typer.Argument(help="Run folder (record, and optionally sweep, output).")],
    preset: Annotated[str | None, typer.Option(help="Preset to draw the fit of (default: the one the sweep used).")] = None,
) -> None:
    """Write Pareto curves, the fit, per-step curves, a skip map and report.md to RUN/report/."""
    from calib.report import report as run_report
    from calib.report import require_run

    require_run(run)
    run_report(run, preset, echo=typer.echo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
