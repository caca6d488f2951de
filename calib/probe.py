"""`teacal probe RUN`: what skipping a window of steps costs the final image, measured by generating.

For a few of the run's prompts (`probed_prompts`: spread over how far each moves, whatever the file's order; first
seed, every recorded step count) it generates with exactly one window of
consecutive steps skipped in both CFG branches (the residual of the step before reused), and compares the final
latents and image with the recorded reference. `teacal fit` turns these into the cost model's per-step sensitivity
and its compounding within a window (`calib.simulate`).

Files (its own, in the run folder)::

    probe.json                          its settings (the resume key) and the planned probes
    probes/<unit>/<first>-<length>.json one complete part per probe; a killed probe loses at most the one in flight
    probes.parquet                      all parts merged, once every planned probe of every shard is done

With `--forecast` it also measures the reuse rule: evenly spaced static schedules at a few budgets, each with a
linear forecast of several constant dampings (and none); `teacal fit` picks the damping per sigma reach from them
(`teacache.forecast`).

Cost: one generation per probe, plus one uncached generation per unit that checks the recorded reference is
reproduced bit for bit. `--window 1` (single steps) costs `steps - 2` generations per unit (`steps - 1` at 8 steps or
fewer, the last step included); each longer length adds
about `steps / (length / 2)`; `--forecast` adds 30 per unit. A generation calls the transformer only at the steps it
computes (`unit_calls`): a window probe all but its window, a forecast probe a fifth to a half of the steps. It says
the count and the time it expects before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from calib.backends import Recording, open_recording, recording_preset, reference_mismatch
from calib.budgets import FEW_STEPS
from calib.errors import UserError
from calib.metrics import psnr, to_tensor
from calib.progress import progress
from calib.runfiles import (
    PROBE_FILE,
    check_same_settings,
    load_probes,
    load_trace,
    now_iso,
    read_array,
    resolve_shard,
    unit_name,
    write_array,
    write_json,
    write_table,
)
from calib.simulate import StaticSchedulePolicy, uniform_schedule
from teacache._files import remove_stale_temp_files
from teacache.forecast import NO_FORECAST, Forecast


@dataclass(frozen=True)
class ProbeRequest:
    run: Path
    prompts: int = 4  # how many of the run's prompts are probed (`probed_prompts`: spread over how far each moves)
    windows: tuple[int, ...] = (1, 4, 8)  # window lengths
    device: str = "auto"
    dtype: str = "auto"
    model_path: Path | None = None
    lightx2v_config: Path | None = None
    shard: str | None = None
    forecast: bool = False  # also measure the reuse rule (PROBE_DAMPINGS on evenly spaced schedules)
    steps: tuple[int, ...] = ()  # which recorded step counts to probe (default: all); fit maps the sensitivity by sigma
    stride: int = 1  # single steps: every stride-th step (fit interpolates between them)


FORECAST_SHARES = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)  # forecast probes: budgets as shares of the steps (wide to narrow spans)
PROBE_DAMPINGS = (0.0, 0.2, 0.4, 0.6, 0.8)


@dataclass(frozen=True)
class Probe:
    item: object  # PromptItem
    seed: int
    steps: int
    size: tuple[int, int]
    first: int = 0  # window: the first skipped step
    length: int = 0  # window: how many; 0 with kind window: the uncached check
    kind: str = "window"  # window | forecast
    budget: int = 0  # forecast: computed steps of its evenly spaced schedule
    alpha: float = 0.0  # forecast: the constant damping

    @property
    def unit(self) -> str:
        return unit_name(self.item.id, self.seed, self.steps, self.size)

    @property
    def part(self) -> str:
        name = f"{self.first}-{self.length}" if self.kind == "window" else f"f{self.budget}-a{self.alpha:g}"
        return f"{self.unit}/{name}.json"

    def schedule(self) -> np.ndarray:
        if self.kind == "forecast":
            return uniform_schedule(self.steps, self.budget)
        schedule = np.ones(self.steps, bool)
        schedule[self.first : self.first + self.length] = False
        return schedule

    def forecast(self) -> Forecast:
        return Forecast("linear", "step", ((0.0, self.alpha),)) if self.alpha else NO_FORECAST

    @property
    def computed(self) -> int:
        """Steps that call the transformer (per branch)."""
        return int(self.schedule().sum())


def window_starts(steps: int, length: int, stride: int = 1) -> list[int]:
    """First skipped steps of the probed windows of `length`: inside 1 .. steps-2 (the first step is always computed,
    and so, by default, is the last), every `stride`-th step for single steps, every length/2 steps for longer windows.
    At FEW_STEPS or fewer the last step is probed alone too: one call is an eighth of the work or more there, so
    whether it must be forced is measured (`teacal fit` frees it when skipping it costs least)."""
    starts = list(range(1, steps - length, stride if length == 1 else max(1, length // 2)))
    return starts + [steps - 1] if length == 1 and steps <= FEW_STEPS else starts


def unit_probes(item, seed: int, steps: int, size: tuple[int, int], windows: tuple[int, ...], stride: int, forecast: bool) -> list[Probe]:
    """One unit's probes: its uncached check, every window, and with `forecast` the forecast probes."""
    probes = [Probe(item, seed, steps, size, 0, 0)]
    for length in windows:
        probes += [Probe(item, seed, steps, size, first, length) for first in window_starts(steps, length, stride)]
    if forecast:
        for budget in sorted({max(3, round(share * steps)) for share in FORECAST_SHARES}):
            probes += [Probe(item, seed, steps, size, kind="forecast", budget=budget, alpha=a) for a in PROBE_DAMPINGS]
    return probes


def unit_calls(steps: int, windows: tuple[int, ...], stride: int, forecast: bool, branches: int) -> int:
    """Transformer calls one unit's probes make: only computed steps call the transformer (a forecast probe computes
    a fifth to a half of them)."""
    return branches * sum(p.computed for p in unit_probes(None, 0, steps, (0, 0), windows, stride, forecast))


def probed_prompts(items: list, trace, count: int) -> list:
    """The `count` prompts to probe, spread evenly over how far the model's output moves per step in each (the mean
    log `y_output` of its recorded steps): the prompts in that order, the one at the middle of each of `count` equal
    slices. Which prompts the file lists first no longer decides: the same prompts in another order probed other
    ones, and on the scenes model two of three such draws lost 1-5 dB of held-out mean to the first (2026-12-07);
    the slowest and the fastest movers differ most in when a skip hurts."""
    if count >= len(items):
        return list(items)
    recorded = trace[trace["step"] > 0]
    movement = np.log(recorded["y_output"].astype(float)).groupby(recorded["prompt_id"]).mean()
    missing = [item.id for item in items if item.id not in movement.index]
    if missing:
        raise UserError(f"no recorded trace for prompt {missing[0]}; finish `teacal record` first")
    ranked = sorted(items, key=lambda item: (movement[item.id], item.id))
    return [ranked[(2 * i + 1) * len(ranked) // (2 * count)] for i in range(count)]


def plan(recording: Recording, request: ProbeRequest) -> list[Probe]:
    settings = recording.settings
    seed = settings["seeds"][0]
    items = probed_prompts(recording.prompts.items, load_trace(recording.run), request.prompts)
    return [probe for item in items for steps in request.steps or settings["steps"]
            for probe in unit_probes(item, seed, steps, recording.size, request.windows, request.stride, request.forecast)]


def check_request(request: ProbeRequest) -> None:
    if request.prompts < 1:
        raise UserError(f"--prompts {request.prompts}: probe at least one prompt")
    if not request.windows or min(request.windows) < 1 or len(set(request.windows)) != len(request.windows):
        raise UserError(f"--window {list(request.windows)}: expected distinct window lengths >= 1")
    if request.stride < 1:
        raise UserError(f"--stride {request.stride}: expected 1 or more")


def probe(request: ProbeRequest, echo=print) -> Path:
    check_request(request)
    recording = open_recording(request.run, request.model_path, request.lightx2v_config, request.device, request.dtype, what="probe")
    run = recording.run
    settings = recording.settings
    if max(request.windows) > settings["max_gap"]:
        raise UserError(f"--window {max(request.windows)}: longer than the run's --max-gap {settings['max_gap']}; the trace has no reuse error that far")
    unrecorded = sorted(set(request.steps) - set(settings["steps"]))
    if unrecorded:
        raise UserError(f"--steps {unrecorded[0]}: {run} recorded {', '.join(map(str, settings['steps']))} steps")
    probes = plan(recording, request)
    missing = [p.unit for p in probes if not (run / "refs" / f"{p.unit}.npy").exists()]
    if missing:
        raise UserError(f"{run}: no reference for {missing[0]}; finish `teacal record {run}` first")
    shard_index, shard_count = resolve_shard(request.shard)
    # The resume key is the recording probed; a probe is named by its unit and window, so more prompts or window
    # lengths later only add probes.
    probe_settings = {"record": {k: settings[k] for k in ("model", "backend", "steps", "sizes", "cfg", "dtype", "device", "inputs_sha256", "weights")}}
    check_same_settings(run / PROBE_FILE, probe_settings, "probe", flag="another run folder (record again)",
                        files={"record.inputs_sha256": f"the recording's prompt set {run / 'inputs'}: other text or images than probed"})
    remove_stale_temp_files(run / "probes")
    remove_stale_temp_files(run, [PROBE_FILE, "probes.parquet"])
    mine = [p for i, p in enumerate(probes) if i % shard_count == shard_index]
    # a unit's uncached check (which writes the reference pixels) runs before its probes in every process
    todo = [p for p in mine if not (run / "probes" / p.part).exists() or (p.kind == "window" and p.length == 0
            and not (run / "probes" / p.unit / "reference-pixels.npy").exists())]
    checks = {p.unit: p for p in probes if p.kind == "window" and p.length == 0}
    mine_todo = len(todo)
    todo = _with_checks_first(todo, checks, run)
    borrowed_checks = len(todo) - mine_todo  # other shards' units' uncached checks, rerun here for their pixels
    per_call = _seconds_per_call(run)
    calls = sum(p.computed for p in todo) * (2 if settings["cfg"] > 1 else 1)
    probed = ", ".join(dict.fromkeys(p.item.id for p in probes))
    echo(f"probe {settings['model']}: prompts {probed} (spread over how far each moves per step)")
    echo(f"probe {settings['model']}: {len(probes)} generations in all ({request.prompts} prompts x {len(request.steps or settings['steps'])} step count(s), "
         f"windows {', '.join(map(str, request.windows))}{', forecasts' if request.forecast else ''}, plus one uncached check per unit); shard {shard_index}/{shard_count}: "
         f"{mine_todo} to run, {len(mine) - mine_todo} done"
         f"{f' (and {borrowed_checks} uncached check(s) of units shared with other shards)' if borrowed_checks else ''}; about {calls * per_call / 60:.1f} min of denoising at the recorded {per_call * 1000:.0f} ms per call")
    write_json(run / PROBE_FILE, {"kind": "probe", "settings": probe_settings, "prompts": request.prompts, "windows": list(request.windows),
                                  "forecast": request.forecast, "steps": list(request.steps), "stride": request.stride,
                                  "planned": len(probes), "updated": now_iso()})
    if todo:
        backend = recording.load()
        try:
            with progress("probe", len(todo)) as advance:
                for p in todo:
                    write_json(run / "probes" / p.part, run_probe(backend, recording, p))
                    advance(f"probe {p.part}")
        finally:
            backend.close()
    if all((run / "probes" / p.part).exists() for p in probes):
        write_table(run / "probes.parquet", load_probes(run))
        echo(f"wrote {run / 'probes.parquet'}")
    else:
        echo("probes of other shards still to run; rerun when they are done to merge probes.parquet")
    return run


def run_probe(backend, recording: Recording, p: Probe) -> dict:
    cfg = recording.settings["cfg"]
    reference = read_array(recording.run / "refs" / f"{p.unit}.npy")
    pixels_file = recording.run / "probes" / p.unit / "reference-pixels.npy"
    branches = 2 if cfg > 1 else 1
    if p.kind == "window" and p.length == 0:
        generation = backend.run(p.item, p.seed, p.steps, cfg, p.size)
        calls = p.steps * branches
        mismatch = reference_mismatch(generation, reference)
        if mismatch is not None:
            raise UserError(f"{p.unit}: an uncached run here does not reproduce the recorded reference ({mismatch}); probe on the machine, "
                            "device and library versions that recorded it, or record again here")
        # the reference image before 8-bit rounding: what every probe of this unit is measured against
        write_array(pixels_file, generation.float_pixels())
    else:
        preset = recording_preset(recording.spec.name).replace(forecast=p.forecast())
        with backend.caching(preset, 0.0, StaticSchedulePolicy(preset, p.schedule())) as cache:
            generation = backend.run(p.item, p.seed, p.steps, cfg, p.size)
            calls = cache.stats().computed  # counted by the runtime, not from the schedule
    with Image.open(recording.run / "refs" / f"{p.unit}.png") as ref:
        image_psnr = psnr(to_tensor(generation.image), to_tensor(ref.convert("RGB")))
    latent_error = float(np.abs(generation.latents - reference).mean() / np.abs(reference).mean())
    image_rmse = float(np.sqrt(np.mean((generation.float_pixels() - read_array(pixels_file)) ** 2)))
    return {"prompt_id": p.item.id, "seed": p.seed, "steps": p.steps, "width": p.size[0], "height": p.size[1], "kind": p.kind, "first": p.first,
            "length": p.length, "budget": p.budget, "alpha": p.alpha, "latent_rel_l1": latent_error, "image_rmse": image_rmse,
            "psnr": image_psnr, "seconds": generation.denoise_seconds, "calls": calls}


def _with_checks_first(todo: list[Probe], checks: dict[str, Probe], run: Path) -> list[Probe]:
    """Each unit's uncached check first (also where another shard ran it: its reference pixels are needed here)."""
    out: list[Probe] = []
    for p in todo:
        check = checks[p.unit]
        if check not in out and (check in todo or not (run / "probes" / p.unit / "reference-pixels.npy").exists()):
            out.append(check)
        if p is not check and p not in out:
            out.append(p)
    return out


def _seconds_per_call(run: Path) -> float:
    try:
        seconds = load_trace(run)["seconds"].astype(float)
    except UserError:
        return float("nan")
    return float(seconds.median())
