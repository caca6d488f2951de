"""What training either embedded model takes: the VAE, the edit pool, flow matching, the weights file.

1. VAE: `AutoencoderKLQwenImage` trained as an autoencoder on rendered scenes: the decoder reconstructs from the
   posterior mean (what the runtime's `latent_dist.mode()` gives) plus a little noise, with MSE + L1/2 weighted on
   the pixels that matter (shapes; without the weight training sits for long on "background only"), and a small L2
   on the latents. Most steps see crops (it is convolutional); the last ones whole scenes. Its per-channel latent
   mean and std, measured on the training pool, go into the VAE config as `latents_mean`/`latents_std`, and the
   runtime normalises with them as the Qwen pipelines do. For a single frame the VAE's causal 3D convolutions see
   two frames of zero padding and one real frame, so training runs them as the equivalent 2D convolutions with the
   kernel's last time slice (`single_frame_convs`; the stock forward gives the same numbers, tested), and
   initialises them for one frame (`single_frame_init`).
2. Transformer: `QwenImageTransformer2DModel` trained with rectified flow matching in the Qwen-Image-Edit token
   layout: the noisy target's tokens followed by the reference image's tokens, two `img_shapes` entries and
   `zero_cond_t` (reference tokens modulated at t=0, as in 2511). The sigma of each sample is logit-normal, put
   through the scheduler's own exponential shift for this sequence length. Text is the deterministic word
   embedding of `calib.tiny.model.embed_text`; some samples get the empty prompt instead, the embedding the
   runtime's negative prompt has, so true CFG has an unconditional model to push away from. Tokens the edit changes
   weigh more in the loss. The modulation and output layers start at zero (adaLN-zero, as DiT), and the shipped
   weights are an EMA of the trained ones.

Everything draws from the config's seed on one pinned thread: the same command on the same machine gives the same
weights. Nothing in `calib` below this package imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from calib.backends.loop import pack, qwen_shift
from calib.tiny.model import Embedded, build, embed_text


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_crop: int = 16
    vae_full_steps: int = 150
    vae_full_batch: int = 8
    vae_scenes: int = 3000
    vae_lr: float = 2e-3
    vae_latent_noise: float = 0.05  # decoder robustness to latents that are not exactly an encoder's output
    vae_l2: float = 1e-4  # keeps the latent scale from drifting
    scenes: int = 8000  # training pool: each scene gets `edits_per_scene` different edits
    edits_per_scene: int = 3
    steps: int = 2400
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    text_dropout: float = 0.1
    changed_weight: float = 2.0  # extra loss weight on tokens the edit changes
    ema: float = 0.998
    threads: int = 1  # pinned: the same weights on any machine, and no OpenMP stalls on a shared runner


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> [B, 3, 1, H, W] in [-1, 1], as VaeImageProcessor.preprocess gives."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1).unsqueeze(2)


@contextlib.contextmanager
def single_frame_convs():
    """Run the VAE's causal 3D convolutions on one frame as the 2D convolutions they equal (3x less work)."""
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as vae_module

    stock = vae_module.QwenImageCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is None and x.shape[2] == 1:
            pad = self._padding  # (w, w, h, h, 2t, 0): the real frame meets the kernel's last time slice
            return F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad[2], pad[0])).unsqueeze(2)
        return stock(self, x, cache_x)

    vae_module.QwenImageCausalConv3d.forward = forward
    try:
        yield
    finally:
        vae_module.QwenImageCausalConv3d.forward = stock


def vae_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance of a single-frame batch, without the frame-cache loop (same numbers)."""
    mean, logvar = vae.quant_conv(vae.encoder(pixels)).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def training_sigmas(generator: torch.Generator, n: int, seq_len: int) -> torch.Tensor:
    """Training noise levels: logit-normal, then the scheduler's exponential shift for `seq_len` tokens."""
    mu = qwen_shift(seq_len)
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def log_progress(label: str, step: int, steps: int, started: float, extra: str) -> None:
    if step % 100 == 0 or step == steps - 1:
        elapsed = time.perf_counter() - started
        print(f"[{label}] step {step + 1}/{steps}  {extra}  {elapsed:.0f}s", flush=True)


# -- VAE --------------------------------------------------------------------------------------------------------


def single_frame_init(vae) -> None:
    """Re-initialise the VAE for single frames: zero biases, and the kernels' real-frame slice scaled by sqrt(3).

    With default initialisation a causal 3D kernel expects three frames of input; one frame gives each layer a
    third of the expected variance, the biases win, and the untrained decoder's output ignores its latent
    (training then stalls on the mean image). This keeps the signal's scale through the stack.
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d):
                if module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, QwenImageCausalConv3d) and module.weight.shape[2] > 1:
                    module.weight[:, :, -1] *= math.sqrt(module.weight.shape[2])


RenderPool = Callable[[np.random.Generator, int], tuple[torch.Tensor, torch.Tensor]]  # (rng, n) -> pixels, loss weights


def train_vae(model: Embedded, cfg: TrainConfig, render_pool: RenderPool, log: list[dict]) -> torch.nn.Module:
    """Most steps see random `vae_crop`-pixel crops (a step costs a fraction of a full image's); the last
    `vae_full_steps` see whole scenes, so the mid-block attention adapts to the full canvas."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    _, vae = build(model, cfg.seed)
    single_frame_init(vae)
    vae.train()
    pixels, weights = render_pool(rng, cfg.vae_scenes)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    started = time.perf_counter()
    factor, size = model.vae_scale_factor, model.size[0]
    with single_frame_convs():
        for step in range(cfg.vae_steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.vae_lr * lr_factor(step, cfg.vae_steps, 50)
            if step < cfg.vae_steps - cfg.vae_full_steps:
                idx = torch.from_numpy(rng.integers(0, len(pixels), cfg.vae_batch))
                ox, oy = rng.integers(0, (size - cfg.vae_crop) // factor + 1, size=2) * factor
                window = (Ellipsis, slice(oy, oy + cfg.vae_crop), slice(ox, ox + cfg.vae_crop))
                x, w = pixels[idx][window], weights[idx][window]
            else:
                idx = torch.from_numpy(rng.integers(0, len(pixels), cfg.vae_full_batch))
                x, w = pixels[idx], weights[idx]
            mean, _ = vae_moments(vae, x)
            recon = vae.decoder(vae.post_quant_conv(mean + cfg.vae_latent_noise * torch.randn_like(mean)))
            error = recon - x
            rec = (w * (error.pow(2) + 0.5 * error.abs())).mean() / w.mean()
            loss = rec + cfg.vae_l2 * mean.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.append({"phase": "vae", "step": step, "loss": rec.item(), "seconds": time.perf_counter() - started})
            log_progress("vae", step, cfg.vae_steps, started, f"weighted reconstruction {rec.item():.4f}")
    return vae.eval()


def vae_preview(vae, images: list[np.ndarray], path: Path) -> float:
    """Scenes over their reconstructions (stock encode/decode), as a PNG; returns their mean abs error (0..255)."""
    from PIL import Image

    with torch.no_grad():
        latents = vae.encode(to_pixels(images)).latent_dist.mode()
        recon = vae.decode(latents).sample[:, :, 0].permute(0, 2, 3, 1).add(1).mul(127.5).round().clamp(0, 255).byte().numpy()
    error = float(np.abs(recon.astype(float) - np.stack(images)).mean())
    sheet = np.concatenate([np.concatenate(images, 1), np.concatenate(list(recon), 1)], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(path)
    return error


# -- the edit pool ----------------------------------------------------------------------------------------------


@dataclass
class Pool:
    source: torch.Tensor  # [P, N, 16] packed, normalised reference latents
    target: torch.Tensor  # [P, N, 16]
    text: torch.Tensor  # [P, L, D] word embeddings, zero-padded
    mask: torch.Tensor  # [P, L] 1 for words
    changed: torch.Tensor  # [P, N] 1 where the edit changes the token
    kinds: list[str]
    grid: tuple[int, int]  # token grid (h, w)


@torch.no_grad()
def encode(vae, images: list[np.ndarray], batch: int = 256) -> torch.Tensor:
    """Posterior means of uint8 images, [P, z, 1, h, w]."""
    out = []
    with single_frame_convs():
        for i in range(0, len(images), batch):
            out.append(vae_moments(vae, to_pixels(images[i : i + batch]))[0])
    return torch.cat(out)


def changed_tokens(source: np.ndarray, target: np.ndarray, block: int) -> torch.Tensor:
    """1 for each target token (a `block`-pixel square) whose pixels the edit changes, in the packed token order."""
    differs = np.abs(target.astype(int) - source.astype(int)).sum(-1) > 30
    n = source.shape[0] // block
    return torch.from_numpy(differs.reshape(n, block, n, block).any(axis=(1, 3)).reshape(-1)).float()


def build_pool(model: Embedded, vae, sources: list[np.ndarray], targets: list[np.ndarray], source_of: list[int], prompts: list[str],
               kinds: list[str]) -> tuple[Pool, list[float], list[float]]:
    """The pool of (reference, target, text) triples, encoded once. `sources` are the distinct reference images,
    `source_of[i]` the one edit i starts from. Returns the pool and the latents' per-channel mean and std."""
    started = time.perf_counter()
    source_latents = encode(vae, sources)
    target_latents = encode(vae, targets)
    mean = source_latents.mean(dim=(0, 2, 3, 4))
    std = source_latents.std(dim=(0, 2, 3, 4))
    shape = (1, -1, 1, 1, 1)

    def tokens(latents: torch.Tensor) -> torch.Tensor:
        return pack((latents - mean.view(shape)) / std.view(shape))

    source = tokens(source_latents)[source_of]
    target = tokens(target_latents)
    block = 2 * model.vae_scale_factor
    changed = torch.stack([changed_tokens(sources[s], t, block) for s, t in zip(source_of, targets, strict=True)])
    embeds = [embed_text(p, model.text_dim) for p in prompts]
    length = max(m.shape[1] for _, m in embeds)
    text = torch.zeros(len(prompts), length, model.text_dim)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, (vectors, m) in enumerate(embeds):
        text[i, : m.shape[1]] = vectors[0]
        mask[i, : m.shape[1]] = 1
    h, w = source_latents.shape[-2:]
    print(f"[pool] {len(prompts)} edits over {len(sources)} scenes encoded in {time.perf_counter() - started:.0f}s; "
          f"{changed.mean().item():.1%} of target tokens change", flush=True)
    return Pool(source, target, text, mask, changed, kinds, (h // 2, w // 2)), mean.tolist(), std.tolist()


# -- transformer ------------------------------------------------------------------------------------------------


def zero_init(transformer) -> None:
    """adaLN-zero: every block starts as the identity and the output as zero (DiT's initialisation)."""
    for block in transformer.transformer_blocks:
        for linear in (block.img_mod[1], block.txt_mod[1]):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    for linear in (transformer.norm_out.linear, transformer.proj_out):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)


def predict_target(transformer, latents: torch.Tensor, reference: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                   timestep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The transformer's prediction for a batch of target tokens beside their reference tokens (the edit layout)."""
    h, w = grid
    out = transformer(hidden_states=torch.cat([latents, reference], dim=1), timestep=timestep, encoder_hidden_states=text,
                      encoder_hidden_states_mask=mask, img_shapes=[[(1, h, w), (1, h, w)]] * latents.shape[0], return_dict=False)[0]
    return out[:, : latents.shape[1]]


def train_transformer(model: Embedded, cfg: TrainConfig, pool: Pool, log: list[dict]) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + 3)
    transformer, _ = build(model, cfg.seed)
    zero_init(transformer)
    transformer.train()
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    n_tokens = pool.grid[0] * pool.grid[1]
    empty_text, empty_mask = embed_text("", model.text_dim)
    started = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup)
        idx = torch.randint(len(pool.kinds), (cfg.batch,), generator=generator)
        x0, reference = pool.target[idx], pool.source[idx]
        text, mask = pool.text[idx].clone(), pool.mask[idx].clone()
        drop = torch.rand(cfg.batch, generator=generator) < cfg.text_dropout
        text[drop] = 0.0
        mask[drop] = 0
        text[drop, : empty_mask.shape[1]] = empty_text[0]
        mask[drop, : empty_mask.shape[1]] = 1
        sigma = training_sigmas(generator, cfg.batch, n_tokens)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
        prediction = predict_target(transformer, noisy, reference, text, mask, sigma, pool.grid)
        weight = 1 + cfg.changed_weight * pool.changed[idx]
        per_token = (prediction - (noise - x0)).pow(2).mean(-1)
        loss = (per_token * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in transformer.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        log.append({"phase": "transformer", "step": step, "loss": loss.item(), "seconds": time.perf_counter() - started})
        log_progress("transformer", step, cfg.steps, started, f"flow-matching loss {loss.item():.4f}")
    transformer.load_state_dict(ema)
    return transformer.eval()


# -- outputs ----------------------------------------------------------------------------------------------------


def write_loss(log: list[dict], folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(log)
    tmp = folder / "loss.csv.tmp"
    frame.to_csv(tmp, index=False)
    os.replace(tmp, folder / "loss.csv")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    final = {}
    for ax, (phase, title) in zip(axes, [("vae", "VAE weighted reconstruction (MSE + L1/2)"), ("transformer", "transformer flow-matching loss")], strict=True):
        part = frame[frame.phase == phase]
        ax.plot(part.step, part.loss, lw=0.5, alpha=0.4, label="per step")
        smooth = part.loss.rolling(50, min_periods=1).mean()
        ax.plot(part.step, smooth, lw=1.5, label="mean of 50")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        final[phase] = float(part.loss.tail(100).mean())
    fig.tight_layout()
    fig.savefig(folder / "loss.png.tmp.png", dpi=110)
    plt.close(fig)
    os.replace(folder / "loss.png.tmp.png", folder / "loss.png")
    return final


def save_weights(transformer, vae, meta: dict, weights: Path) -> None:
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.contiguous() for k, v in transformer.state_dict().items()}
    tensors.update({f"vae.{k}": v.contiguous() for k, v in vae.state_dict().items()})
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "teacal-tiny/1"})
    os.replace(tmp, weights)
    info = {
        "format": "teacal-tiny/1",
        "transformer": {k: v for k, v in transformer.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in vae.config.items() if not k.startswith("_")},
        **meta,
    }
    tmp = weights.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=list) + "\n")
    os.replace(tmp, weights.with_suffix(".json"))


def train_model(model: Embedded, cfg: TrainConfig, render_pool: RenderPool, preview: list[np.ndarray],
                make_pool: Callable[[torch.nn.Module], tuple[Pool, list[float], list[float]]], out: Path, docs: Path, command: str) -> None:
    """VAE, pool, transformer; then the weights file with its provenance and the loss curve in `docs`."""
    import platform

    import diffusers

    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    log: list[dict] = []
    vae = train_vae(model, cfg, render_pool, log)
    vae_seconds = time.perf_counter() - started
    vae_error = vae_preview(vae, preview, docs / "vae.png")
    print(f"[vae] held-out reconstruction error {vae_error:.1f}/255 ({docs / 'vae.png'})", flush=True)
    pool, mean, std = make_pool(vae)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    transformer = train_transformer(model, cfg, pool, log)
    seconds = time.perf_counter() - started
    final = write_loss(log, docs)
    from dataclasses import asdict

    meta = {
        "training": asdict(cfg),
        "final_loss": final,
        "seconds": {"vae": round(vae_seconds, 1), "total": round(seconds, 1)},
        "vae_reconstruction_error_255": round(vae_error, 2),
        "pool_edits": len(pool.kinds),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "command": command,
    }
    save_weights(transformer, vae, meta, out)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB) in {seconds / 60:.1f} min; final loss: VAE {final['vae']:.4f}, transformer {final['transformer']:.4f}")
