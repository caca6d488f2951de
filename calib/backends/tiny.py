"""tiny-qwen-image-edit: diffusers' real Qwen-Image classes at toy size, runnable offline on a CPU.

It goes through every code path the real model does: `QwenImageTransformer2DModel` blocks and hooks,
`zero_cond_t` reference modulation (as in 2511), target + reference tokens with two `img_shapes` entries,
and norm-rescaled true CFG in two `cache_context` branches. There is no text encoder offline, so prompt
embeddings are derived deterministically from the prompt's words.

By default it loads the weights shipped in `calib/weights/`: trained by `make train-tiny`
(`calib.train_tiny`) to edit the scenes of `calib.shapes` ("make the red circle blue", "remove the green
star", ...) at 48x48. `TinyQwenImageEdit(weights=None, seed=s)` builds the same architecture with random
weights instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from safetensors.torch import load_file

from calib.backends import HookedTransformerBackend, synchronize
from calib.backends.loop import Conditioning, denoise, pack, qwen_scheduler, unpack

TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=4,
    attention_head_dim=24,
    num_attention_heads=4,
    joint_attention_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 10, 10),  # frame (target vs reference), height, width: enough frequencies to align positions
    zero_cond_t=True,
)
VAE_CONFIG = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)
TEXT_DIM = TRANSFORMER_CONFIG["joint_attention_dim"]
MAX_TEXT_TOKENS = 32
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "tiny-qwen-image-edit.safetensors"
DEFAULT_SIZE = (48, 48)


def build_tiny(seed: int = 0) -> tuple[QwenImageTransformer2DModel, AutoencoderKLQwenImage]:
    """The tiny transformer and VAE with deterministic weights: the same seed gives the same model."""
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    vae = AutoencoderKLQwenImage(**VAE_CONFIG).eval()
    return transformer, vae


def weights_fingerprint() -> str:
    """sha256 prefix of the shipped weight files, or the seed of the random ones."""
    files = sorted(WEIGHTS_DIR.glob("*.safetensors")) if WEIGHTS_DIR.is_dir() else []
    if not files:
        return "random:seed0"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def load_tiny(weights: str | Path = DEFAULT_WEIGHTS) -> tuple[QwenImageTransformer2DModel, AutoencoderKLQwenImage]:
    """The tiny transformer and VAE from a weights file written by `calib.train_tiny` (configs in the .json beside it)."""
    weights = Path(weights)
    info = json.loads(weights.with_suffix(".json").read_text())
    state = load_file(str(weights))
    transformer = QwenImageTransformer2DModel.from_config(info["transformer"])
    vae = AutoencoderKLQwenImage.from_config(info["vae"])
    for prefix, module in (("transformer.", transformer), ("vae.", vae)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return transformer.eval(), vae.eval()


def embed_text(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> ([1, L, TEXT_DIM] embeddings, [1, L] mask). Each word has a fixed vector seeded by its CRC32."""
    words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())[:MAX_TEXT_TOKENS] or ["<empty>"]
    vectors = [torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(zlib.crc32(w.encode()))) for w in words]
    embeds = torch.stack(vectors).unsqueeze(0)
    return embeds, torch.ones(1, len(words), dtype=torch.long)


class TinyQwenImageEdit(HookedTransformerBackend):
    """Runs the tiny model; `transformer` is the module that caches and recorders hook into."""

    vae_scale_factor = 2 ** len(VAE_CONFIG["temperal_downsample"])

    def __init__(
        self,
        seed: int = 0,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: str | Path | None = DEFAULT_WEIGHTS,
    ) -> None:
        """`weights`: a file written by `calib.train_tiny` (default: the shipped one), or None for random weights from `seed`."""
        self.transformer, self.vae = build_tiny(seed) if weights is None else load_tiny(weights)
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
        latents = unpack(tokens, height, width, self.vae_scale_factor).to(self.dtype)
        mean, std = self._latent_stats(latents)
        latents = latents * std + mean
        pixels = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(pixels.float(), output_type="pil")[0]

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like)
        return mean, std

    def conditioning(self, prompt: str, negative_prompt: str = "") -> Conditioning:
        embeds, mask = embed_text(prompt)
        neg_embeds, neg_mask = embed_text(negative_prompt)
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
    ) -> tuple[Image.Image, dict[str, float]]:
        """One edit (or text-to-image without `image`). Returns the image and its timings in seconds."""
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
        result = self.decode(latents, width, height)
        synchronize(self.device)
        return result, {"denoise_seconds": denoise_seconds, "seconds": time.perf_counter() - started}

    def run(self, item, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> tuple[Image.Image, dict[str, float]]:
        """The backend interface: one prompt-set item."""
        return self.generate(item.prompt, item.load_image(), seed, steps, cfg, size, item.negative_prompt, on_step)

    def close(self) -> None:
        pass
