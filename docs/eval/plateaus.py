"""Which schedules can one preset's polynomial give at each count of computed steps, and which one does the sweep's
`--thresh auto` measure?

    python docs/eval/plateaus.py PRESET RUN --steps N [--thresh-list]

RUN is a recording with N-step traces (its first unit stands for all: for a timestep signal every prompt gets the
same schedule). Walks a fine threshold grid and prints, for each count of computed steps that more than one schedule
reaches, every schedule with the smallest threshold that gives it, marking the one `calib.simulate.
thresholds_for_budgets` (the auto thresholds) places. With --thresh-list, prints instead one threshold inside each
schedule's range, comma-separated, for `teacal sweep --thresh`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.runfiles import load_traces  # noqa: E402
from calib.simulate import schedule_text, shared_schedule, teacache_schedules, thresholds_for_budgets, unit_series  # noqa: E402
from teacache.preset import Preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--thresh-list", action="store_true")
    args = parser.parse_args()
    preset = Preset.load(args.preset)
    if not shared_schedule(preset):
        sys.exit(f"{args.preset}: its schedules differ per prompt ({preset.signal}); this diagnostic is for a timestep signal")
    trace, _, groups, _ = load_traces((args.run,))
    unit = next(u for u in unit_series(trace, groups) if u.steps == args.steps)
    first: dict[str, float] = {}  # schedule -> the smallest grid threshold that gives it
    for threshold in np.geomspace(1e-3, 50, 200_000):
        first.setdefault(schedule_text(teacache_schedules(unit, preset, [threshold])[0][0]), float(threshold))
    if args.thresh_list:
        print(",".join(f"{t * 1.0001:.6g}" for t in first.values()))
        return
    auto = {schedule_text(teacache_schedules(unit, preset, [t])[0][0]) for t in thresholds_for_budgets([unit], preset, np.arange(1, args.steps + 1) / args.steps)}
    for count in range(1, args.steps + 1):
        reached = [(t, s) for s, t in first.items() if s.count("x") == count]
        if len(reached) > 1:
            print(f"{count} of {args.steps}: " + "  ".join(f"{s} from {t:.4g}{' (auto)' if s in auto else ''}" for t, s in sorted(reached)))


if __name__ == "__main__":
    main()
