"""TeaCache for diffusers' `QwenImageTransformer2DModel`, built on diffusers' hook system.

Three kinds of hook share one `StateManager`, so every `cache_context` ("cond", "uncond") gets its own state:

* the transformer hook reads `img_shapes` (how many tokens are the target image) and counts steps per branch;
* the head hook on block 0 computes the preset's signal over the target tokens and asks the policy; on a skip
  it returns ``input + cached residual`` at once;
* the block hooks run their block only when the step is computed, and the last one stores the residual.

On a skipped call no block's forward runs. Everything outside the block stack (embeddings, `norm_out`,
`proj_out`) runs as usual, so the output is the stock output whenever every step is computed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from teacache.policy import TeaCachePolicy, TeaCacheStats
from teacache.preset import Preset, PresetError, check_threshold

_TRANSFORMER_HOOK = "teacache_transformer"
_HEAD_HOOK = "teacache_head_block"
_BLOCK_HOOK = "teacache_block"


@dataclass
class TeaCacheConfig:
    """How TeaCache runs on one transformer.

    Args:
        preset: a `Preset`, or the path of a preset JSON written by `teacal fit`.
        threshold: overrides the preset's default threshold; 0 never skips.
        num_inference_steps: steps per generation. Needed for the forced last steps unless the pipeline
            passes it through `cache_context(name, num_inference_steps=...)`.
    """

    preset: Preset | str | os.PathLike
    threshold: float | None = None
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.preset, Preset):
            self.preset = Preset.load(self.preset)
        if self.threshold is not None:
            self.threshold = check_threshold(self.threshold)
        if self.num_inference_steps is not None and (not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive integer, got {self.num_inference_steps!r}")


def target_token_count(img_shapes) -> int:
    """Tokens of the generated image: the first `(frames, h, w)` entry; the rest are reference images."""
    first = img_shapes[0]
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        first = first[0]
    return prod(first)


def target_temb(block: torch.nn.Module, temb: torch.Tensor) -> torch.Tensor:
    """The target tokens' timestep embedding. With `zero_cond_t` the batch holds [t, 0] embeddings."""
    return temb.chunk(2, dim=0)[0] if getattr(block, "zero_cond_t", False) else temb


def compute_signal(kind: str, block: torch.nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor, n_target: int) -> torch.Tensor:
    """The TeaCache signal at block 0, over the target tokens only.

    `temb`: silu of the timestep embedding (what every block's `img_mod` sees first).
    `modin`: block 0's modulated image input, exactly what enters `transformer_blocks[0].attn` for the target.
    """
    temb = target_temb(block, temb)
    if kind == "temb":
        return F.silu(temb)
    if kind == "modin":
        mod1 = block.img_mod(temb).chunk(2, dim=-1)[0]
        modulated, _ = block._modulate(block.img_norm1(hidden_states[:, :n_target]), mod1)
        return modulated
    raise PresetError(f"unknown signal {kind!r}")


class _BranchState(BaseState):
    """Per cache context (CFG branch): step counter, block-stack input and the cached residual."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.n_target: int | None = None
        self.should_compute = True
        self.stack_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None


class _TeaCacheRuntime:
    """What the hooks of one transformer share beyond per-branch state: the policy and the step count."""

    def __init__(self, config: TeaCacheConfig, policy: TeaCachePolicy | None = None) -> None:
        self.config = config
        self.policy = policy or TeaCachePolicy(config.preset, config.threshold)
        self.state_manager = StateManager(_BranchState)
        self.num_steps: int | None = None
        self.new_generation = True
        self.block_forwards = 0  # blocks that really ran; a skipped call adds none

    def begin_call(self) -> _BranchState:
        context = self.state_manager.context
        num_steps = context.num_inference_steps or self.config.num_inference_steps
        if num_steps is None:
            raise ValueError(
                "TeaCache needs the number of steps: apply_teacache(..., num_inference_steps=N) "
                "or cache_context(name, num_inference_steps=N)"
            )
        state = self.state_manager.get_state()
        step = context.step_index if context.step_index is not None else state.step
        if step >= num_steps:
            # A hand-written loop started the next generation without a reset: start it cleanly.
            self.reset_generation()
            state = self.state_manager.get_state()
            step = 0
        state.step = step
        if self.new_generation or num_steps != self.num_steps:
            self.num_steps = num_steps
            self.policy.start(num_steps)
            self.new_generation = False
        return state

    def reset_generation(self) -> None:
        context = self.state_manager._context
        self.state_manager.reset()  # also clears the context, which the caller still needs
        self.state_manager.set_context(context)
        self.new_generation = True


class TeaCacheTransformerHook(ModelHook):
    _is_stateful = True

    def __init__(self, runtime: _TeaCacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.runtime.begin_call()
        img_shapes = kwargs.get("img_shapes")
        if img_shapes is None:
            raise ValueError("TeaCache on QwenImageTransformer2DModel needs `img_shapes` passed by keyword")
        state.n_target = target_token_count(img_shapes)
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.step += 1
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # The pipeline resets after each generation; the policy keeps that generation's stats until the next start.
        self.runtime.reset_generation()
        return module


class TeaCacheHeadBlockHook(ModelHook):
    def __init__(self, runtime: _TeaCacheRuntime, is_tail: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.is_tail = is_tail

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, *args, temb=None, **kwargs):
        runtime = self.runtime
        state = runtime.state_manager.get_state()
        signal = compute_signal(runtime.policy.preset.signal, module, hidden_states, temb, state.n_target)
        state.should_compute = runtime.policy.decide(state.step, runtime.state_manager.context.name, signal)
        if not state.should_compute:
            return encoder_hidden_states, hidden_states + state.residual
        state.stack_input = hidden_states
        runtime.block_forwards += 1
        output = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, temb=temb, **kwargs)
        if self.is_tail:
            state.residual = output[1] - hidden_states
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
            state.residual = output[1] - state.stack_input
            state.stack_input = None  # the residual is all a later skip needs
        return output


def apply_teacache(
    transformer: torch.nn.Module,
    preset: Preset | str | os.PathLike,
    threshold: float | None = None,
    num_inference_steps: int | None = None,
    policy: TeaCachePolicy | None = None,
) -> TeaCacheConfig:
    """Make `transformer` (a `QwenImageTransformer2DModel`) skip whole block-stack passes by the preset's rule.

    Works with the stock Qwen-Image pipelines (they name the CFG branches with `cache_context`) and with
    hand-written loops that wrap each call in `transformer.cache_context("cond" | "uncond")`. `policy`
    replaces the preset's rule with another decision maker of the same interface (teacal's sweeps use a
    fixed schedule for the oracle).
    """
    config = TeaCacheConfig(preset, threshold, num_inference_steps)
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f"apply_teacache expects a QwenImageTransformer2DModel, got {type(transformer).__name__}")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(_TRANSFORMER_HOOK) is not None:
        raise RuntimeError("TeaCache is already applied to this transformer; call remove_teacache first")

    runtime = _TeaCacheRuntime(config, policy)
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


def remove_teacache(transformer: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in (_TRANSFORMER_HOOK, _HEAD_HOOK, _BLOCK_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def _runtime(transformer: torch.nn.Module) -> _TeaCacheRuntime:
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(_TRANSFORMER_HOOK)
    if hook is None:
        raise RuntimeError("TeaCache is not applied to this transformer")
    return hook.runtime


def teacache_stats(transformer: torch.nn.Module) -> TeaCacheStats:
    """Per step and branch, computed or skipped, for the last (or current) generation."""
    stats = _runtime(transformer).policy.stats
    if stats is None:
        raise RuntimeError("TeaCache has not run a generation yet")
    return stats


def teacache_block_forwards(transformer: torch.nn.Module) -> int:
    """How many transformer-block forwards really ran since TeaCache was applied."""
    return _runtime(transformer).block_forwards
