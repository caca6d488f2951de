"""The `teacal` command: thin; it parses, calls a stage and prints. Bad input exits 2 with one line."""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

# The toolkit's stack comes with `pip install 'teacal[toolkit]'`; `pip install teacal` is the runtime alone (torch, numpy).
TOOLKIT_MODULES = ("typer", "rich", "scipy", "pandas", "pyarrow", "matplotlib", "lpips", "torchmetrics", "diffusers", "safetensors",
                   "PIL", "skimage", "torchvision")


def _require_toolkit() -> None:
    from importlib.util import find_spec

    missing = [name for name in TOOLKIT_MODULES if find_spec(name) is None]
    if missing:
        print(f"error: the teacal command needs the toolkit (missing: {', '.join(missing)}); install it with "
              "pip install 'teacal[toolkit]' (this install has the runtime `teacache` alone)", file=sys.stderr)
        sys.exit(2)


_require_toolkit()

import click  # noqa: E402
import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from calib.budgets import OBJECTIVES  # noqa: E402
from calib.configs import MAX_CONFIGS, STATIC  # noqa: E402
from calib.errors import UserError  # noqa: E402
from calib.fit import TARGETS  # noqa: E402
from calib.metrics import METRICS  # noqa: E402
from calib.models import DEFAULT_MODEL, MODELS  # noqa: E402
from calib.peers import METHODS, grid_keys  # noqa: E402
from calib.regression import LOSSES  # noqa: E402
from teacache.preset import BRANCH_MODES, SIGNALS  # noqa: E402

# Choices, as `--help` shows them, from the modules that own them.
Model = Literal[tuple(MODELS)]  # type: ignore[valid-type]
Signal = Literal[("auto", *SIGNALS)]  # type: ignore[valid-type]
Target = Literal[("auto", *TARGETS)]  # type: ignore[valid-type]
BranchMode = Literal[("auto", *BRANCH_MODES)]  # type: ignore[valid-type]
Loss = Literal[LOSSES]  # type: ignore[valid-type]
Objective = Literal[("auto", *OBJECTIVES)]  # type: ignore[valid-type]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Backend = Literal["diffusers", "lightx2v"]
Metric = Enum("Metric", {name: name for name in METRICS}, type=str)  # Enums: typer lists take no Literal
Method = Enum("Method", {name: name for name in METHODS}, type=str)


class _OneLineErrors(TyperGroup):
    """Every usage error (bad choice, missing option, unparsable number) is one `error:` line and exit code 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            if not standalone_mode:
                raise
            sys.exit(130)
        except typer.TyperException as err:  # typer's own click: its usage errors (bad choice, number, missing option)
            if not standalone_mode or not hasattr(err, "format_message"):
                raise
            if type(err).__name__ == "NoArgsIsHelpError":
                err.show()
                sys.exit(0)
            click.echo(f"error: {_one_line(err)}", err=True)
            sys.exit(2)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


def _one_line(err) -> str:
    """`--flag VALUE: what is wrong`, on one line, whichever validator (click's or pydantic's) raised it."""
    message = " ".join(err.format_message().split())
    param = getattr(err, "param", None)
    flag = max(getattr(param, "opts", None) or [""], key=len) or getattr(param, "name", "") or ""
    if flag and flag not in message:
        message = f"{flag}: {message}"
    return message


app = typer.Typer(
    cls=_OneLineErrors,
    help=(
        "teacal: calibrate TeaCache for Qwen-Image(-Edit) and measure what each threshold buys.\n\n"
        "The main job is two commands: `teacal calibrate RUN --prompts CALIB` (record, probe, fit under one budget of "
        "transformer calls -> RUN/preset.json) and `teacal evaluate HELD --preset RUN/preset.json --prompts HELDOUT` (the "
        "preset against borrowed sets, static schedules and peers on prompts it never saw -> a report that leads with the "
        "threshold to use). The stages are commands too: record, probe, fit, tune, sweep, report, export. `make demo` "
        "runs the main job on the embedded tiny model."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"teacal {version('teacal')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False) -> None:
    pass


class _Command(TyperCommand):
    """Usage lines as the README writes them: `teacal record [OPTIONS] RUN` (typer braces required arguments)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)]


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

    return app.command(cls=_Command, context_settings={"max_content_width": 120})(wrapper)


def parse_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 128x128") from None
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise UserError(f"--size {size!r}: width and height must be multiples of 16, at least 16")
    return width, height


RUN_FOLDER = "Run folder written by `teacal record` (trace/, refs/, run.json)."
MODEL_PANEL, GENERATION_PANEL, DEVICE_PANEL = "Model", "Generation", "Device and scale"
CONFIG_PANEL, MEASURE_PANEL = "What to measure", "How to measure"
DEVICE_HELP = "auto (cuda when present; cuda:LOCAL_RANK under torchrun), cpu or cuda[:N]."
DTYPE_HELP = "auto: bf16 on CUDA, fp32 on CPU."
OBJECTIVE_HELP = ("What is optimised over the calibration prompts: their mean, the worst prompt, or the mean of the worst fifth (cvar); "
                  "auto: the one that does best on folds of the calibration prompts, mean and worst prompt alike.")
LORA_HELP = "A distilled model's Lightning LoRA, its local .safetensors file (see `teacal models`); later stages reuse the recorded one."


@command
def models() -> None:
    """List the models teacal knows: name, backend, weights, pipeline and default settings."""
    typer.echo(f"{'name':<24}{'backend':<11}{'weights':<28}{'pipeline':<28}{'steps':>6}{'cfg':>6}  size")
    for spec in MODELS.values():
        mark = " (default)" if spec.name == DEFAULT_MODEL else ""
        typer.echo(f"{spec.name:<24}{spec.backend:<11}{(spec.hub_id or 'embedded') + (' + LoRA' if spec.lora else ''):<28}{spec.pipeline:<28}{spec.steps:>6}{spec.cfg:>6g}  {spec.size[0]}x{spec.size[1]}{mark}")


@command
def calibrate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Calibration folder: the recording, probes and RUN/preset.json; rerun the same command to resume.")],
    prompts: Annotated[Path | None, typer.Option(help="Calibration prompt set (JSONL: id, prompt, image, negative_prompt). Default: the model's, in the repository's prompts/.", rich_help_panel=GENERATION_PANEL)] = None,
    model: Annotated[Model, typer.Option(help="Model from `teacal models`.", rich_help_panel=MODEL_PANEL)] = DEFAULT_MODEL,
    steps: Annotated[list[int] | None, typer.Option(help="Step counts the preset serves; repeatable (default: the model's).", rich_help_panel=GENERATION_PANEL)] = None,
    cfg: Annotated[float | None, typer.Option(help="True-CFG scale, >= 1 (default: the model's).", rich_help_panel=GENERATION_PANEL)] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT (default: the model's).", rich_help_panel=GENERATION_PANEL)] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Seeds; repeatable (default: 0).", rich_help_panel=GENERATION_PANEL)] = None,
    budget: Annotated[int | None, typer.Option(min=1, help="Transformer calls to spend (default 10,000): it chooses how much to probe, and whether to tune.")] = None,
    hours: Annotated[float | None, typer.Option(help="Or a budget in hours, at the time per call measured while recording.")] = None,
    tune_rounds: Annotated[int, typer.Option(min=0, help="Tune's search rounds at most, when the budget reaches tune.")] = 150,
    objective: Annotated[Objective, typer.Option(help=OBJECTIVE_HELP)] = "auto",
    out: Annotated[Path | None, typer.Option(help="The preset to write (default: RUN/preset.json).")] = None,
    backend: Annotated[Backend | None, typer.Option(help="Default: the model's own.", rich_help_panel=MODEL_PANEL)] = None,
    model_path: Annotated[Path | None, typer.Option(help="Local folder with the weights; never downloads.", rich_help_panel=MODEL_PANEL)] = None,
    lightx2v_config: Annotated[Path | None, typer.Option(help="--backend lightx2v: its JSON config.", rich_help_panel=MODEL_PANEL)] = None,
    lora_path: Annotated[Path | None, typer.Option(help=LORA_HELP, rich_help_panel=MODEL_PANEL)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help=DTYPE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: this process's share of record, probe, the calibration sweeps and tune (torchrun sets RANK/WORLD_SIZE); rank 0 fits.", rich_help_panel=DEVICE_PANEL)] = None,
) -> None:
    """Calibrate a preset end to end under one budget of transformer calls: record, probe, fit (and tune, when the budget reaches it). Prints its plan first."""
    from calib.calibrate import CalibrateRequest
    from calib.calibrate import calibrate as run_calibrate

    run_calibrate(CalibrateRequest(
        run=run, prompts=prompts, model=model, steps=tuple(steps or ()), cfg=cfg, size=parse_size(size) if size else None, seeds=tuple(seed or (0,)),
        budget=budget, hours=hours, tune_rounds=tune_rounds, objective=objective, out=out, device=device, dtype=dtype, backend=backend, model_path=model_path,
        lightx2v_config=lightx2v_config, lora_path=lora_path, shard=shard,
    ), echo=typer.echo)


@command
def evaluate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Held-out folder: the recording, and sweep-<steps>/ with its report per step count.")],
    preset: Annotated[Path, typer.Option(help="Preset JSON written by `teacal calibrate` (or fit, tune).")],
    prompts: Annotated[Path, typer.Option(help="Held-out prompt set: none of its prompts may have calibrated the preset.")],
    steps: Annotated[list[int] | None, typer.Option(help="Step counts to measure; repeatable (default: the preset's calibrated ones).")] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Seeds; repeatable (default: 0).")] = None,
    baseline: Annotated[list[str] | None, typer.Option(help="Borrowed sets and static schedules to measure beside it (default: constant, identity, flux, wan21, mlx-qwen, uniform, lemica).")] = None,
    method: Annotated[list[Method] | None, typer.Option(help="Caches to measure (default: teacache, fbcache, magcache).")] = None,
    target_psnr: Annotated[float | None, typer.Option(min=0.0, help="The report also names the fewest calls keeping every prompt at this PSNR.")] = None,
    plain_reuse: Annotated[bool, typer.Option("--plain-reuse/--no-plain-reuse", help="Also measure a forecasting preset's polynomial with plain reuse (what its forecast gains).")] = True,
    oracle: Annotated[bool, typer.Option("--oracle/--no-oracle", help="Also measure the calibration's best static schedules (how far the preset's front is from them).")] = True,
    model_path: Annotated[Path | None, typer.Option(help="Local folder with the weights (real models).", rich_help_panel=DEVICE_PANEL)] = None,
    lightx2v_config: Annotated[Path | None, typer.Option(help="--backend lightx2v: its JSON config.", rich_help_panel=DEVICE_PANEL)] = None,
    lora_path: Annotated[Path | None, typer.Option(help=LORA_HELP, rich_help_panel=DEVICE_PANEL)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help=DTYPE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: this process's share (torchrun sets RANK/WORLD_SIZE).", rich_help_panel=DEVICE_PANEL)] = None,
) -> None:
    """Measure a preset on held-out prompts against borrowed sets, static schedules and peers; write the report, which leads with the threshold to use."""
    from calib.calibrate import EVALUATE_BASELINES, EVALUATE_METHODS, EvaluateRequest
    from calib.calibrate import evaluate as run_evaluate

    run_evaluate(EvaluateRequest(
        run=run, preset=preset, prompts=prompts, steps=tuple(steps or ()), seeds=tuple(seed or (0,)),
        baselines=tuple(baseline) if baseline else EVALUATE_BASELINES, methods=tuple(dict.fromkeys(m.value for m in method)) if method else EVALUATE_METHODS,
        target_psnr=target_psnr, plain_reuse=plain_reuse, oracle=oracle, device=device, dtype=dtype, model_path=model_path, lightx2v_config=lightx2v_config, lora_path=lora_path, shard=shard,
    ), echo=typer.echo)


@command
def record(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder to write (trace/, refs/, run.json); rerun the same command to resume.")],
    model: Annotated[Model, typer.Option(help="Model from `teacal models`.", rich_help_panel=MODEL_PANEL)] = DEFAULT_MODEL,
    backend: Annotated[Backend | None, typer.Option(help="Default: the model's own. lightx2v needs --model-path and --lightx2v-config.", rich_help_panel=MODEL_PANEL)] = None,
    model_path: Annotated[Path | None, typer.Option(help="Local folder with the weights (diffusers layout); never downloads. Required with --backend lightx2v.", rich_help_panel=MODEL_PANEL)] = None,
    lightx2v_config: Annotated[Path | None, typer.Option(help="--backend lightx2v: LightX2V JSON config (e.g. its configs/qwen_image/qwen_image_i2i_2511.json); sweep reuses it.", rich_help_panel=MODEL_PANEL)] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt set (JSONL: id, prompt, image, negative_prompt). Default: the model's calibration set in the repository's prompts/.", rich_help_panel=GENERATION_PANEL)] = None,
    steps: Annotated[list[int] | None, typer.Option(help="Denoising steps; repeat to record several step counts (default: the model's).", rich_help_panel=GENERATION_PANEL)] = None,
    cfg: Annotated[float | None, typer.Option(help="True-CFG scale, >= 1 (default: the model's).", rich_help_panel=GENERATION_PANEL)] = None,
    size: Annotated[str | None, typer.Option(help="Output WIDTHxHEIGHT (default: the model's).", rich_help_panel=GENERATION_PANEL)] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Seed, each run for every prompt; repeat for several (default: 0).", rich_help_panel=GENERATION_PANEL)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help=DTYPE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: record every K-th prompt from i (torchrun sets RANK/WORLD_SIZE).", rich_help_panel=DEVICE_PANEL)] = None,
    max_gap: Annotated[int, typer.Option(min=1, max=64, help="Reuse errors are recorded for skips of up to this many steps.", rich_help_panel=GENERATION_PANEL)] = 16,
    lora_path: Annotated[Path | None, typer.Option(help=LORA_HELP, rich_help_panel=MODEL_PANEL)] = None,
) -> None:
    """Run prompts uncached and record, per step and CFG branch, the signals' and the output's rel-L1."""
    from calib.record import RecordRequest
    from calib.record import record as run_record

    run_record(RecordRequest(
        model=model, prompts=prompts, out=run, steps=tuple(steps or ()), cfg=cfg, size=parse_size(size) if size else None,
        seeds=tuple(seed or (0,)), device=device, dtype=dtype, backend=backend, model_path=model_path, shard=shard,
        lightx2v_config=lightx2v_config, max_gap=max_gap, lora_path=lora_path,
    ), echo=typer.echo)


@command
def probe(
    run: Annotated[Path, typer.Argument(metavar="RUN", help=RUN_FOLDER + " Probes go in its probes/ and probes.parquet.")],
    prompts: Annotated[int, typer.Option(min=1, help="How many of the run's prompts to probe (spread over how far each moves, whatever their order in the file; first seed, every step count).")] = 4,
    window: Annotated[list[int] | None, typer.Option(help="Window lengths to skip; repeat for several (default: 1, 4 and 8). Single steps give the sensitivity, longer windows the compounding.")] = None,
    steps: Annotated[list[int] | None, typer.Option(help="Which recorded step counts to probe; repeatable (default: all). Fit maps the sensitivity to the others by sigma.")] = None,
    stride: Annotated[int, typer.Option(min=1, help="Single steps: probe every STRIDE-th (fit interpolates between them).")] = 1,
    forecast: Annotated[bool, typer.Option("--forecast", help="Also measure the reuse rule (linear forecasts of several dampings on evenly spaced schedules), for a calibrated forecast.")] = False,
    model_path: Annotated[Path | None, typer.Option(help="Local folder with the weights (real models).", rich_help_panel=DEVICE_PANEL)] = None,
    lightx2v_config: Annotated[Path | None, typer.Option(help="LightX2V JSON config (default: the recorded one).", rich_help_panel=DEVICE_PANEL)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help=DTYPE_HELP + " Must be the recording's.", rich_help_panel=DEVICE_PANEL)] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: run every K-th probe from i (torchrun sets RANK/WORLD_SIZE).", rich_help_panel=DEVICE_PANEL)] = None,
) -> None:
    """Measure what skipping a window of steps costs the final image, for the cost model `teacal fit` uses."""
    from calib.probe import ProbeRequest
    from calib.probe import probe as run_probe

    run_probe(ProbeRequest(run=run, prompts=prompts, windows=tuple(window or (1, 4, 8)), device=device, dtype=dtype, model_path=model_path,
                           lightx2v_config=lightx2v_config, shard=shard, forecast=forecast, steps=tuple(steps or ()), stride=stride), echo=typer.echo)


@command
def fit(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run folders written by `teacal record` (one model and setting).")],
    out: Annotated[Path, typer.Option("--out", help="Preset JSON to write, e.g. presets/my-model.json.")],
    signal: Annotated[Signal, typer.Option(help="auto: each signal's best cross-validated candidate (temb and sigma after the simulated shape search), the one whose simulated front is closest to the oracle.")] = "auto",
    degree: Annotated[int, typer.Option(min=1, max=8, help="Polynomial degree (upstream TeaCache uses 4).")] = 4,
    target: Annotated[Target, typer.Option(help="Which reuse error the cost model weighs: the block residual's (what a skip substitutes) or the output's; auto tries both.")] = "auto",
    branch_mode: Annotated[BranchMode, typer.Option(help="shared: one decision per step for both CFG branches; auto picks it when the signal is the same in both.")] = "auto",
    loss: Annotated[Loss, typer.Option(help="linear (= np.polyfit) or a robust loss.")] = "linear",
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds, grouped by prompt.")] = 5,
    ret_steps: Annotated[int, typer.Option(min=0, help="First steps always computed.")] = 1,
    cutoff_steps: Annotated[int | None, typer.Option(help="First step always computed again at the end; negative counts from the end. Default: the last step (-1), unless the probes of a model of 8 steps or fewer measure the last step as the cheapest to skip.")] = None,
    speedup: Annotated[float, typer.Option(min=1.0, help="The default threshold is the one simulated to reach this speedup.")] = 1.6,
    partial: Annotated[bool, typer.Option("--partial", help="Fit an unfinished recording anyway (it says how much is missing).")] = False,
    oracle_from: Annotated[list[Path] | None, typer.Option(help="A sweep (--out folder) of these runs: the oracle becomes the best static schedule it measured per budget, the cost model's among them. Repeatable.")] = None,
    objective: Annotated[Objective, typer.Option(help=OBJECTIVE_HELP)] = "auto",
    adapt: Annotated[float, typer.Option(min=0.0, help="Strength of the per-prompt ratio (teacache.policy): each step's estimate scaled by the prompt's own pace, "
                                         "observed on the calls it computed, relative to the calibration prompts' (clipped to 1/2..2), to this power. 0: off "
                                         "(the default; docs/eval/README.md says where it helps).")] = 0.0,
) -> None:
    """Fit the rescale polynomial (np.poly1d order) to what skips cost, with scipy; write a preset with its provenance, domain and fit quality."""
    from calib.fit import FitRequest
    from calib.fit import fit as run_fit

    run_fit(FitRequest(runs=tuple(runs), out=out, signal=signal, degree=degree, target=target, branch_mode=branch_mode, loss=loss, folds=folds,
                       ret_steps=ret_steps, cutoff_steps=cutoff_steps, speedup=speedup, partial=partial, oracle_from=tuple(oracle_from or ()),
                       objective=objective, adapt=adapt), echo=typer.echo)


@command
def tune(
    run: Annotated[Path, typer.Argument(metavar="RUN", help=RUN_FOLDER + " The calibration run: its prompts are what is generated and measured.")],
    preset: Annotated[Path, typer.Option(help="Preset JSON written by `teacal fit` on this run (signal temb).")],
    against: Annotated[list[Path], typer.Option(help="A sweep (--out folder) of this run with the methods to match (borrowed sets, uniform, peers). Repeatable: one per step count.")],
    out: Annotated[Path, typer.Option("--out", help="Preset JSON to write (never the input preset).")],
    rounds: Annotated[int, typer.Option(min=0, help="Search rounds; each measures only the schedules not measured before.")] = 150,
    forecast: Annotated[bool, typer.Option("--forecast/--no-forecast", help="Also choose the reuse rule (plain reuse, constant dampings, the probe-fitted rule, dampings per reach measured on the tuned schedules) by generating.")] = True,
    model_path: Annotated[Path | None, typer.Option(help="Local folder with the weights (real models).", rich_help_panel=DEVICE_PANEL)] = None,
    lightx2v_config: Annotated[Path | None, typer.Option(help="LightX2V JSON config (default: the recorded one).", rich_help_panel=DEVICE_PANEL)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help=DTYPE_HELP + " Must be the recording's.", rich_help_panel=DEVICE_PANEL)] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: generate every K-th (prompt, seed) of each schedule; every shard runs the same search, rank 0 writes --out (torchrun sets RANK/WORLD_SIZE).", rich_help_panel=DEVICE_PANEL)] = None,
) -> None:
    """Refine the fitted polynomial by generating its schedules on the calibration prompts: keep the one whose measured front best matches every other method's."""
    from calib.tune import TuneRequest
    from calib.tune import tune as run_tune

    run_tune(TuneRequest(run=run, preset=preset, against=tuple(against), out=out, rounds=rounds, forecast=forecast, device=device, dtype=dtype,
                         model_path=model_path, lightx2v_config=lightx2v_config, shard=shard), echo=typer.echo)


@command
def sweep(
    run: Annotated[Path, typer.Argument(metavar="RUN", help=RUN_FOLDER + " Its prompts, seeds and references are what is measured against.")],
    preset: Annotated[Path, typer.Option(help="Preset JSON written by `teacal fit`.", rich_help_panel=CONFIG_PANEL)],
    thresh: Annotated[str, typer.Option(help="TeaCache's and the borrowed sets' thresholds: auto (each its own, one per budget from 15% to 80% of the calls), START:STOP[:STEP] or a comma list.", rich_help_panel=CONFIG_PANEL)] = "auto",
    baseline: Annotated[list[str] | None, typer.Option(help=f"Borrowed coefficients (constant, identity, flux, wan21, mlx-qwen, or a JSON file) or a static schedule ({', '.join(STATIC)}: LeMiCa's published three, mapped by sigma at other than 50 steps). Repeatable.", rich_help_panel=CONFIG_PANEL)] = None,
    method: Annotated[list[Method] | None, typer.Option(help="Caches to measure (default: teacache). Repeatable; dbcache needs teacal[peers].", rich_help_panel=CONFIG_PANEL)] = None,
    peer_grid: Annotated[list[str] | None, typer.Option(help="A peer's grid, METHOD.PARAM=V1,V2; repeatable. Defaults: " + "; ".join(grid_keys()) + ".", rich_help_panel=CONFIG_PANEL)] = None,
    forecast: Annotated[list[str] | None, typer.Option(help="TeaCache's reuse rules, one front each: preset (its own), none, calibrated, linear:ALPHA[:sigma].", rich_help_panel=CONFIG_PANEL)] = None,
    oracle: Annotated[str, typer.Option(help="The preset's oracle schedules: auto, none, or budgets in computed calls of the total, e.g. 16,20,24.", rich_help_panel=CONFIG_PANEL)] = "auto",
    steps: Annotated[int | None, typer.Option(help="Which recorded step count (when the run holds several).", rich_help_panel=CONFIG_PANEL)] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for sweep.parquet and its parts (default: the run folder). A second sweep there adds to its table.", rich_help_panel=MEASURE_PANEL)] = None,
    prompts: Annotated[Path | None, typer.Option(help="Sweep only these prompts (a subset of the recorded set).", rich_help_panel=MEASURE_PANEL)] = None,
    metrics: Annotated[list[Metric] | None, typer.Option(help="Repeatable (default: all that can run here).", rich_help_panel=MEASURE_PANEL)] = None,
    target_psnr: Annotated[float | None, typer.Option(min=0.0, help="Recommend the fewest computed calls with PSNR >= this, mean and worst prompt.", rich_help_panel=MEASURE_PANEL)] = None,
    target_lpips: Annotated[float | None, typer.Option(min=0.0, help="... or with LPIPS <= this.", rich_help_panel=MEASURE_PANEL)] = None,
    save_preset: Annotated[Path | None, typer.Option(help="Where the recommended preset goes (default: OUT/recommended-preset.json).", rich_help_panel=MEASURE_PANEL)] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Time each generation this many times, rotated; the fastest counts.", rich_help_panel=MEASURE_PANEL)] = 1,
    remake_references: Annotated[bool, typer.Option("--remake-references", help="Measure against this sweep's own uncached images (another dtype or device).", rich_help_panel=MEASURE_PANEL)] = False,
    yes: Annotated[bool, typer.Option("--yes", help=f"Run more than {MAX_CONFIGS} configurations.", rich_help_panel=MEASURE_PANEL)] = False,
    model_path: Annotated[Path | None, typer.Option(help="Local folder with the weights (real models).", rich_help_panel=DEVICE_PANEL)] = None,
    lightx2v_config: Annotated[Path | None, typer.Option(help="LightX2V JSON config (default: the recorded one).", rich_help_panel=DEVICE_PANEL)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=DEVICE_PANEL)] = "auto",
    dtype: Annotated[Dtype, typer.Option(help=DTYPE_HELP + " The recording's, or --remake-references.", rich_help_panel=DEVICE_PANEL)] = "auto",
    shard: Annotated[str | None, typer.Option(help="i/K: every K-th (prompt, seed) (torchrun sets RANK/WORLD_SIZE).", rich_help_panel=DEVICE_PANEL)] = None,
) -> None:
    """Measure speed against LPIPS/PSNR/SSIM for each threshold, borrowed set, static schedule and peer cache setting."""
    from calib.peers import check_installed

    methods = tuple(dict.fromkeys(m.value for m in method or ())) or ("teacache",)
    check_installed(methods)  # a missing optional peer fails before the heavy imports
    from calib.sweep import SweepRequest
    from calib.sweep import sweep as run_sweep

    run_sweep(SweepRequest(
        preset=preset, run=run, thresholds=thresh, out=out, metrics=tuple(dict.fromkeys(m.value for m in metrics or ())) or METRICS, metrics_explicit=metrics is not None,
        baselines=tuple(baseline or ()), oracle=oracle, target_lpips=target_lpips, target_psnr=target_psnr, save_preset=save_preset,
        device=device, dtype=dtype, model_path=model_path, lightx2v_config=lightx2v_config, methods=methods, peer_grids=tuple(peer_grid or ()),
        prompts=prompts, forecasts=tuple(forecast or ("preset",)), steps=steps, remake_references=remake_references, repeats=repeats,
        shard=shard, yes=yes,
    ), echo=typer.echo)


@command
def report(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder (record output), or a sweep's --out folder.")],
    preset: Annotated[Path | None, typer.Option(help="Preset to draw the fit of (default: the one the sweep used).")] = None,
) -> None:
    """Write Pareto curves, the fit, per-step curves, a skip map and report.md to RUN/report/."""
    from calib.report import report as run_report
    from calib.report import require_run

    require_run(run)
    run_report(run, preset, echo=typer.echo)


@command
def export(
    preset: Annotated[Path, typer.Argument(metavar="PRESET", help="Preset JSON written by `teacal fit`.")],
    out: Annotated[Path, typer.Option("--out", help="LightX2V JSON config to write.")],
    base: Annotated[Path | None, typer.Option(help="LightX2V config to extend, e.g. its configs/qwen_image/qwen_image_i2i_2511.json (default: the TeaCache keys alone).")] = None,
    threshold: Annotated[float | None, typer.Option(min=0.0, help="TeaCache threshold (default: the preset's).")] = None,
) -> None:
    """Write a LightX2V config that runs the preset: "feature_caching": "Tea", coefficients and the teacache_* keys."""
    from calib.export import export_lightx2v

    config = export_lightx2v(preset, out, base, threshold)
    typer.echo(f"{out}: LightX2V config, feature_caching Tea, signal {config['teacache_signal']}, threshold {config['teacache_thresh']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
