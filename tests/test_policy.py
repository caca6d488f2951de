"""The decision rule against a plain, independent re-implementation of TeaCache's rule (Liu et al., CVPR 2025, as `teacache.policy` states it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from teacache.policy import TeaCachePolicy
from teacache.preset import Preset, PresetError


def make_preset(**overrides) -> Preset:
    fields = dict(model="tiny-qwen-image-edit", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1, threshold=0.2)
    fields.update(overrides)
    return Preset(**fields)


def reference_schedule(signals: list[np.ndarray], coefficients, threshold, ret_steps, cutoff, max_skips=None) -> list[bool]:
    """TeaCache's rule written out longhand for one series, with the rescaled estimate clamped at 0."""
    acc, previous, skips, out = 0.0, None, 0, []
    for i, signal in enumerate(signals):
        if previous is not None:
            distance = np.abs(signal - previous).mean() / np.abs(previous).mean()
            value = sum(c * distance ** (len(coefficients) - 1 - k) for k, c in enumerate(coefficients))
            acc += max(0.0, value)
        compute = i < ret_steps or i >= cutoff or acc >= threshold or (max_skips is not None and skips >= max_skips)
        if i == 0 and not compute:
            compute = True  # no residual exists before the first computed step
        if compute:
            acc, skips = 0.0, 0
        else:
            skips += 1
        out.append(compute)
        previous = signal
    return out


def random_signals(seed: int, steps: int, scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=32).astype(np.float32)
    drift = rng.uniform(0.0, scale, size=steps)
    signals = []
    for i in range(steps):
        base = base + drift[i] * rng.normal(size=32).astype(np.float32)
        signals.append(base.copy())
    return signals


coefficient_sets = st.sampled_from([[1.0, 0.0], [2.0, 0.5], [-3.0, 4.0, 0.0], [45.1442944188745, -52.91131412057809, 17.078368811436963, 0.10393043235768819, 0.0], [-450, 280, -45, 3.2, -0.02]])


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    steps=st.integers(3, 30),
    scale=st.floats(0.001, 0.5),
    coefficients=coefficient_sets,
    threshold=st.floats(0.0, 1.5),
    ret_steps=st.integers(0, 3),
    max_skips=st.one_of(st.none(), st.integers(1, 4)),
)
def test_decisions_match_reference_per_branch(seed, steps, scale, coefficients, threshold, ret_steps, max_skips):
    cutoff = steps - 1
    if ret_steps + 1 > cutoff:
        return
    preset = make_preset(coefficients=coefficients, ret_steps=ret_steps, cutoff_steps=-1, threshold=threshold, max_consecutive_skips=max_skips)
    cond, uncond = random_signals(seed, steps, scale), random_signals(seed + 1, steps, scale * 2)
    policy = TeaCachePolicy(preset)
    policy.start(steps)
    for i in range(steps):
        policy.decide(i, "cond", torch.from_numpy(cond[i]))
        policy.decide(i, "uncond", torch.from_numpy(uncond[i]))
    stats = policy.stats
    assert stats.schedule("cond") == reference_schedule(cond, coefficients, threshold, ret_steps, cutoff, max_skips)
    assert stats.schedule("uncond") == reference_schedule(uncond, coefficients, threshold, ret_steps, cutoff, max_skips)


def test_first_middle_step_is_not_always_skipped():
    # Pitfall 1: with the signal stored during forced steps, a large jump right after them is computed.
    signals = [np.ones(8, np.float32), np.ones(8, np.float32), 10 * np.ones(8, np.float32), 10 * np.ones(8, np.float32)]
    policy = TeaCachePolicy(make_preset(ret_steps=2, cutoff_steps=-1, threshold=0.5))
    policy.start(4)
    assert [policy.decide(i, "cond", torch.from_numpy(s)) for i, s in enumerate(signals)] == [True, True, True, True]


def test_identity_polynomial_accumulates_raw_distance():
    # Pitfall 2: [1, 0] is the identity; [1.0] would be the constant 1 and compute every step at threshold 0.9.
    signals = [np.full(4, 1.0 + 0.1 * i, np.float32) for i in range(6)]
    identity = TeaCachePolicy(make_preset(coefficients=[1.0, 0.0], ret_steps=1, threshold=0.15))
    constant = TeaCachePolicy(make_preset(coefficients=[1.0], ret_steps=1, threshold=0.9))
    for policy in (identity, constant):
        policy.start(6)
        for i, s in enumerate(signals):
            policy.decide(i, "cond", torch.from_numpy(s))
    assert identity.stats.schedule("cond") == [True, False, True, False, True, True]
    assert all(constant.stats.schedule("cond"))


def test_previous_signal_is_updated_on_skipped_steps():
    # Three small steps in a row: each is measured against the step before, not the last computed one.
    signals = [np.full(4, v, np.float32) for v in (1.0, 1.0, 1.05, 1.1025, 1.157625, 1.2)]
    policy = TeaCachePolicy(make_preset(threshold=0.12))
    policy.start(6)
    for i, s in enumerate(signals):
        policy.decide(i, "cond", torch.from_numpy(s))
    distances = [d.distance for d in policy.stats.decisions]
    assert distances[0] is None
    assert distances[2] == pytest.approx(0.05, rel=1e-5)
    assert distances[3] == pytest.approx(0.05, rel=1e-5)  # against step 2 (skipped), not step 1


def test_branches_are_independent():
    steady = np.ones(8, np.float32)
    policy = TeaCachePolicy(make_preset(threshold=0.3))
    policy.start(5)
    for i in range(5):
        policy.decide(i, "cond", torch.from_numpy(steady))
        policy.decide(i, "uncond", torch.from_numpy(steady * (1 + i)))  # changes a lot every step
    assert policy.stats.schedule("cond") == [True, False, False, False, True]
    assert policy.stats.schedule("uncond") == [True, True, True, True, True]


def test_shared_mode_makes_one_decision_per_step_for_both_branches():
    policy = TeaCachePolicy(make_preset(threshold=0.3, branch_mode="shared"))
    policy.start(6)
    for i in range(6):
        policy.decide(i, "cond", torch.full((4,), 1.0 + 0.2 * (i % 3)))
        policy.decide(i, "uncond", torch.full((4,), 100.0 * (i + 1)))  # ignored: cond decides
    assert policy.stats.schedule("cond") == policy.stats.schedule("uncond")
    assert not all(policy.stats.schedule("cond"))
    assert {d.reason for d in policy.stats.decisions if d.branch == "uncond" and d.step > 0} == {"follow"}


def test_a_branch_without_residual_is_computed():
    policy = TeaCachePolicy(make_preset(ret_steps=0, cutoff_steps=-1, threshold=5.0))
    policy.start(4)
    assert policy.decide(0, "cond", torch.ones(4)) is True
    assert policy.decide(1, "cond", torch.ones(4)) is False
    assert policy.decide(1, "uncond", torch.ones(4)) is True  # uncond has no residual yet
    assert policy.stats.decisions[-1].reason == "no-residual"


def test_start_resets_between_generations():
    policy = TeaCachePolicy(make_preset(threshold=0.5))
    runs = []
    for _ in range(2):
        policy.start(5)
        for i in range(5):
            policy.decide(i, "cond", torch.full((4,), 1.0 + 0.1 * i))
        runs.append([(d.step, d.distance, d.computed) for d in policy.stats.decisions])
    assert runs[0] == runs[1]


def test_same_branch_twice_in_one_step_is_an_error():
    policy = TeaCachePolicy(make_preset())
    policy.start(5)
    policy.decide(0, "cond", torch.ones(4))
    with pytest.raises(RuntimeError, match="asked twice for step 0"):
        policy.decide(0, "cond", torch.ones(4))


def test_threshold_zero_never_skips_even_with_negative_polynomial():
    # The vllm-omni coefficients are negative near 0; clamping keeps threshold 0 = uncached.
    policy = TeaCachePolicy(make_preset(coefficients=[-450, 280, -45, 3.2, -0.02]), threshold=0.0)
    policy.start(8)
    for i in range(8):
        policy.decide(i, "cond", torch.full((4,), 1.0 + 1e-4 * i))
    assert all(policy.stats.schedule("cond"))


def test_non_finite_distance_forces_compute():
    policy = TeaCachePolicy(make_preset(threshold=10.0))
    policy.start(4)
    policy.decide(0, "cond", torch.zeros(4))
    assert policy.decide(1, "cond", torch.ones(4)) is True  # 1/0 = inf: never trust a cache on that
    assert math.isinf(policy.stats.decisions[-1].distance)


# -- the per-prompt ratio (Preset.adapt) ----------------------------------------------------------------------------
def adaptive_run(residual_pace: float, strength: float, steps: int = 20, threshold: float = 0.3) -> list[bool]:
    """One branch through the runtime's calls: the same timestep signal for every prompt, and a residual that drifts
    `residual_pace` per step (what the runtime reports after each computed call)."""
    policy = TeaCachePolicy(make_preset(adapt={"strength": strength, "typical": 0.0, "clip": 4.0}), threshold)
    policy.start(steps)
    torch.manual_seed(0)
    direction = torch.randn(64)
    residual, previous, schedule = torch.ones(64), None, []
    for step in range(steps):
        computed = policy.decide(step, "cond", torch.full((8,), 1.0 + 0.1 * step))  # rel-L1 about 0.1 per step, every prompt
        residual = residual + residual_pace * direction
        if computed:
            policy.observe(step, "cond", residual, previous)
            previous = residual.clone()
        schedule.append(computed)
    return schedule


def test_a_prompt_whose_residual_changes_faster_is_computed_more_at_the_same_threshold():
    calm, restless = adaptive_run(0.02, 1.0), adaptive_run(0.2, 1.0)
    assert sum(restless) > sum(calm)
    # the timestep signal alone gives both prompts one schedule: the difference is the ratio's
    assert adaptive_run(0.02, 0.0) == adaptive_run(0.2, 0.0)


def test_without_adapt_observing_changes_nothing_and_the_preset_file_is_unchanged():
    plain = make_preset()
    assert "adapt" not in plain.to_dict()  # presets written before the field read and write as they did
    policy = TeaCachePolicy(plain, 0.3)
    policy.start(4)
    policy.decide(0, "cond", torch.ones(8))
    policy.observe(0, "cond", torch.ones(4), torch.zeros(4))
    assert policy.ratio("cond") == 1.0 and policy.log_ratios("cond") == []


@pytest.mark.parametrize("adapt", [{"strength": -1.0, "typical": 0.0, "clip": 2.0}, {"strength": 1.0, "typical": 0.0, "clip": 0.5},
                                   {"strength": 1.0, "typical": float("nan"), "clip": 2.0}, {"strength": 1.0}])
def test_a_malformed_adapt_is_refused_with_its_field(adapt):
    with pytest.raises(PresetError, match="field 'adapt'"):
        make_preset(adapt=adapt)
