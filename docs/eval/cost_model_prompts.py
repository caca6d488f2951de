"""Does the cost model see which prompt a schedule hurts? Per held-out prompt, its modelled dB against the measured PSNR.

    python docs/eval/cost_model_prompts.py EVAL --steps N

EVAL is a make eval folder: the cost model (plain reuse, `output` target, as fit's yardstick) is built from
EVAL/calib (its recording and probes) and applied to the held-out recording EVAL/heldout; every static schedule of
the sweep EVAL/heldout/sweep-N with plain reuse is costed on each held-out prompt and set beside its measured PSNR.
Prints how well the model ranks the prompts within a schedule, how often it names the measured worst prompt, and by
how much each prompt's measured PSNR departs from the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.costmodel import cost_model, decibels, schedule_cost  # noqa: E402
from calib.runfiles import load_probes_of, load_traces  # noqa: E402
from calib.simulate import unit_series  # noqa: E402


def costed(eval_dir: Path, steps: int) -> pd.DataFrame:
    """One row per (configuration, held-out prompt): measured PSNR and modelled dB."""
    trace, _, groups, runs = load_traces((eval_dir / "calib",))
    model = cost_model(unit_series(trace, groups), load_probes_of(runs), "output")
    trace, _, groups, _ = load_traces((eval_dir / "heldout",))
    held = {u.key[0].split(":", 1)[1]: u for u in unit_series(trace, groups) if u.steps == steps}
    sweep = pd.read_parquet(eval_dir / "heldout" / f"sweep-{steps}" / "sweep.parquet")
    sweep = sweep[sweep["schedule"].notna() & (sweep["forecast"] == "none")]
    rows = []
    for r in sweep.itertuples():
        unit = held.get(r.prompt_id)
        schedule = np.array([c == "x" for c in str(r.schedule)])
        if unit is None or len(schedule) != steps:  # per-branch schedules are not static: left out
            continue
        modelled = decibels(schedule_cost(model.matrix(unit), np.stack([schedule] * len(unit.branches))))
        rows.append((r.config, r.prompt_id, r.psnr, modelled))
    table = pd.DataFrame(rows, columns=["config", "prompt", "psnr", "modelled"]).astype({"psnr": float, "modelled": float})
    return table[np.isfinite(table["psnr"]) & np.isfinite(table["modelled"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    table = costed(args.eval, args.steps)
    per_config = [g for _, g in table.groupby("config") if len(g) > 3]
    spearman = pd.Series([g["psnr"].corr(g["modelled"], method="spearman") for g in per_config])
    named = sum(g.loc[g["psnr"].idxmin(), "prompt"] == g.loc[g["modelled"].idxmin(), "prompt"] for g in per_config)
    print(f"{args.eval}, {args.steps} steps: {len(per_config)} static schedules x {table['prompt'].nunique()} held-out prompts")
    print(f"Spearman (measured, modelled) across prompts within a schedule: median {spearman.median():.2f}, 10% {spearman.quantile(0.1):.2f}")
    print(f"the model names the measured worst prompt in {named} of {len(per_config)} schedules")
    offset = (table["psnr"] - table["modelled"]).groupby(table["prompt"]).mean()
    offset -= offset.median()
    print("measured - modelled dB per prompt, less the median prompt's:")
    print(offset.sort_values().round(1).to_string())


if __name__ == "__main__":
    main()
