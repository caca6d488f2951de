"""Can any static schedule meet issue 27's bar at a low budget? Every schedule of K computed steps, generated on the
held-out prompts: its mean and worst-prompt PSNR against the best borrowed set or peer's.

    python docs/eval/static_frontier.py EVAL --steps N --computed K [--computed K2 ...]

EVAL is a make eval folder. Every schedule that computes the first and last step and K - 2 of the others (C(N-2, K-2)
of them) is generated, plain reuse, on each prompt of EVAL/ladder-heldout (the ladder's held-out recording; parts in
its tune/ folder, so a rerun reads them back) and set against the best mean and the best worst prompt of the other
methods within 2K calls (make eval's sweep, EVAL/heldout/sweep-N). A diagnostic of the bar, not a way to choose a
schedule: it reads the held-out prompts.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.backends import open_recording  # noqa: E402
from calib.progress import progress  # noqa: E402
from calib.tune import Measurer  # noqa: E402
from teacache.preset import Preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from ladder import best_others  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--computed", type=int, action="append", required=True, help="computed steps of N (CFG: twice the calls)")
    args = parser.parse_args()
    run, n = args.eval / "ladder-heldout", args.steps
    recording = open_recording(run)
    preset = Preset.load(next(args.eval.glob("ladder-*/preset.json")))  # any preset of the model: only its name is used
    measure = Measurer(recording, preset, echo=lambda *a: None)
    for k in args.computed:
        schedules = []
        for middle in itertools.combinations(range(1, n - 1), k - 2):
            marks = ["."] * n
            for i in (0, n - 1, *middle):
                marks[i] = "x"
            schedules.append("".join(marks))
        with progress(f"{k} computed steps of {n}: {len(schedules)} schedules", len(schedules)) as advance:
            for schedule in schedules:
                measure(n, schedule)
                advance()
    rows = [(s, s.count("x"), v["mean"], v["worst"]) for (steps, s), v in measure.summary.items() if steps == n]
    table = pd.DataFrame(rows, columns=["schedule", "computed", "mean_db", "worst_db"])
    for k in sorted(args.computed):
        within = table[table["computed"] <= k]
        sweep = args.eval / "heldout" / f"sweep-{n}" / "sweep.parquet"
        (mean_bar, _), (worst_bar, _) = (best_others(sweep, column, [2 * k])[0] for column in ("psnr", "psnr_worst"))
        both = within[(within["mean_db"] >= mean_bar - 0.5) & (within["worst_db"] >= worst_bar - 0.5)]
        print(f"\n{2 * k} of {2 * n} calls: {len(within)} static schedules; the best other method's mean {mean_bar:.2f}, worst prompt "
              f"{worst_bar:.2f} dB. Within 0.5 dB of both: {len(both)}. The front, mean (worst prompt):")
        mean, worst = within["mean_db"].to_numpy(), within["worst_db"].to_numpy()
        dominated = [((mean >= m) & (worst >= w) & ((mean > m) | (worst > w))).any() for m, w in zip(mean, worst, strict=True)]
        for r in within[~np.array(dominated)].sort_values("mean_db", ascending=False).itertuples():
            print(f"  {r.schedule}  {r.mean_db:.2f} ({r.worst_db:.2f}){'  <- within 0.5 dB of both' if r.Index in both.index else ''}")

if __name__ == "__main__":
    main()
