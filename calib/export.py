"""`teacal export`: a preset as a LightX2V config, so `teacal fit`'s output runs on LightX2V.

The config carries the TeaCache keys inline (`teacache.lightx2v_config.config_keys`: ``"feature_caching": "Tea"``,
``coefficients``, ``teacache_thresh``, ``teacache_*``), on top of a LightX2V config of the user's (``--base``, e.g.
LightX2V's ``configs/qwen_image/qwen_image_i2i_2511.json``). A LightX2V patched with
``integrations/lightx2v/qwen_image_tea.patch`` runs it without teacal; ``python -m teacache.lightx2v`` runs it on a
stock LightX2V.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calib.errors import UserError
from calib.runfiles import check_output_file, read_json, write_json
from teacache.lightx2v_config import KEYS, config_keys
from teacache.preset import Preset, check_threshold

REPLACED = ("feature_caching", "coefficients", "teacache_thresh", "use_ret_steps", "teacache_preset", "teacache_model", *KEYS)


def lightx2v_config(preset: Preset, base: dict[str, Any] | None = None, threshold: float | None = None) -> dict[str, Any]:
    """`base` (a LightX2V config) with every TeaCache key replaced by the preset's."""
    if threshold is not None:
        check_threshold(threshold)
    kept = {k: v for k, v in (base or {}).items() if k not in REPLACED}
    return {**kept, **config_keys(preset, threshold)}


def export_lightx2v(preset_path: Path, out: Path, base_path: Path | None = None, threshold: float | None = None) -> dict[str, Any]:
    check_output_file(out, "--out", "lightx2v-config.json")
    preset = Preset.load(preset_path)
    if out.resolve() in {preset_path.resolve(), *([base_path.resolve()] if base_path else [])}:
        raise UserError(f"--out {out}: would overwrite an input; name another file")
    base = read_json(base_path, f"--base {base_path}", "a JSON object of LightX2V config keys") if base_path is not None else None
    config = lightx2v_config(preset, base, threshold)
    write_json(out, config)
    return config
