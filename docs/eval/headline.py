"""The README's headline rows from a held-out sweep: calibrated TeaCache against the best other method at equal calls.

    python docs/eval/headline.py SWEEP_FOLDER [--shares 0.2 0.3 0.4 0.5 0.6 0.75 | --calls 3 4 5 6 7]

Per budget (a share of the calls): calibrated TeaCache's best configuration within it (its own reuse rule): measured
speedup, mean PSNR (worst prompt), mean SSIM; the best borrowed set, static schedule or peer by mean PSNR, and by worst
prompt (the oracle left out: it is a ceiling, not a method). Prints markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.budgets import best_within  # noqa: E402
from calib.tables import aggregate  # noqa: E402
from teacache.preset import Preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.75])
    parser.add_argument("--calls", type=int, nargs="+", help="these budgets (computed calls) instead of --shares")
    args = parser.parse_args()
    table = pd.read_parquet(args.sweep / "sweep.parquet")
    preset = Preset.load(args.sweep / "sweep-preset.json")
    own = "calibrated" if preset.forecast.extrapolates else "none"
    view = aggregate(table)
    calls = int(table.loc[table["method"] == "uncached", "calls"].max())
    mine = view[(view["method"] == "teacache") & (view["forecast"] == own)].reset_index(drop=True)
    others = view[view["method"].isin(["baseline", "static", "fbcache", "magcache", "seacache", "dbcache"])]
    print("| computed calls | calibrated: speedup, PSNR mean (worst), SSIM | best other by mean | best other by worst prompt |")
    print("|---|---|---|---|")
    per_step = 2 if (table["computed_uncond"] > 0).any() else 1  # calls a step: 2 with CFG, 1 without
    for budget in args.calls or [int(round(share * calls / per_step) * per_step) for share in args.shares]:
        i = best_within(mine["computed"], mine["psnr"], [budget])[0]
        cell = "-" if i < 0 else f"{mine['speedup'][i]:.2f}x, {mine['psnr'][i]:.1f} ({mine['psnr_worst'][i]:.1f}), {mine['ssim'][i]:.3f}"
        by_mean, by_worst = (None, "-"), (None, "-")
        for label, g in others.groupby("label"):
            g = g.reset_index(drop=True)
            j = best_within(g["computed"], g["psnr"], [budget])[0]
            if j >= 0 and (by_mean[0] is None or g["psnr"][j] > by_mean[0]):
                by_mean = (g["psnr"][j], f"{label}: {g['psnr'][j]:.1f} ({g['psnr_worst'][j]:.1f})")
            k = best_within(g["computed"], g["psnr_worst"], [budget])[0]
            if k >= 0 and (by_worst[0] is None or g["psnr_worst"][k] > by_worst[0]):
                by_worst = (g["psnr_worst"][k], f"{label}: {g['psnr_worst'][k]:.1f}")
        print(f"| {budget} of {calls} | {cell} | {by_mean[1]} | {by_worst[1]} |")


if __name__ == "__main__":
    main()
