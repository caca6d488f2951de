"""Real Qwen-Image(-Edit) weights through the stock diffusers pipelines.

bf16 on CUDA; the device is synchronised around every timing; `close()` frees the model's device memory.
It cannot run on a machine without the weights (about 20B parameters): it fails with one clear line first.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import torch

from calib.backends import Generation, HookedTransformerBackend, synchronize
from calib.errors import UserError, described
from calib.models import ModelSpec


def check_model_folder(model_path: str) -> Path:
    folder = Path(model_path)
    if not folder.is_dir():
        raise UserError(f"--model-path {model_path}: not a folder (expected a diffusers model folder with model_index.json)")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--model-path {model_path}: no model_index.json; download the weights with `huggingface-cli download <hub id> --local-dir {model_path}`")
    return folder


def check_real_dependencies() -> None:
    """The real pipelines load the Qwen2.5-VL text encoder with transformers (and big weights with accelerate)."""
    import importlib.util

    missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the real Qwen-Image pipelines need {' and '.join(missing)}: pip install 'teacal[real]'")


class DiffusersBackend(HookedTransformerBackend):
    def __init__(self, spec: ModelSpec, model_path: str | None, device: str, dtype: torch.dtype, lora_path: str | None = None) -> None:
        import diffusers

        self.spec = spec
        self.model_name = spec.name
        self.device = device
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))  # libraries that allocate on "the current device" follow the rank
        pipeline_class = getattr(diffusers, spec.pipeline)
        source = str(check_model_folder(model_path)) if model_path else spec.hub_id
        try:
            # A local folder never triggers a download; a hub id uses the hub cache (and the network, if any).
            self.pipe = pipeline_class.from_pretrained(source, dtype=dtype, local_files_only=model_path is not None)
        except Exception as err:  # noqa: BLE001 - whatever a broken weights folder raises, it is one line to the user
            raise UserError(f"cannot load {spec.name} weights from {source}: {described(err)}") from None
        if lora_path is not None:  # a distilled model: the base weights with its LoRA, from a local file
            try:
                self.pipe.load_lora_weights(str(lora_path))
            except Exception as err:  # noqa: BLE001 - whatever a wrong LoRA file raises, it is one line to the user
                raise UserError(f"cannot load the LoRA {lora_path} into {spec.name}: {described(err)}") from None
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer

    @property
    def hook_target(self) -> torch.nn.Module:
        return self.pipe  # the stock pipelines name the CFG branches only; the scheduler tells TeaCache the step

    def run(self, item, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> Generation:
        width, height = size
        kwargs = dict(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt or " ",  # Qwen pipelines enable true CFG only with a negative prompt
            true_cfg_scale=cfg,
            num_inference_steps=steps,
            width=width,
            height=height,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="np",  # float pixels before 8-bit rounding; the PNG is made from them as the pipeline would
        )
        if self.spec.edit:
            kwargs["image"] = item.load_image()
        # The denoising loop, as the other backends time it (sweep's speedups compare it): from the first transformer
        # call to the end of the last step, so text encoding and VAE work stay out. The device is synchronised at
        # those two points only, never inside the loop.
        marks: dict[str, float] = {}

        def first_call(module, args, kwargs):
            if "loop" not in marks:
                synchronize(self.device)
                marks["loop"] = time.perf_counter()

        final: dict[str, torch.Tensor] = {}

        def step_end(pipe, i, t, tensors):
            if on_step is not None:
                on_step(i)
            if i == pipe.num_timesteps - 1:
                synchronize(self.device)
                marks["loop_end"] = time.perf_counter()
                final["latents"] = tensors["latents"]  # packed, before the VAE: what probes compare
            return tensors

        kwargs["callback_on_step_end"] = step_end
        handle = self.transformer.register_forward_pre_hook(first_call, with_kwargs=True)
        try:
            synchronize(self.device)
            started = time.perf_counter()
            pixels = self.pipe(**kwargs).images[0].astype(np.float32)
            synchronize(self.device)
            seconds = time.perf_counter() - started
        finally:
            handle.remove()
        loop = marks["loop_end"] - marks["loop"] if "loop_end" in marks else seconds
        image = self.pipe.image_processor.numpy_to_pil(pixels[None])[0]
        return Generation(image, final["latents"].float().cpu().numpy(), seconds, loop, pixels)

    def close(self) -> None:
        del self.pipe, self.transformer
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
