"""A preset as LightX2V config keys, and back: the keys the upstreamable patch reads (Wan-style, inline coefficients).

``integrations/lightx2v/qwen_image_tea.patch`` adds TeaCache to LightX2V's Qwen-Image without teacal: it reads
``"feature_caching": "Tea"``, ``coefficients``, ``teacache_thresh`` and the ``teacache_*`` keys below. `config_keys`
writes them from a preset (``teacal export`` does it for a file), so ``teacal fit``'s output becomes a LightX2V config;
`preset_from_keys` reads them back, so that `teacache.lightx2v` (for an unpatched LightX2V) runs the same config and
``LightX2VPipeline.enable_cache("Tea", coefficients=..., teacache_thresh=...)`` with the same schedule.

No torch and no LightX2V here.
"""

from __future__ import annotations

import re
from typing import Any

from teacache.forecast import Forecast, ForecastError
from teacache.preset import Preset, PresetError

# Every key the patch reads beyond feature_caching/coefficients/teacache_thresh/use_ret_steps (its teacache_rule.py).
KEYS = ("teacache_signal", "teacache_ret_steps", "teacache_cutoff_steps", "teacache_branch_mode", "teacache_max_skips", "teacache_forecast",
        "teacache_x_range", "teacache_steps", "teacache_adapt")


def config_keys(preset: Preset, threshold: float | None = None) -> dict[str, Any]:
    """The LightX2V config keys that run `preset` at `threshold` (default: the preset's) on the patched LightX2V."""
    keys: dict[str, Any] = {
        "feature_caching": "Tea",
        "coefficients": list(preset.coefficients),
        "teacache_thresh": preset.threshold if threshold is None else threshold,
        "teacache_signal": preset.signal,
        "teacache_ret_steps": preset.ret_steps,
        "teacache_cutoff_steps": preset.cutoff_steps,
        "teacache_branch_mode": preset.branch_mode,
        "teacache_max_skips": preset.max_consecutive_skips,
        "teacache_forecast": {k: v for k, v in preset.forecast.to_dict().items() if k != "fit"},
    }
    if preset.x_range is not None:
        keys["teacache_x_range"] = list(preset.x_range)
    if preset.domain.get("steps"):
        keys["teacache_steps"] = list(preset.domain["steps"])
    if preset.adapt:
        keys["teacache_adapt"] = dict(preset.adapt)
    return keys


def has_inline_keys(config: Any) -> bool:
    """Whether a LightX2V config carries TeaCache's coefficients itself (rather than a ``teacache_preset`` file)."""
    coefficients = config.get("coefficients")
    return isinstance(coefficients, (list, tuple)) and len(coefficients) > 0


def preset_from_keys(config: Any, model: str, source: str = "LightX2V config") -> Preset:
    """The preset that LightX2V config keys describe, as the patch reads them (its defaults included).

    Wan's ``[[...], [...]]`` coefficient pair is picked by ``use_ret_steps``, and ``use_ret_steps`` sets Wan's forced
    steps when ``teacache_ret_steps``/``teacache_cutoff_steps`` are absent (5 and none at the end when true; the first
    and the last when false). ``teacache_thresh`` must be a number here: the keys carry no threshold of their own.
    """

    def fail(key: str, message: str) -> PresetError:
        return PresetError(f"{source}: TeaCache config key '{key}': {message}")

    use_ret_steps = bool(config.get("use_ret_steps", False))
    coefficients = config.get("coefficients")
    if isinstance(coefficients, (list, tuple)) and coefficients and all(isinstance(c, (list, tuple)) for c in coefficients):
        if len(coefficients) != 2:
            raise fail("coefficients", f"a list of lists is Wan's [[use_ret_steps], [not use_ret_steps]] pair; got {len(coefficients)} lists")
        coefficients = coefficients[0 if use_ret_steps else 1]
    if not isinstance(coefficients, (list, tuple)) or not coefficients or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients):
        raise fail("coefficients", f"expected a list of numbers, highest power first, got {coefficients!r}")
    threshold = config.get("teacache_thresh")
    if threshold is None:
        raise fail("teacache_thresh", "null; with inline coefficients the threshold is a number (0 computes every call)")
    ret_steps = config.get("teacache_ret_steps")
    ret_steps = (5 if use_ret_steps else 1) if ret_steps is None else ret_steps
    cutoff = config.get("teacache_cutoff_steps", "wan")
    if cutoff == "wan":
        cutoff = None if use_ret_steps else -1
    if cutoff is None:
        raise fail("teacache_cutoff_steps", "a preset always forces a last step; give an integer (-1: the last step)")
    signal = config.get("teacache_signal", "temb")
    try:
        forecast = config.get("teacache_forecast")
        forecast = Forecast() if forecast in (None, "none") else Forecast.from_dict(forecast)
    except ForecastError as err:
        raise fail("teacache_forecast", str(err)) from None
    domain: dict[str, Any] = {}
    if config.get("teacache_steps"):
        domain["steps"] = list(config["teacache_steps"])
    if config.get("teacache_x_range") is not None:
        domain["x_range"] = {signal: list(config["teacache_x_range"])}
    try:
        return Preset(model=model, signal=signal, coefficients=tuple(coefficients), ret_steps=ret_steps, cutoff_steps=cutoff,
                      branch_mode=config.get("teacache_branch_mode", "per-branch"), threshold=threshold,
                      max_consecutive_skips=config.get("teacache_max_skips"), forecast=forecast, adapt=config.get("teacache_adapt") or {},
                      domain=domain, source=source)
    except PresetError as err:
        match = re.search(r"field '([^']+)': (.*)", str(err))
        if match is None:
            raise
        raise fail(_FIELD_KEYS.get(match.group(1), match.group(1)), match.group(2)) from None


_FIELD_KEYS = {"signal": "teacache_signal", "ret_steps": "teacache_ret_steps", "cutoff_steps": "teacache_cutoff_steps",
               "branch_mode": "teacache_branch_mode", "threshold": "teacache_thresh", "max_consecutive_skips": "teacache_max_skips",
               "domain.x_range": "teacache_x_range", "domain.steps": "teacache_steps", "coefficients": "coefficients", "adapt": "teacache_adapt"}
