"""The LightX2V patch re-implements TeaCache's rule (it cannot import teacal): these tests keep the two from drifting.

They run in the default suite, without LightX2V: the patch's ``teacache_rule.py`` imports neither torch nor LightX2V,
and is loaded from the patch file itself (`tests.lightx2v_patch.rule_module`). On random traces, the patch's schedule,
fed the LightX2V config keys that `teacache.lightx2v_config.config_keys` writes from a preset, takes exactly the
decisions of `teacache.policy.TeaCachePolicy` on that preset, and its residual store forms exactly the residuals of
`teacache.forecast.ResidualCache`.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from teacache.forecast import Forecast, ResidualCache
from teacache.lightx2v_config import config_keys, preset_from_keys
from teacache.policy import TeaCachePolicy
from teacache.preset import Preset, PresetError
from tests.lightx2v_patch import rule_module


@pytest.fixture(scope="module")
def rule(tmp_path_factory):
    return rule_module(tmp_path_factory.mktemp("patch"))


finite = st.floats(min_value=-40, max_value=40, allow_nan=False, allow_infinity=False)
# [sigma reach, damping] knots, reaches strictly increasing: mostly inside the sigma range the traces span (0..1), so
# that lookups fall between knots, before the first and beyond the last
knots = st.lists(
    st.tuples(st.floats(min_value=0, max_value=1.2, allow_nan=False), st.floats(min_value=-1, max_value=2, allow_nan=False)),
    min_size=1, max_size=4, unique_by=lambda knot: knot[0],
).map(lambda ks: tuple(sorted(ks)))
forecasts = st.one_of(
    st.just(Forecast()),
    st.builds(Forecast, rule=st.just("linear"), axis=st.sampled_from(["step", "sigma"]), alpha=knots),
)


@st.composite
def presets(draw) -> Preset:
    ret_steps = draw(st.integers(0, 3))
    cutoff = draw(st.one_of(st.integers(-3, -1), st.integers(ret_steps + 1, ret_steps + 12)))
    domain = {}
    if draw(st.booleans()):
        low = draw(st.floats(0, 0.5))
        domain["x_range"] = {draw(st.sampled_from(["temb", "modin", "sigma"])): [low, low + draw(st.floats(0, 0.5))]}
    if draw(st.booleans()):
        domain["steps"] = sorted(draw(st.lists(st.integers(2, 30), min_size=1, max_size=3)))
    signal = draw(st.sampled_from(["temb", "modin", "sigma"]))
    if "x_range" in domain and draw(st.booleans()):  # mostly the preset's own signal's range
        domain["x_range"] = {signal: next(iter(domain["x_range"].values()))}
    return Preset(
        model="qwen-image-edit-2511", signal=signal, coefficients=tuple(draw(st.lists(finite, min_size=1, max_size=6))),
        ret_steps=ret_steps, cutoff_steps=cutoff, branch_mode=draw(st.sampled_from(["per-branch", "shared"])),
        threshold=draw(st.floats(0, 3)), max_consecutive_skips=draw(st.one_of(st.none(), st.integers(1, 4))),
        forecast=draw(forecasts), domain=domain,
        adapt=draw(st.one_of(st.just({}), st.fixed_dictionaries({"strength": st.floats(0, 3), "typical": st.floats(-3, 3), "clip": st.floats(1, 5)}))),
    )


def signals(seed: int, num_steps: int, branches: list[str]) -> dict[tuple[int, str], torch.Tensor]:
    """A random signal per call that drifts by a random amount per step (so rel-L1 spans ~0..1 and beyond)."""
    g = torch.Generator().manual_seed(seed)
    base = {b: torch.randn(6, 4, generator=g) for b in branches}
    out = {}
    for step in range(num_steps):
        for b in branches:
            base[b] = base[b] + torch.rand(1, generator=g) * torch.randn(6, 4, generator=g)
            out[step, b] = base[b].clone()
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preset=presets(), num_steps=st.integers(2, 30), cfg=st.booleans(), seed=st.integers(0, 2**31 - 1), requests=st.integers(1, 2))
def test_patch_schedule_takes_the_policys_decisions(rule, preset, num_steps, cfg, seed, requests):
    try:
        preset.resolve_cutoff(num_steps)
    except PresetError:
        assume(False)
    branches = ["cond", "uncond"] if cfg else ["cond"]
    schedule = rule.TeaCacheSchedule(rule.TeaCacheSettings.from_config(config_keys(preset)))
    policy = TeaCachePolicy(preset)
    for request in range(requests):  # a second request starts afresh on both
        trace = signals(seed + request, num_steps, branches)
        residuals = signals(seed + request + 1, num_steps, branches)  # what each computed call reports (an adapt preset)
        schedule.start(num_steps)
        policy.start(num_steps)
        previous = dict.fromkeys(branches)
        for step in range(num_steps):
            for branch in branches:
                needs = schedule.needs_signal(step, branch)
                computed = schedule.decide(step, branch, trace[step, branch] if needs else None)
                assert computed == policy.decide(step, branch, trace[step, branch])
                if computed:
                    schedule.observe(step, branch, residuals[step, branch], previous[branch])
                    policy.observe(step, branch, residuals[step, branch], previous[branch])
                    previous[branch] = residuals[step, branch]
        ours = [(d.step, d.branch, d.distance, d.accumulated, d.computed, d.reason) for d in policy.stats.decisions]
        assert [(d.step, d.branch, d.distance, d.accumulated, d.computed, d.reason) for d in schedule.decisions] == ours
        assert schedule.outside_domain == policy.stats.outside_domain
        assert schedule.counts() == {b: (c["computed"], c["skipped"]) for b, c in policy.stats.per_branch().items()}


@settings(max_examples=200, deadline=None)
@given(forecast=forecasts, pattern=st.lists(st.booleans(), min_size=2, max_size=25), seed=st.integers(0, 2**31 - 1))
def test_patch_forecast_forms_the_same_residuals(rule, forecast, pattern, seed):
    g = torch.Generator().manual_seed(seed)
    keys = config_keys(Preset(model="m", signal="temb", coefficients=(1.0, 0.0), ret_steps=0, cutoff_steps=-1, forecast=forecast))
    store, cache = rule.ResidualStore(rule.Forecast.from_config(keys["teacache_forecast"])), ResidualCache(forecast)
    sigmas = torch.linspace(1.0, 0.05, len(pattern)).to(torch.bfloat16).float()  # bf16-rounded sigmas, as both runtimes see them
    pattern[0] = True  # a branch's first call is always computed
    for step, computed in enumerate(pattern):
        sigma = float(sigmas[step])
        if computed:
            residual = torch.randn(5, 3, generator=g).to(torch.bfloat16)
            store.store(step, sigma, residual)
            cache.store(step, sigma, residual)
        else:
            assert torch.equal(store.residual_for(step, sigma), cache.residual_for(step, sigma))


def test_patch_damping_is_keyed_by_the_slopes_sigma_reach(rule):
    """The knots are interpolated and held at the ends, looked up at the longer of the slope's sigma span and the sigma
    distance it is carried ahead: a slope over a short span carried across a long skip is damped as a long one."""
    keys = {"rule": "linear", "axis": "step", "alpha": [[0.1, 0.5], [0.3, 0.25]]}
    patch, ours = rule.Forecast.from_config(keys), Forecast.from_dict(keys)
    for reach, damping in [(0.0, 0.5), (0.1, 0.5), (0.2, 0.375), (0.3, 0.25), (0.9, 0.25)]:
        assert patch.damping(reach) == ours.damping(reach) == pytest.approx(damping)
    before, last = rule.ComputedStep(4, 0.6, None), rule.ComputedStep(5, 0.55, None)  # span 0.05
    assert patch.slope_factor(6, 0.5, last, before) == pytest.approx(0.5 * 1 / 1)  # carried 0.05: reach 0.05
    assert patch.slope_factor(9, 0.35, last, before) == pytest.approx(0.375 * 4 / 1)  # carried 0.2: reach 0.2


def test_keys_round_trip_to_the_same_preset():
    preset = Preset(model="qwen-image-edit-2511", signal="modin", coefficients=(3.0, -1.0, 0.2), ret_steps=2, cutoff_steps=-2, branch_mode="shared",
                    threshold=0.3, max_consecutive_skips=3, forecast=Forecast("linear", "sigma", ((0.05, 0.3), (0.2, 0.2))),
                    domain={"steps": [20, 40], "x_range": {"modin": [0.02, 0.4]}}, adapt={"strength": 1.0, "typical": -1.3, "clip": 2.0})
    keys = config_keys(preset)
    assert json.loads(json.dumps(keys)) == keys  # plain JSON: what goes into a LightX2V config file
    again = preset_from_keys(keys, model=preset.model)
    assert again.to_dict() == preset.to_dict()
    assert config_keys(preset, threshold=0.5)["teacache_thresh"] == 0.5


def test_wan_style_keys_mean_the_same_on_both_sides(rule):
    """LightX2V's own Wan keys: a [[ret], [non-ret]] coefficient pair picked by use_ret_steps, and its forced steps."""
    config = {"feature_caching": "Tea", "coefficients": [[2.0, 0.0], [1.0, 0.0]], "teacache_thresh": 0.26, "use_ret_steps": False}
    settings_ = rule.TeaCacheSettings.from_config(config)
    assert (settings_.coefficients, settings_.ret_steps, settings_.cutoff_steps) == ((1.0, 0.0), 1, -1)
    preset = preset_from_keys(config, model="qwen-image-edit-2511")
    assert (preset.coefficients, preset.ret_steps, preset.cutoff_steps, preset.threshold) == ((1.0, 0.0), 1, -1, 0.26)
    ret = rule.TeaCacheSettings.from_config({**config, "use_ret_steps": True})
    assert (ret.coefficients, ret.ret_steps, ret.resolve_cutoff(40)) == ((2.0, 0.0), 5, 40)  # Wan: nothing forced at the end


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"coefficients": None}, "TeaCache config key 'coefficients': 'feature_caching': 'Tea' needs the rescale polynomial"),
        ({"coefficients": [[1.0], [2.0], [3.0]]}, "Wan's [[use_ret_steps], [not use_ret_steps]] pair; got 3 lists"),
        ({"teacache_thresh": None}, "TeaCache config key 'teacache_thresh': must be a finite number >= 0"),
        ({"teacache_signal": "e0"}, "TeaCache config key 'teacache_signal': unknown signal 'e0'; expected one of temb, modin"),
        ({"teacache_forecast": {"rule": "taylor"}}, "TeaCache config key 'teacache_forecast': unknown rule 'taylor'"),
        ({"teacache_forecast": {"rule": "linear"}}, "the linear rule needs at least one damping value"),
        ({"teacache_forecast": {"rule": "linear", "alpha": [0.3, 0.2]}}, "TeaCache config key 'teacache_forecast': 'alpha' must be a list of [sigma reach, damping] pairs"),
        ({"teacache_forecast": {"rule": "linear", "alpha": [[0.2, 0.5], [0.1, 0.3]]}}, "TeaCache config key 'teacache_forecast': the reaches in 'alpha' must be >= 0 and increasing"),
        ({"teacache_forecast": {"rule": "linear", "alpha": [[-0.1, 0.5]]}}, "the reaches in 'alpha' must be >= 0 and increasing"),
        ({"teacache_forecast": {"rule": "linear", "alpha": [[0.1, float("nan")]]}}, "pairs of finite numbers"),
        ({"teacache_forecast": {"rule": "none", "alpha": [[0.1, 0.5]]}}, "the none rule takes no 'alpha'"),
        ({"teacache_ret_steps": 4, "teacache_cutoff_steps": 3}, "TeaCache config key 'teacache_cutoff_steps': 3 with teacache_ret_steps 4 leaves no step to skip"),
        ({"teacache_x_range": [0.5, 0.1]}, "TeaCache config key 'teacache_x_range': must be null or [low, high] with low <= high"),
        ({"teacache_branch_mode": "both"}, "TeaCache config key 'teacache_branch_mode': unknown mode 'both'"),
    ],
)
def test_bad_patch_keys_are_one_clear_error(rule, change, message):
    config = {"feature_caching": "Tea", "coefficients": [1.0, 0.0], "teacache_thresh": 0.2, **change}
    with pytest.raises(rule.TeaCacheConfigError) as err:
        rule.TeaCacheSettings.from_config(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_keys_on_the_teacal_side_name_the_key():
    with pytest.raises(PresetError, match="TeaCache config key 'teacache_signal': unknown signal 'e0'"):
        preset_from_keys({"coefficients": [1.0, 0.0], "teacache_thresh": 0.2, "teacache_signal": "e0"}, model="qwen-image-edit-2511")
    with pytest.raises(PresetError, match="TeaCache config key 'teacache_thresh': null"):
        preset_from_keys({"coefficients": [1.0, 0.0], "teacache_thresh": None}, model="qwen-image-edit-2511")
