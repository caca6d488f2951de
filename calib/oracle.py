"""The oracle: the best static schedule per budget. No torch.

Two of them, one word each:
* the cost model's (`oracle_db`, `gap_to_oracle`): the schedules of least modelled cost on some prompts
  (`calib.costmodel.oracle_schedules`), what fit scores its candidates against;
* the measured one (`measured_static`, `measured_oracle`): the static schedules that sweeps of the calibration run
  measured by generating; the best per budget, and the runners-up, go into the preset, and a later sweep generates
  them. `check_cost_model` says how well the cost model ranks what was measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calib.budgets import IDENTICAL_DB, OBJECTIVES, budget_steps, over_prompts
from calib.costmodel import db_at_budgets, decibels, oracle_schedules, schedule_cost, simulated_front
from calib.errors import UserError
from calib.runfiles import SWEEP_FILE, SWEEP_TABLE, read_json, read_table
from calib.simulate import UnitSeries, forced_steps, schedule_text, thresholds_for_budgets
from calib.tables import static_configs
from teacache.preset import Preset


def modelled_db(matrices: dict, units: list[UnitSeries], schedule: np.ndarray, objective: str = "mean") -> float:
    """The modelled dB of one static schedule, shared by every branch, over `units` under `objective`."""
    return over_prompts([decibels(schedule_cost(matrices[u.key], np.tile(schedule, (len(u.branches), 1)))) for u in units], objective)


def oracle_db(train: list[UnitSeries], test: list[UnitSeries], matrices: dict, forced: np.ndarray, budgets: np.ndarray,
              objective: str = "mean") -> np.ndarray:
    """Modelled dB on `test` (under `objective`) of the best static schedules of `train` (one step count), at each budget."""
    mean = np.mean([matrices[u.key].mean(axis=0) for u in train], axis=0)
    schedules = oracle_schedules(mean, forced)
    n = len(forced)
    out = []
    for budget in budgets:
        k = round(budget * n)
        schedule = schedules.get(k)
        if schedule is None:
            out.append(np.nan)
            continue
        out.append(modelled_db(matrices, test, schedule, objective))
    return np.array(out)


def gap_to_oracle(preset: Preset, train: list[UnitSeries], test: list[UnitSeries], matrices: dict, steps: int, objective: str = "mean") -> np.ndarray:
    """At each budget of `steps`: the modelled dB on `test` of the preset's front (thresholds placed on `train`) minus
    that of `train`'s best static schedules, both under `objective`."""
    budgets = np.array(budget_steps(steps)) / steps
    front = simulated_front(test, preset, thresholds_for_budgets(train, preset, budgets), matrices, objective)
    return db_at_budgets(front, budgets) - oracle_db(train, test, matrices, forced_steps(preset, steps), budgets, objective)


# -- the oracle, verified by generating -------------------------------------------------------------------------------
ORACLE_CANDIDATES = 3  # schedules per budget a sweep generates as oracle candidates: the calibration's best and runners-up


def measured_static(sweeps: tuple[Path, ...], runs: list[Path]) -> pd.DataFrame:
    """Every static schedule that sweeps of the calibration runs measured on all their prompts: steps, schedule, mean
    PSNR over the prompts (`psnr`), the worst prompt's (`worst`) and the worst fifth's (`cvar`). Only sweeps of the runs being fitted are accepted: what is measured on held-out prompts
    must never tune the calibration."""
    fitted = {Path(r).resolve() for r in runs}
    rows = []
    for folder in map(Path, sweeps):
        info_path, table_path = folder / SWEEP_FILE, folder / SWEEP_TABLE
        if not info_path.is_file() or not table_path.is_file():
            raise UserError(f"--oracle-from {folder}: no finished sweep here (sweep.json and sweep.parquet); run `teacal sweep RUN --out {folder}` first")
        info = read_json(info_path)
        measured_run = (folder / info.get("run", ".")).resolve()
        if measured_run not in fitted:
            raise UserError(f"--oracle-from {folder}: it measured {measured_run}, which is not a run being fitted; "
                            "the oracle is chosen on the calibration prompts only, never on held-out ones")
        table = read_table(table_path)
        schedules = static_configs(table)
        psnr = table["psnr"].where(np.isfinite(table["psnr"]), IDENTICAL_DB)  # identical images: as good as it gets
        per_config = psnr[table["config"].isin(schedules.index)].groupby(table["config"])
        rows += [(int(info["settings"]["steps"]), schedules[config], *(over_prompts(values, o) for o in OBJECTIVES)) for config, values in per_config]
    if not rows:
        raise UserError(f"--oracle-from {', '.join(map(str, sweeps))}: no static schedule measured on every prompt")
    frame = pd.DataFrame(rows, columns=["steps", "schedule", "psnr", "worst", "cvar"])
    return frame.groupby(["steps", "schedule"], as_index=False).agg(psnr=("psnr", "max"), worst=("worst", "min"), cvar=("cvar", "min"))


def measured_oracle(measured: pd.DataFrame, echo=print) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, list[str]]]]:
    """The best *measured* static schedule per step count and budget, from sweeps of the calibration runs
    (`measured_static`), and the runners-up: the next ORACLE_CANDIDATES - 1 by mean PSNR.

    The cost model's schedule (dynamic programming) is a candidate among others: a sweep of the calibration run measures
    it next to every other static schedule (calibrated TeaCache on a latent-independent signal, the borrowed sets on
    it, uniform spacing). The oracle at a budget is the candidate of the best mean PSNR over the calibration prompts,
    so there it is at or above every static method by construction, and it was verified by generating. Why runners-up:
    on other prompts near-equal schedules change places, so a sweep generates them too and its report's oracle is the
    best static schedule measured on the prompts it swept.
    """
    table = measured.assign(budget=measured["schedule"].str.count("x")).sort_values(["psnr", "schedule"], ascending=[False, True])
    ranked = table.groupby(["steps", "budget"], sort=True).head(ORACLE_CANDIDATES)
    best: dict[str, dict[str, str]] = {}
    runners_up: dict[str, dict[str, list[str]]] = {}
    for steps, rows in ranked.groupby("steps"):
        tops = rows.groupby("budget", sort=True).head(1)
        echo(f"oracle at {steps} steps, verified by generating on the calibration prompts: "
             + ", ".join(f"{r.budget} steps {r.psnr:.1f} dB" for r in tops.itertuples()))
        best[str(steps)] = {str(r.budget): r.schedule for r in tops.itertuples()}
        runners_up[str(steps)] = {str(b): list(g["schedule"].iloc[1:]) for b, g in rows.groupby("budget", sort=True) if len(g) > 1}
    return best, runners_up


def check_cost_model(matrices: dict, units: list[UnitSeries], measured: pd.DataFrame) -> dict:
    """How well the cost model ranks the static schedules a sweep of the calibration prompts measured.

    Per step count and budget (20%..75% of the steps): does the schedule the model rates best have the best measured
    mean PSNR, and how much does it lose if not; the rank correlation between modelled dB and measured PSNR inside a
    budget (what choosing a schedule needs); and the RMS error of the modelled dB after one offset per step count (the
    model predicts latent error, the sweep measures 8-bit images).
    """
    from scipy.stats import spearmanr

    rows = []
    for steps in sorted(set(measured["steps"]) & {u.steps for u in units}):
        same = [u for u in units if u.steps == steps]
        for r in measured[measured["steps"] == steps].itertuples():
            schedule = np.array([c == "x" for c in r.schedule])
            if len(schedule) != steps or int(schedule.sum()) not in budget_steps(steps):
                continue  # outside the compared budgets; near no skips, 8-bit rounding decides the PSNR
            rows.append((steps, int(schedule.sum()), r.psnr, modelled_db(matrices, same, schedule)))
    table = pd.DataFrame(rows, columns=["steps", "budget", "measured", "modelled"])
    if table.empty:
        return {}
    offsets = table.groupby("steps").apply(lambda g: (g["measured"] - g["modelled"]).mean(), include_groups=False)
    error = table["measured"] - table["modelled"] - table["steps"].map(offsets)
    picks, losses, correlations = 0, [], []
    budgets = [g for _, g in table.groupby(["steps", "budget"]) if len(g) > 1]
    for g in budgets:
        loss = float(g["measured"].max() - g.loc[g["modelled"].idxmax(), "measured"])
        picks += loss <= 1e-9
        losses.append(loss)
        if g["measured"].nunique() > 2:
            correlations.append(spearmanr(g["modelled"], g["measured"]).statistic)
    return {"schedules": len(table), "budgets": len(budgets), "best_is_measured_best": int(picks),
            "worst_loss_db": round(max(losses, default=0.0), 4), "rank_correlation": round(float(np.nanmean(correlations)), 4) if correlations else None,
            "rms_db": round(float(np.sqrt(np.mean(error**2))), 4)}


def preset_oracle(units: list[UnitSeries], step_rules: Preset, plain: dict, measured: pd.DataFrame | None, sources: tuple[Path, ...],
                  echo=print) -> tuple[dict, dict, str, dict]:
    """The oracle schedules the preset carries: the cost model's (plain reuse, what sweep runs as the oracle), replaced
    (`plain`: its matrices per unit), replaced by the measured ones where sweeps of the calibration measured them; their runners-up, their source, and the cost model's audit."""
    oracle = {}
    for steps in sorted({u.steps for u in units}):
        same = [u for u in units if u.steps == steps]
        mean = np.mean([plain[u.key].mean(axis=0) for u in same], axis=0)
        oracle[str(steps)] = {str(b): schedule_text(s) for b, s in oracle_schedules(mean, forced_steps(step_rules, steps)).items()}
    if measured is None:
        return oracle, {}, "cost model", {}
    measured_best, runners_up = measured_oracle(measured, echo=echo)
    for steps, by_budget in measured_best.items():
        oracle.setdefault(steps, {}).update(by_budget)
    audit = check_cost_model(plain, units, measured)
    if audit:
        echo(f"cost model against {audit['schedules']} static schedules measured on the calibration prompts: its best is the measured best at "
             f"{audit['best_is_measured_best']} of {audit['budgets']} budgets (worst loss {audit['worst_loss_db']:.2f} dB), rank correlation inside a budget "
             f"{audit['rank_correlation']}, RMS error {audit['rms_db']:.2f} dB after one offset per step count")
    return oracle, runners_up, "measured on the calibration prompts: " + ", ".join(str(p) for p in sources), audit
