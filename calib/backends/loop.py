"""The Qwen-Image(-Edit) denoising loop at transformer level.

It mirrors `QwenImageEditPipeline.__call__` step for step (packing, shift, timesteps, norm-rescaled true CFG),
using the pipeline's own helpers, but takes the reference size as given instead of resizing it to 1024².
Each CFG branch runs in its own `cache_context`, with the step index and count, as cache hooks expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
    QwenImageEditPipeline,
    calculate_shift,
    retrieve_timesteps,
)

# Qwen-Image's scheduler configuration (scheduler/scheduler_config.json of the Qwen-Image repos).
QWEN_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


def qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG)


def qwen_shift(n_tokens: int) -> float:
    """The shift `mu` the Qwen pipelines' dynamic shifting gives `n_tokens` image tokens."""
    c = QWEN_SCHEDULER_CONFIG
    return calculate_shift(n_tokens, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])


def qwen_sigmas(steps: int, mu: float) -> np.ndarray:
    """The sigma of each of `steps` steps, as the Qwen pipelines set them (linear, shifted by `mu`, stretched to the terminal)."""
    scheduler = qwen_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas[:-1].double().numpy()


def shift_of(sigmas: np.ndarray) -> float:
    """The shift `mu` under which the Qwen scheduler gives these sigmas (a recorded run's): bisection, since a larger
    shift spends more steps at high noise and so raises every sigma."""
    sigmas = np.asarray(sigmas, float)
    low, high = -4.0, 4.0
    for _ in range(60):
        mid = (low + high) / 2
        if qwen_sigmas(len(sigmas), mid).mean() < sigmas.mean():
            low = mid
        else:
            high = mid
    return (low + high) / 2


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] latents -> [B, H/2 * W/2, 4C] tokens, as the pipeline packs them."""
    b, c, _, h, w = latents.shape
    return QwenImageEditPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    return QwenImageEditPipeline._unpack_latents(tokens, height, width, vae_scale_factor)


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen's norm-rescaled true CFG: the guided prediction keeps the conditional prediction's norm."""
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


def denoise(
    transformer,
    scheduler: FlowMatchEulerDiscreteScheduler,
    latents: torch.Tensor,
    conditioning: Conditioning,
    img_shapes: list,
    steps: int,
    cfg: float,
    image_latents: torch.Tensor | None = None,
    on_step=None,
) -> torch.Tensor:
    """Run `steps` flow-matching steps from packed `latents`; returns the packed final latents."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(
        latents.shape[1],
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, steps = retrieve_timesteps(scheduler, steps, latents.device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    do_cfg = cfg > 1 and conditioning.negative_embeds is not None
    n_target = latents.shape[1]
    for i, t in enumerate(timesteps):
        model_input = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
        call = dict(
            hidden_states=model_input,
            timestep=t.expand(latents.shape[0]).to(latents.dtype) / 1000,
            img_shapes=img_shapes,
            return_dict=False,
        )
        context = dict(step_index=i, num_inference_steps=steps, timestep=t, sigma=float(scheduler.sigmas[i]))
        with transformer.cache_context("cond", **context):
            prediction = transformer(encoder_hidden_states=conditioning.prompt_embeds, encoder_hidden_states_mask=conditioning.prompt_mask, **call)[0]
        prediction = prediction[:, :n_target]
        if do_cfg:
            with transformer.cache_context("uncond", **context):
                negative = transformer(encoder_hidden_states=conditioning.negative_embeds, encoder_hidden_states_mask=conditioning.negative_mask, **call)[0]
            prediction = true_cfg(prediction, negative[:, :n_target], cfg)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    # As the stock pipelines do after each generation: stateful cache hooks start clean next time.
    transformer._reset_stateful_cache()
    return latents
