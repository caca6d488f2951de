"""The reuse rule (`teacache.forecast`) and the preset's calibrated domain, as the policy and the runtime apply them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from teacache.forecast import Forecast, ForecastError, ResidualCache
from teacache.policy import TeaCachePolicy
from teacache.preset import Preset, PresetError


def test_linear_forecast_equals_a_hand_computation_on_a_toy_sequence():
    r0, r1 = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.5])
    cache = ResidualCache(Forecast("linear", "step", ((0.1, 0.5), (0.3, 0.25))))
    cache.store(2, 0.8, r0)
    cache.store(4, 0.6, r1)
    # sigma span 0.2: halfway between the knots, alpha 0.375; slope over 2 steps, 1 step ahead
    assert torch.allclose(cache.residual_for(5, 0.5), r1 + 0.375 * (r1 - r0) / 2)
    # 3 steps ahead: the same slope, three times as far, now carried 0.3 in sigma (beyond its 0.2 span): alpha 0.25
    assert torch.allclose(cache.residual_for(7, 0.3), r1 + 0.25 * (r1 - r0) * 3 / 2)
    # 2 steps ahead, carried 0.25: alpha 0.3125
    assert torch.allclose(cache.residual_for(6, 0.35), r1 + 0.3125 * (r1 - r0) * 2 / 2)
    wide = ResidualCache(Forecast("linear", "step", ((0.1, 0.5), (0.3, 0.25))))
    wide.store(0, 1.0, r0)
    wide.store(4, 0.6, r1)  # span 0.4: beyond the last knot, its damping holds
    assert torch.allclose(wide.residual_for(5, 0.5), r1 + 0.25 * (r1 - r0) / 4)
    by_sigma = ResidualCache(Forecast("linear", "sigma", ((0.0, 1.0),)))
    by_sigma.store(2, 0.8, r0)
    by_sigma.store(4, 0.6, r1)
    # sigma: (0.5 - 0.6) / (0.6 - 0.8) = 0.5 of the slope
    assert torch.allclose(by_sigma.residual_for(5, 0.5), r1 + 0.5 * (r1 - r0))


def test_none_and_first_skip_reuse_the_last_residual_exactly():
    r0, r1 = torch.randn(3, 4), torch.randn(3, 4)
    plain = ResidualCache(Forecast())
    plain.store(0, 1.0, r0)
    plain.store(1, 0.9, r1)
    assert plain.residual_for(3, 0.7) is r1 and plain.before is None  # none keeps one residual
    only_one = ResidualCache(Forecast("linear", "step", ((0.0, 0.3),)))
    only_one.store(0, 1.0, r0)
    assert only_one.residual_for(1, 0.9) is r0  # no slope yet: plain reuse


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rule": "cubic"}, "unknown rule 'cubic'"),
        ({"rule": "linear"}, "needs at least one damping value"),
        ({"rule": "linear", "alpha": [[0, 0.5]], "axis": "time"}, "unknown axis 'time'"),
        ({"rule": "none", "alpha": [[0, 0.5]]}, "takes no damping"),
        ({"rule": "linear", "alpha": [0.5]}, "must be a list of [sigma span, damping] pairs"),
        ({"rule": "linear", "alpha": [[0.2, 0.5], [0.1, 0.4]]}, "increasing"),
        ({"rule": "none", "extra": 1}, "unknown key(s) 'extra'"),
    ],
)
def test_bad_forecasts_are_one_clear_preset_error(tmp_path, data, message):
    preset = Preset(model="m", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1).to_dict()
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**preset, "forecast": data}))
    with pytest.raises(PresetError, match="field 'forecast") as err:
        Preset.load(path)
    assert message in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ForecastError):
        Forecast.from_dict(data)


def test_forecast_round_trips_through_the_preset_file(tmp_path):
    preset = Preset(model="m", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1,
                    forecast=Forecast("linear", "sigma", ((0.05, 0.4), (0.2, 0.2)), fit={"objective": 1.0}))
    preset.save(tmp_path / "p.json")
    again = Preset.load(tmp_path / "p.json")
    assert again.forecast == preset.forecast and again.forecast.fit == {"objective": 1.0}


def _policy(domain: dict) -> TeaCachePolicy:
    # -(x - 0.08)(x - 0.5): positive only inside (0.08, 0.5); below it, without the clamp, it would skip for free
    preset = Preset(model="m", signal="temb", coefficients=[-1.0, 0.58, -0.04], ret_steps=1, cutoff_steps=-1, branch_mode="shared", domain=domain)
    return TeaCachePolicy(preset, threshold=0.02)


def test_distances_below_the_calibrated_range_are_clamped_and_flagged():
    steps = 40
    distances = [None] + [0.05] * (steps - 1)  # a 40-step run sees half the distances of the 20-step calibration
    unclamped, clamped = _policy({}), _policy({"steps": [20], "x_range": {"temb": [0.1, 0.3]}})
    for policy in (unclamped, clamped):
        policy.start(steps)
        for step, distance in enumerate(distances):
            policy.decide_distance(step, "cond", distance)
    assert unclamped.stats.computed == 2  # the estimate is 0 below the range: only the forced steps run
    assert clamped.stats.computed > 10  # clamped to 0.1, the estimate keeps accumulating
    assert clamped.stats.outside_domain == ["40 steps outside the calibrated 20..20", "signal rel-L1 below the calibrated 0.1..0.3"]
    assert "outside the calibrated domain" in str(clamped.stats) and unclamped.stats.outside_domain == []


def test_domain_fields_are_validated(tmp_path):
    with pytest.raises(PresetError, match="domain"):
        Preset(model="m", signal="temb", coefficients=[1.0], ret_steps=1, cutoff_steps=-1, domain={"x_range": {"temb": [0.3, 0.1]}})
    with pytest.raises(PresetError, match="domain.steps"):
        Preset(model="m", signal="temb", coefficients=[1.0], ret_steps=1, cutoff_steps=-1, domain={"steps": [0]})
    with pytest.raises(PresetError, match="unknown key"):
        Preset(model="m", signal="temb", coefficients=[1.0], ret_steps=1, cutoff_steps=-1, domain={"size": [1]})
    assert np.isclose(Preset(model="m", signal="temb", coefficients=[1.0], ret_steps=1, cutoff_steps=-1,
                             domain={"x_range": {"temb": [0.1, 0.3]}}).x_range[1], 0.3)
