"""TeaCache on diffusers' QwenImageTransformer2DModel: real hooks, real blocks, the tiny model."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from PIL import Image

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
def teacache(module, p: Preset, threshold=None, policy=None):
    apply_teacache(module, p, threshold=threshold, policy=policy)
    try:
        yield
    finally:
        remove_teacache(module)


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
    return tiny.generate(PROMPT, image, seed=seed, steps=steps, cfg=cfg).image


@pytest.mark.parametrize("signal", ["temb", "modin", "sigma"])
def test_threshold_zero_is_bit_identical_to_uncached(tiny, reference_image, signal):
    plain = generate(tiny, reference_image)
    with teacache(tiny.transformer, preset(signal=signal), threshold=0.0):
        cached = generate(tiny, reference_image)
        stats = teacache_stats(tiny.transformer)
    assert np.array_equal(pixels(plain), pixels(cached))
    assert stats.skipped == 0 and stats.computed == 2 * STEPS


def test_the_sigma_signal_skips_early_and_computes_late_whatever_the_latents(tiny, reference_image):
    """|Δσ|/σ grows along a flow-matching schedule: accumulated, it computes more often towards the end, and the
    schedule depends on the step count alone (the same for every seed and both CFG branches)."""
    schedules = []
    for seed in (0, 5):
        with teacache(tiny.transformer, preset(signal="sigma"), threshold=0.25):
            generate(tiny, reference_image, seed=seed)
            stats = teacache_stats(tiny.transformer)
        schedules += [stats.schedule("cond"), stats.schedule("uncond")]
    assert all(s == schedules[0] for s in schedules)
    computed = [i for i, c in enumerate(schedules[0]) if c]
    gaps = np.diff(computed)
    assert 2 < len(computed) < STEPS and gaps[0] > 1 and (np.diff(gaps) <= 0).all(), schedules[0]


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
    with teacache(pipe, preset(), threshold=0.0):
        exact = run()
    with teacache(pipe, preset(), threshold=1e9):
        skipped = run()
        stats = teacache_stats(pipe)
    assert np.array_equal(plain, exact)
    assert not np.array_equal(plain, skipped)
    assert stats.schedule("cond") == stats.schedule("uncond") == [True, False, False, True]


# -- the runtime follows the generation that really runs (issue: no silent wrong results) ------------------------------
def _pipe(tiny, pipeline_class, **extra):
    parts = dict(scheduler=qwen_scheduler(), vae=tiny.vae, text_encoder=None, tokenizer=None, transformer=tiny.transformer, **extra)
    pipe = pipeline_class(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t2i(pipe, steps=STEPS, size=64, **kwargs):
    args = dict(_pipeline_kwargs(steps), height=size, width=size)
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(0), **args).images


def test_the_step_count_comes_from_the_generation_not_from_apply(tiny):
    pipe = _pipe(tiny, QwenImagePipeline)
    with teacache(pipe, preset(), threshold=1e9):
        for steps in (6, 4, 8):
            _t2i(pipe, steps=steps)
            stats = teacache_stats(pipe)
            assert stats.num_steps == steps
            assert stats.schedule("cond") == [True] + [False] * (steps - 2) + [True]  # the last step of *this* run is forced


def test_a_request_outside_the_domain_warns_once_per_process_however_many_hooks(tiny, caplog):
    pipe = _pipe(tiny, QwenImagePipeline)
    outside = preset(domain={"steps": [20, 40]})  # what a sweep does: a hook per threshold, each run at 6 steps
    with caplog.at_level("WARNING", logger="teacache.diffusers"):
        for threshold in (0.1, 0.2, 0.3):
            with teacache(pipe, outside, threshold=threshold):
                _t2i(pipe, steps=6)
                assert teacache_stats(pipe).outside_domain == ["6 steps outside the calibrated 20..40"]
    assert [r.getMessage() for r in caplog.records].count(
        f"TeaCache preset {outside.source}: 6 steps outside the calibrated 20..40; its schedule there is extrapolated") == 1


def test_img2img_strength_runs_fewer_steps_and_teacache_follows(tiny, reference_image):
    from diffusers import QwenImageImg2ImgPipeline

    pipe = _pipe(tiny, QwenImageImg2ImgPipeline)
    with teacache(pipe, preset(), threshold=1e9):
        _t2i(pipe, steps=8, image=reference_image.resize((64, 64)), strength=0.5)
        stats = teacache_stats(pipe)
    assert stats.num_steps == 4  # int(8 * 0.5) steps run, from the scheduler's begin_index
    assert stats.schedule("cond") == [True, False, False, True]


def test_an_aborted_generation_leaks_nothing_into_the_next_one(tiny):
    pipe = _pipe(tiny, QwenImagePipeline)

    def abort(pipeline, step, t, tensors):
        if step == 2:
            raise KeyboardInterrupt("user stopped it")
        return tensors

    with teacache(pipe, preset(), threshold=0.3):
        with pytest.raises(KeyboardInterrupt):
            _t2i(pipe, steps=6, size=64, callback_on_step_end=abort)
        after_abort = _t2i(pipe, steps=6, size=48)  # another size: a leaked residual would not even fit
        after_stats = [(d.step, d.branch, d.computed) for d in teacache_stats(pipe).decisions]
    with teacache(pipe, preset(), threshold=0.3):
        fresh = _t2i(pipe, steps=6, size=48)
        fresh_stats = [(d.step, d.branch, d.computed) for d in teacache_stats(pipe).decisions]
    assert np.array_equal(after_abort, fresh) and after_stats == fresh_stats
    assert any(not computed for *_, computed in fresh_stats)


def test_batch_of_two_and_a_change_of_size(tiny):
    pipe = _pipe(tiny, QwenImagePipeline)
    plain = _t2i(pipe, steps=6, size=64, num_images_per_prompt=2)
    with teacache(pipe, preset(), threshold=0.0):
        exact = _t2i(pipe, steps=6, size=64, num_images_per_prompt=2)
    with teacache(pipe, preset(), threshold=0.3):
        batch = _t2i(pipe, steps=6, size=64, num_images_per_prompt=2)
        batch_stats = teacache_stats(pipe)
        smaller = _t2i(pipe, steps=6, size=48)
    assert np.array_equal(plain, exact)
    assert batch.shape[0] == 2 and smaller.shape[1:3] == (48, 48) and batch_stats.skipped > 0


def _tiny_controlnet(tiny):
    from diffusers import QwenImageControlNetModel

    from calib.tiny.model import TRANSFORMER_CONFIG

    config = {k: TRANSFORMER_CONFIG[k] for k in ("patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "axes_dims_rope")}
    torch.manual_seed(0)
    controlnet = QwenImageControlNetModel(num_layers=2, **config).eval()
    with torch.no_grad():  # diffusers zero-initialises the control projections; make them matter
        for layer in [*controlnet.controlnet_blocks, controlnet.controlnet_x_embedder]:
            layer.weight.normal_(0, 0.05)
    return controlnet


def test_a_skipped_call_adds_the_current_controlnet_residuals_once(tiny):
    """A skipped call's stack output is its input + the blocks' own residual of the last computed call + this call's
    ControlNet residuals (which diffusers' block loop adds after each block), not + last call's a second time."""
    from calib.simulate import StaticSchedulePolicy

    transformer = tiny.transformer
    n_blocks = len(transformer.transformer_blocks)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 16, generator=generator)
    embeds, mask = embed_text(PROMPT)
    controls = [[torch.randn(1, 16, 96, generator=generator) * 0.1 for _ in range(2)] for _ in range(2)]
    call = dict(hidden_states=hidden, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]], return_dict=False)
    tail_inputs = []
    hook = transformer.norm_out.register_forward_pre_hook(lambda module, args: tail_inputs.append(args[0].clone()))
    p = preset(ret_steps=0)
    try:
        with torch.no_grad(), teacache(transformer, p, policy=StaticSchedulePolicy(p, np.array([True, False]))):
            for step in range(2):
                with transformer.cache_context("cond", step_index=step, num_inference_steps=2):
                    transformer(timestep=torch.tensor([0.5]), controlnet_block_samples=controls[step], **call)
    finally:
        hook.remove()
    interval = -(-n_blocks // 2)
    added = [sum(c[i // interval] for i in range(n_blocks)) for c in controls]
    stack_input = transformer.img_in(hidden)
    block_residual = tail_inputs[0] - stack_input - added[0]
    assert torch.allclose(tail_inputs[1], stack_input + block_residual + added[1], atol=1e-5)


def test_controlnet_pipeline_at_threshold_zero_is_the_plain_image(tiny):
    from diffusers import QwenImageControlNetPipeline, QwenImageTransformer2DModel

    from calib.tiny.model import TRANSFORMER_CONFIG

    # diffusers' ControlNet pipeline passes img_shapes that zero_cond_t (the 2511 edit layout) cannot read: a random
    # transformer of the same shape without it
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**{**TRANSFORMER_CONFIG, "zero_cond_t": False}).eval()
    pipe = QwenImageControlNetPipeline(scheduler=qwen_scheduler(), vae=tiny.vae, text_encoder=None, tokenizer=None, transformer=transformer,
                                       controlnet=_tiny_controlnet(tiny))
    pipe.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    plain = _t2i(pipe, steps=4, control_image=control)
    with teacache(pipe, preset(), threshold=0.0):
        exact = _t2i(pipe, steps=4, control_image=control)
    with teacache(pipe, preset(), threshold=1e9):
        skipped = _t2i(pipe, steps=4, control_image=control)
        stats = teacache_stats(pipe)
    assert np.array_equal(plain, exact) and not np.array_equal(plain, skipped)
    assert stats.schedule("cond") == [True, False, False, True]


def test_a_transformer_alone_without_step_fields_says_how_to_apply_teacache(tiny):
    with teacache(tiny.transformer, preset(), threshold=0.3):
        with pytest.raises(ValueError, match="apply it to the pipeline"), tiny.transformer.cache_context("cond"):
            embeds, mask = embed_text(PROMPT)
            tiny.transformer(hidden_states=torch.randn(1, 16, 16), timestep=torch.tensor([0.5]), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]], return_dict=False)


def test_the_per_prompt_ratio_learns_the_generations_pace_from_the_calls_it_computed(tiny, reference_image):
    """With `adapt`, every computed call after a branch's first reports its residual change to the policy, and a
    generation that changes faster than the calibration's `typical` is computed more at the same threshold (slower:
    less); the timestep signal alone would give all three one schedule."""
    from teacache.policy import TeaCachePolicy

    def run(typical: float, strength: float) -> tuple[int, TeaCachePolicy]:
        policy = TeaCachePolicy(preset(signal="sigma", adapt={"strength": strength, "typical": typical, "clip": 2.0}), 0.25)
        with teacache(tiny.transformer, policy.preset, policy=policy):
            generate(tiny, reference_image)
        return policy.stats.computed, policy

    plain, observed = run(0.0, 0.0)
    ratios = observed.log_ratios("cond")
    assert len(ratios) == sum(observed.stats.schedule("cond")) - 1 and all(np.isfinite(ratios))
    pace = float(np.mean(ratios))
    faster, _ = run(pace - 1.0, 1.0)  # this generation changes e times faster than "typical": ratio 2 (clipped)
    slower, _ = run(pace + 1.0, 1.0)
    assert slower < plain < faster, (slower, plain, faster)
