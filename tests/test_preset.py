"""Presets: round trip, and one clear error per kind of bad preset."""

from __future__ import annotations

import json

import pytest

from teacache.preset import PRESET_FORMAT, Preset, PresetError

GOOD = {
    "format": PRESET_FORMAT,
    "model": "tiny-qwen-image-edit",
    "signal": "modin",
    "coefficients": [45.1, -52.9, 17.0, 0.1, 0.0],
    "ret_steps": 1,
    "cutoff_steps": -1,
    "branch_mode": "per-branch",
    "threshold": 0.2,
}


def write(tmp_path, data) -> str:
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_round_trip(tmp_path):
    preset = Preset.from_dict(GOOD)
    path = tmp_path / "out" / "p.json"
    preset.save(path)
    assert Preset.load(path) == preset
    assert json.loads(path.read_text())["format"] == PRESET_FORMAT


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"signal": None}, "missing field(s) 'signal'"),
        ({"format": "teacal-preset/2"}, "field 'format': expected 'teacal-preset/1'"),
        ({"coefficients": [1.0, float("nan")]}, "field 'coefficients': must all be finite"),
        ({"coefficients": [1.0, float("inf")]}, "field 'coefficients': must all be finite"),
        ({"ret_steps": 5, "cutoff_steps": 5}, "ret_steps + 1 > cutoff_steps"),
        ({"signal": "latents"}, "field 'signal': unknown signal 'latents'"),
        ({"branch_mode": "both"}, "field 'branch_mode': unknown mode"),
        ({"threshold": -0.1}, "field 'threshold': must be a finite number >= 0"),
        ({"surprise": 1}, "unknown field(s) 'surprise'"),
        ({"coefficients": "1,0"}, "field 'coefficients': must be a list of numbers"),
    ],
)
def test_bad_presets_fail_with_one_clear_error(tmp_path, change, message):
    data = dict(GOOD)
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = write(tmp_path, json.dumps(data, allow_nan=True))
    with pytest.raises(PresetError) as err:
        Preset.load(path)
    text = str(err.value)
    assert message in text
    assert path in text and "\n" not in text


def test_invalid_json_and_missing_file(tmp_path):
    with pytest.raises(PresetError, match="invalid JSON at line 1"):
        Preset.load(write(tmp_path, "{not json"))
    with pytest.raises(PresetError, match="file not found"):
        Preset.load(tmp_path / "absent.json")


def test_negative_cutoff_resolves_per_run_and_checks_room_to_skip():
    preset = Preset.from_dict(dict(GOOD, ret_steps=2, cutoff_steps=-2))
    assert preset.resolve_cutoff(20) == 18
    with pytest.raises(PresetError, match="leave no step to skip"):
        preset.resolve_cutoff(4)


def test_preset_for_another_model_is_rejected():
    with pytest.raises(PresetError, match="calibrated for 'tiny-qwen-image-edit', not 'qwen-image-edit-2511'"):
        Preset.from_dict(GOOD).require_model("qwen-image-edit-2511")
