"""What a sweep measures: its configurations, each a way to run the model. No torch, no model.

* calibrated TeaCache at each threshold and reuse rule (`--forecast`);
* borrowed coefficient sets (`--baseline constant|identity|flux|wan21|mlx-qwen|FILE`) at their own thresholds;
* static schedules: uniform spacing and LeMiCa's published schedules (`--baseline uniform|lemica`), and the preset's
  oracle candidates (`--oracle`: the calibration's best static schedule per budget, and its runners-up);
* the peer caches of `calib.peers` (`--method`, `--peer-grid`).

`--thresh auto` gives each method its own thresholds, one per budget from 15% to 80% of the calls (`calib.budgets`),
placed by simulating its schedules on the recorded trace. Budgets are computed calls of the total, both CFG
branches counted; a schedule computes the same steps in each branch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from calib.budgets import SWEPT, budget_steps
from calib.errors import UserError
from calib.simulate import (
    LEMICA,
    UnitSeries,
    forced_steps,
    lemica_schedule,
    shared_schedule,
    teacache_schedules,
    thresholds_for_budgets,
    uniform_schedule,
)
from teacache.forecast import NO_FORECAST, Forecast
from teacache.preset import Preset

MAX_CONFIGS = 400  # more than this many configurations needs --yes


# Published coefficients (TeaCache for FLUX and Wan2.1, mlx-teacache for Qwen-Image), to show what calibration buys. None keeps the preset's signal.
BASELINES: dict[str, tuple[list[float], str | None]] = {
    "constant": ([1.0], None),  # the original sketch's default: poly1d([1.0]) is the constant 1
    "identity": ([1.0, 0.0], "temb"),
    "flux": ([4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01], "modin"),
    "wan21": ([2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01], "temb"),
    "mlx-qwen": ([45.1442944188745, -52.91131412057809, 17.078368811436963, 0.10393043235768819, 0.0], "modin"),
}


STATIC = ("uniform", "lemica")  # static schedules that take no coefficients: evenly spaced; LeMiCa's published three


def parse_thresholds(spec: str) -> list[float] | None:
    """`auto` (None), `a:b` (step 0.05), `a:b:step`, or `t1,t2,...`; every value finite and >= 0."""
    text = spec.strip()
    if text == "auto":
        return None
    bad = UserError(f"--thresh {spec!r}: expected auto, START:STOP[:STEP] with START <= STOP and STEP > 0, or a comma list of numbers >= 0")
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise bad
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 0.05
            if not all(math.isfinite(v) for v in parts) or start < 0 or stop < start or step <= 0:
                raise bad
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 100_000:
                raise UserError(f"--thresh {spec!r}: {count:,} thresholds; use a coarser STEP (sweep runs every distinct schedule)")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise bad from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise bad
    return sorted(set(values))


def parse_forecast(spec: str, preset: Preset) -> tuple[str, Forecast]:
    """`--forecast` values: `preset` (the preset's own rule), `none`, `calibrated` (the preset's fitted rule, which
    must extrapolate), or `linear:ALPHA[:step|sigma]` (a fixed damping, e.g. linear:1 = undamped)."""
    text = spec.strip().lower()
    if text == "preset":
        return ("calibrated" if preset.forecast.extrapolates else "none"), preset.forecast
    if text == "none":
        return "none", NO_FORECAST
    if text == "calibrated":
        if not preset.forecast.extrapolates:
            raise UserError(f"--forecast calibrated: preset {preset.source} has no fitted forecast (its rule is none); fit one with `teacal fit`")
        return "calibrated", preset.forecast
    match = re.fullmatch(r"linear:([0-9.eE+-]+)(?::(step|sigma))?", text)
    if match is None:
        raise UserError(f"--forecast {spec!r}: expected preset, none, calibrated or linear:ALPHA[:step|sigma]")
    try:
        alpha = float(match.group(1))
        forecast = Forecast("linear", match.group(2) or "step", ((0.0, alpha),))
    except ValueError:
        raise UserError(f"--forecast {spec!r}: ALPHA must be a finite number") from None
    return f"linear:{alpha:g}" + (f":{forecast.axis}" if forecast.axis != "step" else ""), forecast


@dataclass(frozen=True)
class Config:
    id: str  # names its part folder
    method: str  # uncached | teacache | baseline | oracle | static | a peer: fbcache | magcache | seacache | dbcache
    label: str  # what the chart's legend says
    threshold: float | None = None
    budget: int | None = None
    forecast: str = "none"
    preset: Preset | None = None
    schedule: tuple[bool, ...] | None = None
    params: tuple[tuple[str, float | int], ...] = ()  # a peer's own settings (calib.peers.GRIDS)


def load_baseline(name: str, preset: Preset) -> tuple[str, Preset]:
    """A named or file baseline: the preset with borrowed coefficients and no calibrated domain (nothing to clamp to)."""
    if name in BASELINES:
        coefficients, signal = BASELINES[name]
        return name, preset.replace(coefficients=coefficients, signal=signal or preset.signal, domain={}, forecast=NO_FORECAST)
    path = Path(name)
    if path.is_dir():
        raise UserError(f"--baseline {name}: is a folder, not a preset or coefficients file")
    if not path.is_file():
        raise UserError(f"--baseline {name!r}: not one of {', '.join(BASELINES)} or {', '.join(STATIC)}, and not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--baseline {name}: not valid JSON ({type(err).__name__})") from None
    if isinstance(data, dict):
        other = Preset.from_dict(data, source=str(path))
        return path.stem, preset.replace(coefficients=other.coefficients, signal=other.signal, domain={}, forecast=NO_FORECAST)
    if isinstance(data, list) and data and all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in data):
        return path.stem, preset.replace(coefficients=data, domain={}, forecast=NO_FORECAST)
    raise UserError(f"--baseline {name}: expected a preset or a JSON list of finite coefficients")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def oracle_budgets(spec: str, steps: int, branches: int, forced: int, auto: list[int]) -> list[int]:
    """`--oracle`: auto (`auto`, steps per branch), none, or budgets in computed calls of the total -> steps per branch."""
    if spec == "none":
        return []
    if spec == "auto":
        return auto
    try:
        calls = sorted({int(b) for b in spec.split(",") if b.strip()})
    except ValueError:
        raise UserError(f"--oracle {spec!r}: expected auto, none or comma-separated budgets in computed calls, e.g. 16,20,24") from None
    if not calls or calls[0] < forced * branches or calls[-1] > steps * branches or any(c % branches for c in calls):
        raise UserError(f"--oracle {spec!r}: budgets are computed calls of the {steps * branches}, from the {forced * branches} forced ones"
                        + (f", each a multiple of {branches} (one schedule for both CFG branches)" if branches > 1 else ""))
    return [c // branches for c in calls]


@dataclass(frozen=True)
class Wanted:
    """What the flags ask a sweep to measure, parsed."""

    methods: tuple[str, ...]
    thresholds: list[float] | None  # None: auto, each method its own
    forecasts: list[tuple[str, Forecast]]  # TeaCache's reuse rules: (label, rule)
    baselines: list[tuple[str, Preset]]
    statics: list[str]  # uniform, lemica
    oracle: str  # --oracle
    peers: list  # calib.peers settings


def configurations(wanted: Wanted, preset: Preset, units: list[UnitSeries], branches: int, lemica_sigma: np.ndarray) -> list[Config]:
    """Every configuration the flags ask for, on a run of these recorded units (one step count). `lemica_sigma`: the
    sigmas of LeMiCa's 50 steps under the run's own shift, to map its schedules by."""
    steps = units[0].steps
    forced = forced_steps(preset, steps)
    auto = [k for k in budget_steps(steps, SWEPT) if k > forced.sum()]

    def grid(method_preset: Preset) -> list[float]:
        return wanted.thresholds if wanted.thresholds is not None else thresholds_for_budgets(units, method_preset, [k / steps for k in auto])

    configs = [Config("uncached", "uncached", "uncached")]
    if "teacache" in wanted.methods:
        for name, forecast in wanted.forecasts:
            calibrated = preset.replace(forecast=forecast)
            suffix = "" if name == "none" else f"-f{_slug(name)}"
            label = "teacache (calibrated)" + ("" if name == "none" else f", forecast {name}")
            thresholds = grid(calibrated)
            if wanted.thresholds is None and preset.threshold is not None:  # and the preset's default, so that it is measured too
                thresholds = sorted({*thresholds, float(preset.threshold)})
            configs += [Config(f"teacache{suffix}-t{t:g}", "teacache", label, threshold=t, forecast=name, preset=calibrated) for t in thresholds]
    for name, base in wanted.baselines:
        configs += [Config(_slug(f"baseline-{name}-t{t:g}"), "baseline", f"baseline: {name}", threshold=t, preset=base) for t in grid(base)]
    plain = preset.replace(forecast=NO_FORECAST)
    configs += oracle_configs(plain, oracle_budgets(wanted.oracle, steps, branches, int(forced.sum()), auto), steps, branches, wanted.oracle)
    for name in wanted.statics:
        configs += static_schedule_configs(name, plain, units[0].sigma, forced, auto, branches, lemica_sigma)
    return configs + [Config(s.id, s.method, s.label, threshold=s.threshold, params=s.params) for s in wanted.peers]


def static_schedule_configs(name: str, preset: Preset, sigma: np.ndarray, forced: np.ndarray, budgets: list[int], branches: int,
                            lemica_sigma: np.ndarray) -> list[Config]:
    """`--baseline uniform`: evenly spaced at every budget (steps per branch); `--baseline lemica`: LeMiCa's three
    published schedules (`calib.simulate.lemica_schedule`); two that map to one schedule run once, as the slower."""
    if name == "uniform":
        named = {f"uniform-{k * branches}": uniform_schedule(len(sigma), k, forced) for k in budgets}
    else:
        named = {}
        for speed in LEMICA:
            schedule = lemica_schedule(speed, sigma, lemica_sigma)
            if not any(np.array_equal(schedule, other) for other in named.values()):
                named[f"lemica-{speed}"] = schedule
    label = "static: uniform spacing" if name == "uniform" else "static: LeMiCa (published Qwen-Image schedules)"
    return [Config(i, "static", label, budget=int(s.sum()) * branches, preset=preset, schedule=tuple(bool(b) for b in s)) for i, s in named.items()]


def oracle_configs(preset: Preset, budgets: list[int], steps: int, branches: int, spec: str) -> list[Config]:
    """The preset's oracle candidates at these budgets (steps per branch): the calibration's pick, and its runners-up."""
    oracle = preset.calibration.get("oracle", {}).get(str(steps), {})
    if budgets and not oracle and spec != "auto":
        raise UserError(f"--oracle {spec}: preset {preset.source} holds no oracle schedules for {steps} steps (fit it on a recording of {steps} steps)")
    probed = preset.calibration.get("cost_model", {}).get("probed", False)
    if preset.calibration.get("oracle_source", "cost model").startswith("measured"):
        label = "oracle pick (best static schedule measured on the calibration prompts)"
    else:
        label = f"oracle pick (best static schedule, {'probed' if probed else 'recorded reuse'} cost model)"
    runners_up = preset.calibration.get("oracle_runners_up", {}).get(str(steps), {})

    def schedule_of(text, where: str, k: int) -> tuple[bool, ...]:
        """A schedule the preset holds, checked before anything runs: a hand-edited one must not fail mid-sweep."""
        if not isinstance(text, str) or set(text) - {"x", "."} or len(text) != steps or text.count("x") != k or text[:1] != "x":
            raise UserError(f"preset {preset.source}: calibration.{where}[{steps}][{k}] = {text!r}: expected {steps} characters of x "
                            f"(computed) and . (skipped), {k} of them x, the first one x")
        return tuple(c == "x" for c in text)

    configs = []
    for k in budgets:
        calls = k * branches
        if str(k) in oracle:
            configs.append(Config(f"oracle-{calls}", "oracle", label, budget=calls, preset=preset, schedule=schedule_of(oracle[str(k)], "oracle", k)))
        listed = runners_up.get(str(k), [])
        if not isinstance(listed, list):
            raise UserError(f"preset {preset.source}: calibration.oracle_runners_up[{steps}][{k}] = {listed!r}: expected a list of schedules")
        configs += [Config(f"oracle-{calls}-{rank}", "oracle", "oracle candidates (runners-up on the calibration prompts)", budget=calls,
                           preset=preset, schedule=schedule_of(schedule, "oracle_runners_up", k)) for rank, schedule in enumerate(listed, start=2)]
    return configs


def shared_runs(configs: list[Config], units: list[UnitSeries]) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """What TeaCache and the borrowed sets will compute on each recorded unit (`predicted`), and which configurations
    share one run (`runs_as`): those whose schedules are the same on every unit, when the signal is exact."""
    predicted = {c.id: _predicted(units, c) for c in configs if c.method in ("teacache", "baseline")}
    runs_as: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for c in configs:
        if c.id in predicted and shared_schedule(c.preset):
            key = (c.preset.branch_mode, c.forecast, tuple(predicted[c.id]["computed"]))
            runs_as[c.id] = seen.setdefault(key, c.id)
    return predicted, runs_as


def _predicted(units, config: Config) -> pd.DataFrame:
    rows = []
    for unit in units:
        schedules = teacache_schedules(unit, config.preset, [config.threshold])[0]
        for b, branch in enumerate(unit.branches):
            rows += [(unit.key[0], unit.key[1], branch, m, bool(schedules[b, m])) for m in range(unit.steps)]
    return pd.DataFrame(rows, columns=["prompt_id", "seed", "branch", "step", "computed"])
