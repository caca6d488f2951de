"""The objective's folds, scored on generated images instead of the cost model: would they choose another objective?

    python docs/eval/objective_folds.py RUN

RUN is a calibration run folder with its preset (`teacal calibrate`'s, e.g. EVAL/ladder-8000). The same folds, fold
fits and shape searches as `teacal fit --objective auto` (`calib.search.choose_objective`); each fold's schedule at
each budget is then generated, plain reuse, on the calibration prompts that fold held out (parts in
RUN/objective-folds/, so a rerun reads them back), and each objective is scored as choose_objective scores it: the
mean over budgets of (mean prompt + worst prompt) / 2, every calibration prompt pooled from the fold that held it out.
Prints the modelled and the measured scores side by side, per step count too. Only calibration prompts are used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calib.backends import open_recording  # noqa: E402
from calib.budgets import OBJECTIVES, budget_steps  # noqa: E402
from calib.fit import (  # noqa: E402
    OBJECTIVE_FOLDS,
    TARGETS,
    YARDSTICK,
    FitRequest,
    cost_models,
    cross_validate,
    fold_preset,
    group_folds,
    load_calibration,
    transform,
)
from calib.runfiles import unit_name  # noqa: E402
from calib.search import OBJECTIVE_TRIALS, held_out_db, search_shape  # noqa: E402
from calib.simulate import EXACT_SIGNALS, schedule_text, teacache_schedules, thresholds_for_budgets  # noqa: E402
from calib.tune import Measurer  # noqa: E402
from teacache.preset import Preset  # noqa: E402


class FoldMeasurer(Measurer):
    """Generates only the prompts one fold held out; its parts apart from tune's and from the other folds'."""

    def __init__(self, recording, preset, fold: int, prompt_ids: set[str], backend) -> None:
        super().__init__(recording, preset, echo=lambda *a: None)
        self.fold, self.backend = fold, backend
        self.mine = [(item, seed) for item, seed in self.pairs if item.id in prompt_ids]

    def part(self, steps, schedule, forecast=None):
        return self.recording.run / "objective-folds" / f"fold-{self.fold}" / str(steps) / f"{schedule.replace('.', '-')}.json"


def scores(pooled: dict, steps: int | None = None) -> dict[str, float]:
    common = [k for k in pooled["mean"] if all(len(pooled[o].get(k, ())) == len(pooled["mean"][k]) for o in OBJECTIVES)
              and steps in (None, k[0])]
    return {o: round(float(np.mean([(np.mean(pooled[o][k]) + np.min(pooled[o][k])) / 2 for k in common])), 2) for o in OBJECTIVES}


def main() -> None:
    run = Path(sys.argv[1])
    quiet = lambda *a, **k: None  # noqa: E731
    request = FitRequest(runs=(run,), out=run / "objective-folds" / "unused.json")
    calibration = load_calibration(request, quiet)
    costs = cost_models(calibration.units, calibration.probes, TARGETS, quiet)
    scored, windows = cross_validate(request, calibration, costs, quiet)
    units = calibration.units
    # the candidate objective_by_folds uses: the best cross-validated timestep signal
    c = max((s for s in scored if s.candidate.signal in EXACT_SIGNALS and s.candidate.degree == request.degree), key=lambda s: s.db_gap).candidate
    w = windows[(c.signal, c.target, c.branch_mode)]
    folds = group_folds(np.array([u.group for u in units]), min(OBJECTIVE_FOLDS, calibration.prompts))
    matrices = costs.plain[YARDSTICK]
    recording, preset = open_recording(run), Preset.load(run / "preset.json")
    modelled = {o: {} for o in OBJECTIVES}
    measured = {o: {} for o in OBJECTIVES}
    backend = None
    for objective in OBJECTIVES:
        for fold, (train_units, test_units) in enumerate(folds):
            fitted = fold_preset(c, units, w, transform(w.cost, c.transform), train_units, request.loss, calibration.settings["model"],
                                 request.ret_steps, calibration.step_rules.cutoff_steps)
            train, test = [units[i] for i in train_units], [units[i] for i in test_units]
            searched = search_shape(fitted, train, matrices, objective, OBJECTIVE_TRIALS, quiet=True)[0]
            for key, values in held_out_db(searched, train, test, matrices).items():
                modelled[objective].setdefault(key, []).extend(values)
            measure = FoldMeasurer(recording, preset, fold, {u.key[0].split(":", 1)[1] for u in test}, backend)
            for steps in sorted({u.steps for u in test}):
                train_n, test_n = [u for u in train if u.steps == steps], [u for u in test if u.steps == steps]
                for budget in budget_steps(steps):
                    placed = thresholds_for_budgets(train_n, searched, [budget / steps])
                    for u in test_n if placed else ():
                        schedule = schedule_text(teacache_schedules(u, searched, placed[-1:])[0][0])
                        measure(steps, schedule)
                        generated = measure.part(steps, schedule)
                        name = unit_name(u.key[0].split(":", 1)[1], u.key[1], steps, recording.size)
                        value = json.loads(generated.read_text())["per_generation"][name]
                        measured[objective].setdefault((steps, budget), []).append(value)
            backend = measure.backend or backend
        print(f"{objective}: searched and generated on every fold", flush=True)
    for name, pooled in (("modelled (the cost model; what fit uses)", modelled), ("measured (generated)", measured)):
        per_steps = "; ".join(f"{n} steps {scores(pooled, n)}" for n in sorted({k[0] for k in pooled['mean']}))
        print(f"{name}: {scores(pooled)}  ({per_steps})")


if __name__ == "__main__":
    main()
