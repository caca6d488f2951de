"""TeaCache for diffusers' `QwenImageTransformer2DModel`, built on diffusers' hook system.

Three kinds of hook share one `StateManager`, so every `cache_context` ("cond", "uncond") gets its own state:

* the transformer hook finds where the generation is (step and step count), reads `img_shapes` (how many tokens
  are the target image), starts a new generation when the step goes back, and reports each call to observers;
* the head hook on block 0 computes the preset's signal over the target tokens and asks the policy; on a skip
  it returns ``input + residual`` at once (the residual formed by the preset's reuse rule, `teacache.forecast`);
* the block hooks run their block only when the step is computed, and the last one stores the residual.

On a skipped call no block's forward runs. Everything outside the block stack (embeddings, `norm_out`,
`proj_out`, ControlNet residuals) runs as usual, so the output is the stock output whenever every step is computed.

Where the generation is comes from what runs, never from a number given in advance: the `cache_context` fields
``step_index``/``num_inference_steps`` when a denoising loop passes them, else the pipeline's scheduler
(``step_index``, ``begin_index``, ``timesteps``: exact for img2img and inpaint, which start at ``begin_index``).
A step index that does not move forward starts a new generation, so an aborted generation leaks nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
import torch.nn.functional as F

try:
    from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
except ModuleNotFoundError as err:  # the runtime alone (pip install teacal) has no diffusers: say which extra brings it
    if err.name != "diffusers":
        raise
    raise ModuleNotFoundError("teacache.diffusers needs diffusers (>=0.42.1,<0.43): pip install 'teacal[diffusers]'", name="diffusers") from None

from teacache.forecast import ResidualCache
from teacache.policy import TeaCacheCall, TeaCachePolicy, TeaCacheStats
from teacache.preset import SIGNALS, Preset, PresetError, check_threshold

logger = logging.getLogger(__name__)
# (preset source, reason) already warned in this process: a sweep applies a hook per configuration, and each warned
# again (35 times for one sweep)
_WARNED: set[tuple[str, str]] = set()

_TRANSFORMER_HOOK = "teacache_transformer"
_HEAD_HOOK = "teacache_head_block"
_BLOCK_HOOK = "teacache_block"


@dataclass
class TeaCacheConfig:
    """How TeaCache runs on one transformer.

    Args:
        preset: a `Preset`, or the path of a preset JSON written by `teacal fit`.
        threshold: overrides the preset's default threshold; 0 never skips.
    """

    preset: Preset | str | os.PathLike
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.preset, Preset):
            self.preset = Preset.load(self.preset)
        if self.threshold is not None:
            self.threshold = check_threshold(self.threshold)


def target_token_count(img_shapes) -> int:
    """Tokens of the generated image: the first `(frames, h, w)` entry; the rest are reference images."""
    first = img_shapes[0]
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        first = first[0]
    return prod(first)


def target_temb(block: torch.nn.Module, temb: torch.Tensor) -> torch.Tensor:
    """The target tokens' timestep embedding. With `zero_cond_t` the batch holds [t, 0] embeddings."""
    return temb.chunk(2, dim=0)[0] if getattr(block, "zero_cond_t", False) else temb


def compute_signal(kind: str, block: torch.nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor, n_target: int, sigma: float) -> torch.Tensor:
    """The TeaCache signal at block 0, over the target tokens only.

    `temb`: silu of the timestep embedding (what every block's `img_mod` sees first).
    `modin`: block 0's modulated image input, exactly what enters `transformer_blocks[0].attn` for the target.
    `sigma`: the timestep the transformer received (t / 1000), as a one-element CPU tensor: its rel-L1 is |Δσ| / σ.
    """
    if kind == "sigma":
        return torch.tensor([sigma], dtype=torch.float64)
    temb = target_temb(block, temb)
    if kind == "temb":
        return F.silu(temb)
    if kind == "modin":
        mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
        modulated, _ = block._modulate(block.img_norm1(hidden_states[:, :n_target]), mod1)
        return modulated
    raise PresetError(f"unknown signal {kind!r}")


class _BranchState(BaseState):
    """Per cache context (CFG branch): where it is, its block-stack input and its stored residuals."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step: int | None = None
        self.sigma = 0.0
        self.n_target: int | None = None
        self.should_compute = True
        self.stack_input: torch.Tensor | None = None
        self.control_before_tail: torch.Tensor | float = 0.0  # ControlNet residuals the loop adds inside the stack
        self.cache: ResidualCache | None = None
        self.signals: dict[str, torch.Tensor] = {}
        self.residual: torch.Tensor | None = None  # this call's block-stack residual, for observers


class _TeaCacheRuntime:
    """What the hooks of one transformer share beyond per-branch state: the policy, where steps come from, observers."""

    def __init__(self, config: TeaCacheConfig, policy: TeaCachePolicy | None, pipeline: Any | None) -> None:
        self.config = config
        self.policy = policy or TeaCachePolicy(config.preset, config.threshold)
        self.state_manager = StateManager(_BranchState)
        self.pipeline = pipeline
        self.observers: list = []  # called with a TeaCacheCall after every transformer call
        self.block_forwards = 0  # blocks that really ran; a skipped call adds none
        self.fresh = True  # the next call starts a generation (set again when the pipeline resets the hooks)

    def position(self) -> tuple[int, int]:
        """(step index, steps in this generation), from the denoising loop's context or the pipeline's scheduler."""
        context = self.state_manager.context
        if context.step_index is not None and context.num_inference_steps is not None:
            return int(context.step_index), int(context.num_inference_steps)
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            raise ValueError(
                "TeaCache needs to know which step of how many each call is: apply it to the pipeline "
                "(apply_teacache(pipe, preset)), or wrap each call in transformer.cache_context(name, step_index=i, "
                "num_inference_steps=n)"
            )
        begin = scheduler.begin_index or 0
        index = scheduler.step_index if scheduler.step_index is not None else begin
        return index - begin, len(timesteps) - begin

    def begin_call(self, kwargs: dict) -> _BranchState:
        step, num_steps = self.position()
        state = self.state_manager.get_state()
        policy = self.policy
        if self.fresh or not policy.started or policy.stats.num_steps != num_steps or (state.step is not None and step <= state.step):
            self.new_generation(num_steps)
            state = self.state_manager.get_state()
        state.step = step
        img_shapes = kwargs.get("img_shapes")
        if img_shapes is None:
            raise ValueError("TeaCache on QwenImageTransformer2DModel needs `img_shapes` passed by keyword")
        state.n_target = target_token_count(img_shapes)
        timestep = kwargs.get("timestep")
        state.sigma = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep or 0.0)
        if state.cache is None:
            state.cache = ResidualCache(policy.preset.forecast)
        return state

    def new_generation(self, num_steps: int) -> None:
        """Forget every branch's step, signal and residual; the last generation's stats stay readable until now."""
        context = self.state_manager.context  # set: a generation starts inside a call, within its cache_context
        self.state_manager.reset()  # also clears the context, which the caller still needs
        self.state_manager.set_context(context)
        self.policy.start(num_steps)
        self.fresh = False
        for reason in self.policy.stats.outside_domain:
            self.warn_once(reason)

    def warn_once(self, reason: str) -> None:
        key = (self.policy.preset.source, reason)
        if key not in _WARNED:
            _WARNED.add(key)
            logger.warning("TeaCache preset %s: %s; its schedule there is extrapolated", *key)

    def end_call(self, state: _BranchState, output, seconds: float | None) -> None:
        stats = self.policy.stats
        for reason in stats.outside_domain:
            self.warn_once(reason)
        if self.observers:
            prediction = output[0] if isinstance(output, tuple) else output.sample
            call = TeaCacheCall(
                step=state.step, branch=self.state_manager.context.name, sigma=state.sigma, computed=state.should_compute,
                signals=state.signals, residual=state.residual, prediction=prediction[:, : state.n_target], seconds=seconds,
            )
            for observer in self.observers:
                observer(call)
        state.signals, state.residual = {}, None


class TeaCacheTransformerHook(ModelHook):
    _is_stateful = True

    def __init__(self, runtime: _TeaCacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        state = runtime.begin_call(kwargs)
        state.control_before_tail = _control_before_tail(len(module.transformer_blocks), kwargs.get("controlnet_block_samples"))
        started = _synchronized_now(module) if runtime.observers else None
        output = self.fn_ref.original_forward(*args, **kwargs)
        runtime.end_call(state, output, None if started is None else _synchronized_now(module) - started)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # The pipeline resets after each generation; the next call starts a new one (the stats stay readable).
        self.runtime.state_manager.reset()
        self.runtime.fresh = True
        return module


def _synchronized_now(module: torch.nn.Module) -> float:
    """perf_counter once the module's device has finished its queued work (observed calls are timed)."""
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _control_before_tail(num_blocks: int, samples) -> torch.Tensor | float:
    """The ControlNet residuals diffusers' block loop adds after every block but the last (the same indexing).

    They sit inside the measured ``tail output - stack input``; the loop adds them again on a skipped call, so the
    stored residual leaves them out.
    """
    if samples is None or num_blocks < 2:
        return 0.0
    interval = -(-num_blocks // len(samples))  # ceil, as the loop computes it
    return sum(samples[index // interval] for index in range(num_blocks - 1))


class TeaCacheHeadBlockHook(ModelHook):
    def __init__(self, runtime: _TeaCacheRuntime, is_tail: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.is_tail = is_tail

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, *args, temb=None, **kwargs):
        runtime = self.runtime
        state = runtime.state_manager.get_state()
        kinds = SIGNALS if runtime.observers else (runtime.policy.preset.signal,)
        state.signals = {kind: compute_signal(kind, module, hidden_states, temb, state.n_target, state.sigma) for kind in kinds}
        signal = state.signals[runtime.policy.preset.signal]
        computed = runtime.policy.decide(state.step, runtime.state_manager.context.name, signal)
        if not computed and (state.cache.empty or state.cache.last.residual.shape != hidden_states.shape):
            computed = True  # never add a residual of another generation or shape
        state.should_compute = computed
        if not computed:
            residual = state.cache.residual_for(state.step, state.sigma)
            state.residual = residual[:, : state.n_target]
            return encoder_hidden_states, hidden_states + residual
        state.stack_input = hidden_states
        runtime.block_forwards += 1
        output = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, temb=temb, **kwargs)
        if self.is_tail:
            _store(self.runtime, state, output[1])
        return output


class TeaCacheBlockHook(ModelHook):
    def __init__(self, runtime: _TeaCacheRuntime, is_tail: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.is_tail = is_tail

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, *args, **kwargs):
        state = self.runtime.state_manager.get_state()
        if not state.should_compute:
            return encoder_hidden_states, hidden_states
        self.runtime.block_forwards += 1
        output = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.is_tail:
            _store(self.runtime, state, output[1])
        return output


def _store(runtime: _TeaCacheRuntime, state: _BranchState, tail_output: torch.Tensor) -> None:
    residual = tail_output - state.stack_input - state.control_before_tail
    previous = None if state.cache.empty else state.cache.last.residual[:, : state.n_target]
    runtime.policy.observe(state.step, runtime.state_manager.context.name, residual[:, : state.n_target], previous)
    state.cache.store(state.step, state.sigma, residual)
    state.residual = residual[:, : state.n_target]
    state.stack_input = None  # the residual is all a later skip needs


def apply_teacache(
    module: torch.nn.Module,
    preset: Preset | str | os.PathLike,
    threshold: float | None = None,
    policy: TeaCachePolicy | None = None,
    observers=(),
) -> TeaCacheConfig:
    """Make a `QwenImageTransformer2DModel` skip whole block-stack passes by the preset's rule.

    `module` is a Qwen-Image pipeline (its transformer is hooked; its scheduler says which step of how many each call
    is, so img2img strength, changed step counts and aborted generations are followed) or the transformer itself, for
    denoising loops that pass ``step_index`` and ``num_inference_steps`` to ``cache_context``. Each CFG branch runs in
    its own ``cache_context("cond" | "uncond")``, as the stock pipelines do. `policy` replaces the preset's rule with
    another decision maker of the same interface (teacal's sweeps use fixed schedules); `observers` are called with a
    `teacache.policy.TeaCacheCall` after every transformer call (teacal's recorder).
    """
    config = TeaCacheConfig(preset, threshold)
    pipeline = module if hasattr(module, "transformer") and hasattr(module, "scheduler") else None
    transformer = pipeline.transformer if pipeline is not None else module
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"apply_teacache expects a Qwen-Image pipeline or a QwenImageTransformer2DModel, got {type(module).__name__}")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(_TRANSFORMER_HOOK) is not None:
        raise RuntimeError("TeaCache is already applied to this transformer; call remove_teacache first")

    runtime = _TeaCacheRuntime(config, policy, pipeline)
    runtime.observers.extend(observers)
    registry.register_hook(TeaCacheTransformerHook(runtime), _TRANSFORMER_HOOK)
    last = len(blocks) - 1
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(TeaCacheHeadBlockHook(runtime, is_tail=last == 0), _HEAD_HOOK)
    for index in range(1, len(blocks)):
        HookRegistry.check_if_exists_or_initialize(blocks[index]).register_hook(
            TeaCacheBlockHook(runtime, is_tail=index == last), _BLOCK_HOOK
        )
    # Hooks registered by hand: without this, cache_context() would not reach the new block hooks.
    registry.invalidate_child_registries_cache()
    return config


def _transformer(module: torch.nn.Module) -> torch.nn.Module:
    return module.transformer if hasattr(module, "transformer") and hasattr(module, "scheduler") else module


def remove_teacache(module: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(_transformer(module))
    for name in (_TRANSFORMER_HOOK, _HEAD_HOOK, _BLOCK_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def _runtime(module: torch.nn.Module) -> _TeaCacheRuntime:
    hook = HookRegistry.check_if_exists_or_initialize(_transformer(module)).get_hook(_TRANSFORMER_HOOK)
    if hook is None:
        raise RuntimeError("TeaCache is not applied to this transformer")
    return hook.runtime


def teacache_stats(module: torch.nn.Module) -> TeaCacheStats:
    """Per step and branch, computed or skipped, for the last (or current) generation, and any domain flags."""
    stats = _runtime(module).policy.stats
    if stats is None:
        raise RuntimeError("TeaCache has not run a generation yet")
    return stats


def teacache_block_forwards(module: torch.nn.Module) -> int:
    """How many transformer-block forwards really ran since TeaCache was applied."""
    return _runtime(module).block_forwards
