"""TeaCache on diffusers' QwenImageTransformer2DModel: real hooks, real blocks, the tiny model."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

from calib.backends.loop import qwen_scheduler
from calib.tiny.model import embed_text
from teacache.diffusers import apply_teacache, remove_teacache, teacache_block_forwards, teacache_stats
from teacache.preset import Preset
from tests.conftest import pixels

PROMPT = "make the helmet red"
STEPS = 8


def preset(**overrides) -> Preset:
    fields = dict(model="tiny-qwen-image-edit", signal="modin", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1, threshold=0.2)
    fields.update(overrides)
    return Preset(**fields)


@contextlib.contextmanager
def teacache(transformer, p: Preset, threshold=None, num_inference_steps=None):
    apply_teacache(transformer, p, threshold=threshold, num_inference_steps=num_inference_steps)
    try:
        yield
    finally:
        remove_teacache(transformer)


@contextlib.contextmanager
def count_block_bodies(transformer):
    """Counts block bodies that really ran: attention lives inside a block's own forward."""
    counter = {"n": 0}
    handles = [b.attn.register_forward_pre_hook(lambda *_: counter.__setitem__("n", counter["n"] + 1)) for b in transformer.transformer_blocks]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def generate(tiny, image, seed=0, steps=STEPS, cfg=4.0):
    return tiny.generate(PROMPT, image, seed=seed, steps=steps, cfg=cfg)[0]


@pytest.mark.parametrize("signal", ["temb", "modin"])
def test_threshold_zero_is_bit_identical_to_uncached(tiny, reference_image, signal):
    plain = generate(tiny, reference_image)
    with teacache(tiny.transformer, preset(signal=signal), threshold=0.0):
        cached = generate(tiny, reference_image)
        stats = teacache_stats(tiny.transformer)
    assert np.array_equal(pixels(plain), pixels(cached))
    assert stats.skipped == 0 and stats.computed == 2 * STEPS


def test_huge_threshold_computes_only_forced_steps_and_runs_no_blocks_otherwise(tiny, reference_image):
    n_blocks = len(tiny.transformer.transformer_blocks)
    plain = generate(tiny, reference_image)
    with teacache(tiny.transformer, preset(ret_steps=2, cutoff_steps=-1), threshold=1e9), count_block_bodies(tiny.transformer) as ran:
        cached = generate(tiny, reference_image)
        stats = teacache_stats(tiny.transformer)
        forwards = teacache_block_forwards(tiny.transformer)
    forced = [True, True] + [False] * (STEPS - 3) + [True]
    assert stats.schedule("cond") == forced and stats.schedule("uncond") == forced
    assert ran["n"] == forwards == 2 * sum(forced) * n_blocks
    assert not np.array_equal(pixels(plain), pixels(cached))  # skipping really changed the image


def test_two_generations_in_a_row_match(tiny, reference_image):
    with teacache(tiny.transformer, preset(), threshold=0.3):
        first = generate(tiny, reference_image, seed=3)
        first_stats = [(d.step, d.branch, d.computed) for d in teacache_stats(tiny.transformer).decisions]
        second = generate(tiny, reference_image, seed=3)
        second_stats = [(d.step, d.branch, d.computed) for d in teacache_stats(tiny.transformer).decisions]
    assert np.array_equal(pixels(first), pixels(second))
    assert first_stats == second_stats
    assert any(not c for *_, c in first_stats)


def test_shared_mode_applies_one_decision_to_both_branches(tiny, reference_image):
    with teacache(tiny.transformer, preset(branch_mode="shared"), threshold=0.3):
        generate(tiny, reference_image)
        stats = teacache_stats(tiny.transformer)
    assert stats.schedule("cond") == stats.schedule("uncond")
    assert 0 < stats.skipped < 2 * STEPS


def test_without_cfg_only_the_cond_branch_runs(tiny, reference_image):
    with teacache(tiny.transformer, preset(), threshold=0.3):
        generate(tiny, reference_image, cfg=1.0)
        assert teacache_stats(tiny.transformer).branches == ["cond"]


def test_remove_restores_the_plain_transformer(tiny, reference_image):
    plain = generate(tiny, reference_image)
    with teacache(tiny.transformer, preset(), threshold=1e9):
        generate(tiny, reference_image)
    assert np.array_equal(pixels(plain), pixels(generate(tiny, reference_image)))


def _pipeline_kwargs(steps):
    embeds, mask = embed_text(PROMPT)
    neg, neg_mask = embed_text("")
    return dict(
        prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=4.0, num_inference_steps=steps, height=64, width=64, output_type="np",
    )


@pytest.mark.parametrize("pipeline_class", [QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline])
def test_stock_pipelines(tiny, pipeline_class, reference_image, monkeypatch):
    """The stock pipelines name their branches and reset hooks themselves; TeaCache needs nothing else."""
    steps = 4
    # The edit pipelines size the reference to about 1024² (140 s per run for the tiny model on 2 CPU cores).
    # Shrink that target area 256-fold; the call structure TeaCache hooks into is unchanged.
    module = sys.modules[pipeline_class.__module__]
    if hasattr(module, "calculate_dimensions"):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: original(area / 256, ratio))
    parts = dict(scheduler=qwen_scheduler(), vae=tiny.vae, text_encoder=None, tokenizer=None, transformer=tiny.transformer)
    if pipeline_class is not QwenImagePipeline:
        parts["processor"] = None
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    kwargs = _pipeline_kwargs(steps)
    if pipeline_class is not QwenImagePipeline:
        kwargs["image"] = reference_image

    def run():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    plain = run()
    with teacache(tiny.transformer, preset(), threshold=0.0, num_inference_steps=steps):
        exact = run()
    with teacache(tiny.transformer, preset(), threshold=1e9, num_inference_steps=steps):
        skipped = run()
        stats = teacache_stats(tiny.transformer)
    assert np.array_equal(plain, exact)
    assert not np.array_equal(plain, skipped)
    assert stats.schedule("cond") == stats.schedule("uncond") == [True, False, False, True]
