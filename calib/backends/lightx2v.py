"""The lightx2v backend: Qwen-Image(-Edit) run by LightX2V's own runner, every transformer call observed.

`teacal record|sweep --backend lightx2v --model-path DIR --lightx2v-config FILE` use `LightX2VQwenImage`:

* it builds LightX2V's `QwenImageRunner` the way ``lightx2v.infer`` does (``set_config`` + ``init_runner``), with
  ``"feature_caching": "Tea"`` selected through `teacache.lightx2v.install`;
* recording runs the TeaCache infer class at threshold 0, which computes every call, and observes each call's
  ``temb``/``modin`` signals and block-stack output (`teacache.lightx2v.TeaCacheCall`);
* sweeping runs it with a real preset and threshold.

LightX2V is an optional dependency: this module imports it only when a backend object is made.

The tiny model runs on LightX2V too (`write_tiny_model` + `TinyLightX2V`), on the CPU through the
``teacal-lightx2v-cpu`` platform plugin. Two things in LightX2V stand in the way of its runner there, so
`TinyLightX2V` drives LightX2V's real transformer model and scheduler directly, in the runner's own step loop
(``QwenImageRunner.run``), with the tiny model's prompt embeddings instead of the Qwen2.5-VL text encoder:

* ``QwenImageScheduler.__init__`` builds ``QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56])`` (hard-coded, for
  head dim 128); the tiny model has ``axes_dims_rope=(8, 4, 4)``. We set ``scheduler.pos_embed`` to LightX2V's
  own ``QwenEmbedRope`` with the tiny axes.
* ``create_default_tensors`` (``lightx2v/common/ops/utils.py``) treats weights loaded on a CPU device as host
  copies for offloading and leaves ``.weight`` unset, so on a CPU platform the model must be moved with its own
  ``to_cuda()`` (which moves to ``AI_DEVICE``, here ``cpu``) before it runs.
* The runner's text encoder (``Qwen25_VLForConditionalGeneration_TextEncoder``) needs the Qwen2.5-VL weights,
  which no tiny model ships.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from teacache.preset import Preset

TINY_LIGHTX2V_CONFIG = dict(
    # torch kernels only: runs on any device, the CPU included
    attn_type="torch_sdpa",
    modulate_type="torch",
    rope_type="torch_complex_rope",
    layer_norm_type="torch",
    rms_norm_type="torch",
)


def recording_preset(model: str) -> Preset:
    """A preset under which every call is computed (threshold 0): recording observes, it never skips."""
    return Preset(model=model, signal="temb", coefficients=(1.0, 0.0), ret_steps=0, cutoff_steps=-1, threshold=0.0,
                  calibration={"purpose": "recording: threshold 0 computes every call"})


def _lightx2v():
    import teacache.lightx2v as tl

    tl.install()
    return tl


class _Observed:
    """Collects the `TeaCacheCall`s of one generation, with the step's timestep and sigma."""

    def __init__(self, scheduler, on_call: Callable[[dict[str, Any]], None] | None) -> None:
        self.scheduler = scheduler
        self.on_call = on_call
        self.started = time.perf_counter()

    def __call__(self, call) -> None:
        now = time.perf_counter()
        if self.on_call is not None:
            step = call.step
            self.on_call(
                dict(
                    step=step,
                    branch=call.branch,
                    computed=call.computed,
                    timestep=float(self.scheduler.timesteps[step]),
                    sigma=float(self.scheduler.scheduler.sigmas[step]),
                    signals=call.signals,
                    hidden_states=call.hidden_states,
                    output=call.output,
                    n_target=call.n_target,
                    seconds=now - self.started,
                )
            )
        self.started = time.perf_counter()


class LightX2VQwenImage:
    """Qwen-Image(-Edit) through LightX2V's runner (needs the real weights: text encoder, transformer, VAE)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        lightx2v_config: str | os.PathLike,
        *,
        task: str = "i2i",
        preset: Preset | str | os.PathLike | None = None,
        threshold: float | None = None,
        model_name: str | None = None,
    ) -> None:
        _lightx2v()
        from lightx2v.infer import init_runner
        from lightx2v.utils.set_config import set_config

        args = argparse.Namespace(model_cls="qwen_image", task=task, model_path=str(model_path), config_json=str(lightx2v_config), support_tasks=[])
        config = set_config(args)
        name = model_name or config.get("teacache_model") or ("qwen-image-edit" if task == "i2i" else "qwen-image")
        with config.temporarily_unlocked():
            config["feature_caching"] = "Tea"
            config["teacache_model"] = model_name or config.get("teacache_model")
            config["teacache_preset"] = preset if preset is not None else recording_preset(name)
            config["teacache_thresh"] = threshold if preset is not None else 0.0
        self.task = task
        self.runner = init_runner(config)
        self.transformer_infer = self.runner.model.transformer_infer

    @property
    def stats(self):
        return self.transformer_infer.stats

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        image: Image.Image | None,
        seed: int,
        steps: int = 40,
        cfg: float = 4.0,
        size: tuple[int, int] = (1024, 1024),
        negative_prompt: str = " ",
        on_call: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Image.Image, dict[str, float]]:
        """One generation; `on_call` sees every transformer call (step, branch, signals, outputs, seconds)."""
        from lightx2v.utils.input_info import init_empty_input_info, update_input_info_from_dict

        width, height = size
        self.runner.set_config({"infer_steps": steps, "enable_cfg": cfg > 1, "sample_guide_scale": cfg})
        scheduler = self.runner.model.scheduler
        scheduler.sample_guide_scale = cfg  # read once at construction
        observer = _Observed(scheduler, on_call)
        self.transformer_infer.observers.append(observer)
        with tempfile.TemporaryDirectory() as tmp:
            data = dict(seed=seed, prompt=prompt, negative_prompt=negative_prompt, target_shape=[height, width], return_result_tensor=False,
                        save_result_path=str(Path(tmp) / "out.png"))
            if image is not None:
                data["image_path"] = str(Path(tmp) / "input.png")
                image.convert("RGB").save(data["image_path"])
            input_info = init_empty_input_info(self.task)
            update_input_info_from_dict(input_info, data)
            started = time.perf_counter()
            try:
                self.runner.run_pipeline(input_info)
            finally:
                self.transformer_infer.observers.remove(observer)
            seconds = time.perf_counter() - started
            result = Image.open(data["save_result_path"]).convert("RGB")
            result.load()
        return result, {"seconds": seconds}


# -- the tiny model on LightX2V ------------------------------------------------------------------------------------
def write_tiny_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny transformer's weights and configs in the layout LightX2V loads (``transformer/``, ``scheduler/``)."""
    from safetensors.torch import save_file

    from calib.backends.loop import QWEN_SCHEDULER_CONFIG
    from calib.backends.tiny import TRANSFORMER_CONFIG, build_tiny

    root = Path(directory)
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    transformer, _ = build_tiny(seed)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, root / "transformer" / "diffusion_pytorch_model.safetensors")
    config = dict(TRANSFORMER_CONFIG, axes_dims_rope=list(TRANSFORMER_CONFIG["axes_dims_rope"]), _class_name="QwenImageTransformer2DModel")
    (root / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(QWEN_SCHEDULER_CONFIG, _class_name="FlowMatchEulerDiscreteScheduler"), indent=2))
    return root


class TinyLightX2V:
    """The tiny Qwen-Image-Edit on LightX2V's real transformer model and scheduler (see the module notes)."""

    def __init__(self, model_dir: str | os.PathLike, **config_overrides: Any) -> None:
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
        self.model.to_cuda()  # LightX2V's name for "to AI_DEVICE"; see the module notes
        self.scheduler = QwenImageScheduler(config)
        self.scheduler.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(transformer_config["axes_dims_rope"]), scale_rope=True)
        self.model.set_scheduler(self.scheduler)
        self.transformer_infer = self.model.transformer_infer

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
    def denoise(self, inputs: dict[str, Any], input_info, steps: int | None = None, before_step: Callable[[int], None] | None = None) -> torch.Tensor:
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
        latents = self.scheduler.latents
        self.scheduler.clear()
        return latents

    @torch.no_grad()
    def warmup(self, inputs: dict[str, Any], input_info) -> None:
        """What ``QwenImageRunner._run_warmup`` does with the model: prepare, one step, then clear."""
        self.scheduler.prepare(input_info)
        self.scheduler.step_pre(step_index=0)
        self.model.infer(inputs)
        self.scheduler.step_post()
        self.scheduler.clear()
        self.model.pre_infer.clear_rope_cache()
