"""TeaCache for LightX2V's Qwen-Image(-Edit), and how ``"feature_caching": "Tea"`` selects it.

LightX2V (github.com/ModelTC/LightX2V) is an optional dependency: importing this module without it raises an
ImportError that says what is missing. Nothing here copies LightX2V code; the classes below subclass its real
``QwenImageTransformerInfer`` and call its own block, modulation and weight code.

Selecting it
    Stock LightX2V's ``QwenImageTransformerModel._init_infer_class`` only knows ``"NoCaching"``. This module is for
    a LightX2V you cannot patch: call :func:`install` before LightX2V builds the model (``python -m
    teacache.lightx2v <lightx2v.infer arguments>`` does that, then runs LightX2V's own ``lightx2v.infer``), and
    ``"feature_caching": "Tea"`` picks :func:`tea_infer_class`. A LightX2V patched with
    ``integrations/lightx2v/qwen_image_tea.patch`` needs none of this (nor teacal): it has its own TeaCache class,
    which reads the same inline keys and takes the same decisions (``tests/test_lightx2v_rule.py``). teacal's
    record and sweep use this module's class on either (`install` takes precedence), for its observers.

Config keys (in the LightX2V JSON config)
    Either the keys of the upstreamable patch, inline (``teacal export`` writes them from a preset; see
    `teacache.lightx2v_config`): ``coefficients``, ``teacache_thresh`` and the ``teacache_*`` keys. The same config
    then runs on a patched LightX2V (its own infer class) and here, with the same schedule; so does
    ``LightX2VPipeline.enable_cache("Tea", coefficients=..., teacache_thresh=...)``. Or a teacal preset file:

    ``teacache_preset``  path of a teacal preset (``teacal fit`` writes them); a relative path is looked up from
                         the working directory, then beside the config JSON. A `Preset` object also works.
                         (Stock ``LightX2VPipeline`` does not pass the config JSON's path on, so from Python use an
                         absolute path, or `enable_teacache`.)
    ``teacache_thresh``  optional threshold; ``null`` uses the preset's. LightX2V's ``get_default_config()``
                         (``lightx2v/utils/set_config.py``) puts ``teacache_thresh: 0.26`` into *every* config, so a
                         config that omits the key gets 0.26, not the preset's threshold: write ``null`` to get it
                         (stock ``LightX2VPipeline`` drops null values: there, use `enable_teacache`).
    ``teacache_model``   optional model name (``qwen-image-edit-2511``...); the preset must have been made for it.
                         Without it, the preset must at least be a Qwen-Image preset of the right kind (edit
                         preset for ``task: i2i``, text-to-image preset for ``t2i``).

How one call runs (`QwenImageTeaCachingTransformerInfer.infer`)
    * signal, over the target tokens only (the reference tokens of an edit are left out, as in
      ``teacache.diffusers.compute_signal``, so presets transfer between the two backends):
      ``temb``: ``pre_infer_out.temb_img_silu`` of the target (its first row under ``zero_cond_t``);
      ``modin``: block 0's modulated image input, computed with block 0's own ``img_mod``/``img_norm1`` weights
      and LightX2V's ``_modulate`` (under block/phase ``cpu_offload`` a device copy of block 0's ``img_mod`` is
      made once per request; ``lazy_load`` keeps it on disk, so ``modin`` is refused there);
      ``sigma``: the timestep the transformer receives (`timestep_input`), a one-element CPU tensor;
    * branch: ``scheduler.infer_condition`` (True: "cond", False: "uncond"); each branch has its own state;
    * decision: `teacache.policy.TeaCachePolicy`, the one place the rule is written;
    * computed: the block stack runs and ``output - input`` is kept as the branch's residual, on the device, or on
      the CPU when ``cpu_offload`` is set; skipped: ``input + residual``, no block runs.

Request boundaries and logs
    A new generation starts when the scheduler prepares a new request (``scheduler.rope_request_id`` changes), or
    when the step index goes back. ``clear()`` drops residuals and signals; it runs from ``scheduler.clear()``
    (at the end of every request) once `install` or the patch is in place. Each request ends with one loguru line
    (LightX2V's logger): computed and skipped calls per branch; a request outside the preset's calibrated domain
    (step count, signal range) gets one warning, and the flag in ``stats.outside_domain``. LightX2V refuses
    ``--warmup`` with any feature caching (``DefaultRunner.warmup``: "Warmup does not support feature caching").

Parallelism
    ``cfg_parallel``: rank 0 runs only the cond branch and rank 1 only the uncond branch; each rank keeps the state
    of its own branch. In ``shared`` branch mode both ranks see the same image-stream signal and so decide alike.
    ``seq_parallel``: every rank holds a slice of the tokens. ``temb`` and ``sigma`` are the same on every rank, so the decision
    is too. For ``modin`` each rank keeps its slice of the target tokens, and the rel-L1 all-reduces its two sums
    (``sum|a - b|`` and ``sum|b|``) over the sequence-parallel group: every rank gets the rel-L1 of the full tensor
    and takes the same decision, without gathering the signal.
"""

from __future__ import annotations

import copy
import math
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from teacache.forecast import ResidualCache
from teacache.lightx2v_config import config_keys, has_inline_keys, preset_from_keys
from teacache.policy import TeaCacheCall, TeaCachePolicy, TeaCacheStats, rel_l1
from teacache.preset import SIGNALS, Preset, PresetError, check_threshold

INSTALL_HINT = "LightX2V (github.com/ModelTC/LightX2V, installed from its git repository or a checkout on PYTHONPATH) and its dependencies"
PLATFORM_HINT = "Set PLATFORM to an available platform; on a machine without an accelerator install integrations/lightx2v/cpu_platform and set PLATFORM=cpu"


def _import_failure(err: BaseException) -> ImportError:
    """What went wrong while importing LightX2V, in one line: a missing or broken package, or its device platform."""
    if isinstance(err, ImportError):
        return ImportError(f"teacache.lightx2v needs {INSTALL_HINT}; importing it failed: {err}")
    frames = traceback.extract_tb(err.__traceback__)
    where = frames[-1].filename if frames else "?"
    if f"{os.sep}lightx2v_platform{os.sep}" in where:  # init_ai_device / check_ai_device: PLATFORM and its device
        return ImportError(f"LightX2V is importable but could not set up its device ({err}). {PLATFORM_HINT}")
    return ImportError(
        f"teacache.lightx2v: importing LightX2V failed in {where} with {type(err).__name__}: {err} "
        "(a dependency that is installed but broken, e.g. built for another torch)"
    )


try:
    from lightx2v.models.networks.qwen_image.infer.offload.transformer_infer import QwenImageOffloadTransformerInfer
    from lightx2v.models.networks.qwen_image.infer.transformer_infer import QwenImageTransformerInfer
    from lightx2v.models.networks.qwen_image.model import QwenImageTransformerModel
    from lightx2v.models.schedulers.qwen_image.scheduler import QwenImageScheduler
    from loguru import logger  # LightX2V's logger: what its users see
except (ImportError, RuntimeError) as err:  # ModuleNotFoundError included
    raise _import_failure(err) from err

LIGHTX2V_DEFAULT_THRESH = 0.26  # lightx2v/utils/set_config.py: get_default_config()
BRANCHES = {True: "cond", False: "uncond"}


# -- configuration -------------------------------------------------------------------------------------------------
def load_preset(config: Any) -> Preset:
    """The preset a LightX2V config describes: inline keys (``coefficients``...), or the file ``teacache_preset``."""
    value = config.get("teacache_preset")
    if value is not None and has_inline_keys(config):
        raise PresetError("LightX2V config: give either 'coefficients' (inline TeaCache keys) or 'teacache_preset' (a teacal preset file), not both")
    if value is None:
        if has_inline_keys(config):
            return preset_from_keys(config, model=config.get("teacache_model") or "qwen-image", source=str(config.get("config_json") or "LightX2V config"))
        raise PresetError(
            "LightX2V config: 'feature_caching': 'Tea' on qwen_image needs 'coefficients' (the rescale polynomial; "
            "`teacal export` writes them and the other TeaCache keys from a preset) or 'teacache_preset' (a teacal preset file)"
        )
    preset = value if isinstance(value, Preset) else Preset.load(_resolve_path(value, config))
    check_preset_model(preset, config)
    return preset


def _resolve_path(value: str | os.PathLike, config: Any) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    if not config.get("config_json"):
        raise PresetError(
            f"preset {path}: file not found from {Path.cwd()}, and this LightX2V config does not say where its JSON is "
            "(stock LightX2VPipeline drops config_json): use an absolute path, or teacache.lightx2v.enable_teacache()"
        )
    beside = Path(config["config_json"]).parent / path
    return beside if beside.exists() else path


def check_preset_model(preset: Preset, config: Any) -> None:
    """Reject a preset made for another model: exactly ``teacache_model`` when given, else by family and task."""
    expected = config.get("teacache_model")
    if expected:
        preset.require_model(expected)
        return
    if "qwen-image" not in preset.model:
        raise PresetError(
            f"preset {preset.source}: field 'model': this preset was calibrated for {preset.model!r}, not a Qwen-Image "
            "model; LightX2V's qwen_image transformer needs a Qwen-Image(-Edit) preset"
        )
    task, edit = config.get("task"), "edit" in preset.model
    if (task == "i2i" and not edit) or (task == "t2i" and edit):
        kind = "an edit" if edit else "a text-to-image"
        raise PresetError(
            f"preset {preset.source}: field 'model': {preset.model!r} is {kind} model, but this LightX2V config runs "
            f"task {task!r}; use a preset calibrated for the model you run (or name it with 'teacache_model')"
        )


def resolve_threshold(config: Any, preset: Preset) -> float:
    if has_inline_keys(config):
        return preset.threshold  # the inline keys' own teacache_thresh, as the patch reads it
    value = config.get("teacache_thresh")
    if value is None:
        return preset.threshold
    threshold = check_threshold(value)
    if threshold == LIGHTX2V_DEFAULT_THRESH and threshold != preset.threshold:
        logger.warning(
            f"TeaCache: teacache_thresh={threshold} overrides the preset's threshold {preset.threshold}. 0.26 is also the value LightX2V's "
            "get_default_config() gives every config; if you did not set it, write \"teacache_thresh\": null"
        )
    return threshold


def enable_teacache(pipe: Any, preset: Preset | str | os.PathLike, threshold: float | None = None) -> dict[str, Any]:
    """TeaCache on a ``lightx2v.LightX2VPipeline``, before ``create_generator``: the preset's inline config keys.

    They carry numbers only (no preset path to find, no null for the pipeline to drop), so the same settings reach
    the model as through a config JSON; on a patched LightX2V its own class runs them, else `install` lets this
    module's class do it. Returns the keys set.
    """
    install()
    preset = preset if isinstance(preset, Preset) else Preset.load(preset)
    keys = config_keys(preset, threshold)
    pipe.update(keys)
    return keys


def summary_line(stats: TeaCacheStats, threshold: float) -> str:
    """The log line of one request, word for word the patch's: computed/skipped per branch, and the schedule."""
    parts = [f"{branch} {c['computed']} computed / {c['skipped']} skipped [{''.join('x' if on else '.' for on in stats.schedule(branch))}]"
             for branch, c in stats.per_branch().items()]
    return f"TeaCache: {stats.num_steps} steps, {', '.join(parts)} (threshold {threshold:g})"


# -- the infer classes -----------------------------------------------------------------------------------------------
def timestep_input(scheduler) -> float:
    """The timestep the transformer gets at this step: ``QwenImageScheduler.step_pre`` feeds t in its dtype (bf16) / 1000."""
    t = torch.tensor([float(scheduler.timesteps[scheduler.step_index])], dtype=scheduler.dtype) / 1000
    return float(t[0])


class QwenImageTeaCachingTransformerInfer(QwenImageTransformerInfer):
    """LightX2V's Qwen-Image transformer infer with TeaCache: skips the whole block stack when the policy says so."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.preset = load_preset(config)
        self.threshold = resolve_threshold(config, self.preset)
        self.cpu_offload = bool(config.get("cpu_offload", False))
        self.lazy_load = bool(config.get("lazy_load", False))
        self._check_signal(self.preset)
        self.observers: list[Callable[[TeaCacheCall], None]] = []
        self.last_stats: TeaCacheStats | None = None
        self._policy: TeaCachePolicy | None = None  # set by `use_preset`; None: the preset's own rule
        self._reset()
        logger.info(f"TeaCache on qwen_image: preset {self.preset.source} ({self.preset.model}), signal {self.preset.signal}, threshold {self.threshold}")

    def _check_signal(self, preset: Preset) -> None:
        if preset.signal == "modin" and self.lazy_load:
            raise PresetError(
                f"preset {preset.source}: field 'signal': 'modin' needs block 0's img_mod weights at every call, and "
                "lazy_load keeps them on disk; use a preset with signal 'temb', or turn lazy_load off"
            )

    # -- state ---------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        distance = self._seq_parallel_rel_l1 if self.seq_parallel and self.preset.signal == "modin" else rel_l1
        self.policy = self._policy or TeaCachePolicy(self.preset, self.threshold, distance)
        self._caches: dict[str, ResidualCache] = {}
        self._request: tuple[int, Any] | None = None
        self._last_step = -1
        self._warned: set[str] = set()
        self._device_img_mod = None  # block 0's img_mod on the device, for one request (block/phase offload)

    def clear(self) -> None:
        """End of a request: log what TeaCache did, forget residuals and signals. The stats stay readable."""
        if self.policy.started:
            self.last_stats = self.policy.stats
            if self.policy.stats.decisions:
                logger.info(summary_line(self.policy.stats, self.threshold))
        self._reset()

    def use_preset(self, preset: Preset, threshold: float | None = None, policy: TeaCachePolicy | None = None) -> None:
        """Switch to another preset and threshold between requests, without rebuilding the model (teacal's sweep).

        The preset is checked against the model as at construction. `policy` replaces the preset's rule with another
        decision maker of `TeaCachePolicy`'s interface (teacal runs its oracle schedules so); each request restarts it.
        """
        check_preset_model(preset, self.config)
        self._check_signal(preset)
        self.preset = preset
        self.threshold = check_threshold(preset.threshold if threshold is None else threshold)
        self._policy = policy
        self.last_stats = None
        self._reset()

    @property
    def stats(self) -> TeaCacheStats | None:
        """Per step and branch, computed or skipped, for the generation in progress or the last one; with the reasons
        it lies outside the preset's calibrated domain (``stats.outside_domain``)."""
        return self.policy.stats if self.policy.started else self.last_stats

    def set_scheduler(self, scheduler) -> None:
        super().set_scheduler(scheduler)
        # As LightX2V's BaseTransformerInfer.set_scheduler does (Qwen's override does not): scheduler.clear() reaches
        # self.clear() through it once install() or the patch is in place.
        scheduler.transformer_infer = self

    def _begin_call(self) -> None:
        scheduler = self.scheduler
        request = (id(scheduler), getattr(scheduler, "rope_request_id", None))
        step = scheduler.step_index
        if not self.policy.started or request != self._request or step < self._last_step:
            self.clear()
            self._request = request
            self.policy.start(scheduler.infer_steps)
        self._last_step = step

    def _warn_outside_domain(self) -> None:
        for reason in self.policy.stats.outside_domain:
            if reason not in self._warned:
                self._warned.add(reason)
                logger.warning(f"TeaCache preset {self.preset.source}: this request lies outside its calibrated domain ({reason}); the schedule there is extrapolated")

    # -- signals -------------------------------------------------------------------------------------------------
    def n_target(self) -> int:
        """Target tokens of the full sequence: the packed latents being denoised (reference tokens follow them)."""
        return self.scheduler.latents.shape[1]

    def _target_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the target tokens (all of them without sequence parallelism)."""
        n_target = self.n_target()
        if not self.seq_parallel:
            return hidden_states[:n_target]
        start = dist.get_rank(self.seq_p_group) * hidden_states.shape[0]
        return hidden_states[: max(0, min(hidden_states.shape[0], n_target - start))]

    def _target_temb(self, pre_infer_out) -> torch.Tensor:
        temb = pre_infer_out.temb_img_silu
        # zero_cond_t (2511): rows are [target t, reference t=0]; the target's is the first, as in diffusers.
        return temb[:1] if self.zero_cond_t else temb

    def signals(self, block_weights, pre_infer_out, kinds: tuple[str, ...] = SIGNALS) -> dict[str, torch.Tensor]:
        """The candidate TeaCache signals of this call, over the target tokens, as `teacache.diffusers` defines them."""
        temb = self._target_temb(pre_infer_out)
        out: dict[str, torch.Tensor] = {}
        if "sigma" in kinds:
            out["sigma"] = torch.tensor([timestep_input(self.scheduler)], dtype=torch.float64)
        if "temb" in kinds:
            out["temb"] = temb
        if "modin" in kinds:
            phase = block_weights.blocks[0].compute_phases[0]
            mod1 = self._block0_img_mod(phase.img_mod, temb).chunk(2, dim=-1)[0]
            modulated, _ = self._modulate(phase.img_norm1.apply(self._target_rows(pre_infer_out.hidden_states)), mod1)
            out["modin"] = modulated
        return out

    def _block0_img_mod(self, img_mod, temb: torch.Tensor) -> torch.Tensor:
        weight = getattr(img_mod, "weight", None)
        if weight is not None and weight.device == temb.device:
            return img_mod.apply(temb)
        if self.lazy_load or getattr(img_mod, "pin_weight", None) is None:
            raise RuntimeError(
                "TeaCache signal 'modin' needs block 0's img_mod weights, which this LightX2V setup keeps on disk "
                "(lazy_load); use a preset with signal 'temb'"
            )
        # Block/phase cpu_offload keeps block weights in host memory: one device copy of block 0's img_mod per request
        # (not a transfer each way per call), made by LightX2V's own to_cuda on a shallow copy, so that the model's
        # weight object, which the offload manager reads, is left as it is.
        if self._device_img_mod is None:
            self._device_img_mod = copy.copy(img_mod)
            self._device_img_mod.to_cuda()
        return self._device_img_mod.apply(temb)

    def _seq_parallel_rel_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """rel-L1 of the full signal from each rank's slice: all-reduce sum|a-b| and sum|b| (same count on both)."""
        sums = torch.stack([(current.float() - previous.float()).abs().sum(), previous.float().abs().sum()])
        dist.all_reduce(sums, group=self.seq_p_group)
        value = (sums[0] / sums[1]).item()
        return value if math.isfinite(value) else math.inf

    # -- the call ------------------------------------------------------------------------------------------------
    def infer(self, block_weights, pre_infer_out):
        self._begin_call()
        step, branch = self.scheduler.step_index, BRANCHES[bool(self.scheduler.infer_condition)]
        kinds = SIGNALS if self.observers else (self.preset.signal,)
        signals = self.signals(block_weights, pre_infer_out, kinds)
        computed = self.policy.decide(step, branch, signals[self.preset.signal])
        self._warn_outside_domain()
        hidden_states = pre_infer_out.hidden_states
        sigma = timestep_input(self.scheduler)
        cache = self._caches.setdefault(branch, ResidualCache(self.preset.forecast))
        if computed:
            # LightX2V's Qwen blocks update hidden_states out of place, so the input is still the stack's input here.
            output = super().infer(block_weights, pre_infer_out)
            residual = output - hidden_states
            previous = None if cache.empty else self._target_rows(cache.last.residual)
            self.policy.observe(step, branch, self._target_rows(residual), previous)
            cache.store(step, sigma, residual.cpu() if self.cpu_offload else residual)
        else:
            residual = cache.residual_for(step, sigma).to(hidden_states.device)
            output = hidden_states + residual
        if self.observers:
            call = TeaCacheCall(step=step, branch=branch, sigma=sigma, computed=computed, signals=signals,
                                residual=self._target_rows(residual), prediction=None)
            for observer in self.observers:
                observer(call)
        return output


class QwenImageOffloadTeaCachingTransformerInfer(QwenImageTeaCachingTransformerInfer, QwenImageOffloadTransformerInfer):
    """The same under ``cpu_offload``: LightX2V's offloading block loop runs the computed calls."""


def tea_infer_class(config: Any) -> type[QwenImageTeaCachingTransformerInfer]:
    """The infer class ``"feature_caching": "Tea"`` selects, as LightX2V picks its own for NoCaching."""
    return QwenImageOffloadTeaCachingTransformerInfer if config.get("cpu_offload", False) else QwenImageTeaCachingTransformerInfer


# -- selection without patching LightX2V -----------------------------------------------------------------------------
_ORIGINALS: dict[str, Any] = {}


def install() -> None:
    """Make ``"feature_caching": "Tea"`` select TeaCache in LightX2V's Qwen-Image model, for this process.

    Wraps ``QwenImageTransformerModel._init_infer_class`` (which leaves the class unset for anything but
    NoCaching) and ``QwenImageScheduler.clear`` (so the end of every request clears TeaCache state and logs it).
    Idempotent; `uninstall` restores both. On a patched LightX2V this module's class replaces the patch's.
    """
    if _ORIGINALS:
        return
    init_infer_class, clear = QwenImageTransformerModel._init_infer_class, QwenImageScheduler.clear

    def _init_infer_class(self):
        init_infer_class(self)  # the pre/post infer classes (and, on a patched LightX2V, the patch's TeaCache class)
        if self.config["feature_caching"] == "Tea":
            self.transformer_infer_class = tea_infer_class(self.config)

    def _clear(self):
        clear(self)
        if isinstance(getattr(self, "transformer_infer", None), QwenImageTeaCachingTransformerInfer):
            self.transformer_infer.clear()

    _ORIGINALS.update(init_infer_class=init_infer_class, clear=clear)
    QwenImageTransformerModel._init_infer_class = _init_infer_class
    QwenImageScheduler.clear = _clear


def uninstall() -> None:
    if not _ORIGINALS:
        return
    QwenImageTransformerModel._init_infer_class = _ORIGINALS.pop("init_infer_class")
    QwenImageScheduler.clear = _ORIGINALS.pop("clear")


def main() -> None:
    """``python -m teacache.lightx2v ARGS``: LightX2V's own ``lightx2v.infer`` with TeaCache selectable."""
    install()
    from lightx2v.infer import main as lightx2v_main

    lightx2v_main()


if __name__ == "__main__":
    main()
