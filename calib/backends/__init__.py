"""How a model is run: each backend generates one image per (prompt, seed) and exposes the transformer
that TeaCache and the recorder hook into."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from calib.backends.observe import Observer, observe
from calib.errors import UserError
from calib.models import ModelSpec
from calib.prompts import PromptItem
from teacache.diffusers import apply_teacache, remove_teacache, teacache_block_forwards, teacache_stats
from teacache.policy import TeaCacheStats


class Backend(Protocol):
    def observing(self) -> contextlib.AbstractContextManager:
        """Record every transformer call while active; yields an object whose `.rows` are trace rows."""

    def caching(self, preset, threshold: float | None, steps: int, policy=None) -> contextlib.AbstractContextManager:
        """TeaCache on while active; yields a `CacheHandle` for the stats of the last generation."""

    def run(self, item: PromptItem, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> tuple[Image.Image, dict[str, float]]:
        """The image, and {"seconds", "denoise_seconds"} measured with the device synchronised."""

    def close(self) -> None:
        """Free the model and its device memory."""


@dataclass(frozen=True)
class CacheHandle:
    stats: Callable[[], TeaCacheStats]
    block_forwards: Callable[[], int]


class HookedTransformerBackend:
    """Shared by the backends whose denoiser is diffusers' `QwenImageTransformer2DModel` (`self.transformer`)."""

    transformer: torch.nn.Module

    @contextlib.contextmanager
    def observing(self) -> Iterator[Observer]:
        with observe(self.transformer) as observer:
            yield observer

    @contextlib.contextmanager
    def caching(self, preset, threshold: float | None, steps: int, policy=None) -> Iterator[CacheHandle]:
        apply_teacache(self.transformer, preset, threshold=threshold, num_inference_steps=steps, policy=policy)
        try:
            yield CacheHandle(lambda: teacache_stats(self.transformer), lambda: teacache_block_forwards(self.transformer))
        finally:
            remove_teacache(self.transformer)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device auto or cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return device


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
        raise UserError(f"model {spec.name} is the embedded tiny model; it runs on its own backend, not {chosen}")
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


def weights_id(spec: ModelSpec, backend: str, model_path: str | None) -> str:
    """Names the weights a run uses, so a run folder never mixes outputs of different weights."""
    if backend == "tiny":
        from calib.tiny.model import weights_fingerprint

        return weights_fingerprint()
    return str(Path(model_path).resolve()) if model_path else str(spec.hub_id)


def load_backend(spec: ModelSpec, backend: str, model_path: str | None, device: str, dtype: torch.dtype, lightx2v_config: str | None = None) -> Backend:
    if backend == "tiny":
        from calib.backends.tiny import TinyQwenImageEdit

        return TinyQwenImageEdit(device=device, dtype=dtype)
    if backend == "lightx2v":
        # LightX2V picks its device (PLATFORM) and dtype (DTYPE, bf16 by default) itself.
        from calib.backends.lightx2v import LightX2VQwenImage

        return LightX2VQwenImage(spec, model_path, lightx2v_config)
    from calib.backends.diffusers import DiffusersBackend

    return DiffusersBackend(spec, model_path, device, dtype)
