"""The embedded models: diffusers' real Qwen-Image classes at toy size, runnable offline on a CPU.

Two of them, each an `Embedded` (architecture, weights file, image size):

- `tiny-qwen-image-edit` (`TINY`): edits of coloured shapes whose outcome the instruction determines. Fast; it proves
  code paths (hooks, CFG branches, reference tokens), not which schedule is best: its flow is nearly straight.
- `scenes-qwen-image-edit` (`SCENES`): open-ended edits of `calib.tiny.scenes` ("add a star" anywhere, "change the
  background"), whose conditional distribution has many modes, as a real model's does: the evidence model.

Weights ship in `calib/tiny/weights/` (trained by `calib.training`); text has no encoder offline, so each word has a
fixed vector (`embed_text`). `calib.backends.tiny.TinyQwenImageEdit` runs either.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors.torch import load_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_TEXT_TOKENS = 32


@dataclass(frozen=True)
class Embedded:
    name: str
    transformer: dict
    vae: dict
    size: tuple[int, int]  # (width, height) it was trained at

    @property
    def weights(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"

    @property
    def text_dim(self) -> int:
        return self.transformer["joint_attention_dim"]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae["temperal_downsample"])


TINY = Embedded(
    "tiny-qwen-image-edit",
    transformer=dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=24, num_attention_heads=4,
        joint_attention_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 10, 10),  # frame (target vs reference), height, width: enough frequencies to align positions
        zero_cond_t=True,
    ),
    vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    size=(48, 48),
)
# 64x64 -> 16x16x4 latents -> 64 target + 64 reference tokens; 4 blocks 128 wide: about 1 s per 50-step edit with
# CFG on one CPU thread. The VAE is wider than the tiny one's: the scenes have textures and hatching to keep.
SCENES = Embedded(
    "scenes-qwen-image-edit",
    transformer=dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12), zero_cond_t=True,
    ),
    vae=dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
             latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    size=(64, 64),
)
# The scenes model distilled to 8 and 4 steps with CFG off (calib.training.distill), as Lightning distils Qwen-Image-Edit.
SCENES_8STEP = Embedded("scenes-qwen-image-edit-8step", SCENES.transformer, SCENES.vae, SCENES.size)
SCENES_4STEP = Embedded("scenes-qwen-image-edit-4step", SCENES.transformer, SCENES.vae, SCENES.size)
EMBEDDED = {model.name: model for model in (TINY, SCENES, SCENES_8STEP, SCENES_4STEP)}

# The tiny model's names, as the tests and the LightX2V harness use them.
TRANSFORMER_CONFIG, VAE_CONFIG, DEFAULT_WEIGHTS, DEFAULT_SIZE = TINY.transformer, TINY.vae, TINY.weights, TINY.size
TEXT_DIM = TINY.text_dim


def build(model: Embedded, seed: int = 0) -> tuple[QwenImageTransformer2DModel, AutoencoderKLQwenImage]:
    """The model's transformer and VAE with deterministic random weights: the same seed gives the same model."""
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**model.transformer).eval()
    vae = AutoencoderKLQwenImage(**model.vae).eval()
    return transformer, vae


def build_tiny(seed: int = 0) -> tuple[QwenImageTransformer2DModel, AutoencoderKLQwenImage]:
    return build(TINY, seed)


def weights_fingerprint(weights: Path = DEFAULT_WEIGHTS) -> str:
    """sha256 prefix of a shipped weights file, or the seed of the random ones when there is none."""
    if not weights.is_file():
        return "random:seed0"
    return f"sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}"


def load(weights: str | Path) -> tuple[QwenImageTransformer2DModel, AutoencoderKLQwenImage]:
    """A transformer and VAE from a weights file written by `calib.training` (configs in the .json beside it)."""
    weights = Path(weights)
    info = json.loads(weights.with_suffix(".json").read_text())
    state = load_file(str(weights))
    transformer = QwenImageTransformer2DModel.from_config(info["transformer"])
    vae = AutoencoderKLQwenImage.from_config(info["vae"])
    for prefix, module in (("transformer.", transformer), ("vae.", vae)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return transformer.eval(), vae.eval()


def embed_text(text: str, dim: int = TEXT_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> ([1, L, dim] embeddings, [1, L] mask). Each word has a fixed vector seeded by its CRC32."""
    words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())[:MAX_TEXT_TOKENS] or ["<empty>"]
    vectors = [torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode()))) for w in words]
    embeds = torch.stack(vectors).unsqueeze(0)
    return embeds, torch.ones(1, len(words), dtype=torch.long)
