"""The embedded models (tiny-qwen-image-edit, scenes-qwen-image-edit): diffusers' real Qwen-Image classes at toy size,
runnable offline on a CPU.

It goes through every code path the real model does: `QwenImageTransformer2DModel` blocks and hooks,
`zero_cond_t` reference modulation (as in 2511), target + reference tokens with two `img_shapes` entries,
and norm-rescaled true CFG in two `cache_context` branches. There is no text encoder offline, so prompt
embeddings are derived deterministically from the prompt's words.

By default it loads the weights shipped in `calib/tiny/weights/` (`calib.tiny.model.EMBEDDED`: the tiny model edits
the shapes of `calib.tiny.shapes` at 48x48, the scenes model the open-ended scenes of `calib.tiny.scenes` at 64x64).
`TinyQwenImageEdit(weights=None, seed=s)` builds the same architecture with random weights instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from calib.backends import Generation, HookedTransformerBackend, synchronize
from calib.backends.loop import Conditioning, denoise, pack, qwen_scheduler, unpack
from calib.tiny.model import DEFAULT_SIZE, TINY, Embedded, build, embed_text, load


class TinyQwenImageEdit(HookedTransformerBackend):
    """Runs an embedded model; `transformer` is the module that caches and recorders hook into."""

    vae_scale_factor = TINY.vae_scale_factor  # both embedded models downsample 4x

    def __init__(
        self,
        seed: int = 0,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: str | Path | None = "shipped",
        model: Embedded = TINY,
    ) -> None:
        """`weights`: a file written by `calib.training` (default: the model's shipped one), or None for random weights from `seed`."""
        self.model_name, self.text_dim = model.name, model.text_dim
        weights = model.weights if weights == "shipped" else weights
        self.transformer, self.vae = build(model, seed) if weights is None else load(weights)
        for module in (self.transformer, self.vae):
            module.to(device)
            if dtype != torch.float32:  # .to(dtype) warns even when it changes nothing
                module.to(dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.scheduler = qwen_scheduler()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        pixels = self.image_processor.preprocess(image.convert("RGB"), height, width).unsqueeze(2)
        latents = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return pack((latents - mean) / std)  # as the Qwen pipelines normalise with latents_mean/std

    def decode(self, tokens: torch.Tensor, width: int, height: int) -> Image.Image:
        return self.decode_pixels(tokens, width, height)[0]

    def decode_pixels(self, tokens: torch.Tensor, width: int, height: int) -> tuple[Image.Image, np.ndarray]:
        """The image, and its float pixels in [0, 1] before 8-bit rounding."""
        latents = unpack(tokens, height, width, self.vae_scale_factor).to(self.dtype)
        mean, std = self._latent_stats(latents)
        latents = latents * std + mean
        pixels = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        array = self.image_processor.postprocess(pixels.float(), output_type="np")[0]
        return self.image_processor.numpy_to_pil(array[None])[0], array.astype(np.float32)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like)
        return mean, std

    def conditioning(self, prompt: str, negative_prompt: str = "") -> Conditioning:
        embeds, mask = embed_text(prompt, self.text_dim)
        neg_embeds, neg_mask = embed_text(negative_prompt, self.text_dim)
        to = dict(device=self.device)
        return Conditioning(embeds.to(**to, dtype=self.dtype), mask.to(**to), neg_embeds.to(**to, dtype=self.dtype), neg_mask.to(**to))

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        image: Image.Image | None,
        seed: int,
        steps: int = 20,
        cfg: float = 4.0,
        size: tuple[int, int] = DEFAULT_SIZE,
        negative_prompt: str = "",
        on_step=None,
    ) -> Generation:
        """One edit (or text-to-image without `image`): the image, its final latents and timings."""
        width, height = size
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        noise = torch.randn(1, 4, 1, h, w, generator=torch.Generator().manual_seed(seed))
        latents = pack(noise).to(self.device, self.dtype)
        image_latents = self.encode_image(image, width, height) if image is not None else None
        img_shapes = [[(1, h // 2, w // 2)] + ([(1, h // 2, w // 2)] if image is not None else [])]
        synchronize(self.device)
        started = time.perf_counter()
        latents = denoise(
            self.transformer, self.scheduler, latents, self.conditioning(prompt, negative_prompt),
            img_shapes, steps, cfg, image_latents=image_latents, on_step=on_step,
        )
        synchronize(self.device)
        denoise_seconds = time.perf_counter() - started
        result, pixels = self.decode_pixels(latents, width, height)
        synchronize(self.device)
        return Generation(result, latents.float().cpu().numpy(), time.perf_counter() - started, denoise_seconds, pixels)

    def run(self, item, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> Generation:
        """The backend interface: one prompt-set item."""
        return self.generate(item.prompt, item.load_image(), seed, steps, cfg, size, item.negative_prompt, on_step)

    def close(self) -> None:
        pass
