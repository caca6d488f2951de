"""The cost model, the oracle and the schedule simulators: pure numbers, no model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.costmodel import CostModel, decibels, oracle_schedules, schedule_cost
from calib.simulate import UnitSeries, teacache_schedules, thresholds_for_budgets, unit_series
from teacache.preset import Preset


def _cost_table(n: int, seed: int) -> np.ndarray:
    """A synthetic ``c[m, j, p]``: skipping m after j costs more the longer the gap and the later the step."""
    rng = np.random.default_rng(seed)
    late = np.linspace(0.2, 2.0, n) * rng.uniform(0.7, 1.3, n)
    gap = np.arange(n)[:, None] - np.arange(n)[None, :]
    c = np.where(gap > 0, late[:, None] * np.maximum(gap, 1) ** rng.uniform(1.0, 1.6), np.inf)
    return c[:, :, None]


def test_oracle_beats_a_hand_built_schedule_on_a_synthetic_cost_table():
    n = 12
    c = _cost_table(n, 0)
    forced = np.zeros(n, bool)
    forced[0] = forced[-1] = True
    hand = np.array([c == "x" for c in "x..x..x..x.x"])  # evenly spaced, 5 computed
    oracle = oracle_schedules(c, forced)[int(hand.sum())]
    assert oracle.sum() == hand.sum() and oracle[forced].all()
    assert schedule_cost(c[None], oracle[None]) < schedule_cost(c[None], hand[None])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 9))
def test_oracle_is_the_best_static_schedule_by_brute_force(seed, n):
    c = _cost_table(n, seed)
    forced = np.zeros(n, bool)
    forced[0] = forced[-1] = True
    schedules = oracle_schedules(c, forced)
    for budget in range(2, n + 1):
        best = min(
            schedule_cost(c[None], np.array(s)[None])
            for s in itertools.product([False, True], repeat=n)
            if sum(s) == budget and all(s[i] for i in np.flatnonzero(forced))
        )
        assert math.isclose(schedule_cost(c[None], schedules[budget][None]), best, rel_tol=1e-12, abs_tol=1e-15)


def test_cost_is_sensitivity_times_reuse_error_times_compounding():
    n = 5
    sigma = np.linspace(1.0, 0.2, n)
    reuse = np.full((1, n, 3), np.nan)
    reuse[0, 1:, 1] = [0.1, 0.2, 0.3, 0.4]  # e(m, m-1)
    reuse[0, 2:, 2] = [0.5, 0.6, 0.7]  # e(m, m-2)
    unit = UnitSeries(("p", 0, n, 16, 16), "p", ("cond",), sigma, {"temb": np.zeros((1, n)), "modin": np.zeros((1, n)), "sigma": np.zeros((1, n))},
                      {"residual": reuse, "output": reuse})
    gain = [1.0, 2.0, 3.0, 4.0, 5.0]
    model = CostModel(gain={n: {"sigma": list(sigma), "gain": gain}}, gamma=0.5)
    c = model.matrix(unit)
    step = 0.2  # every sigma step of this series
    assert math.isclose(c[0, 3, 2, 0], gain[3] * step * 0.3)  # gap 1: no compounding
    assert math.isclose(c[0, 3, 1, 0], gain[3] * step * 0.6 * 1.5)  # gap 2: one step of compounding
    assert np.isinf(c[0, 4, 1, 0])  # gap 3 is beyond the recorded max gap
    # skipping steps 2 and 3 after computing 1: their costs add
    schedule = np.array([[True, True, False, False, True]])
    assert math.isclose(schedule_cost(c, schedule), c[0, 2, 1, 0] + c[0, 3, 1, 0])
    assert decibels(0.01) == 40.0 and decibels(0.0) == 100.0


def test_sensitivity_transfers_to_another_step_count_through_sigma():
    sigma20 = np.linspace(1.0, 0.05, 20)
    model = CostModel(gain={20: {"sigma": list(sigma20), "gain": list(np.linspace(1.0, 3.0, 20))}})
    sigma40 = np.linspace(1.0, 0.05, 40)
    s40, s20 = model.sensitivity(sigma40), model.sensitivity(sigma20)
    # half the sigma step, half the sensitivity per step; the gain per unit of sigma step is the same
    assert np.allclose(s40[::2][:-1] / s20[:-1], 0.5, rtol=0.06)


def _trace(x: np.ndarray, prompt_id: str = "p") -> pd.DataFrame:
    n = len(x)
    rows = []
    for branch in ("cond", "uncond"):
        for step in range(n):
            rows.append(dict(prompt_id=prompt_id, seed=0, steps=n, width=16, height=16, step=step, branch=branch, timestep=1000 * (1 - step / n),
                             sigma=1 - step / n, x_temb=x[step], x_modin=x[step], x_sigma=x[step], y_output=0.1, y_residual=0.1, seconds=0.01))
    return pd.DataFrame(rows)


def test_thresholds_for_budgets_reach_every_computed_count():
    rng = np.random.default_rng(1)
    x = np.concatenate([[np.nan], rng.uniform(0.05, 0.3, 19)])
    unit = unit_series(_trace(x))[0]
    preset = Preset(model="m", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1, branch_mode="shared")
    budgets = [k / 20 for k in range(3, 17)]
    thresholds = thresholds_for_budgets([unit], preset, budgets)
    counts = {int(teacache_schedules(unit, preset, [t])[0, 0].sum()) for t in thresholds}
    reachable = {int(teacache_schedules(unit, preset, [t])[0, 0].sum()) for t in np.geomspace(1e-4, 10, 4000)}
    assert {k for k in range(3, 17) if k in reachable} <= counts


def test_thresholds_for_an_adaptive_signal_keep_the_mean_over_every_prompt_within_each_budget():
    """With `modin` each prompt has its own schedule: the threshold for a budget must not put the prompts' mean above
    it, or the sweep's front has no point at that budget (it fell back to one a step below)."""
    rng = np.random.default_rng(3)
    units = [unit_series(_trace(np.concatenate([[np.nan], rng.uniform(0.02, 0.3, 19) * scale]), f"p{i}"))[0]
             for i, scale in enumerate([0.5, 0.7, 1.0, 1.0, 1.4, 2.0])]
    preset = Preset(model="m", signal="modin", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1, branch_mode="shared")
    budgets = [k / 20 for k in range(3, 17)]
    fractions = [float(np.mean([teacache_schedules(u, preset, [t]).mean() for u in units]))
                 for t in thresholds_for_budgets(units, preset, budgets)]
    for budget in budgets:  # a point within one computed step below every budget, none above the largest
        assert any(budget - 1 / 20 < f <= budget + 1e-9 for f in fractions), (budget, sorted(fractions))
    assert max(fractions) <= max(budgets) + 1e-9


def test_lemica_is_published_at_50_steps_and_mapped_by_sigma_at_other_counts():
    from calib.backends.loop import qwen_sigmas, shift_of
    from calib.simulate import LEMICA, lemica_schedule

    mu = 0.49
    fifty = qwen_sigmas(50, mu)
    for name, steps in LEMICA.items():
        assert np.flatnonzero(lemica_schedule(name, fifty, fifty)).tolist() == list(steps)
    twenty = qwen_sigmas(20, mu)
    published = qwen_sigmas(50, shift_of(twenty))  # the run's own shift, recovered from its sigmas
    np.testing.assert_allclose(published, fifty, atol=1e-5)
    for name, steps in LEMICA.items():
        schedule = lemica_schedule(name, twenty, published)
        assert schedule[0] and schedule[-1] and schedule.sum() <= len(steps)
        for m in np.flatnonzero(schedule)[1:-1]:  # each computed step is, of its neighbours, the nearest in sigma to a published one
            assert any(abs(twenty[m] - fifty[s]) <= min(abs(twenty[m + d] - fifty[s]) for d in (-1, 1)) for s in steps)
    slow = lemica_schedule("slow", twenty, published)
    assert slow[:8].all() and slow[8:].mean() < 0.6  # dense early, as published (steps 0-19 of 50)


def test_each_objective_recovers_its_choice_on_a_synthetic_cost_table():
    """Two static schedules over four prompts: A is better on average, B on the worst prompt (and on the worst fifth,
    one prompt of four). The cost model scores each under the objective asked for; each objective picks its own."""
    from calib.budgets import OBJECTIVES, over_prompts
    from calib.oracle import modelled_db

    n = 6
    a, b = np.array([1, 0, 1, 0, 1, 1], bool), np.array([1, 1, 0, 1, 0, 1], bool)
    units, matrices = [], {}
    for i in range(4):
        unit = UnitSeries((f"p{i}", 0, n, 8, 8), f"p{i}", ("cond",), np.linspace(1, 0.1, n), {}, {})
        matrix = np.full((1, n, n, 2), 1e-3)
        if i == 3:  # one prompt on which A's skips (steps 1 and 3) cost 10 times more
            matrix[:, [1, 3]] = 0.01
        else:  # B's skips (steps 2 and 4) cost a little more on the three others
            matrix[:, [2, 4]] = 3e-3
        units.append(unit)
        matrices[unit.key] = matrix
    scores = {o: {name: modelled_db(matrices, units, s, o) for name, s in (("A", a), ("B", b))} for o in OBJECTIVES}
    assert max(scores["mean"], key=scores["mean"].get) == "A"
    assert max(scores["worst"], key=scores["worst"].get) == "B" and max(scores["cvar"], key=scores["cvar"].get) == "B"
    assert over_prompts([50, 50, 50, 30], "mean") == 45 and over_prompts([50, 50, 50, 30], "worst") == 30
    assert over_prompts(list(range(10)), "cvar") == 0.5  # the worst fifth: 2 of 10
