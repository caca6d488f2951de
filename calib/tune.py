"""`teacal tune RUN --preset P --against SWEEP --out P2`: refine the fitted polynomial by generating its schedules on
the calibration prompts and keeping what measures best.

Why a stage after `fit`: the cost model ranks measured static schedules well (`fit --oracle-from` prints how well),
but one polynomial with one threshold per budget cannot give the best schedule at every budget, and the model
overrates some schedules (those that compute the second-to-last step). So the last word goes to measurement. On a
latent-independent signal (`temb`, `sigma`) TeaCache's schedule at a threshold is the same for every prompt, so the
polynomial's whole front is a handful of static schedules per step count, each measured once by generating it on
the run's prompts and comparing with the recorded references.

The search: a pattern search over the logarithm of the polynomial's values at `degree + 1` knots where the recorded
signal lies (the interpolating polynomial is the candidate; one that is not positive over the calibrated range is
skipped). It starts at the fitted coefficients, moves one knot at a time by ±0.1 and ±0.3, keeps a move when the
score improves, and halves the moves after a whole pass without gain. It is deterministic. The score compares the
candidate's measured front with the best *other* method that the `--against` sweeps (sweeps of this run, never of held-out prompts) measured at each
budget, 20% to 75% of the steps: twice the worst gap, plus every shortfall, plus a hundredth of every gap (clipped to
±5 dB), so that being at par everywhere comes first and being ahead second.

Then the reuse rule (`--forecast`, on by default), chosen by generating too (`calib.reuse_rule`).

Files (its own, in the run folder)::

    tune.json                             its settings (the resume key)
    tune/<steps>/<schedule>[@<rule>].json one measured static schedule (with a reuse rule): mean PSNR over the run's
                                          prompts and seeds

A measured schedule is never measured again, by this search or a later one; the search is deterministic, so a killed
tune replays to where it stopped without generating. Cost: prompts x seeds generations per new schedule; a round
rarely brings more than a few new ones. It says what it measured, and how long it took, at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from calib.backends import Recording, open_recording, reference_mismatch
from calib.budgets import IDENTICAL_DB, OBJECTIVES, best_within, budget_steps, front_at, over_prompts
from calib.errors import UserError
from calib.metrics import psnr, to_tensor
from calib.oracle import measured_oracle, measured_static
from calib.progress import progress
from calib.reuse_rule import tune_forecast
from calib.runfiles import (
    SWEEP_FILE,
    SWEEP_TABLE,
    check_output_file,
    check_same_settings,
    json_number,
    load_trace,
    now_iso,
    read_array,
    read_json,
    read_table,
    resolve_shard,
    settings_hash,
    unit_name,
    wait_for,
    write_json,
)
from calib.search import knots_of, log_values_at, pattern_search
from calib.simulate import (
    EXACT_SIGNALS,
    StaticSchedulePolicy,
    schedule_text,
    shared_schedule,
    teacache_schedules,
    threshold_for_speedup,
    thresholds_for_budgets,
    unit_series,
)
from calib.tables import aggregate
from teacache._files import remove_stale_temp_files
from teacache.forecast import NO_FORECAST, Forecast
from teacache.preset import Preset, PresetError

TUNE_FILE = "tune.json"


@dataclass(frozen=True)
class TuneRequest:
    run: Path
    preset: Path
    against: tuple[Path, ...]
    out: Path
    rounds: int = 150
    forecast: bool = True  # also choose the reuse rule by generating (tune_forecast)
    device: str = "auto"
    dtype: str = "auto"
    model_path: Path | None = None
    lightx2v_config: Path | None = None
    shard: str | None = None  # i/K (or torchrun's RANK/WORLD_SIZE): this process generates every K-th (prompt, seed)


def others_front(sweeps: tuple[Path, ...], recording: Recording, objective: str = "mean") -> dict[int, pd.DataFrame]:
    """Per step count: every measured configuration of the other methods (borrowed sets, uniform spacing, peers), as
    mean computed steps per branch and PSNR over the prompts under `objective`; calibrated TeaCache, its forecasts and
    the oracle are left out.

    Tune measures on every prompt and seed of the run, so a sweep measured on fewer, or without PSNR, is refused."""
    pairs = {(item.id, seed) for item in recording.prompts.items for seed in recording.settings["seeds"]}
    out: dict[int, list[pd.DataFrame]] = {}
    for folder in map(Path, sweeps):
        steps = int(read_json(folder / SWEEP_FILE)["settings"]["steps"])
        table = read_table(folder / SWEEP_TABLE)
        swept = set(zip(table["prompt_id"], table["seed"], strict=True))
        if swept != pairs:
            raise UserError(f"--against {folder}: it measured {len(swept)} of the run's {len(pairs)} (prompt, seed) pairs; sweep all of them "
                            "(without --prompts) so that tune compares like with like")
        if not np.isfinite(table.loc[table["method"] != "uncached", "psnr"]).any():
            raise UserError(f"--against {folder}: no PSNR measured; sweep with the psnr metric")
        per_step = table.loc[table["method"] == "uncached", "calls"].max() / steps  # 2 with CFG
        view = aggregate(table)
        view = view[(view["method"] != "uncached") & ~view["label"].str.startswith(("teacache (calibrated)", "oracle"))]
        if objective == "mean":  # as aggregate has it: images identical to their reference left out of the mean
            psnr = view["psnr"]
        else:
            psnr = view["config"].map(table["psnr"].where(np.isfinite(table["psnr"]), IDENTICAL_DB).groupby(table["config"]).agg(lambda v: over_prompts(v, objective)))
        out.setdefault(steps, []).append(pd.DataFrame({"label": view["label"], "computed": view["computed"] / per_step, "psnr": psnr}))
    return {steps: pd.concat(frames, ignore_index=True) for steps, frames in out.items()}


def check_references(recording: Recording) -> None:
    """Every unit of the run has its reference image: tune compares each generation with it."""
    settings = recording.settings
    names = [unit_name(item.id, seed, steps, recording.size) for steps in settings["steps"] for item in recording.prompts.items for seed in settings["seeds"]]
    missing = [name for name in names if not (recording.run / "refs" / f"{name}.png").exists()]
    if missing:
        raise UserError(f"{recording.run}: no reference for {missing[0]}; finish `teacal record {recording.run}` first")


def best_other(front: pd.DataFrame, budget: int) -> tuple[float, str]:
    """The best mean PSNR any other method reached computing no more than `budget` steps per branch, and which."""
    index = best_within(front["computed"], front["psnr"].where(np.isfinite(front["psnr"])), [budget])[0]
    return (-math.inf, "none") if index < 0 else (float(front["psnr"].iloc[index]), str(front["label"].iloc[index]))


class Measurer:
    """Measures static schedules on the run's prompts and seeds, once each (parts in RUN/tune/).

    Sharded (`shard` = (i, K)), every process runs the same deterministic search, so all ask for the same schedules in
    the same order: each generates every K-th (prompt, seed) into its own part, waits for the others' parts and merges
    them, in the order one process would have written, into the schedule's part."""

    def __init__(self, recording: Recording, preset: Preset, shard: tuple[int, int] = (0, 1), echo=print) -> None:
        self.recording, self.preset = recording, preset.replace(forecast=NO_FORECAST)
        self.pairs = [(item, seed) for item in recording.prompts.items for seed in recording.settings["seeds"]]
        self.shard, self.echo = shard, echo
        self.mine = self.pairs[shard[0]:: shard[1]]
        self.backend = None
        self.generations = 0
        self.measured: dict[tuple, float] = {}  # (steps, schedule) or (steps, schedule, forecast) -> mean PSNR
        self.summary: dict[tuple, dict[str, float]] = {}  # the same keys -> the PSNR under each objective (calib.budgets)

    def part(self, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> Path:
        rule = "" if not forecast.extrapolates else "@" + settings_hash({"axis": forecast.axis, "alpha": [list(k) for k in forecast.alpha]})
        return self.recording.run / "tune" / str(steps) / f"{schedule.replace('.', '-')}{rule}.json"

    def __call__(self, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> float:
        """Mean PSNR of `schedule` over the run's prompts and seeds, each skipped call formed by `forecast`."""
        if not forecast.extrapolates:
            forecast = NO_FORECAST
        key = (steps, schedule) if not forecast.extrapolates else (steps, schedule, forecast)  # a Forecast hashes without its fit notes
        if key in self.measured:
            return self.measured[key]
        path = self.part(steps, schedule, forecast)
        if path.exists():
            part = read_json(path)
            self.measured[key] = float(part["psnr"])
            self.summary[key] = {o: over_prompts(list(part["per_generation"].values()), o) for o in OBJECTIVES}
            return self.measured[key]
        values = self._generate(steps, schedule, forecast, path)
        mean = float(np.mean(list(values.values())))
        write_json(path, {"steps": steps, "schedule": schedule, "forecast": forecast.to_dict(), "psnr": mean, "per_generation": values})
        self.measured[key] = mean
        self.summary[key] = {o: over_prompts(list(values.values()), o) for o in OBJECTIVES}
        return mean

    def _generate(self, steps: int, schedule: str, forecast: Forecast, path: Path) -> dict[str, float]:
        """PSNR per generation of `schedule` over the run's pairs, in their order: this shard's generated (or read back
        from its part), the others' read from theirs once they are written."""
        index, count = self.shard
        size = self.recording.size
        parts = [path.with_name(f"{path.stem}.shard-{i}of{count}.json") for i in range(count)] if count > 1 else []
        own = parts[index] if parts else None
        if own is not None and own.exists():
            values = read_json(own)["per_generation"]
        else:
            if self.backend is None and self.mine:
                self._load()
            policy_schedule = np.array([c == "x" for c in schedule])
            preset = self.preset.replace(forecast=forecast)
            values = {}
            for item, seed in self.mine:
                with self.backend.caching(preset, 0.0, StaticSchedulePolicy(preset, policy_schedule)):
                    generation = self.backend.run(item, seed, steps, self.recording.settings["cfg"], size)
                name = unit_name(item.id, seed, steps, size)
                with Image.open(self.recording.run / "refs" / f"{name}.png") as reference:
                    value = psnr(to_tensor(generation.image), to_tensor(reference.convert("RGB")))
                values[name] = value if math.isfinite(value) else IDENTICAL_DB
            self.generations += len(self.mine)
            if own is None:
                return values
            write_json(own, {"steps": steps, "schedule": schedule, "forecast": forecast.to_dict(), "per_generation": values})
        wait_for(lambda: path.exists() or all(p.exists() for p in parts), f"their share of schedule {schedule} at {steps} steps", self.echo, poll=0.2)
        if path.exists():  # another shard merged already
            return read_json(path)["per_generation"]
        for part in parts:
            values.update(read_json(part)["per_generation"])
        return {name: values[name] for name in (unit_name(item.id, seed, steps, size) for item, seed in self.pairs)}

    def under(self, objective: str, steps: int, schedule: str, forecast: Forecast = NO_FORECAST) -> float:
        """The PSNR of `schedule` over the prompts under `objective`, measured by `__call__` when it was not yet."""
        self(steps, schedule, forecast)
        return self.summary[(steps, schedule) if not forecast.extrapolates else (steps, schedule, forecast)][objective]

    def _load(self) -> None:
        """The model, once, after checking that an uncached run here reproduces the recorded reference."""
        self.backend = self.recording.load()
        item, seed = self.mine[0]
        steps = self.recording.settings["steps"][0]
        generation = self.backend.run(item, seed, steps, self.recording.settings["cfg"], self.recording.size)
        reference = read_array(self.recording.run / "refs" / f"{unit_name(item.id, seed, steps, self.recording.size)}.npy")
        mismatch = reference_mismatch(generation, reference)
        if mismatch is not None:
            raise UserError(f"{self.recording.run}: an uncached run here does not reproduce the recorded reference ({mismatch}); tune on the "
                            "machine, device and library versions that recorded it, or record again here")

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


class Search:
    """Scores polynomials by their measured fronts against the other methods' (see the module notes)."""

    def __init__(self, units: dict, fronts: dict[int, pd.DataFrame], measure: Measurer, objective: str = "mean") -> None:
        self.units, self.measure, self.objective = units, measure, objective
        self.bar = {steps: {b: best_other(fronts[steps], b) for b in budget_steps(steps)} for steps in units}

    def schedules(self, preset: Preset, steps: int) -> list[str]:
        budgets = budget_steps(steps)
        unit = self.units[steps]
        fractions = [b / steps for b in budgets] + [budgets[0] / steps - 0.05]  # and one point below the range
        thresholds = thresholds_for_budgets([unit], preset, fractions)
        found = {schedule_text(s[0]) for s in teacache_schedules(unit, preset, thresholds)}
        return sorted(s for s in found if budgets[0] - 1 <= s.count("x") <= budgets[-1])

    def gaps(self, preset: Preset) -> dict[int, np.ndarray]:
        out = {}
        for steps in self.units:
            measured = [(s.count("x"), self.measure.under(self.objective, steps, s)) for s in self.schedules(preset, steps)]
            bar = np.array([self.bar[steps][b][0] for b in budget_steps(steps)])
            out[steps] = np.where(np.isfinite(bar), front_at(measured, budget_steps(steps), -math.inf) - bar, np.nan)  # NaN: no other method computes this little
        return out

    @staticmethod
    def score(gaps: dict[int, np.ndarray]) -> float:
        g = np.concatenate(list(gaps.values()))
        g = np.maximum(g[~np.isnan(g)], -100.0)  # -inf: the candidate has no schedule this cheap, as bad as it gets
        if g.size == 0:
            return 0.0
        return float(2 * min(g.min(), 0.0) + np.minimum(g, 0.0).sum() + 0.01 * np.clip(g, -5, 5).sum())


def load_request_preset(request: TuneRequest) -> tuple[Preset, Path]:
    """The flags and the fitted preset, checked before any run is opened."""
    if request.rounds < 0:
        raise UserError(f"--rounds {request.rounds}: expected 0 or more")
    if not request.against:
        raise UserError("--against: give at least one sweep of the run (its --out folder) to measure against")
    out = check_output_file(request.out, "--out", "preset.json")
    preset_path = Path(request.preset)
    if preset_path.is_dir():
        raise UserError(f"--preset {preset_path}: is a folder; give the preset JSON that `teacal fit` wrote")
    if out.resolve() == preset_path.resolve():
        raise UserError(f"--out {out}: that is the input preset; tune never edits its inputs, choose another file")
    preset = Preset.load(preset_path)
    if not shared_schedule(preset):
        raise UserError(f"--preset {preset_path}: signal {preset.signal}{', adaptive' if preset.adaptive else ''}; tune needs a signal that does not depend "
                        f"on the latents ({', '.join(EXACT_SIGNALS)}) and no per-prompt ratio: schedules the same for every prompt")
    if preset.x_range is None:
        raise UserError(f"--preset {preset_path}: no calibrated domain (x_range); tune refines a preset that `teacal fit` wrote")
    return preset, out


def open_tune(request: TuneRequest, preset: Preset, out: Path) -> tuple[Recording, dict, pd.DataFrame, pd.DataFrame]:
    """The calibration run, ready to generate; the other methods' fronts per step count; what the sweeps measured; the trace."""
    run = Path(request.run)
    measured = measured_static(request.against, [run])  # refuses sweeps of other runs: never tune on held-out prompts
    recording = open_recording(run, request.model_path, request.lightx2v_config, request.device, request.dtype, what="tune")
    settings = recording.settings
    preset.require_model(settings["model"])
    fronts = others_front(request.against, recording, preset.calibration.get("objective", "mean"))
    missing = sorted(set(fronts) - set(settings["steps"]))
    if missing:
        raise UserError(f"--against: sweeps of {', '.join(map(str, missing))} steps, which {run} did not record")
    check_references(recording)
    tune_settings = {"record": {k: settings[k] for k in ("model", "backend", "steps", "sizes", "seeds", "cfg", "dtype", "device", "inputs_sha256", "weights")}}
    check_same_settings(run / TUNE_FILE, tune_settings, "tune", flag="another run folder (record again)",
                        files={"record.inputs_sha256": f"the recording's prompt set {run / 'inputs'}: other text or images than tuned"})
    remove_stale_temp_files(run, [TUNE_FILE])
    for steps in fronts:
        remove_stale_temp_files(run / "tune" / str(steps))
    remove_stale_temp_files(out.parent, [out.name])
    write_json(run / TUNE_FILE, {"kind": "tune", "settings": tune_settings, "updated": now_iso()})
    return recording, fronts, measured, load_trace(run)


def tune(request: TuneRequest, echo=print) -> Preset:
    """Search the polynomial on generations, choose the reuse rule, write the tuned preset (see the module notes)."""
    preset, out = load_request_preset(request)
    recording, fronts, measured, trace = open_tune(request, preset, out)
    units = {steps: unit_series(trace[trace["steps"] == steps])[0] for steps in sorted(fronts)}
    shard = resolve_shard(request.shard)
    measure = Measurer(recording, preset, shard, echo)
    for r in measured.itertuples():  # what the sweeps measured is not generated again
        measure.measured.setdefault((int(r.steps), r.schedule), float(r.psnr))
        measure.summary.setdefault((int(r.steps), r.schedule), {"mean": float(r.psnr), "worst": float(r.worst), "cvar": float(r.cvar)})
    objective = preset.calibration.get("objective", "mean")  # what fit made the preset for
    search = Search(units, fronts, measure, objective)
    echo(f"tune {recording.settings['model']}: {request.rounds} rounds at {', '.join(map(str, units))} steps against "
         f"{', '.join(sorted({label for f in fronts.values() for label in f['label']}))}; each new schedule costs {len(measure.pairs)} generations")
    started = time.monotonic()
    knots = knots_of(preset, list(units.values()))
    try:
        def improved(round_: int, moved: Preset, score: float) -> None:
            echo(f"round {round_}: worst gap {np.nanmin(np.concatenate(list(search.gaps(moved).values()))):+.2f} dB, score {score:.3f}")

        with progress("tune", request.rounds) as advance:
            best_preset, _ = pattern_search(preset, knots, log_values_at(preset, knots), lambda p: search.score(search.gaps(p)), request.rounds,
                                            advance, improved)
        forecast, forecast_record = preset.forecast, {}
        if request.forecast:
            schedules = {steps: search.schedules(best_preset, steps) for steps in units}
            forecast, forecast_record = tune_forecast(measure, schedules, {steps: u.sigma for steps, u in units.items()}, preset.forecast, echo)
    finally:
        measure.close()
    echo(f"measured {measure.generations} generations in {(time.monotonic() - started) / 60:.1f} min")
    tuned = tuned_preset(request, preset, best_preset, forecast, forecast_record, search, trace, echo)
    if shard[0] != 0:  # every shard found the same preset; the first writes it
        return tuned
    tuned.save(out)
    echo(f"tuned coefficients {[float(f'{c:.6g}') for c in tuned.coefficients]}; default threshold {tuned.threshold:.4g} "
         f"(simulated {tuned.fit['default_threshold_speedup']:.2f}x); wrote {out}")
    return tuned


def tuned_preset(request: TuneRequest, preset: Preset, best_preset: Preset, forecast: Forecast, forecast_record: dict, search: Search,
                 trace: pd.DataFrame, echo=print) -> Preset:
    """The tuned polynomial with its reuse rule, the gaps before and after, and the oracle: the best static schedule
    measured per budget, now with every schedule tune measured. Only what a rerun reproduces goes in (no timings)."""
    first, best_gaps = search.gaps(preset), search.gaps(best_preset)  # measured already: no generation
    echo(f"{'steps':>5}{'budget':>7}{'fitted':>8}{'tuned':>8}   gap to the best other method (dB), calibration prompts")
    rows = {}
    for steps in search.units:
        rows[str(steps)] = {}
        for b, before, after in zip(budget_steps(steps), first[steps], best_gaps[steps], strict=True):
            label = search.bar[steps][b][1]
            echo(f"{steps:>5}{b:>7}{before:>+8.2f}{after:>+8.2f}   {label}")
            rows[str(steps)][str(b)] = {"fitted": json_number(before), "tuned": json_number(after), "best_other": label}
    measured = search.measure.measured
    everything = pd.DataFrame([(*key, p) for key, p in measured.items() if len(key) == 2], columns=["steps", "schedule", "psnr"])
    oracle, runners_up = dict(preset.calibration.get("oracle", {})), dict(preset.calibration.get("oracle_runners_up", {}))
    best, next_best = measured_oracle(everything, echo=echo)
    for steps, by_budget in best.items():
        oracle[steps] = {**oracle.get(steps, {}), **by_budget}
        runners_up[steps] = {**{b: s for b, s in runners_up.get(steps, {}).items() if b not in by_budget}, **next_best.get(steps, {})}
    threshold, reached = threshold_for_speedup(unit_series(trace), best_preset, float(preset.fit.get("requested_speedup", 1.6)))
    calibration = dict(preset.calibration, oracle=oracle, oracle_runners_up=runners_up, oracle_source=f"measured on the calibration prompts: {', '.join(map(str, request.against))} and teacal tune",
                       tune={"from_coefficients": list(preset.coefficients), "against": [str(p) for p in request.against], "rounds": request.rounds,
                             "schedules_measured": len(measured), "gaps_db": rows, "forecast": forecast_record})
    try:
        return best_preset.replace(threshold=threshold, calibration=calibration, thresholds=(), forecast=forecast,
                                   fit=dict(preset.fit, default_threshold_speedup=round(reached, 4)))
    except PresetError as err:
        raise UserError(str(err)) from None
