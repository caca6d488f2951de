"""The shipped tiny Qwen-Image-Edit: it loads, it is deterministic, and it really edits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calib.backends import tiny
from calib.models import get_model
from calib.tiny import model as tiny_model
from calib.tiny import shapes as S
from calib.training.common import single_frame_convs, to_pixels, vae_moments


@pytest.fixture(scope="module")
def model() -> tiny.TinyQwenImageEdit:
    return tiny.TinyQwenImageEdit()


def test_shipped_weights_are_small_and_described():
    assert tiny_model.DEFAULT_WEIGHTS.exists(), "run `make train-tiny` to produce the weights"
    assert tiny_model.DEFAULT_WEIGHTS.stat().st_size <= 10 * 2**20
    info = json.loads(tiny_model.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert info["transformer"]["zero_cond_t"] is True
    assert info["vae"]["z_dim"] * 4 == info["transformer"]["in_channels"]
    assert info["vae"]["latents_std"] != [1.0] * info["vae"]["z_dim"]  # measured on the training pool


def test_default_model_loads_the_trained_weights(model):
    random_model = tiny.TinyQwenImageEdit(weights=None, seed=0)
    trained = dict(model.transformer.named_parameters())
    assert any(not torch.equal(p, trained[k]) for k, p in random_model.transformer.named_parameters())
    assert get_model("tiny-qwen-image-edit").size == tiny.DEFAULT_SIZE


def test_short_generation_is_deterministic(model):
    edit = next(S.sample_edits(S.HELD_OUT_SEED, 1))
    first = model.generate(edit.prompt, S.to_pil(edit.source), seed=3, steps=4).image
    second = model.generate(edit.prompt, S.to_pil(edit.source), seed=3, steps=4).image
    other_seed = model.generate(edit.prompt, S.to_pil(edit.source), seed=4, steps=4).image
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert not np.array_equal(np.asarray(first), np.asarray(other_seed))


def test_a_recolour_edit_succeeds(model):
    circle = S.Shape("circle", "red", 16.0, 18.0, 8.0)
    scene = S.Scene((circle, S.Shape("square", "blue", 34.0, 32.0, 7.0)), background="white")
    green = S.Shape("circle", "green", 16.0, 18.0, 8.0)
    edit = S.Edit("recolour", "make the red circle green", scene, S._replace_shape(scene, circle, green), green, circle)
    output = model.generate(edit.prompt, S.to_pil(scene), seed=0, steps=20, cfg=4.0).image
    verdict = S.edit_success(edit, output)
    assert verdict["success"], verdict["detail"]
    assert not S.edit_success(edit, S.render(scene))["success"]  # the same judge rejects the unedited scene


def test_edit_metric_accepts_the_intended_targets_and_rejects_the_sources():
    for edit in S.sample_edits(1, 50, balanced=True):
        assert S.edit_success(edit, S.render(edit.target))["success"], edit.prompt
        assert not S.edit_success(edit, S.render(edit.source))["success"], edit.prompt


def test_training_runs_the_vae_as_the_stock_forward_does():
    _, vae = tiny_model.build_tiny(0)
    rng = np.random.default_rng(0)
    pixels = to_pixels([S.render(S.sample_scene(rng)) for _ in range(2)])
    with torch.no_grad():
        stock_latents = vae.encode(pixels).latent_dist.mode()
        stock_images = vae.decode(stock_latents).sample
        with single_frame_convs():
            latents, _ = vae_moments(vae, pixels)
            images = vae.decoder(vae.post_quant_conv(latents)).clamp(-1, 1)
    torch.testing.assert_close(latents, stock_latents, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(images, stock_images, atol=1e-5, rtol=1e-4)
