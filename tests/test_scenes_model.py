"""The scenes model (scenes-qwen-image-edit), the evidence model: it loads as the registry names it, runs both CFG
branches with the reference tokens through diffusers' real classes, and the shipped weights reproduce a recorded image
bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calib.backends import load_backend
from calib.models import get_model
from calib.runfiles import prompt_set_identities
from calib.tiny import scenes as S
from calib.tiny.model import SCENES

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "scenes-reference.npz"  # written once with the shipped weights (see below)
PROMPT, SEED, STEPS = "add a red star", 3, 8


@pytest.fixture(scope="module")
def scenes():
    return load_backend(get_model("scenes-qwen-image-edit"), "tiny", None, "cpu", torch.float32)


def _source():
    return S.to_pil(S.Scene((S.Item(S.Shape("circle", "blue", 20.0, 24.0, 7.0)),), "white", S.Texture()))


def test_the_shipped_weights_are_small_and_describe_their_model():
    assert SCENES.weights.stat().st_size <= 40 * 2**20
    info = json.loads(SCENES.weights.with_suffix(".json").read_text())
    assert info["transformer"]["zero_cond_t"] is True and info["transformer"]["num_layers"] == SCENES.transformer["num_layers"]
    assert info["training"]["steps"] > 0 and info["seconds"]["total"] < 95 * 60  # trained on one CPU thread in about 90 minutes


def test_both_cfg_branches_run_with_the_reference_tokens(scenes):
    """Each call carries 64 target + 64 reference tokens; the cond and uncond calls of a step differ (true CFG)."""
    calls = []
    handle = scenes.transformer.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (kwargs["hidden_states"].shape[1], kwargs["img_shapes"], kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    try:
        scenes.generate(PROMPT, _source(), seed=SEED, steps=2, cfg=4.0, size=SCENES.size)
    finally:
        handle.remove()
    assert len(calls) == 4  # 2 steps x (cond, uncond)
    assert all(tokens == 128 and shapes == [[(1, 8, 8), (1, 8, 8)]] for tokens, shapes, _ in calls)
    assert not torch.equal(calls[0][2][:, :1], calls[1][2][:, :1])  # the prompt, then the empty negative prompt


def test_open_edits_have_many_outcomes(scenes):
    """What makes it the evidence model: one input, several seeds, different images (a determined edit would agree)."""
    images = [np.asarray(scenes.generate("draw three shapes", S.to_pil(S.Scene((), S.BLANK, S.Texture())), seed=s, steps=12,
                                         cfg=4.0, size=SCENES.size).image, dtype=float) for s in range(3)]
    assert min(np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1:]) > 10  # of 255, per pixel


def test_the_held_out_scenes_prompts_share_no_input_with_the_calibration_prompts():
    """teacal evaluate refuses a prompt that calibrated the preset: the shipped sets must never overlap, nor repeat."""
    calibration = prompt_set_identities(ROOT / "prompts/scenes/calib.jsonl")
    held_out = prompt_set_identities(ROOT / "prompts/scenes/heldout.jsonl")
    assert len(set(held_out.values())) == len(held_out) >= 24
    assert not set(held_out.values()) & set(calibration.values())


def test_the_shipped_weights_reproduce_a_recorded_image_bit_for_bit(scenes):
    generation = scenes.generate(PROMPT, _source(), seed=SEED, steps=STEPS, cfg=4.0, size=SCENES.size)
    recorded = np.load(REFERENCE)
    np.testing.assert_array_equal(np.asarray(generation.image), recorded["image"])  # the 8-bit image, bit for bit
    # the latents too, to float32 rounding: CPU kernels may sum in another order on another instruction set
    np.testing.assert_allclose(generation.latents, recorded["latents"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":  # write the reference: python -m tests.test_scenes_model (after make train-scenes)
    torch.set_num_threads(1)
    backend = load_backend(get_model("scenes-qwen-image-edit"), "tiny", None, "cpu", torch.float32)
    g = backend.generate(PROMPT, _source(), seed=SEED, steps=STEPS, cfg=4.0, size=SCENES.size)
    REFERENCE.parent.mkdir(exist_ok=True)
    np.savez_compressed(REFERENCE, latents=g.latents, image=np.asarray(g.image))
    print(f"wrote {REFERENCE}")
