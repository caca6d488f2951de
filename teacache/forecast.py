"""How a skipped call's residual is formed: the reuse rule. Pure; both runtimes use it.

A computed call stores its block-stack residual ``r = stack_output - stack_input``. A skipped call at step ``i``
returns ``stack_input + r̂`` with

* ``none``:   ``r̂ = r₁``, the residual of the branch's last computed step ``s₁`` (plain TeaCache);
* ``linear``: ``r̂ = r₁ + α_g · (r₁ - r₀) · d(i, s₁) / d(s₁, s₀)``, extrapolated from the last two computed steps
  ``s₀ < s₁``. ``d`` is the step-index difference (``axis: step``) or the sigma difference (``axis: sigma``), and
  the damping ``α_g`` depends on the gap ``g = i - s₁`` (``alpha[g - 1]``; the last entry serves longer gaps).
  ``α = 0`` is plain reuse. Before a branch has two computed steps there is no slope, and the rule reuses.

`teacal fit` fits ``alpha`` from the recorded residual trajectories. A forecast costs one extra residual per branch
(``r₀``): for Qwen-Image-Edit at 1024², the target's 4096 tokens x 3072 channels in bf16, 24 MiB per branch.
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
    """A reuse rule, as a preset's ``forecast`` object: ``{"rule": "linear", "axis": "step", "alpha": [0.3, 0.25]}``."""

    rule: str = "none"
    axis: str = "step"
    alpha: tuple[float, ...] = ()
    fit: dict[str, Any] = field(default_factory=dict, compare=False)  # how it was calibrated (teacal fit)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))
        if self.rule not in RULES:
            raise ForecastError(f"field 'forecast.rule': unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.axis not in AXES:
            raise ForecastError(f"field 'forecast.axis': unknown axis {self.axis!r}; expected one of {', '.join(AXES)}")
        if not all(math.isfinite(a) for a in self.alpha):
            raise ForecastError(f"field 'forecast.alpha': must be finite numbers, got {list(self.alpha)}")
        if self.rule == "linear" and not self.alpha:
            raise ForecastError("field 'forecast.alpha': the linear rule needs at least one damping value")
        if self.rule == "none" and self.alpha:
            raise ForecastError("field 'forecast.alpha': the none rule takes no damping")

    @property
    def extrapolates(self) -> bool:
        return self.rule != "none"

    def damping(self, gap: int) -> float:
        return self.alpha[min(gap, len(self.alpha)) - 1] if self.alpha else 0.0

    def slope_factor(self, step: int, sigma: float, last: ComputedStep, before: ComputedStep) -> float:
        """``α_g · d(i, s₁) / d(s₁, s₀)``: the multiple of ``r₁ - r₀`` added to ``r₁``."""
        if self.axis == "sigma":
            span = last.sigma - before.sigma
            ahead = sigma - last.sigma
        else:
            span, ahead = last.step - before.step, step - last.step
        if span == 0:
            return 0.0
        return self.damping(step - last.step) * ahead / span

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"rule": self.rule}
        if self.extrapolates:
            data.update(axis=self.axis, alpha=list(self.alpha))
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
        if not isinstance(alpha, list) or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alpha):
            raise ForecastError(f"field 'forecast.alpha': must be a list of numbers, got {alpha!r}")
        return cls(rule=data.get("rule", "none"), axis=data.get("axis", "step"), alpha=tuple(alpha), fit=dict(data.get("fit", {})))


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
