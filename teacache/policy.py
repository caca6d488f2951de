"""The TeaCache decision rule: the only place it is written. Pure: no model, no hooks.

Per transformer call at step ``i`` of one decision series (a CFG branch, or one shared series)::

    acc += max(0, poly(rel_l1(signal_i, signal_{i-1}))) * ratio
    compute = i < ret_steps or i >= cutoff or acc >= threshold
    if compute: acc = 0
    signal_{i-1} = signal_i              # on every step, computed or skipped

Deliberate choices, each fixing a pitfall of the original sketch of the request:

* forced steps still store the signal, so the first middle step compares against a real previous signal;
* the rescaled estimate is clamped at 0: a fitted polynomial can dip below zero near x = 0, and a negative
  "output change" would let the accumulator run backwards; it also makes threshold 0 mean "never skip";
* a preset that knows its calibrated signal range (`Preset.x_range`) gets each distance clamped into it: outside
  it the polynomial is extrapolation, and a fitted one can fall to 0 there and skip for free (a 20-step preset at
  40 steps sees smaller distances). Clamping errs towards computing. Generations outside the domain are flagged in
  the stats (`outside_domain`), and the runtimes log them once;
* `start()` resets everything for a new generation;
* ``ratio`` is 1 unless the preset adapts (`Preset.adapt`): then it is this prompt's own pace, learnt from the calls
  it computed, at no extra transformer work. After each computed call the runtime reports the residual it produced
  and the one before (`observe`); their rel-L1 is the change the prompt really made over the window, and the plain
  accumulated estimate (``poly`` alone) is what the calibration predicted for it. ``ratio = exp(strength * clip(mean
  log(observed / predicted) - typical))``: a prompt that changes faster than the calibration prompts did (``typical``,
  their median) accumulates faster and is computed more often at the same threshold. A timestep-only signal
  (``sigma``) thereby gets a per-prompt schedule;
* every branch has its own state (or, in shared mode, one decision per step that both branches follow),
  and a branch that has no residual yet is always computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the rule needs no torch: simulators (`teacal fit`, `teacal report`) run it on recorded numbers
    import torch

from teacache.preset import Preset, check_threshold

SHARED = "shared"


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean(|current - previous|) / mean(|previous|), in float32 so bf16 signals do not round to zero."""
    current = current.float()
    previous = previous.float()
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


@dataclass(frozen=True)
class Decision:
    step: int
    branch: str
    distance: float | None  # rel-L1 of the signal against the previous step; None on a series' first step
    accumulated: float  # accumulator after this step's addition, before any reset
    computed: bool
    reason: str  # forced | threshold | cap | no-residual | skip | follow


@dataclass
class TeaCacheStats:
    """What happened in one generation, per step and branch."""

    num_steps: int
    decisions: list[Decision] = field(default_factory=list)
    outside_domain: list[str] = field(default_factory=list)  # why this generation lies outside the preset's domain

    @property
    def computed(self) -> int:
        return sum(d.computed for d in self.decisions)

    @property
    def skipped(self) -> int:
        return sum(not d.computed for d in self.decisions)

    @property
    def branches(self) -> list[str]:
        return sorted({d.branch for d in self.decisions})

    def schedule(self, branch: str) -> list[bool]:
        """Computed (True) or skipped, in step order, for one branch."""
        return [d.computed for d in sorted(self.decisions, key=lambda d: d.step) if d.branch == branch]

    def per_branch(self) -> dict[str, dict[str, int]]:
        return {
            b: {"computed": sum(self.schedule(b)), "skipped": len(self.schedule(b)) - sum(self.schedule(b))}
            for b in self.branches
        }

    def __str__(self) -> str:
        parts = ", ".join(f"{b}: {c['computed']} computed / {c['skipped']} skipped" for b, c in self.per_branch().items())
        flag = f"; outside the calibrated domain: {'; '.join(self.outside_domain)}" if self.outside_domain else ""
        return f"TeaCache {self.computed}/{len(self.decisions)} calls computed ({parts}){flag}"


@dataclass(frozen=True)
class TeaCacheCall:
    """What a runtime reports of one transformer call to its observers (teacal's recorder): the same in both runtimes.

    Tensors cover the target tokens only (the generated image; an edit's reference tokens are left out).
    """

    step: int
    branch: str
    sigma: float  # the timestep the transformer received, t / 1000
    computed: bool
    signals: dict[str, torch.Tensor]  # every candidate signal (teacache.preset.SIGNALS) when observed
    residual: torch.Tensor  # block-stack output - input (on a skipped call: the residual that was added)
    prediction: torch.Tensor | None  # the transformer's output for this branch (None where the runtime cannot see it)
    seconds: float | None = None  # the call's wall time, device synchronised (measured only while observed)


@dataclass
class _Series:
    """Decision state of one series: a CFG branch, or the shared series."""

    previous_signal: torch.Tensor | None = None
    accumulated: float = 0.0
    consecutive_skips: int = 0
    last_step: int | None = None
    last_computed: bool = True
    branches_at_last_step: set[str] = field(default_factory=set)
    predicted: float = 0.0  # the plain (unscaled) estimates accumulated since the last computed step
    window: float = 0.0  # what `predicted` was when the last computed step closed its window
    observed_at: int | None = None  # the step of the last observed window (shared mode: the first branch's only)
    log_ratios: list[float] = field(default_factory=list)  # log(observed / predicted) - typical, per observed window


class TeaCachePolicy:
    """Decides, per call, whether the transformer blocks run. Runtimes call `decide`; simulators `decide_distance`.

    `distance` measures a signal against the previous one (default `rel_l1`). A runtime whose signal is split
    across processes (LightX2V's sequence parallelism) passes a rel-L1 that all-reduces its two sums, so every
    process sees the distance of the full signal and takes the same decision.
    """

    def __init__(
        self,
        preset: Preset,
        threshold: float | None = None,
        distance: Callable[[torch.Tensor, torch.Tensor], float] = rel_l1,
    ) -> None:
        self.preset = preset
        self.distance = distance
        self.threshold = check_threshold(preset.threshold if threshold is None else threshold)
        self.shared = preset.branch_mode == SHARED
        self._rescale = np.poly1d(preset.coefficients)
        self._adapt = preset.adapt or None  # strength 0 still observes (calibration measures `typical` so)
        self._x_range = preset.x_range
        self._series: dict[str, _Series] = {}
        self._has_residual: set[str] = set()
        self._cutoff: int | None = None
        self.stats: TeaCacheStats | None = None

    @property
    def started(self) -> bool:
        return self.stats is not None

    def start(self, num_steps: int) -> None:
        """Begin a new generation of `num_steps` steps: forget every signal, accumulator and residual."""
        self._cutoff = self.preset.resolve_cutoff(num_steps)
        self._series = {}
        self._has_residual = set()
        self.stats = TeaCacheStats(num_steps=num_steps, outside_domain=self.preset.outside_domain(num_steps))

    def flag_outside_domain(self, reason: str) -> None:
        """Record, once per generation, why it lies outside the preset's domain (a runtime may add the image size)."""
        if self.stats is not None and reason not in self.stats.outside_domain:
            self.stats.outside_domain.append(reason)

    def rescale(self, distance: float) -> float:
        value = float(self._rescale(distance))
        return max(0.0, value) if math.isfinite(value) else math.inf

    def estimate(self, distance: float) -> float:
        """What one step adds to the accumulator, exactly as the rule applies it: clamped into the domain, rescaled."""
        return self.rescale(self._clamped(distance)) if math.isfinite(distance) else math.inf

    def decide(self, step: int, branch: str, signal: torch.Tensor) -> bool:
        """True = run the transformer blocks for this call; False = reuse the branch's cached residual."""
        series = self._series_for(branch)
        distance = None
        if not self._follows_shared_decision(series, step):
            if series.previous_signal is not None:
                distance = self.distance(signal, series.previous_signal)
            series.previous_signal = signal.detach()
        return self.decide_distance(step, branch, distance)

    def decide_distance(self, step: int, branch: str, distance: float | None) -> bool:
        """Decide from a precomputed rel-L1 (None when there is no previous signal): for simulators."""
        if self.stats is None or self._cutoff is None:
            raise RuntimeError("TeaCachePolicy.start(num_steps) must be called before the first decision of a generation")
        series = self._series_for(branch)
        repeated = series.last_step is not None and (step < series.last_step or branch in series.branches_at_last_step and step == series.last_step)
        if repeated:
            raise RuntimeError(
                f"TeaCache: branch {branch!r} asked twice for step {step}; each CFG branch needs its own "
                "cache context ('cond'/'uncond'), and each generation needs a reset"
            )
        if self._follows_shared_decision(series, step):
            computed, reason, accumulated = series.last_computed, "follow", series.accumulated
            series.branches_at_last_step.add(branch)
        else:
            series.last_step = step
            series.branches_at_last_step = {branch}
            computed, reason = self._rule(series, step, distance)
            accumulated = series.accumulated
            if not computed and branch not in self._has_residual:
                computed, reason = True, "no-residual"
            if computed:
                series.accumulated = 0.0
                series.window, series.predicted = series.predicted, 0.0
            series.consecutive_skips = 0 if computed else series.consecutive_skips + 1
            series.last_computed = computed
        if not computed and branch not in self._has_residual:  # a branch following a shared skip
            computed, reason = True, "no-residual"
        if computed:
            self._has_residual.add(branch)
        self.stats.decisions.append(Decision(step, branch, distance, accumulated, computed, reason))
        return computed

    # -- the per-prompt ratio (Preset.adapt) --------------------------------------------------------------------
    def observe(self, step: int, branch: str, residual: torch.Tensor, previous: torch.Tensor | None) -> None:
        """After a computed call: the residual it produced and the branch's previous one (None: none yet).

        Nothing is measured unless the preset has `adapt`, so a plain preset costs no extra work."""
        if self._adapt is not None and previous is not None and previous.shape == residual.shape:
            self.observe_change(step, branch, self.distance(residual, previous.to(residual.device)))

    def observe_change(self, step: int, branch: str, change: float) -> None:
        """`observe` from a precomputed rel-L1 of the residual over the window that step `step` closed: for simulators."""
        series = self._series_for(branch)
        if self._adapt is None or series.observed_at == step or not (0 < change < math.inf and 0 < series.window < math.inf):
            return
        series.observed_at = step  # in shared mode the first branch of a step stands for the step
        series.log_ratios.append(math.log(change / series.window) - self._adapt["typical"])

    def log_ratios(self, branch: str) -> list[float]:
        """Each observed window's log(observed / predicted) - typical, in order (empty without `adapt`)."""
        return list(self._series_for(branch).log_ratios)

    def ratio(self, branch: str) -> float:
        """How much faster than the calibration prompts this generation's branch changes (1 without `adapt`)."""
        return self._ratio(self._series_for(branch))

    def _ratio(self, series: _Series) -> float:
        if self._adapt is None or not series.log_ratios:
            return 1.0
        bound = math.log(self._adapt["clip"])
        return math.exp(self._adapt["strength"] * min(max(float(np.mean(series.log_ratios)), -bound), bound))

    def _clamped(self, distance: float) -> float:
        if self._x_range is None or not math.isfinite(distance):
            return distance
        low, high = self._x_range
        if not low <= distance <= high:
            side = "below" if distance < low else "above"
            self.flag_outside_domain(f"signal rel-L1 {side} the calibrated {low:.4g}..{high:.4g}")
        return min(max(distance, low), high)

    def _rule(self, series: _Series, step: int, distance: float | None) -> tuple[bool, str]:
        """TeaCache itself: accumulate the rescaled distance; compute when forced, over threshold or capped."""
        if distance is not None:
            estimate = self.estimate(distance)
            series.predicted += estimate
            series.accumulated += estimate * self._ratio(series)
        if step < self.preset.ret_steps or step >= self._cutoff:
            return True, "forced"
        if series.accumulated >= self.threshold:
            return True, "threshold"
        if self.preset.max_consecutive_skips is not None and series.consecutive_skips >= self.preset.max_consecutive_skips:
            return True, "cap"
        return False, "skip"

    def _series_for(self, branch: str) -> _Series:
        return self._series.setdefault(SHARED if self.shared else branch, _Series())

    def _follows_shared_decision(self, series: _Series, step: int) -> bool:
        """In shared mode the first branch at a step decides; the others follow that decision."""
        return self.shared and series.last_step == step
