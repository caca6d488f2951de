"""What calibration costs against what it buys: each rung of `teacal calibrate`'s ladder, measured on held-out prompts.

    python docs/eval/ladder.py EVAL --prompts HELDOUT.jsonl --steps N [--steps M] --budget B [--budget C ...] [--full PRESET]
                               [--plain B] [--preset NAME=PRESET ...]

For each budget B, EVAL/ladder-B/preset.json is what `teacal calibrate --budget B` wrote (make ladder). The held-out
prompts are recorded once (EVAL/ladder-heldout), each preset swept there with `--method teacache` (its own reuse
rule; with `--plain B`, budget B's preset also with plain reuse), and `--full PRESET` (a preset of the full
calibration, sweeps and tune included) and any `--preset NAME=PRESET` (say, the same budget calibrated on the same
prompts in another order) beside them. The best borrowed set or peer per budget, by mean and by worst
prompt, comes from make eval's sweep of the same held-out prompts (EVAL/heldout/sweep-N), when it is there. Writes
EVAL/ladder.md: per step count, mean PSNR (worst prompt) at equal computed calls, each rung's calls, and for every
pair of calibrations the budgets where one is more than 0.5 dB below the other on the mean or the worst prompt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.budgets import best_within, budget_steps  # noqa: E402
from calib.probe import Probe  # noqa: E402
from calib.report import with_measured_oracle  # noqa: E402
from calib.tables import aggregate  # noqa: E402


def teacal(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "calib.cli", *args], cwd=ROOT, check=True)


# Two calibrations "agree" at a budget when neither is below the other by more than this, on the mean or the worst
# prompt (issue 25's bar for the default against the full calibration).
AGREE_DB = 0.5


def front(view: pd.DataFrame, budgets: list[int]) -> list[tuple[float, float] | None]:
    """Mean and worst-prompt PSNR of the best configuration within each budget of calls (None where none is)."""
    best = best_within(view["computed"], view["psnr"], budgets)
    return [None if i < 0 else (float(view["psnr"].iloc[i]), float(view["psnr_worst"].iloc[i])) for i in best]


def cell(point: tuple[float, float] | None) -> str:
    return "-" if point is None else f"{point[0]:.1f} ({point[1]:.1f})"


def below(a: list, b: list, budgets: list[int]) -> list[int]:
    """The budgets where front `a` is more than AGREE_DB below front `b`, on the mean or the worst prompt."""
    return [budget for budget, p, q in zip(budgets, a, b, strict=True)
            if p is not None and q is not None and (p[0] < q[0] - AGREE_DB or p[1] < q[1] - AGREE_DB)]


def agreement(fronts: dict[str, list], budgets: list[int]) -> list[str]:
    """A markdown table: for each pair of calibrations (plain-reuse columns left out), the budgets where the row's
    is more than AGREE_DB below the column's."""
    calibrated = [name for name in fronts if not name.endswith("plain reuse")]
    lines = [f"\nBudgets (of {len(budgets)}) where the row's calibration is more than {AGREE_DB} dB below the column's, on the "
             "mean or the worst prompt:\n", "| below | " + " | ".join(calibrated) + " |", "|" + "---|" * (len(calibrated) + 1)]
    for a in calibrated:
        misses = ["-" if a == b else ", ".join(map(str, below(fronts[a], fronts[b], budgets))) or "none" for b in calibrated]
        lines.append(f"| {a} | " + " | ".join(misses) + " |")
    return lines


def calls_made(run: Path) -> int:
    """The transformer calls a calibration run made, counted from its files: every recorded call; each probe's
    computed ones (as the runtime counted them where its part says, else from its schedule); every computed call of
    its calibration sweeps and of tune's generations."""
    calls = len(pd.read_parquet(run / "trace.parquet"))  # a row per recorded step and branch
    branches = 2 if json.loads((run / "run.json").read_text())["settings"]["cfg"] > 1 else 1
    for part in (run / "probes").glob("*/*.json"):
        p = json.loads(part.read_text())
        if "calls" not in p:
            probe = Probe(None, p["seed"], p["steps"], (p["width"], p["height"]), p["first"], p["length"], p["kind"], p["budget"], p["alpha"])
            p["calls"] = probe.computed * branches
        calls += p["calls"]
    calls += sum(int(pd.read_parquet(sweep)["computed"].sum()) for sweep in run.glob("calib-sweep-*/sweep.parquet"))
    for part in (run / "tune").glob("*/*.json"):
        if ".shard-" not in part.name:  # a shard's generations are in the merged part too
            p = json.loads(part.read_text())
            calls += p["schedule"].count("x") * branches * len(p["per_generation"])
    return calls


def best_others(sweep: Path, column: str, budgets: list[int]) -> list[tuple[float | None, str]]:
    """Per budget of calls: the best `column` (psnr, psnr_worst) of any borrowed set or peer in make eval's sweep, each
    at its own best configuration within the budget, and whose it is ((None, "-") where none reaches it)."""
    swept = pd.read_parquet(sweep)
    others = with_measured_oracle(aggregate(swept), swept)
    others = others[~others["method"].isin(["uncached", "teacache", "oracle", "oracle pick"])]
    best = []
    for b in budgets:
        points = []
        for label, g in others.groupby("label"):
            i = best_within(g["computed"], g[column], [b])[0]
            if i >= 0:
                points.append((float(g[column].iloc[i]), label))
        best.append(max(points, default=(None, "-")))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval", type=Path)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--steps", type=int, action="append", required=True)
    parser.add_argument("--budget", type=int, action="append", required=True)
    parser.add_argument("--full", type=Path, help="a preset of the full calibration (record, probe, fit, sweeps, tune)")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME=PRESET", help="another preset beside the rungs (repeatable)")
    parser.add_argument("--plain", type=int, action="append", default=[], metavar="B",
                        help="also sweep budget B's preset, if it forecasts, with plain reuse: a column of its own (repeatable)")
    args = parser.parse_args()
    held = args.eval / "ladder-heldout"
    presets = {f"budget {b:,}": args.eval / f"ladder-{b}" / "preset.json" for b in args.budget}
    for named in args.preset:
        name, _, path = named.partition("=")
        if not path:
            parser.error(f"--preset {named}: expected NAME=PRESET")
        presets[name] = Path(path)
    if args.full:
        presets["full calibration"] = args.full
    model = json.loads(next(iter(presets.values())).read_text())["model"]
    teacal("record", str(held), "--model", model, "--prompts", str(args.prompts), *[a for n in args.steps for a in ("--steps", str(n))])
    lines = [f"# What calibration costs, and what it buys: {model}\n",
             f"`python docs/eval/ladder.py {' '.join(sys.argv[1:])}`. Held-out prompts: {args.prompts} (never used to calibrate). "
             "Mean PSNR (worst prompt) in dB against the uncached image, each preset's best threshold within the budget.\n"]
    for name, preset in presets.items():
        plan = json.loads((preset.parent / "calibrate.json").read_text()) if (preset.parent / "calibrate.json").exists() else None
        rung = plan["settings"]["rung"]["name"] if plan else "sweeps and tune included"
        cost = f", {calls_made(preset.parent):,} calls" if plan else ""
        lines.append(f"- {name}: {preset} ({rung}{cost})")
    for steps in args.steps:
        rows = {}
        for name, preset in presets.items():
            out = held / f"{name.replace(' ', '-').replace(',', '')}-{steps}"
            plain = name in {f"budget {b:,}" for b in args.plain} and json.loads(preset.read_text()).get("forecast", {}).get("rule", "none") != "none"
            teacal("sweep", str(held), "--preset", str(preset), "--steps", str(steps), "--out", str(out), "--oracle", "none", "--metrics", "psnr",
                   "--metrics", "ssim", "--yes", *(["--forecast", "preset", "--forecast", "none"] if plain else []))
            view = aggregate(pd.read_parquet(out / "sweep.parquet"))
            view = view[view["method"] == "teacache"]
            if plain:  # the two fronts apart: the preset's own rule, and the same polynomial with plain reuse
                reuse = ~view["label"].str.contains("forecast")  # "teacache (calibrated)"; the rule: "..., forecast calibrated"
                rows[name], rows[f"{name}, plain reuse"] = view[~reuse], view[reuse]
            else:
                rows[name] = view
        calls = steps * 2
        budgets = [k * 2 for k in budget_steps(steps)]
        fronts = {name: front(view, budgets) for name, view in rows.items()}
        table = {"calls": [f"{b} of {calls}" for b in budgets], **{name: [cell(p) for p in f] for name, f in fronts.items()}}
        full_sweep = args.eval / "heldout" / f"sweep-{steps}" / "sweep.parquet"
        if full_sweep.exists():
            for column, what in (("psnr", "best borrowed set or peer"), ("psnr_worst", "best worst prompt of those")):
                best = best_others(full_sweep, column, budgets)
                table[what] = [f"{v:.1f} ({label})" if v is not None else "-" for v, label in best]
        frame = pd.DataFrame(table)
        lines += [f"\n## {steps} steps\n", "| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
        lines += agreement(fronts, budgets)
    (args.eval / "ladder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
