"""Which placement of the auto thresholds would a calibration choose: the grid's, or the evenest schedule of each count?

    python docs/eval/placement.py RUN [--steps N ...] [--prompts K]

RUN is a calibration run folder with its preset (`teacal calibrate`'s). A polynomial's thresholds reach several
schedules of one count of computed steps; `calib.simulate.thresholds_for_budgets` (the sweep's auto thresholds)
measures the one its grid lands on. The alternative tried in commit 242d6bc (and reverted) took the evenest: the
shortest longest run of skipped steps, then the smallest sum of squared runs, then the smaller threshold. At every count of the compared budgets
where the two differ, both schedules are generated with plain reuse on the calibration prompts (parts in RUN/tune/,
as tune writes them) and scored on the first K (default 4) by (mean + worst prompt) / 2; prints each count and the mean
difference, even minus grid. Only calibration prompts are used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.backends import open_recording  # noqa: E402
from calib.budgets import SWEPT, budget_steps  # noqa: E402
from calib.runfiles import load_traces, unit_name  # noqa: E402
from calib.simulate import (  # noqa: E402
    forced_steps,
    schedule_text,
    shared_schedule,
    teacache_schedules,
    thresholds_for_budgets,
    unit_series,
)
from calib.tune import Measurer  # noqa: E402
from teacache.preset import Preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from plateaus import schedule_thresholds  # noqa: E402


def unevenness(schedule: str) -> tuple[int, int]:
    """The longest run of skipped steps, then the sum of the runs' squares."""
    runs = [len(run) for run in schedule.split("x") if run]
    return max(runs, default=0), sum(r * r for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, action="append", help="default: every recorded step count")
    parser.add_argument("--prompts", type=int, default=4, help="score on the first K calibration prompts")
    args = parser.parse_args()
    preset = Preset.load(args.run / "preset.json")
    if not shared_schedule(preset):
        sys.exit(f"{args.run}: its preset's schedules differ per prompt ({preset.signal}); this diagnostic is for a timestep signal")
    recording = open_recording(args.run)
    scored = [(item.id, seed) for item in recording.prompts.items[: args.prompts] for seed in recording.settings["seeds"]]
    measure = Measurer(recording, preset, echo=lambda *a: None)
    trace, _, groups, _ = load_traces((args.run,))
    units = unit_series(trace, groups)
    differences = []
    for steps in args.steps or recording.settings["steps"]:
        unit = next(u for u in units if u.steps == steps)
        by_count: dict[int, list[str]] = {}
        for schedule in schedule_thresholds(unit, preset):
            by_count.setdefault(schedule.count("x"), []).append(schedule)
        budgets = [k / steps for k in budget_steps(steps, SWEPT) if k > forced_steps(preset, steps).sum()]
        for threshold in thresholds_for_budgets([unit], preset, budgets):
            grid = schedule_text(teacache_schedules(unit, preset, [threshold])[0][0])
            even = min(by_count[grid.count("x")], key=unevenness)
            if unevenness(even) >= unevenness(grid):
                continue
            score = {}
            for schedule in (grid, even):
                measure(steps, schedule)
                per = json.loads(measure.part(steps, schedule).read_text())["per_generation"]
                values = np.array([per[unit_name(prompt, seed, steps, recording.size)] for prompt, seed in scored])
                score[schedule] = ((values.mean() + values.min()) / 2, values.mean(), values.min())
            differences.append(score[even][0] - score[grid][0])
            print(f"{steps} steps, {grid.count('x')} computed: grid {grid} {score[grid][1]:.1f} ({score[grid][2]:.1f}), "
                  f"even {even} {score[even][1]:.1f} ({score[even][2]:.1f}): {differences[-1]:+.2f} dB", flush=True)
    if differences:
        print(f"even minus grid, (mean + worst prompt) / 2 over {len(differences)} counts on {args.prompts} prompts: {np.mean(differences):+.2f} dB")
    else:
        print("the grid already lands on the evenest schedule of every compared count")


if __name__ == "__main__":
    main()
