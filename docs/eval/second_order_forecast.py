"""Diagnostic, not part of teacal (see forecast-alternatives.md): run `teacal` with the linear reuse rule replaced by
a damped second-order one, to measure it with the same sweep, prompts and schedules.

The quadratic goes through the branch's last three computed residuals r₀, r₁, r₂ at steps t₀ < t₁ < t₂ (Newton form
in step index), and each --forecast spec's damping scales the whole correction: r̂ = r₂ + α·(p(i) − r₂), α looked up at
the slope's reach as the linear rule does. With two computed steps it is the linear rule, with one plain reuse. The
sweep's labels still say linear or calibrated."""

import sys

from teacache import forecast as fc

linear_residual_for = fc.ResidualCache.residual_for


def store(self, step, sigma, residual):
    if self.forecast.extrapolates:
        self.oldest = getattr(self, "before", None)
        self.before = self.last
    self.last = fc.ComputedStep(step, float(sigma), residual)


def residual_for(self, step, sigma):
    oldest = getattr(self, "oldest", None)
    if self.last is None or self.before is None or oldest is None:
        return linear_residual_for(self, step, sigma)
    t0, t1, t2 = oldest.step, self.before.step, self.last.step
    r0, r1, r2 = oldest.residual, self.before.residual, self.last.residual
    alpha = self.forecast.damping(fc.Forecast.reach(self.before.sigma, self.last.sigma, sigma))
    if alpha == 0.0:
        return r2
    slope = (r2 - r1) / (t2 - t1)
    curvature = (slope - (r1 - r0) / (t1 - t0)) / (t2 - t0)
    return r2 + alpha * ((step - t2) * slope + (step - t2) * (step - t1) * curvature)


if __name__ == "__main__":
    fc.ResidualCache.store = store
    fc.ResidualCache.residual_for = residual_for
    from calib.cli import app

    sys.argv[0] = "teacal"
    app()
