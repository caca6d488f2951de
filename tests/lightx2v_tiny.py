"""Test fixtures: the embedded trained tiny model on LightX2V's real transformer model and scheduler.

`write_tiny_model` + `TinyLightX2V` run the diffusers tiny model's weights on LightX2V's real
``QwenImageTransformerModel`` and ``QwenImageScheduler``, in the runner's own step loop (``QwenImageRunner.run``),
with the tiny model's prompt embeddings and VAE instead of the runner's encoders; it implements the backend
interface of `calib.backends.lightx2v`. That model cannot go through the runner: ``QwenImageScheduler.__init__``
builds ``QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56])`` (hard-coded, for head dim 128) and the tiny model has
its own ``axes_dims_rope`` (`TinyLightX2V` sets ``scheduler.pos_embed`` to LightX2V's own ``QwenEmbedRope`` with
the tiny axes); nor has it a Qwen2.5-VL text encoder or a 16-channel Qwen-Image VAE.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from calib.backends import Generation, recording_preset
from calib.backends.lightx2v import LightX2VModelBackend, _lightx2v, _now
from calib.errors import UserError

TINY_LIGHTX2V_CONFIG = dict(
    # torch kernels only: runs on any device, the CPU included
    attn_type="torch_sdpa",
    modulate_type="torch",
    rope_type="torch_complex_rope",
    layer_norm_type="torch",
    rms_norm_type="torch",
)

# LightX2V's Qwen blocks squeeze the text's batch dimension (``txt_modulated2.squeeze(0)`` in
# ``qwen_image/infer/transformer_infer.py``, ``infer_ffn``), so a one-token text becomes 1-D and fails in ``addmm``. The
# real text encoder never yields one token (its prompt template alone is dozens); the tiny model's word embedding
# gives the empty negative prompt one token, so on LightX2V the tiny model's default negative prompt is this one.
TINY_NEGATIVE_PROMPT = "low quality"


def write_tiny_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny transformer's weights and configs in the layout LightX2V loads (``transformer/``, ``scheduler/``).

    The weights are the ones `TinyQwenImageEdit(seed)` runs (the shipped trained ones), so both backends agree.
    """
    from safetensors.torch import save_file

    from calib.backends.loop import QWEN_SCHEDULER_CONFIG
    from calib.backends.tiny import TinyQwenImageEdit
    from calib.tiny.model import TRANSFORMER_CONFIG

    root = Path(directory)
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    transformer = TinyQwenImageEdit(seed=seed).transformer
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, root / "transformer" / "diffusion_pytorch_model.safetensors")
    config = dict(TRANSFORMER_CONFIG, axes_dims_rope=list(TRANSFORMER_CONFIG["axes_dims_rope"]), _class_name="QwenImageTransformer2DModel")
    (root / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(QWEN_SCHEDULER_CONFIG, _class_name="FlowMatchEulerDiscreteScheduler"), indent=2))
    return root


class TinyLightX2V(LightX2VModelBackend):
    """The tiny Qwen-Image-Edit on LightX2V's real transformer model and scheduler (see the module notes).

    As a backend (`run`, `observing`, `caching`) build it with ``**recording_config("tiny-qwen-image-edit")``; the
    prompt embeddings and the VAE are the diffusers tiny model's (`TinyQwenImageEdit`, same seed).
    """

    def __init__(self, model_dir: str | os.PathLike, seed: int = 0, install: bool = True, **config_overrides: Any) -> None:
        """`install`: make "Tea" select `teacache.lightx2v`'s class; False leaves LightX2V as it is (a patched LightX2V
        then runs its own TeaCache class, with the caching scheduler its runner picks)."""
        if install:
            _lightx2v()
        from lightx2v.models.networks.qwen_image.model import QwenImageTransformerModel
        from lightx2v.models.schedulers.qwen_image.scheduler import QwenEmbedRope, QwenImageScheduler
        from lightx2v.utils.set_config import get_default_config
        from lightx2v_platform.base.global_var import AI_DEVICE

        model_dir = Path(model_dir)
        transformer_config = json.loads((model_dir / "transformer" / "config.json").read_text())
        config = get_default_config()
        config.update(transformer_config)
        config.update(dict(model_path=str(model_dir), model_cls="qwen_image", task="i2i", infer_steps=8, enable_cfg=True, sample_guide_scale=4.0,
                           num_channels_latents=transformer_config["in_channels"] // 4, vae_scale_factor=4, **TINY_LIGHTX2V_CONFIG))
        config.update(config_overrides)
        self.config = config
        self.model = QwenImageTransformerModel(str(model_dir / "transformer"), config, torch.device(AI_DEVICE))
        if not config.get("cpu_offload", False):  # under offload LightX2V moves the weights itself, as the runner's backend leaves it
            self.model.to_cuda()  # LightX2V's name for "to AI_DEVICE"; see calib.backends.lightx2v's notes
        self.scheduler = self._scheduler_class(config["feature_caching"], QwenImageScheduler)(config)
        self.scheduler.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(transformer_config["axes_dims_rope"]), scale_rope=True)
        self.model.set_scheduler(self.scheduler)
        self.recording = recording_preset("tiny-qwen-image-edit")
        self.model_name = "tiny-qwen-image-edit"
        self.seed = seed
        self._codec = None

    @staticmethod
    def _scheduler_class(feature_caching: str, plain: type) -> type:
        """As the patched QwenImageRunner.init_scheduler picks it: the caching scheduler for "Tea" where it exists."""
        if feature_caching != "Tea":
            return plain
        try:
            from lightx2v.models.schedulers.qwen_image.feature_caching.scheduler import QwenImageSchedulerCaching
        except ImportError:  # stock LightX2V: teacache.lightx2v.install() makes the plain one clear TeaCache
            return plain
        return QwenImageSchedulerCaching

    @property
    def codec(self):
        """The tiny model's text embedding and VAE (`TinyQwenImageEdit`), which stand in for the runner's encoders."""
        if self._codec is None:
            from calib.backends.tiny import TinyQwenImageEdit

            self._codec = TinyQwenImageEdit(self.seed)
        return self._codec

    def inputs(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor, image_latents: torch.Tensor) -> dict[str, Any]:
        """The runner's ``inputs`` dict: text encoder and VAE encoder outputs."""
        dtype = torch.bfloat16
        return {
            "text_encoder_output": {"prompt_embeds": prompt_embeds.to(dtype), "negative_prompt_embeds": negative_embeds.to(dtype)},
            "image_encoder_output": [{"image_latents": image_latents.to(dtype)}],
        }

    def input_info(self, seed: int, size: tuple[int, int], prompt_len: int, negative_len: int):
        from lightx2v.utils.input_info import I2IInputInfo

        width, height = size
        h, w = height // self.config["vae_scale_factor"], width // self.config["vae_scale_factor"]
        return I2IInputInfo(
            seed=seed,
            target_shape=(1, 1, self.config["num_channels_latents"], h, w),
            image_shapes=[[(1, h // 2, w // 2), (1, h // 2, w // 2)]],
            txt_seq_lens=[prompt_len, negative_len],
        )

    @torch.no_grad()
    def denoise(self, inputs: dict[str, Any], input_info, steps: int | None = None, before_step: Callable[[int], None] | None = None,
                on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """``scheduler.prepare`` then ``QwenImageRunner.run``'s loop, then the runner's ``end_run`` clear. Returns the latents."""
        if steps is not None:
            self.config["infer_steps"] = steps
        self.scheduler.prepare(input_info)
        for step in range(self.scheduler.infer_steps):
            self.scheduler.step_pre(step_index=step)
            if before_step is not None:
                before_step(step)
            self.model.infer(inputs)
            self.scheduler.step_post()
            if on_step is not None:
                on_step(step)
        latents = self.scheduler.latents
        self.scheduler.clear()
        return latents

    @torch.no_grad()
    def run(self, item, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> Generation:
        """The backend interface: one prompt-set item, as `TinyQwenImageEdit.run` makes it, denoised by LightX2V."""
        width, height = size
        self.config["enable_cfg"] = cfg > 1
        self.scheduler.sample_guide_scale = cfg
        started = _now()
        conditioning = self.codec.conditioning(item.prompt, item.negative_prompt or TINY_NEGATIVE_PROMPT)
        if min(conditioning.prompt_embeds.shape[1], conditioning.negative_embeds.shape[1]) < 2:
            raise UserError(f"{item.id}: LightX2V's Qwen blocks cannot take a one-token text (they squeeze it to 1-D); use a longer prompt")
        image_latents = self.codec.encode_image(item.load_image(), width, height)
        inputs = self.inputs(conditioning.prompt_embeds, conditioning.negative_embeds, image_latents)
        info = self.input_info(seed, size, conditioning.prompt_embeds.shape[1], conditioning.negative_embeds.shape[1])
        denoise_started = _now()
        latents = self.denoise(inputs, info, steps, on_step=on_step)
        denoise_seconds = _now() - denoise_started
        image = self.codec.decode(latents, width, height)
        return Generation(image, latents.float().cpu().numpy(), _now() - started, denoise_seconds)

    def close(self) -> None:
        del self.model, self.scheduler
        gc.collect()

    @torch.no_grad()
    def warmup(self, inputs: dict[str, Any], input_info) -> None:
        """What ``QwenImageRunner._run_warmup`` does with the model: prepare, one step, then clear."""
        self.scheduler.prepare(input_info)
        self.scheduler.step_pre(step_index=0)
        self.model.infer(inputs)
        self.scheduler.step_post()
        self.scheduler.clear()
        self.model.pre_infer.clear_rope_cache()
