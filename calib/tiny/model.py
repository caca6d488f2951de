"""The embedded tiny Qwen-Image-Edit: diffusers' real Qwen-Image classes at toy size, runnable offline on a CPU.

Its architecture (`TRANSFORMER_CONFIG`, `VAE_CONFIG`), its weights (shipped in `calib/tiny/weights/`, trained by
`calib.tiny.train` on the scenes of `calib.tiny.shapes`) and its text embedding (no text encoder offline: each
word has a fixed vector). `calib.backends.tiny.TinyQwenImageEdit` runs it.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from safetensors.torch import load_file

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
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
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
    """The tiny transformer and VAE from a weights file written by `calib.tiny.train` (configs in the .json beside it)."""
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
