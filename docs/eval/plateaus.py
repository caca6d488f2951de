"""Which schedules can one preset's polynomial give at each count of computed steps, and which one does the sweep's
`--thresh auto` measure?

    python docs/eval/plateaus.py PRESET RUN --steps N [--thresh-list] [--choose-on CALIB_RUN]

RUN is a recording with N-step traces (its first unit stands for all: for a timestep signal every prompt gets the
same schedule). Finds every schedule the preset's thresholds give (`schedule_thresholds`) and prints, for each count
of computed steps that more than one schedule reaches, every schedule with the smallest threshold found to give it, marking the one `calib.simulate.
thresholds_for_budgets` (the auto thresholds) places. With --thresh-list, prints instead one threshold inside each
schedule's range, comma-separated, for `teacal sweep --thresh`. With --choose-on, every schedule of a count that has
several, within 15-80% of the steps, is generated (plain reuse) on CALIB_RUN's prompts (parts in its tune/ folder,
as tune writes them) and each count's best by (mean + worst prompt) / 2 there is marked; with --thresh-list only
the chosen ones are listed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.backends import open_recording  # noqa: E402
from calib.runfiles import load_traces  # noqa: E402
from calib.simulate import (  # noqa: E402
    UnitSeries,
    refined_thresholds,
    schedule_text,
    shared_schedule,
    teacache_schedules,
    thresholds_for_budgets,
    unit_series,
)
from calib.tune import Measurer  # noqa: E402
from teacache.preset import Preset  # noqa: E402


def schedule_thresholds(unit: UnitSeries, preset: Preset) -> dict[str, float]:
    """Every schedule the preset's thresholds give the unit (its first branch), each with the smallest threshold found
    to give it: a log grid from 1e-6 to 1e3, bisected wherever neighbouring thresholds give different schedules, down
    to a ratio of 1 + 1e-7."""
    seen = refined_thresholds(np.geomspace(1e-6, 1e3, 60), lambda t: schedule_text(teacache_schedules(unit, preset, [t])[0][0]),
                              lambda a, b: a != b, 1 + 1e-7)
    first: dict[str, float] = {}
    for threshold, schedule in sorted(seen.items()):
        first.setdefault(schedule, float(threshold))
    return first


def choose_by_generation(schedules: dict[str, float], steps: int, preset: Preset, calibration_run: Path) -> set[str]:
    """Per count of computed steps with several schedules (15-80% of the steps): the one whose generated images of
    the calibration run's prompts score best by (mean + worst prompt) / 2. Counts with one schedule keep it."""
    by_count: dict[int, list[str]] = {}
    for schedule in schedules:
        by_count.setdefault(schedule.count("x"), []).append(schedule)
    measure = Measurer(open_recording(calibration_run), preset)
    chosen = set()
    for count, group in sorted(by_count.items()):
        if len(group) == 1 or not 0.15 * steps <= count <= 0.8 * steps:
            chosen.update(group)
            continue
        scores = {s: (measure.under("mean", steps, s) + measure.under("worst", steps, s)) / 2 for s in group}
        chosen.add(max(group, key=scores.get))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--thresh-list", action="store_true")
    parser.add_argument("--choose-on", type=Path, help="a calibration run: choose each count's schedule by generating them on its prompts")
    args = parser.parse_args()
    preset = Preset.load(args.preset)
    if not shared_schedule(preset):
        sys.exit(f"{args.preset}: its schedules differ per prompt ({preset.signal}); this diagnostic is for a timestep signal")
    trace, _, groups, _ = load_traces((args.run,))
    unit = next(u for u in unit_series(trace, groups) if u.steps == args.steps)
    first = schedule_thresholds(unit, preset)
    chosen = choose_by_generation(first, args.steps, preset, args.choose_on) if args.choose_on else set(first)
    if args.thresh_list:
        print(",".join(f"{t * 1.0001:.6g}" for s, t in first.items() if s in chosen))
        return
    auto = {schedule_text(teacache_schedules(unit, preset, [t])[0][0]) for t in thresholds_for_budgets([unit], preset, np.arange(1, args.steps + 1) / args.steps)}
    for count in range(1, args.steps + 1):
        reached = [(t, s) for s, t in first.items() if s.count("x") == count]
        if len(reached) > 1:
            print(f"{count} of {args.steps}: " + "  ".join(f"{s} from {t:.4g}{' (auto)' if s in auto else ''}{' (chosen)' if args.choose_on and s in chosen else ''}" for t, s in sorted(reached)))


if __name__ == "__main__":
    main()
