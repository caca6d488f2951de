"""`teacal calibrate RUN --prompts P`: the whole calibration under one budget of transformer calls, its plan printed first.

The stages are the stage commands' own code, resumable and sharded as they are:

    record   every calibration prompt, uncached: the trace (always; its calls are the floor of any budget)
    probe    what skipping single steps (and windows) costs the final image, on a few prompts
    fit      the preset: the rescale polynomial fitted to the probed cost model
    tune     sweeps of the calibration prompts, the measured oracle, then the polynomial refined by generating

The budget (`--budget` calls; or `--hours`, converted through the per-call time measured while recording) chooses the
last rung of `LADDER` that fits (listed from least to most useful; at many steps a later rung may cost less). On the
tiny model's held-out prompts (docs/eval/README.md, "What calibration costs") what the full calibration gains over
record + fit comes from the window probes and the forecast probes, at one step count (fit maps them to the others by
sigma); the sweeps and tune, about 90% of the full cost, change little there, and on the scenes model's they lose
(tune fits the calibration prompts: 0.6 to 3.4 dB below the default at 26 of 28 budgets). A probe calls the transformer
only at the steps it computes, and the plan counts those calls (`calib.probe.unit_calls`). At 20 and 40 steps the
default budget buys both on 4 prompts (4,568 calls for 12 prompts with CFG); at 40 or 50 steps on 4 prompts, every
5th step (6,976; 9,520). Which prompts are probed follows from the recording, not the file's order
(`calib.probe.probed_prompts`; docs/eval/README.md, "Which prompts are probed").

Files, in RUN: the record's (run.json, trace/, refs/, ...), the probes', calibrate.json (the plan: its resume key),
preset.json (the result); with tune, calib-sweep-<steps>/ and fitted-preset.json as well.

Under torchrun (or `--shard i/K`) every rank records, probes, sweeps and tunes its share of the prompts and waits for the
others at the end of each stage; rank 0 fits (and writes the presets), the others wait for its files. Tune's search is
sequential, but each schedule it measures is a generation per prompt: every rank runs the same search and generates
its share of each schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from calib.budgets import budget_steps
from calib.errors import UserError
from calib.probe import ProbeRequest, unit_calls
from calib.record import RecordRequest, check_request
from calib.runfiles import SWEEP_TABLE, check_same_settings, load_run, missing_units, resolve_shard, wait_for, write_json

CALIBRATE_FILE = "calibrate.json"
DEFAULT_BUDGET = 10_000  # calls: about TeaCache's own 70-prompt calibration of a 50-step CFG model
TUNE_BASELINES = ("constant", "identity", "wan21", "flux", "mlx-qwen", "uniform", "lemica")  # what tune must match


@dataclass(frozen=True)
class Rung:
    """One level of measurement: the probes it runs (none: fit on the trace alone) and whether it tunes."""

    name: str
    probe_prompts: int = 0
    stride: int = 1
    windows: tuple[int, ...] = ()
    all_step_counts: bool = False  # probe every recorded step count (else the smallest; fit maps it by sigma)
    forecast: bool = False  # forecast probes: a fitted reuse rule
    tune: bool = False


LADDER = (
    Rung("record + fit"),
    Rung("+ probes: 2 prompts, every 2nd step", 2, 2, (1,)),
    Rung("+ probes: 4 prompts, every 2nd step", 4, 2, (1,)),
    Rung("+ probes: 4 prompts, every step, windows of 4", 4, 1, (1, 4)),
    Rung("+ probes: 2 prompts, every 5th step, forecasts", 2, 5, (1,), False, True),
    Rung("+ probes: 4 prompts, every 5th step, forecasts", 4, 5, (1,), False, True),  # the default at 40 and 50 steps
    Rung("+ probes: 4 prompts, every 2nd step, forecasts", 4, 2, (1,), False, True),  # the tiny model's: the full calibration at 30 of 35 budgets
    Rung("+ probes: 4 prompts, every step count, windows of 1/4/8, forecasts", 4, 1, (1, 4, 8), True, True),
    Rung("+ calibration sweeps and tune", 4, 1, (1, 4, 8), True, True, tune=True),
)


@dataclass(frozen=True)
class CalibrateRequest:
    run: Path
    prompts: Path | None = None
    model: str = "tiny-qwen-image-edit"
    steps: tuple[int, ...] = ()
    cfg: float | None = None
    size: tuple[int, int] | None = None
    seeds: tuple[int, ...] = (0,)
    budget: int | None = None  # calls; None: DEFAULT_BUDGET, unless hours
    hours: float | None = None
    tune_rounds: int = 150  # at most; fewer when the budget ends first
    objective: str = "auto"  # what fit and tune optimise over the prompts (calib.budgets.OBJECTIVES; auto: fit chooses by folds)
    out: Path | None = None  # the preset (default RUN/preset.json)
    device: str = "auto"
    dtype: str = "auto"
    backend: str | None = None
    model_path: Path | None = None
    lightx2v_config: Path | None = None
    lora_path: Path | None = None
    shard: str | None = None


@dataclass
class Plan:
    """What each rung costs on this recording, in calls, and the rung the budget buys."""

    branches: int
    steps: tuple[int, ...]
    units: int  # recorded generations per step count
    record_calls: int
    costs: list[int] = field(default_factory=list)  # per rung of LADDER, the whole calibration
    chosen: int = 0

    @property
    def rung(self) -> Rung:
        return LADDER[self.chosen]


def probe_plan(rung: Rung, steps: tuple[int, ...], branches: int) -> tuple[tuple[int, ...], int]:
    """The step counts the rung probes, and the transformer calls per probed prompt (its uncached checks included)."""
    probed = steps if rung.all_step_counts else steps[:1]
    return probed, sum(unit_calls(n, rung.windows, rung.stride, rung.forecast, branches) for n in probed)


# A sweep or tune generation skips calls too: the scenes model's full calibration (12 prompts, 50 steps, CFG) made
# 370,668 calls in its sweeps and tune, 71% of their 518,640 steps x branches (counted from its files, 2026-12-07).
SWEEP_COMPUTED_SHARE = 0.71


def tune_calls(plan: Plan, rounds: int) -> int:
    """An estimate, from the tiny model's make eval (12 prompts, 20 and 40 steps: 3,108 sweep generations, 7.4 per
    compared budget and prompt; 2,688 tune generations in 150 rounds, 1.5 new schedules a round per prompt), each
    generation calling the transformer at SWEEP_COMPUTED_SHARE of its steps."""
    per_generation = {n: n * plan.branches * SWEEP_COMPUTED_SHARE for n in plan.steps}
    budgets = {n: len(budget_steps(n)) for n in plan.steps}
    sweeps = sum(7.4 * budgets[n] * plan.units * per_generation[n] for n in plan.steps)
    return round(sweeps + rounds * 1.5 * plan.units * sum(per_generation.values()) / len(per_generation))


def make_plan(request: CalibrateRequest, steps: tuple[int, ...], cfg: float, units: int, budget: int) -> Plan:
    branches = 2 if cfg > 1 else 1
    plan = Plan(branches, steps, units, units * sum(steps) * branches)
    for rung in LADDER:
        probes = min(rung.probe_prompts, units) * probe_plan(rung, steps, branches)[1] if rung.windows else 0
        plan.costs.append(plan.record_calls + probes + (tune_calls(plan, request.tune_rounds) if rung.tune else 0))
    within = [i for i, cost in enumerate(plan.costs) if cost <= budget]
    plan.chosen = within[-1] if within else 0
    return plan


def print_plan(plan: Plan, budget: int, seconds_per_call: float | None, echo=print) -> None:
    echo(f"plan: a budget of {budget:,} transformer calls; recording alone costs {plan.record_calls:,} "
         f"({plan.units} generations per step count {', '.join(map(str, plan.steps))}, {plan.branches} call(s) a step)")
    for i, (rung, cost) in enumerate(zip(LADDER, plan.costs, strict=True)):
        mark = "->" if i == plan.chosen else "  "
        when = f", about {cost * seconds_per_call / 3600:.2f} h here" if seconds_per_call else ""
        echo(f"  {mark} {rung.name:<68}{cost:>12,} calls{' (estimated)' if rung.tune else ''}{when}")
    if plan.costs[plan.chosen] > budget:
        echo(f"note: the budget is below what recording alone costs; recording and fit run anyway ({plan.costs[0]:,} calls)")
    forecast = next((i for i, rung in enumerate(LADDER) if rung.forecast), None)
    if forecast is not None and not LADDER[plan.chosen].forecast:
        # on the scenes model at 50 steps the forecast probes turned a loss into a 5-9 dB win (docs/eval/README.md)
        echo(f"note: --budget {plan.costs[forecast]} would buy the forecast probes, which gained most on held-out prompts")


def calibrate(request: CalibrateRequest, echo=print) -> Path:
    from calib.fit import FitRequest, fit
    from calib.probe import probe
    from calib.record import record

    if request.budget is not None and request.hours is not None:
        raise UserError("give --budget or --hours, not both")
    if request.budget is not None and request.budget < 1:
        raise UserError(f"--budget {request.budget}: expected a number of transformer calls >= 1")
    if request.hours is not None and not (math.isfinite(request.hours) and request.hours > 0):
        raise UserError(f"--hours {request.hours}: expected a positive number")
    if request.tune_rounds < 0:
        raise UserError(f"--tune-rounds {request.tune_rounds}: expected 0 or more")
    run = Path(request.run)
    out = Path(request.out) if request.out is not None else run / "preset.json"
    record_request = RecordRequest(out=run, model=request.model, prompts=request.prompts, steps=request.steps, cfg=request.cfg, size=request.size,
                                   seeds=request.seeds, device=request.device, dtype=request.dtype, backend=request.backend,
                                   model_path=request.model_path, shard=request.shard, lightx2v_config=request.lightx2v_config,
                                   lora_path=request.lora_path)
    _, _, prompts, steps, cfg = check_request(record_request)
    units = len(prompts) * len(request.seeds)
    budget = request.budget if request.budget is not None else DEFAULT_BUDGET
    plan = make_plan(request, steps, cfg, units, budget if request.hours is None else 0)
    if request.hours is None:
        print_plan(plan, budget, None, echo)
    else:
        echo(f"plan: --hours {request.hours:g}; recording costs {plan.record_calls:,} calls and comes first; the budget in calls follows from its time per call")
    record(record_request, echo=echo)
    wait_for(lambda: not missing_units(run, load_run(run)), "the recording", echo)
    seconds_per_call = _seconds_per_call(run)
    if request.hours is not None:
        budget = int(request.hours * 3600 / seconds_per_call)
        plan = make_plan(request, steps, cfg, units, budget)
        print_plan(plan, budget, seconds_per_call, echo)
    else:
        echo(f"time: {seconds_per_call * 1000:.1f} ms per call while recording; the plan takes about {plan.costs[plan.chosen] * seconds_per_call / 3600:.2f} h here")
    rung = plan.rung
    settings = {"rung": asdict(rung), "record": load_run(run)["settings"], "tune_rounds": request.tune_rounds, "objective": request.objective}
    check_same_settings(run / CALIBRATE_FILE, settings, "calibration", flag="another run folder, or the budget it was planned with")
    write_json(run / CALIBRATE_FILE, {"kind": "calibrate", "settings": settings, "budget": budget, "costs": plan.costs})
    if rung.windows:
        probed, _ = probe_plan(rung, steps, plan.branches)
        probe_request = ProbeRequest(run=run, prompts=min(rung.probe_prompts, len(prompts)), windows=rung.windows, device=request.device,
                                     dtype=request.dtype, model_path=request.model_path, lightx2v_config=request.lightx2v_config,
                                     shard=request.shard, forecast=rung.forecast, steps=probed, stride=rung.stride)
        probe(probe_request, echo=echo)
        parts = _probe_parts(run, probe_request)
        wait_for(lambda: all(part.exists() for part in parts), "the probes", echo)
    first = resolve_shard(request.shard)[0] == 0
    if not rung.tune:
        if first:
            fit(FitRequest(runs=(run,), out=out, objective=request.objective), echo=echo)
    else:
        _tune_stages(request, run, out, plan, budget, first, echo)
    if not first:
        wait_for(out.exists, f"rank 0's preset {out}", echo)
        return out
    echo(f"calibrated: {out} ({rung.name}; {plan.costs[plan.chosen]:,} calls planned). Measure it on held-out prompts: "
         f"teacal evaluate HELD --preset {out} --prompts HELDOUT.jsonl")
    return out


def _tune_stages(request: CalibrateRequest, run: Path, out: Path, plan: Plan, budget: int, first: bool, echo=print) -> None:
    """fit; sweeps of the calibration prompts (the fitted preset's schedules beside what tune must match); fit again
    with the measured oracle; tune, its rounds sized to the budget left. Every shard sweeps and tunes its share of
    the prompts; rank 0 fits, the others wait for its presets."""
    from calib.fit import FitRequest, fit
    from calib.sweep import SweepRequest, sweep
    from calib.tune import TuneRequest, tune

    fitted, first_preset = run / "fitted-preset.json", run / "first-preset.json"
    if first:
        fit(FitRequest(runs=(run,), out=first_preset, objective=request.objective), echo=echo)
    wait_for(first_preset.exists, f"rank 0's first fit {first_preset}", echo)
    sweeps = []
    for steps in plan.steps:
        folder = run / f"calib-sweep-{steps}"
        sweep(SweepRequest(run=run, preset=first_preset, out=folder, baselines=TUNE_BASELINES, forecasts=("none",), steps=steps,
                           metrics=("psnr",), device=request.device, dtype=request.dtype, model_path=request.model_path,
                           lightx2v_config=request.lightx2v_config, shard=request.shard, yes=True), echo=echo)
        sweeps.append(folder)
    for folder in sweeps:
        wait_for((folder / SWEEP_TABLE).exists, f"the calibration sweep {folder}", echo)
    if first:
        fit(FitRequest(runs=(run,), out=fitted, oracle_from=tuple(sweeps), objective=request.objective), echo=echo)
    wait_for(fitted.exists, f"rank 0's fit with the measured oracle {fitted}", echo)
    rounds = request.tune_rounds
    while rounds > 0 and plan.record_calls + tune_calls(plan, rounds) > budget:
        rounds -= 10
    echo(f"tune: {max(rounds, 0)} rounds fit the budget")
    tune(TuneRequest(run=run, preset=fitted, against=tuple(sweeps), out=out, rounds=max(rounds, 0), device=request.device, dtype=request.dtype,
                     model_path=request.model_path, lightx2v_config=request.lightx2v_config, shard=request.shard), echo=echo)


def _probe_parts(run: Path, request: ProbeRequest) -> list[Path]:
    """The files every shard's probes write, all of which fit needs."""
    from calib.backends import open_recording
    from calib.probe import plan

    recording = open_recording(run, request.model_path, request.lightx2v_config, request.device, request.dtype, what="probe")
    return [run / "probes" / p.part for p in plan(recording, request)]


def _seconds_per_call(run: Path) -> float:
    from calib.runfiles import load_trace

    seconds = load_trace(run)["seconds"].astype(float)
    return float(seconds.median()) or 1e-3


# -- evaluate ---------------------------------------------------------------------------------------------------
EVALUATE_BASELINES = ("constant", "identity", "flux", "wan21", "mlx-qwen", "uniform", "lemica")
EVALUATE_METHODS = ("teacache", "fbcache", "magcache")


@dataclass(frozen=True)
class EvaluateRequest:
    run: Path  # the held-out run folder: the recording, and a sweep-<steps>/ per step count with its report
    preset: Path
    prompts: Path
    steps: tuple[int, ...] = ()  # default: the step counts the preset was calibrated at
    seeds: tuple[int, ...] = (0,)
    baselines: tuple[str, ...] = EVALUATE_BASELINES
    methods: tuple[str, ...] = EVALUATE_METHODS
    target_psnr: float | None = None
    plain_reuse: bool = True  # a forecasting preset's polynomial with plain reuse too: what its forecast gains
    oracle: bool = True  # the calibration's best static schedules too: how far the preset's front is from them
    device: str = "auto"
    dtype: str = "auto"
    model_path: Path | None = None
    lightx2v_config: Path | None = None
    lora_path: Path | None = None
    shard: str | None = None


def check_held_out(preset, prompts: Path, echo=print) -> None:
    """A preset is measured on prompts it never saw: one calibrated on any of these is refused. A preset that names
    no calibration prompts (written elsewhere, or by hand) cannot be checked: said, not refused."""
    from calib.prompts import load_prompts
    from calib.runfiles import prompt_set_identities

    load_prompts(prompts)  # a malformed set fails here, naming its line
    calibrated = set(preset.calibration.get("prompt_identities", ()))
    if not calibrated:
        echo(f"note: {preset.source} names no calibration prompts (calibration.prompt_identities): whether {prompts} is held out "
             "cannot be checked")
        return
    seen = [pid for pid, identity in prompt_set_identities(Path(prompts)).items() if identity in calibrated]
    if seen:
        raise UserError(f"--prompts {prompts}: {len(seen)} of its prompts calibrated {preset.source} (e.g. {seen[0]!r}); evaluate on "
                        "prompts the preset never saw")


def evaluate(request: EvaluateRequest, echo=print) -> list[Path]:
    """Record the held-out prompts, sweep the preset beside the borrowed sets, static schedules and peers at every
    calibrated step count, and report each; returns the report folders."""
    from calib.record import RecordRequest, record
    from calib.report import report
    from calib.sweep import SweepRequest, sweep
    from teacache.preset import Preset

    preset = Preset.load(request.preset)
    check_held_out(preset, request.prompts, echo)
    steps = request.steps or tuple(preset.domain.get("steps") or ())
    if not steps:
        raise UserError(f"--preset {request.preset}: no calibrated step counts in its domain; pass --steps")
    size = tuple(preset.domain["sizes"][0]) if preset.domain.get("sizes") else None
    run = Path(request.run)
    record(RecordRequest(out=run, model=preset.model, prompts=request.prompts, steps=steps, cfg=preset.calibration.get("cfg"), size=size,
                         seeds=request.seeds, device=request.device, dtype=request.dtype, model_path=request.model_path,
                         lightx2v_config=request.lightx2v_config, lora_path=request.lora_path, shard=request.shard), echo=echo)
    wait_for(lambda: not missing_units(run, load_run(run)), "the recording", echo)
    forecasts = ("preset", "none") if preset.forecast.extrapolates and request.plain_reuse else ("preset",)
    first = resolve_shard(request.shard)[0] == 0
    folders = []
    for n in steps:
        folder = run / f"sweep-{n}"
        sweep(SweepRequest(run=run, preset=request.preset, out=folder, steps=n, baselines=request.baselines, methods=request.methods,
                           forecasts=forecasts, oracle="auto" if request.oracle else "none", target_psnr=request.target_psnr,
                           device=request.device, dtype=request.dtype,
                           model_path=request.model_path, lightx2v_config=request.lightx2v_config, shard=request.shard, yes=True), echo=echo)
        if first:  # the first shard reports, once every shard's part is merged (by whichever finished last)
            wait_for((folder / SWEEP_TABLE).exists, f"the sweep {folder}", echo)
            folders.append(report(folder, echo=echo))
    for folder in folders:
        echo(f"report: {folder / 'report.md'}")
    return folders
