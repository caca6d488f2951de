"""The lightx2v backend: Qwen-Image(-Edit) run by LightX2V's own runner, every transformer call observed.

`teacal record|sweep --backend lightx2v --model-path DIR --lightx2v-config FILE` use `LightX2VQwenImage`:

* it builds LightX2V's `QwenImageRunner` the way ``lightx2v.infer`` does (``set_config``, then ``init_runner``'s two lines), with
  ``"feature_caching": "Tea"`` selected through `teacache.lightx2v.install`, and runs each generation with the
  runner's own ``run_pipeline`` (text encoder, VAE encoder, denoising loop, VAE decoder);
* outside `caching()` and `plain()` the TeaCache infer class runs a recording preset at threshold 0, which computes every call;
  `observing()` turns each call into a trace row with exactly the columns and definitions of the diffusers
  backend (`calib.backends.observe.trace_row`): the signals and block-stack input/output come from
  `teacache.lightx2v.TeaCacheCall`, the prediction from ``QwenImageTransformerModel._infer_cond_uncond``;
* `caching()` switches the same infer object to a preset and threshold (or a fixed schedule) for the sweep;
* `plain()` routes the same infer object to LightX2V's own ``infer`` (`stock_infer_class`: the class
  ``"NoCaching"`` picks, the offload one under ``cpu_offload``), so that sweep's uncached runs pay none of TeaCache's
  per-call bookkeeping (signal rel-L1, residual subtraction): the baseline of its speedups is stock LightX2V's.
  Threshold 0 computes the very same blocks, so a recording's references are a plain run's latents bit for bit.

Timings synchronise LightX2V's device (``AI_DEVICE``).

LightX2V is an optional dependency: this module imports it only when a backend object is made. `check_lightx2v`
checks the flags and the import before anything loads.

On a CPU (the ``teacal-lightx2v-cpu`` platform plugin, ``PLATFORM=cpu``) the whole runner runs:
``tests/test_lightx2v.py`` writes a tiny random model folder with every part it loads (transformer, scheduler,
Qwen-Image VAE, Qwen2.5-VL text encoder, tokenizer, processor) and runs `teacal record|sweep --backend lightx2v` on it.
Two things LightX2V does on a CPU are handled here and in the plugin:

* ``create_default_tensors`` (``lightx2v/common/ops/utils.py``) treats weights loaded on a CPU device as host
  copies for offloading and leaves ``.weight`` unset, so on a CPU platform the model must be moved with its own
  ``to_cuda()`` (which moves to ``AI_DEVICE``, here ``cpu``) before it runs; `LightX2VQwenImage` does it.
* LightX2V calls ``torch.<device>.manual_seed``, ``mem_get_info``, ``empty_cache``...; the plugin gives
  ``torch.cpu`` the CPU's meaning of those it lacks.

``cpu_offload`` runs there too, at ``model`` and ``block`` granularity, recorded, plain and cached, with the same images
as without (LightX2V's block offload manager waits on device streams: the plugin gives ``torch.cpu.Stream`` a
``synchronize``, a no-op, as CPU work is synchronous).

The runner clamps ``target_shape`` to ``min_custom_size..max_custom_size`` of its config (256..1664 by default);
`LightX2VQwenImage.run` refuses a --size it would change, rather than record a reference of another size.

The test fixtures that run the trained tiny model on LightX2V's transformer live in ``tests/lightx2v_tiny.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import os
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from calib.backends import CacheHandle, Generation, recording_preset
from calib.errors import UserError
from calib.models import ModelSpec
from calib.runfiles import read_json
from teacache.policy import TeaCacheCall
from teacache.preset import Preset

INSTALL_HINT = (
    "install LightX2V from its git repository (pip install git+https://github.com/ModelTC/LightX2V, or put a checkout "
    "on PYTHONPATH) with its dependencies (the list in `make test-lightx2v`); without a GPU also "
    "`pip install -e integrations/lightx2v/cpu_platform` and set PLATFORM=cpu"
)
# Config keys under which LightX2V runs differently from the one-process runner this backend drives.
UNSUPPORTED_CONFIG = {
    "parallel": "teacal drives LightX2V in one process; shard prompts with `teacal record --shard` instead",
    "lazy_load": "the runner rebuilds the transformer for every request, which drops teacal's observers",
    "unload_modules": "the runner rebuilds the transformer for every request, which drops teacal's observers",
    "disagg_mode": "disaggregated serving runs the transformer in another process",
}


# -- checks, before anything loads -----------------------------------------------------------------------------------
def check_lightx2v_config(path: str | None) -> Path:
    """`--lightx2v-config`: a LightX2V JSON config (an object) that this backend can run."""
    if path is None:
        raise UserError(
            "--backend lightx2v needs --lightx2v-config FILE, a LightX2V JSON config such as LightX2V's "
            "configs/qwen_image/qwen_image_i2i_2511.json"
        )
    file = Path(path)
    config = read_json(file, f"--lightx2v-config {path}", "a JSON object of LightX2V config keys")
    for key, why in UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise UserError(f"--lightx2v-config {path}: {key!r} is not supported here ({why})")
    return file


def check_lightx2v_model_folder(model_path: str | None) -> Path:
    """`--model-path`: required; the Qwen-Image weights folder LightX2V loads (``transformer/``, ``scheduler/``...)."""
    if model_path is None:
        raise UserError("--backend lightx2v needs --model-path DIR, the local Qwen-Image weights folder LightX2V loads")
    folder = Path(model_path)
    if not folder.is_dir():
        raise UserError(f"--model-path {model_path}: not a folder (expected the Qwen-Image weights: transformer/, scheduler/, text_encoder/, vae/)")
    for part in ("transformer", "scheduler/scheduler_config.json", "text_encoder", "vae"):
        if not (folder / part).exists():
            raise UserError(f"--model-path {model_path}: no {part}; LightX2V loads the weights in their Hugging Face layout")
    return folder


def check_lightx2v_importable() -> None:
    """LightX2V and its device platform import, or one line that says how to get them."""
    try:
        import teacache.lightx2v  # noqa: F401
    except ImportError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--backend lightx2v: LightX2V cannot be imported here ({first}); {INSTALL_HINT}") from None


def check_lightx2v(model_path: str | None, lightx2v_config: str | None) -> None:
    """Everything `--backend lightx2v` needs, cheapest first; each failure is one `UserError` line."""
    check_lightx2v_model_folder(model_path)
    check_lightx2v_config(lightx2v_config)
    check_lightx2v_importable()


def lightx2v_settings(lightx2v_config: str | os.PathLike, dtype: str) -> dict[str, Any]:
    """What a run records about LightX2V: its config (path and content hash) and the dtype it runs in.

    LightX2V takes its dtype from the ``DTYPE`` environment variable (BF16 by default), not from teacal's --dtype.
    """
    if dtype != "auto":
        raise UserError(f"--dtype {dtype}: LightX2V takes its dtype from the DTYPE environment variable (BF16 or FP16); leave --dtype auto")
    path = Path(lightx2v_config).resolve()
    return {
        "lightx2v_config": str(path),
        "lightx2v_config_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "dtype": {"BF16": "bfloat16", "FP16": "float16"}.get(os.environ.get("DTYPE", "BF16"), os.environ.get("DTYPE", "BF16")),
    }


def check_same_lightx2v_config(settings: dict[str, Any], run: str | os.PathLike) -> None:
    """Sweep reusing the recorded --lightx2v-config: the file must still be the one the references were made with."""
    path = Path(settings["lightx2v_config"])
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != settings["lightx2v_config_sha256"]:
        raise UserError(f"{path}: changed since it was recorded in {run}; record again, or pass --lightx2v-config to sweep with another config")


# -- recording and caching on LightX2V's Qwen-Image model --------------------------------------------------------------
def recording_config(model: str) -> dict[str, Any]:
    """LightX2V config keys that select TeaCache with the recording preset, for the model named `model` (a config's
    own inline TeaCache coefficients, as `teacal export` writes them, give way to it: recording computes every call)."""
    return dict(feature_caching="Tea", teacache_model=model, teacache_preset=recording_preset(model), teacache_thresh=0.0, coefficients=None)


def _lightx2v():
    import teacache.lightx2v as tl

    tl.install()
    return tl


def _device_module():
    from lightx2v_platform.base.global_var import AI_DEVICE

    return getattr(torch, AI_DEVICE, None)


def _on_cpu() -> bool:
    return _device_module() is torch.cpu


def _now() -> float:
    """perf_counter after LightX2V's device has finished its queued work."""
    synchronize = getattr(_device_module(), "synchronize", None)
    if synchronize is not None:
        synchronize()
    return time.perf_counter()


class _CallCompleter:
    """Completes the TeaCache infer class's `TeaCacheCall` with what only the model sees, then hands it on.

    One call is one ``QwenImageTransformerModel._infer_cond_uncond`` (one CFG branch of one step): within it the infer
    class reports the signals and the residual; the call returns the prediction, and is timed here.
    """

    def __init__(self, observer: Callable[[TeaCacheCall], None]) -> None:
        self.observer = observer
        self._call: TeaCacheCall | None = None

    def on_tea_call(self, call: TeaCacheCall) -> None:
        self._call = call

    def observe_call(self, infer_cond_uncond: Callable, *args, **kwargs) -> torch.Tensor:
        self._call = None
        started = _now()
        prediction = infer_cond_uncond(*args, **kwargs)
        seconds = _now() - started
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError("LightX2V ran a transformer call without TeaCache's infer class; build it with recording_config()")
        n = call.residual.shape[0]
        self.observer(dataclasses.replace(call, prediction=prediction[:, :n], seconds=seconds))
        return prediction


def stock_infer_class(infer) -> type:
    """The LightX2V class `infer` (TeaCache's infer object) stands in for: the first class of its MRO that is LightX2V's
    own and no feature-caching class (a patched LightX2V's are under ``feature_caching``). That is the class
    ``"feature_caching": "NoCaching"`` picks: ``QwenImageTransformerInfer``, or ``QwenImageOffloadTransformerInfer``
    under ``cpu_offload`` (`teacache.lightx2v.tea_infer_class` subclasses the same one)."""
    for cls in type(infer).__mro__:
        module = cls.__module__
        if module.startswith("lightx2v.") and ".feature_caching" not in module:
            return cls
    raise RuntimeError(f"{type(infer).__name__} derives from no LightX2V infer class")


def _no_clear() -> None:
    """TeaCache's ``clear`` under `LightX2VModelBackend.plain`: there is nothing of a plain generation to forget."""


class LightX2VModelBackend:
    """Observing, caching and plain runs, shared by the backends whose denoiser is LightX2V's `QwenImageTransformerModel`
    (``self.model``), built with `recording_config` so that its infer class is TeaCache's."""

    model: Any
    recording: Preset

    @property
    def transformer_infer(self):
        return self.model.transformer_infer

    def _tea_infer(self):
        infer = self.model.transformer_infer
        if not hasattr(infer, "use_preset"):
            raise RuntimeError(f"{type(infer).__name__} is not TeaCache's infer class; build the model with recording_config()")
        return infer

    @property
    def num_blocks(self) -> int:
        return len(self.model.transformer_weights.blocks)

    @contextlib.contextmanager
    def observing(self, observer: Callable[[TeaCacheCall], None]) -> Iterator[None]:
        infer, model = self._tea_infer(), self.model
        completer = _CallCompleter(observer)
        patched = "_infer_cond_uncond" in vars(model)
        original = model._infer_cond_uncond
        model._infer_cond_uncond = functools.partial(completer.observe_call, original)
        infer.observers.append(completer.on_tea_call)
        try:
            yield
        finally:
            infer.observers.remove(completer.on_tea_call)
            if patched:
                model._infer_cond_uncond = original
            else:
                del model._infer_cond_uncond

    @contextlib.contextmanager
    def caching(self, preset: Preset, threshold: float | None, policy=None) -> Iterator[CacheHandle]:
        """TeaCache with `preset` at `threshold` (or `policy`'s decisions) while active; the steps come from the scheduler.

        ``block_forwards`` counts the block-stack passes that really ran (``infer_func``, which runs every block).
        """
        infer = self._tea_infer()
        infer.use_preset(preset, threshold, policy)
        stack_runs = 0
        infer_func = infer.infer_func

        def counted(*args, **kwargs):
            nonlocal stack_runs
            stack_runs += 1
            return infer_func(*args, **kwargs)

        def stats():
            if infer.stats is None:
                raise RuntimeError("TeaCache has not run a generation yet")
            return infer.stats

        infer.infer_func = counted
        try:
            yield CacheHandle(stats, lambda: stack_runs * self.num_blocks)
        finally:
            infer.infer_func = infer_func
            infer.use_preset(self.recording)

    @contextlib.contextmanager
    def plain(self) -> Iterator[None]:
        """While active, the model's infer object runs LightX2V's own ``infer`` (`stock_infer_class`): no signal, no
        decision, no residual, no observer; TeaCache's end-of-request ``clear`` (which the scheduler calls once
        `install` is in place) is a no-op too, as a plain generation leaves TeaCache's state untouched.

        It is the same object, so its ``infer_func`` (``infer_calculating``, or under ``cpu_offload`` at block or phase
        granularity LightX2V's offloading block loop) and its offload manager, with the buffers the model set up for
        it, are the ones that run; under ``model`` granularity the model itself moves the weights, as always.
        Not inside `observing()`: a plain call has nothing to report.
        """
        infer = self._tea_infer()
        if infer.observers:
            raise RuntimeError("plain() inside observing(): a plain generation runs no TeaCache and reports no call")
        stock = stock_infer_class(infer)
        shadowed = {name: vars(infer)[name] for name in ("infer", "clear") if name in vars(infer)}
        infer.infer = types.MethodType(stock.infer, infer)
        infer.clear = _no_clear
        try:
            yield
        finally:
            for name in ("infer", "clear"):
                if name in shadowed:
                    setattr(infer, name, shadowed[name])
                else:
                    delattr(infer, name)


class LightX2VQwenImage(LightX2VModelBackend):
    """Qwen-Image(-Edit) through LightX2V's runner: --model-path holds every part it loads (transformer/, scheduler/,
    vae/, text_encoder/, tokenizer/, and processor/ for an edit model)."""

    def __init__(self, spec: ModelSpec, model_path: str | os.PathLike, lightx2v_config: str | os.PathLike) -> None:
        _lightx2v()
        # Not `lightx2v.infer.init_runner`: importing lightx2v.infer imports the runner of every model LightX2V has, and
        # their extra dependencies (soundfile...). The Qwen runner's module registers it; the two lines are init_runner's.
        from lightx2v.models.runners.qwen_image.qwen_image_runner import QwenImageRunner
        from lightx2v.utils.set_config import set_config

        self.spec = spec
        self.model_name = spec.name
        self.task = "i2i" if spec.edit else "t2i"
        self.recording = recording_preset(spec.name)
        args = argparse.Namespace(model_cls="qwen_image", task=self.task, model_path=str(model_path), config_json=str(lightx2v_config), support_tasks=[])
        config = set_config(args)
        with config.temporarily_unlocked():
            config.update(recording_config(spec.name))
            if "infer_steps" not in config:  # the scheduler reads it once built (a KeyError without); run() sets each run's
                config["infer_steps"] = spec.steps
        try:
            self.runner = QwenImageRunner(config)
            self.runner.init_modules()
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"LightX2V cannot load {spec.name} from {model_path}: {first}") from None
        self.model = self.runner.model
        if _on_cpu() and not config.get("cpu_offload", False):
            # create_default_tensors keeps weights loaded on a CPU device as host copies only (.weight stays None),
            # expecting an offload step to move them; on the CPU platform nothing else does. to_cuda() moves them
            # to AI_DEVICE, here the CPU (see the module notes). With cpu_offload the runner moves them itself.
            self.model.to_cuda()

    @torch.no_grad()
    def run(self, item, seed: int, steps: int, cfg: float, size: tuple[int, int], on_step=None) -> Generation:
        from lightx2v.utils.input_info import init_empty_input_info, update_input_info_from_dict
        from lightx2v.utils.utils import seed_all

        width, height = size
        runner, scheduler = self.runner, self.model.scheduler
        runner.set_config({"infer_steps": steps, "enable_cfg": cfg > 1, "sample_guide_scale": cfg})
        scheduler.sample_guide_scale = cfg  # the scheduler reads it once, at construction
        denoise_seconds: list[float] = []
        final_latents: list[torch.Tensor] = []
        run_dit = runner.run_dit

        def timed_run_dit(*args, **kwargs):
            started = _now()
            out = run_dit(*args, **kwargs)
            denoise_seconds.append(_now() - started)
            final_latents.append(out[0])  # (latents, generator): what the VAE decodes
            return out

        with tempfile.TemporaryDirectory() as tmp:
            data = dict(seed=seed, prompt=item.prompt, negative_prompt=item.negative_prompt or " ", target_shape=[height, width],
                        return_result_tensor=False, save_result_path=str(Path(tmp) / "out.png"))
            if self.spec.edit:
                data["image_path"] = str(Path(tmp) / "input.png")
                item.load_image().convert("RGB").save(data["image_path"])
            input_info = init_empty_input_info(self.task)
            update_input_info_from_dict(input_info, data)
            seed_all(seed)
            runner.run_dit = timed_run_dit
            if on_step is not None:  # LightX2V reports (step + 1) / steps * 100 after each step
                runner.set_progress_callback(lambda done, total: on_step(round(done / total * scheduler.infer_steps) - 1))
            started = _now()
            try:
                runner.run_pipeline(input_info)
            finally:
                runner.run_dit = run_dit
                runner.set_progress_callback(None)
            seconds = _now() - started
            with Image.open(data["save_result_path"]) as result:
                image = result.convert("RGB")
        if image.size != (width, height):
            # QwenImageRunner.get_custom_shape clamps the size to [min_custom_size, max_custom_size] (256 and 1664 by
            # default) and the VAE rounds it down to a multiple of 2 * vae_scale_factor: the reference would not
            # be the size the run records.
            raise UserError(
                f"--size {width}x{height}: LightX2V made a {image.size[0]}x{image.size[1]} image; use a size that is a multiple of "
                f"{2 * runner.config['vae_scale_factor']} within min_custom_size..max_custom_size of the LightX2V config "
                f"({runner.config.get('min_custom_size', 256)}..{runner.config.get('max_custom_size', 1664)})"
            )
        return Generation(image, final_latents[0].float().cpu().numpy(), seconds, denoise_seconds[0])

    def close(self) -> None:
        del self.runner, self.model
        gc.collect()
        empty_cache = getattr(_device_module(), "empty_cache", None)
        if empty_cache is not None:
            empty_cache()
