"""Does a per-prompt signal tell which prompts a TeaCache schedule hurts? Measured before building a rule on it.

    python docs/eval/adaptivity.py HELDOUT_RUN SWEEP_FOLDER --steps N [--column x_modin --column y_output]

For every prompt of the held-out recording, a column's change per step is divided by its median over the prompts at
that step and branch; the prompt's score is the mean log of that ratio (> 0: it changes more than a typical prompt).
For each TeaCache configuration of the sweep, the Spearman correlation between the score and the prompt's PSNR is
printed. An adaptive rule ("compute more where the per-prompt signal runs high") helps the worst prompt only where
the correlation is clearly negative. `x_modin` (block 0's modulated input) is a signal both runtimes compute before
deciding; `y_output` (the transformer's output change) is what TeaCache estimates and a skipped call cannot see.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.budgets import IDENTICAL_DB  # noqa: E402
from calib.runfiles import load_trace  # noqa: E402


def scores(trace: pd.DataFrame, column: str) -> pd.Series:
    """Per prompt: the mean log ratio of `column` to its median over the prompts at the same step and branch."""
    typical = trace.groupby(["step", "branch"])[column].transform("median")
    return np.log(trace[column] / typical).groupby(trace["prompt_id"]).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--column", action="append", default=None)
    args = parser.parse_args()
    columns = args.column or ["x_modin", "y_output"]
    trace = load_trace(args.run)
    trace = trace[trace["steps"] == args.steps]
    per_prompt = {c: scores(trace, c) for c in columns}
    table = pd.read_parquet(args.sweep / "sweep.parquet")
    table = table[table["method"] == "teacache"]
    print(f"{'configuration':<42}{'computed':>9}{'mean':>7}{'worst':>7}" + "".join(f"{'rho ' + c:>14}" for c in columns))
    for config, group in table.groupby("config"):
        psnr = group.set_index("prompt_id")["psnr"].replace(np.inf, IDENTICAL_DB)
        rho = [pd.concat([psnr, per_prompt[c]], axis=1).dropna().corr(method="spearman").iloc[0, 1] for c in columns]
        print(f"{config[:41]:<42}{group['computed_cond'].mean():>9.1f}{psnr.mean():>7.1f}{psnr.min():>7.1f}" + "".join(f"{r:>+14.2f}" for r in rho))


if __name__ == "__main__":
    main()
