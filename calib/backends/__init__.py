"""How a model is run and observed: each backend generates one image per (prompt, seed) and runs TeaCache's runtime.

There is one observation mechanism for every backend: recording runs TeaCache at threshold 0 (every call computed,
bit-identical to an uncached run) with an observer, which receives a `teacache.policy.TeaCacheCall` per transformer
call: the same signal, residual and prediction code that caching uses. `plain()` is the other side: a generation
under it does no TeaCache work at all (sweep times its uncached baseline there).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from calib.errors import UserError
from calib.models import ModelSpec
from calib.prompts import PromptItem
from teacache.diffusers import apply_teacache, remove_teacache, teacache_block_forwards, teacache_stats
from teacache.policy import TeaCacheCall, TeaCacheStats
from teacache.preset import Preset


@dataclass
class Generation:
    """One generated image, its final (packed) latents and its timings, device synchronised."""

    image: Image.Image
    latents: np.ndarray  # float32, what the VAE decodes: probes compare them with the reference's
    seconds: float  # the whole generation
    denoise_seconds: float  # the denoising loop only: what caching shortens, and what sweep's speedups compare
    pixels: np.ndarray | None = None  # float32 [H, W, 3] in [0, 1] before 8-bit rounding (None where the backend has only the file)

    def float_pixels(self) -> np.ndarray:
        """The image before rounding, or the 8-bit image where that is all the backend gives."""
        return self.pixels if self.pixels is not None else np.asarray(self.image.convert("RGB"), dtype=np.float32) / 255


class Backend(Protocol):
    def observing(self, observer: Callable[[TeaCacheCall], None]) -> contextlib.AbstractContextManager:
        """While active, every transformer call runs computed (TeaCache at threshold 0) and is reported to `observer`."""

    def caching(self, preset, threshold: float | None, policy=None) -> contextlib.AbstractContextManager:
        """TeaCache on while active; yields a `CacheHandle` for the stats of the last generation."""

    def plain(self) -> contextlib.AbstractContextManager:
        """While active, a generation runs the model's stock path, with no TeaCache work: the uncached baseline."""

    def run(self, item: PromptItem, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> Generation:
        """One generation of a prompt-set item."""

    def close(self) -> None:
        """Free the model and its device memory."""


@dataclass(frozen=True)
class CacheHandle:
    stats: Callable[[], TeaCacheStats]
    block_forwards: Callable[[], int]


def recording_preset(model: str) -> Preset:
    """A preset under which every call is computed (threshold 0): recording observes, it never skips."""
    return Preset(model=model, signal="temb", coefficients=(1.0, 0.0), ret_steps=0, cutoff_steps=-1, threshold=0.0,
                  calibration={"purpose": "recording: threshold 0 computes every call"})


class HookedTransformerBackend:
    """Shared by the backends whose denoiser is diffusers' `QwenImageTransformer2DModel` (`self.transformer`).

    `hook_target` is what `apply_teacache` gets: the pipeline (whose scheduler tells the steps), or the transformer
    when the backend's own loop passes the step fields to `cache_context`.
    """

    transformer: torch.nn.Module
    model_name: str

    @property
    def hook_target(self) -> torch.nn.Module:
        return self.transformer

    @contextlib.contextmanager
    def observing(self, observer: Callable[[TeaCacheCall], None]) -> Iterator[None]:
        apply_teacache(self.hook_target, recording_preset(self.model_name), threshold=0.0, observers=[observer])
        try:
            yield
        finally:
            remove_teacache(self.hook_target)

    @contextlib.contextmanager
    def caching(self, preset, threshold: float | None, policy=None) -> Iterator[CacheHandle]:
        apply_teacache(self.hook_target, preset, threshold=threshold, policy=policy)
        try:
            yield CacheHandle(lambda: teacache_stats(self.hook_target), lambda: teacache_block_forwards(self.hook_target))
        finally:
            remove_teacache(self.hook_target)

    def plain(self) -> contextlib.AbstractContextManager:
        """Nothing to switch off: outside `observing()` and `caching()` no TeaCache hook is on the transformer."""
        return contextlib.nullcontext()

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def resolve_device(device: str, cuda_available: bool | None = None, cuda_count: int | None = None, local_rank: str | None = None) -> str:
    """`--device` -> a torch device string. auto: ``cuda:LOCAL_RANK`` under torchrun (each rank its own GPU), else
    ``cuda:0`` when CUDA is available, else ``cpu``. The three machine facts are arguments so that tests can state them;
    by default they are read from torch and the environment."""
    import os

    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    local_rank = os.environ.get("LOCAL_RANK") if local_rank is None else local_rank

    def this_ranks_gpu() -> str:  # bare auto/cuda: under torchrun each rank its own GPU, else the first
        index = int(local_rank) if local_rank not in (None, "") else 0
        count = torch.cuda.device_count() if cuda_count is None else cuda_count
        if index >= count:
            raise UserError(f"LOCAL_RANK={index} but this machine has {count} CUDA device(s); launch at most {count} processes per node")
        return f"cuda:{index}"

    if device == "auto":
        return this_ranks_gpu() if cuda_available else "cpu"
    if device == "cpu":
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise UserError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    if not cuda_available:
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device auto or cpu)")
    return device if match.group(1) is not None else this_ranks_gpu()


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return table[dtype]


def check_backend(spec: ModelSpec, backend: str | None, model_path: str | None, lightx2v_config: str | None = None) -> str:
    """Which backend runs `spec`, checked before anything is loaded."""
    chosen = backend or spec.backend
    if chosen not in ("tiny", "diffusers", "lightx2v"):
        raise UserError(f"--backend {chosen!r}: expected diffusers or lightx2v")
    if spec.backend == "tiny" and chosen != "tiny":
        raise UserError(f"model {spec.name} is an embedded model; it runs on its own backend, not {chosen}")
    if chosen == "diffusers" and spec.backend == "tiny":
        chosen = "tiny"
    if chosen != "lightx2v" and lightx2v_config is not None:
        raise UserError(f"--lightx2v-config is for --backend lightx2v; this run uses {chosen}")
    if chosen == "lightx2v":
        from calib.backends.lightx2v import check_lightx2v

        check_lightx2v(model_path, lightx2v_config)
    if chosen == "diffusers":
        from calib.backends.diffusers import check_model_folder, check_real_dependencies

        check_real_dependencies()
        if model_path is not None:
            check_model_folder(model_path)
    return chosen


def weights_id(spec: ModelSpec, backend: str, model_path: str | None, lora_path: str | None = None) -> str:
    """Names the weights a run uses, so a run folder never mixes outputs of different weights."""
    if backend == "tiny":
        from calib.tiny.model import EMBEDDED, weights_fingerprint

        return weights_fingerprint(EMBEDDED[spec.name].weights)
    base = str(Path(model_path).resolve()) if model_path else str(spec.hub_id)
    return base + (f" + LoRA {Path(lora_path).resolve()}" if lora_path else "")


def check_lora(spec: ModelSpec, backend: str, lora_path: str | None) -> None:
    """A distilled model's LoRA: its local file is required on the diffusers backend, and refused for other models."""
    if spec.lora is None:
        if lora_path is not None:
            raise UserError(f"--lora-path: model {spec.name} runs no LoRA (the distilled entries of `teacal models` do)")
        return
    if backend == "lightx2v":
        if lora_path is not None:
            raise UserError("--lora-path: with --backend lightx2v the LoRA is named in the LightX2V config (lora_configs)")
        return
    if lora_path is None:
        raise UserError(f"--lora-path FILE: {spec.name} runs the base weights with the Lightning LoRA {spec.lora}; download it and "
                        "pass its local file (teacal never downloads)")
    if not Path(lora_path).is_file():
        raise UserError(f"--lora-path {lora_path}: no such file")


def load_backend(spec: ModelSpec, backend: str, model_path: str | None, device: str, dtype: torch.dtype, lightx2v_config: str | None = None,
                 lora_path: str | None = None) -> Backend:
    if backend == "tiny":
        from calib.backends.tiny import TinyQwenImageEdit
        from calib.tiny.model import EMBEDDED

        return TinyQwenImageEdit(device=device, dtype=dtype, model=EMBEDDED[spec.name])
    if backend == "lightx2v":
        # LightX2V picks its device (PLATFORM) and dtype (DTYPE, bf16 by default) itself.
        from calib.backends.lightx2v import LightX2VQwenImage

        return LightX2VQwenImage(spec, model_path, lightx2v_config)
    from calib.backends.diffusers import DiffusersBackend

    return DiffusersBackend(spec, model_path, device, dtype, lora_path)


# -- a recorded run, opened again by a stage that generates (probe, sweep) ------------------------------------------
@dataclass
class Recording:
    """What a generating stage needs of a `teacal record` run folder, checked before any model loads."""

    run: Path
    info: dict
    spec: ModelSpec
    backend: str
    prompts: object  # calib.prompts.PromptSet, from the run's own inputs/ copy
    device: str
    dtype: torch.dtype
    model_path: str | None
    lightx2v_config: str | None
    lora_path: str | None = None

    @property
    def settings(self) -> dict:
        return self.info["settings"]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.settings["sizes"][0])

    def load(self) -> Backend:
        return load_backend(self.spec, self.backend, self.model_path, self.device, self.dtype, self.lightx2v_config, self.lora_path)


def open_recording(run: Path, model_path=None, lightx2v_config=None, device: str = "auto", dtype: str = "auto",
                   allow_other_precision: bool = False, what: str = "this stage") -> Recording:
    """A recorded run, ready to generate again like it: the same model, weights, inputs, backend, dtype and device kind.

    A dtype or device kind other than the recording's would score the precision difference as caching error: refused
    unless `allow_other_precision` (sweep's --remake-references, which measures against its own uncached run).
    """
    from calib.models import get_model
    from calib.prompts import load_prompts
    from calib.runfiles import load_run

    run = Path(run)
    info = load_run(run)
    settings = info["settings"]
    spec = get_model(settings["model"])
    lightx2v_config = lightx2v_config or settings.get("lightx2v_config")
    if lightx2v_config is not None and lightx2v_config == settings.get("lightx2v_config"):
        from calib.backends.lightx2v import check_same_lightx2v_config

        check_same_lightx2v_config(settings, run)
    backend = check_backend(spec, settings["backend"], model_path, lightx2v_config)
    lora_path = settings.get("lora")  # a distilled model's LoRA file, as recorded
    recorded_weights = settings.get("weights")
    weights = weights_id(spec, backend, model_path, lora_path)
    if recorded_weights is not None and weights != recorded_weights:
        raise UserError(f"{run}: recorded with weights {recorded_weights}, but {what} would run {weights}; record again (or pass the same --model-path)")
    prompts = load_prompts(run / info["prompt_file"], need_image=spec.edit)
    if prompts.sha256 != settings["inputs_sha256"]:
        raise UserError(f"{run / info['prompt_file']}: the prompt set or its images changed since they were recorded in {run}; record again")
    resolved = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved) if backend != "lightx2v" else None
    dtype_name = str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else settings["dtype"]
    if not allow_other_precision:
        if dtype_name != settings["dtype"]:
            raise UserError(f"--dtype {dtype_name}: {run} was recorded in {settings['dtype']}; its references would differ by the precision alone "
                            f"(pass --dtype {settings['dtype']}{', or --remake-references' if what == 'sweep' else ''})")
        if resolved.split(":")[0] != settings["device"]:
            raise UserError(f"--device {resolved}: {run} was recorded on {settings['device']}; its references would differ by the device alone "
                            f"(use a {settings['device']} device{', or --remake-references' if what == 'sweep' else ''})")
        threads = torch.get_num_threads() if resolved == "cpu" else None
        if settings.get("cpu_threads") is not None and threads != settings["cpu_threads"]:
            raise UserError(f"{run} was recorded with {settings['cpu_threads']} CPU thread(s), this process has {threads}: CPU results depend on "
                            f"the thread count; set OMP_NUM_THREADS={settings['cpu_threads']}{' (or pass --remake-references)' if what == 'sweep' else ''}")
    return Recording(run, info, spec, backend, prompts, resolved, torch_dtype, model_path, lightx2v_config, lora_path)


def reference_mismatch(generation: Generation, reference_latents: np.ndarray) -> str | None:
    """None when an uncached generation reproduces the recorded reference bit for bit; else what differs."""
    if generation.latents.shape != reference_latents.shape:
        return f"latents of shape {generation.latents.shape}, the reference's {reference_latents.shape}"
    if np.array_equal(generation.latents, reference_latents):
        return None
    diff = float(np.abs(generation.latents - reference_latents).max())
    scale = float(np.abs(reference_latents).mean()) or 1.0
    return f"final latents differ by up to {diff:.3g} ({diff / scale:.2%} of their mean magnitude)"
