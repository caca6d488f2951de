"""A new preset against the columns of a committed ladder table, without re-running the calibrations behind them.

    python docs/eval/against_ladder.py LADDER.md HELD --steps N NAME=PRESET [NAME=PRESET ...]

HELD is a recording of the ladder's held-out prompts (`teacal record HELD --model M --prompts HELDOUT.jsonl --steps N`);
each preset is swept there as `docs/eval/ladder.py` sweeps its rungs (auto thresholds, PSNR) into HELD/NAME-N, and its
front (mean PSNR (worst prompt) of the best threshold within each budget of calls) printed beside LADDER.md's columns
at N steps, with the budgets where it is more than ladder.AGREE_DB below each, on the mean or the worst prompt. The
full calibrations behind a ladder cost 300,000-400,000 calls; their columns stand for them here.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ladder import agreement, cell, front, teacal  # noqa: E402

from calib.tables import aggregate  # noqa: E402

POINT = re.compile(r"([\d.]+) \(([\d.]+)\)")


def ladder_columns(ladder: Path, steps: int) -> dict[str, list]:
    """The table at `steps` of a ladder.md: column -> per budget (mean, worst) or, for the best-other columns, the text."""
    section = ladder.read_text().split(f"## {steps} steps\n")[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    columns: dict[str, list] = {h: [] for h in head}
    for line in rows[1:]:  # the rule line (|---|) is not among them
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0][:1].isdigit():  # the agreement table follows
            break
        for name, text in zip(head, cells, strict=True):
            point = POINT.fullmatch(text)
            columns[name].append((float(point[1]), float(point[2])) if point else None if text == "-" else text)
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ladder", type=Path)
    parser.add_argument("held", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("presets", nargs="+", metavar="NAME=PRESET")
    args = parser.parse_args()
    columns = ladder_columns(args.ladder, args.steps)
    budgets = [int(calls.split()[0]) for calls in columns["calls"]]
    fronts = {}
    for named in args.presets:
        name, _, preset = named.partition("=")
        out = args.held / f"{name.replace(' ', '-')}-{args.steps}"
        teacal("sweep", str(args.held), "--preset", preset, "--steps", str(args.steps), "--out", str(out), "--oracle", "none", "--metrics", "psnr", "--yes")
        view = aggregate(pd.read_parquet(out / "sweep.parquet"))
        fronts[name] = front(view[view["method"] == "teacache"], budgets)
    kinds = {name: {type(v) for v in column if v is not None} for name, column in columns.items()}
    calibrated = {name: columns[name] for name in columns if kinds[name] == {tuple} and not name.endswith("plain reuse")}
    others = [name for name in columns if kinds[name] == {str} and name != "calls"]
    lines = [f"`python docs/eval/against_ladder.py {' '.join(sys.argv[1:])}`: the new preset(s) beside {args.ladder}'s columns at {args.steps} steps.\n",
             "| calls | " + " | ".join([*fronts, *calibrated, *others]) + " |", "|" + "---|" * (1 + len(fronts) + len(calibrated) + len(others))]
    for i, calls in enumerate(columns["calls"]):
        lines.append(f"| {calls} | " + " | ".join([*(cell(f[i]) for f in fronts.values()), *(cell(c[i]) for c in calibrated.values()),
                                                   *(columns[o][i] or "-" for o in others)]) + " |")
    lines += agreement({**fronts, **calibrated}, budgets)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
