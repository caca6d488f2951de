"""The TeaCache preset: what `teacal fit` writes and every runtime reads.

A preset is versioned JSON (``"format": "teacal-preset/1"``). Unknown keys and wrong versions are errors:
a preset that is silently half-understood is how borrowed coefficients end up wrecking images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from teacache._files import atomic_write
from teacache.forecast import NO_FORECAST, Forecast, ForecastError

PRESET_FORMAT = "teacal-preset/1"
# temb: the timestep embedding; modin: block 0's modulated image input; sigma: the timestep the transformer receives
# (t / 1000), whose rel-L1 is |Δσ| / σ. temb and sigma are functions of the schedule alone; sigma's distance grows
# monotonically towards the end of a flow-matching schedule, where temb's (Qwen-Image, 40 steps) repeats early values.
SIGNALS = ("temb", "modin", "sigma")
BRANCH_MODES = ("per-branch", "shared")


class PresetError(ValueError):
    """A preset that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Preset:
    """Coefficients and schedule limits for one model.

    `coefficients` are highest power first, as `np.poly1d` takes them; `[1.0, 0.0]` is the identity.
    `cutoff_steps` is the first step that is always computed again; a negative value counts from the end
    (-1: the last step). `forecast` is the reuse rule of a skipped call (`teacache.forecast`). `adapt` is the per-prompt
    ratio (`teacache.policy`; empty: off): ``strength`` (the exponent, 0 = off), ``typical`` (the calibration prompts'
    median log ratio of observed to predicted residual change) and ``clip`` (the ratio's bound, >= 1). `domain` is what the
    preset was calibrated on: ``steps`` (the step counts recorded), ``sizes`` ([width, height] pairs), ``dtype`` and
    ``x_range`` (per signal, the [low, high] of the recorded rel-L1); runtimes clamp the signal's rel-L1 into that
    range and flag a generation outside it. A preset without a domain (hand-written coefficients) is used as is.
    """

    model: str
    signal: str
    coefficients: tuple[float, ...]
    ret_steps: int
    cutoff_steps: int
    branch_mode: str = "per-branch"
    threshold: float = 0.2
    max_consecutive_skips: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    thresholds: tuple[dict[str, Any], ...] = ()
    forecast: Forecast = NO_FORECAST
    adapt: dict[str, Any] = field(default_factory=dict)
    domain: dict[str, Any] = field(default_factory=dict)
    format: str = PRESET_FORMAT
    source: str = field(default="<memory>", compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        object.__setattr__(self, "thresholds", tuple(dict(t) for t in self.thresholds))
        if isinstance(self.forecast, dict):
            try:
                object.__setattr__(self, "forecast", Forecast.from_dict(self.forecast))
            except ForecastError as err:
                raise self._fail("forecast", str(err).removeprefix("field 'forecast': ")) from None
        self._check()

    def _fail(self, name: str, message: str) -> PresetError:
        return PresetError(f"preset {self.source}: field '{name}': {message}")

    def _check(self) -> None:
        if self.format != PRESET_FORMAT:
            raise self._fail("format", f"expected '{PRESET_FORMAT}', got {self.format!r}")
        if not isinstance(self.model, str) or not self.model:
            raise self._fail("model", "must be a non-empty model name")
        if self.signal not in SIGNALS:
            raise self._fail("signal", f"unknown signal {self.signal!r}; expected one of {', '.join(SIGNALS)}")
        if not self.coefficients:
            raise self._fail("coefficients", "must hold at least one number (highest power first)")
        if not all(math.isfinite(c) for c in self.coefficients):
            raise self._fail("coefficients", f"must all be finite, got {list(self.coefficients)}")
        if self.branch_mode not in BRANCH_MODES:
            raise self._fail("branch_mode", f"unknown mode {self.branch_mode!r}; expected one of {', '.join(BRANCH_MODES)}")
        for name in ("ret_steps", "cutoff_steps"):
            if not _is_int(getattr(self, name)):
                raise self._fail(name, f"must be an integer, got {getattr(self, name)!r}")
        if self.ret_steps < 0:
            raise self._fail("ret_steps", f"must be >= 0, got {self.ret_steps}")
        if self.cutoff_steps >= 0 and self.ret_steps + 1 > self.cutoff_steps:
            raise self._fail(
                "cutoff_steps",
                f"ret_steps + 1 > cutoff_steps ({self.ret_steps} + 1 > {self.cutoff_steps}): no step could ever be skipped",
            )
        check_threshold(self.threshold, lambda msg: self._fail("threshold", msg))
        if self.max_consecutive_skips is not None and (not _is_int(self.max_consecutive_skips) or self.max_consecutive_skips < 1):
            raise self._fail("max_consecutive_skips", f"must be null or an integer >= 1, got {self.max_consecutive_skips!r}")
        for name in ("calibration", "fit", "adapt", "domain"):
            if not isinstance(getattr(self, name), dict):
                raise self._fail(name, "must be an object")
        if not isinstance(self.forecast, Forecast):
            raise self._fail("forecast", f"must be an object like {{\"rule\": \"none\"}}, got {self.forecast!r}")
        self._check_domain()
        self._check_adapt()

    def _check_adapt(self) -> None:
        if not self.adapt:
            return
        keys = {"strength", "typical", "clip"}
        if set(self.adapt) != keys or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.adapt.values()):
            raise self._fail("adapt", f"expected {{}} or finite numbers for exactly {', '.join(sorted(keys))}, got {self.adapt!r}")
        if self.adapt["strength"] < 0 or self.adapt["clip"] < 1:
            raise self._fail("adapt", f"strength must be >= 0 and clip >= 1, got {self.adapt!r}")

    @property
    def adaptive(self) -> bool:
        """Whether each prompt's observed residual change scales the rule (`teacache.policy`)."""
        return bool(self.adapt) and self.adapt["strength"] > 0

    def _check_domain(self) -> None:
        unknown = sorted(set(self.domain) - {"steps", "sizes", "dtype", "x_range"})
        if unknown:
            raise self._fail("domain", f"unknown key(s) {', '.join(repr(k) for k in unknown)}")
        steps = self.domain.get("steps", [])
        if not isinstance(steps, list) or not all(_is_int(s) and s >= 1 for s in steps):
            raise self._fail("domain.steps", f"must be a list of step counts, got {steps!r}")
        for signal, bounds in self.domain.get("x_range", {}).items():
            if signal not in SIGNALS or not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds) and bounds[0] <= bounds[1]):
                raise self._fail("domain.x_range", f"expected {{signal: [low, high]}} for signals {', '.join(SIGNALS)}, got {signal!r}: {bounds!r}")

    @property
    def x_range(self) -> tuple[float, float] | None:
        """The calibrated [low, high] of this preset's signal, or None when the preset has no domain."""
        bounds = self.domain.get("x_range", {}).get(self.signal)
        return (float(bounds[0]), float(bounds[1])) if bounds else None

    def outside_domain(self, num_steps: int | None = None, size: tuple[int, int] | None = None) -> list[str]:
        """Why a generation of `num_steps` steps at `size` (width, height) lies outside the calibrated domain."""
        reasons = []
        steps = self.domain.get("steps")
        if steps and num_steps is not None and not min(steps) <= num_steps <= max(steps):
            reasons.append(f"{num_steps} steps outside the calibrated {min(steps)}..{max(steps)}")
        sizes = self.domain.get("sizes")
        if sizes and size is not None and list(size) not in [list(s) for s in sizes]:
            reasons.append(f"size {size[0]}x{size[1]} not among the calibrated {', '.join(f'{w}x{h}' for w, h in sizes)}")
        return reasons

    # -- schedule ---------------------------------------------------------------------------------------------
    @property
    def rescale(self) -> np.poly1d:
        return np.poly1d(self.coefficients)

    def resolve_cutoff(self, num_steps: int) -> int:
        """The absolute first step that is always computed again, for a run of `num_steps` steps."""
        if num_steps < 1:
            raise self._fail("cutoff_steps", f"a run needs at least one step, got num_steps={num_steps}")
        cutoff = self.cutoff_steps if self.cutoff_steps >= 0 else num_steps + self.cutoff_steps
        if self.ret_steps + 1 > cutoff:
            raise self._fail(
                "cutoff_steps",
                f"with {num_steps} steps, ret_steps={self.ret_steps} and cutoff_steps={self.cutoff_steps} leave no step to skip",
            )
        return cutoff

    def require_model(self, model: str) -> None:
        if self.model != model:
            raise self._fail("model", f"this preset was calibrated for {self.model!r}, not {model!r}; calibrate one with `teacal record` + `teacal fit`")

    def replace(self, **changes: Any) -> Preset:
        return dataclasses.replace(self, **changes)

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        data["coefficients"] = list(self.coefficients)
        data["thresholds"] = list(self.thresholds)
        data["forecast"] = self.forecast.to_dict()
        if not data["adapt"]:  # a preset without the per-prompt ratio reads as it did before the field existed
            del data["adapt"]
        return {"format": data.pop("format"), **data}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<memory>") -> Preset:
        if not isinstance(data, dict):
            raise PresetError(f"preset {source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
        if data.get("format") != PRESET_FORMAT:
            raise PresetError(f"preset {source}: field 'format': expected '{PRESET_FORMAT}', got {data.get('format')!r}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise PresetError(f"preset {source}: unknown field(s) {', '.join(repr(k) for k in unknown)}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise PresetError(f"preset {source}: missing field(s) {', '.join(repr(k) for k in missing)}")
        coefficients = data["coefficients"]
        if not isinstance(coefficients, list) or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients):
            raise PresetError(f"preset {source}: field 'coefficients': must be a list of numbers, got {coefficients!r}")
        return cls(**data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Preset:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PresetError(f"preset {path}: file not found") from None
        try:
            # Python's json accepts NaN/Infinity; a preset must not, so they surface as non-finite errors below.
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PresetError(f"preset {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")


def check_threshold(value: Any, fail=None) -> float:
    """A threshold is a finite number >= 0; 0 computes every step."""
    fail = fail or (lambda msg: PresetError(f"threshold: {msg}"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise fail(f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
