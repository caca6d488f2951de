"""How a skipped call's residual is formed: the reuse rule. Pure; both runtimes use it.

A computed call stores its block-stack residual ``r = stack_output - stack_input``. A skipped call at step ``i``
returns ``stack_input + r̂`` with

* ``none``:   ``r̂ = r₁``, the residual of the branch's last computed step ``s₁`` (plain TeaCache);
* ``linear``: ``r̂ = r₁ + α · (r₁ - r₀) · d(i, s₁) / d(s₁, s₀)``, extrapolated from the last two computed steps
  ``s₀ < s₁``. ``d`` is the step-index difference (``axis: step``) or the sigma difference (``axis: sigma``).
  ``α = 0`` is plain reuse. Before a branch has two computed steps there is no slope, and the rule reuses.

The damping depends on how far the slope reaches, in sigma: the longer of the span it was measured over,
``σ(s₀) - σ(s₁)``, and the distance it is carried ahead, ``σ(s₁) - σ(i)`` (`Forecast.reach`). A slope is a poor guide
far from where it was measured (on the trained tiny model: after spans of 5-6 of 20 steps, any extrapolation loses;
after 2-3 steps, damping about 0.6-0.8 gains 2-3 dB). ``alpha`` is a list of ``[reach, α]`` knots, interpolated
linearly and held constant beyond the ends; one knot is a constant damping. Sigma distances mean the same at any
step count, so one table serves a preset's whole domain.

`teacal fit` fits the knots from forecast probes (`teacal probe --forecast`: generations measured against the
reference). A forecast costs one extra residual per branch (``r₀``): for Qwen-Image-Edit at 1024², the target's
4096 tokens x 3072 channels in bf16, 24 MiB per branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

RULES = ("none", "linear")
AXES = ("step", "sigma")


class ForecastError(ValueError):
    pass


@dataclass(frozen=True)
class Forecast:
    """A reuse rule, as a preset's ``forecast`` object: ``{"rule": "linear", "axis": "step", "alpha": [[0.1, 0.6], [0.3, 0.0]]}``."""

    rule: str = "none"
    axis: str = "step"
    alpha: tuple[tuple[float, float], ...] = ()  # [sigma span, damping] knots, spans increasing
    fit: dict[str, Any] = field(default_factory=dict, compare=False)  # how it was calibrated (teacal fit)

    def __post_init__(self) -> None:
        try:
            knots = tuple((float(span), float(a)) for span, a in self.alpha)
        except (TypeError, ValueError):
            raise ForecastError(f"field 'forecast.alpha': expected [[sigma span, damping], ...], got {list(self.alpha)!r}") from None
        object.__setattr__(self, "alpha", knots)
        if self.rule not in RULES:
            raise ForecastError(f"field 'forecast.rule': unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.axis not in AXES:
            raise ForecastError(f"field 'forecast.axis': unknown axis {self.axis!r}; expected one of {', '.join(AXES)}")
        if not all(math.isfinite(v) for knot in knots for v in knot):
            raise ForecastError(f"field 'forecast.alpha': must be finite numbers, got {[list(k) for k in knots]}")
        if any(b[0] <= a[0] for a, b in zip(knots, knots[1:], strict=False)) or any(span < 0 for span, _ in knots):
            raise ForecastError(f"field 'forecast.alpha': the spans must be >= 0 and increasing, got {[list(k) for k in knots]}")
        if self.rule == "linear" and not self.alpha:
            raise ForecastError("field 'forecast.alpha': the linear rule needs at least one damping value")
        if self.rule == "none" and self.alpha:
            raise ForecastError("field 'forecast.alpha': the none rule takes no damping")

    @property
    def extrapolates(self) -> bool:
        return self.rule != "none"

    def damping(self, sigma_span: float) -> float:
        """α for a slope measured over this sigma span: the knots interpolated, constant beyond their ends."""
        if not self.alpha:
            return 0.0
        spans, values = zip(*self.alpha, strict=True)
        if sigma_span <= spans[0]:
            return values[0]
        for (s0, a0), (s1, a1) in zip(self.alpha, self.alpha[1:], strict=False):
            if sigma_span <= s1:
                return a0 + (a1 - a0) * (sigma_span - s0) / (s1 - s0)
        return values[-1]

    def slope_factor(self, step: int, sigma: float, last: ComputedStep, before: ComputedStep) -> float:
        """``α(span) · d(i, s₁) / d(s₁, s₀)``: the multiple of ``r₁ - r₀`` added to ``r₁``."""
        if self.axis == "sigma":
            span, ahead = last.sigma - before.sigma, sigma - last.sigma
        else:
            span, ahead = last.step - before.step, step - last.step
        if span == 0:
            return 0.0
        return self.damping(self.reach(before.sigma, last.sigma, sigma)) * ahead / span

    @staticmethod
    def reach(sigma_before: float, sigma_last: float, sigma: float) -> float:
        """What the damping is looked up at: the longer of the slope's sigma span and the sigma distance it is carried
        ahead. A slope measured over a short span and carried far (a short compute gap, then a long skip) is trusted
        only as much as a slope over that longer distance: on the trained tiny model, keying by the span alone lost
        0.7-1.5 dB at 10-14 computed calls of 40, where TeaCache's schedules do exactly that."""
        return max(abs(sigma_before - sigma_last), abs(sigma_last - sigma))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rule": self.rule}
        if self.extrapolates:
            data.update(axis=self.axis, alpha=[list(k) for k in self.alpha])
        if self.fit:
            data["fit"] = self.fit
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Forecast:
        if not isinstance(data, dict):
            raise ForecastError(f"field 'forecast': expected an object like {{\"rule\": \"none\"}}, got {data!r}")
        unknown = sorted(set(data) - {"rule", "axis", "alpha", "fit"})
        if unknown:
            raise ForecastError(f"field 'forecast': unknown key(s) {', '.join(repr(k) for k in unknown)}")
        alpha = data.get("alpha", [])
        numbers = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not isinstance(alpha, list) or not all(isinstance(k, list) and len(k) == 2 and all(map(numbers, k)) for k in alpha):
            raise ForecastError(f"field 'forecast.alpha': must be a list of [sigma span, damping] pairs, got {alpha!r}")
        return cls(rule=data.get("rule", "none"), axis=data.get("axis", "step"), alpha=tuple(map(tuple, alpha)), fit=dict(data.get("fit", {})))


NO_FORECAST = Forecast()


@dataclass(frozen=True)
class ComputedStep:
    step: int
    sigma: float
    residual: torch.Tensor


class ResidualCache:
    """One branch's stored residuals and the rule that turns them into a skipped call's residual."""

    def __init__(self, forecast: Forecast = NO_FORECAST) -> None:
        self.forecast = forecast
        self.last: ComputedStep | None = None
        self.before: ComputedStep | None = None  # kept only when the rule extrapolates

    @property
    def empty(self) -> bool:
        return self.last is None

    def store(self, step: int, sigma: float, residual: torch.Tensor) -> None:
        if self.forecast.extrapolates:
            self.before = self.last
        self.last = ComputedStep(step, float(sigma), residual)

    def residual_for(self, step: int, sigma: float) -> torch.Tensor:
        """The residual a skipped call at `step` (and `sigma`) adds to its stack input."""
        if self.last is None:
            raise RuntimeError("TeaCache: a skipped call needs a stored residual; the policy computes a branch's first call")
        if self.before is None:
            return self.last.residual
        factor = self.forecast.slope_factor(step, sigma, self.last, self.before)
        if factor == 0.0:
            return self.last.residual
        return self.last.residual + factor * (self.last.residual - self.before.residual.to(self.last.residual.device))
