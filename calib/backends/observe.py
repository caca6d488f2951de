"""Observe an uncached transformer, step by step: the candidate signals and the true output changes.

Hooks only read tensors; the forward computation is untouched, so a recorded image is bit-identical to a
plain one. Each `cache_context` branch keeps its own previous values, as TeaCache's policy does.
"""

from __future__ import annotations

import contextlib
import time

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from teacache.diffusers import compute_signal, target_token_count
from teacache.policy import rel_l1
from teacache.preset import SIGNALS

_OBSERVE_TRANSFORMER = "teacal_observe_transformer"
_OBSERVE_HEAD = "teacal_observe_head"
_OBSERVE_TAIL = "teacal_observe_tail"


def trace_row(step: int, branch: str, sigma: float, current: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], seconds: float) -> dict:
    """One trace row of a transformer call, shared by every backend's observer.

    `current` holds this call's `x_<signal>` and `y_<target>` tensors (target tokens only); each column's value is
    `rel_l1` against the same column of the branch's previous call, None on the branch's first call. `previous`
    (the branch's) is updated in place. `sigma` is the timestep the transformer received, t / 1000.
    """
    row = {"step": step, "branch": branch, "timestep": sigma * 1000, "sigma": sigma}
    for column, value in current.items():
        before = previous.get(column)
        row[column] = None if before is None else rel_l1(value, before)
        previous[column] = value.detach()
    row["seconds"] = seconds
    return row


class _Previous(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.values: dict[str, torch.Tensor] = {}  # previous step's signals and targets, by column
        self.current: dict[str, torch.Tensor] = {}
        self.n_target = 0
        self.stack_input: torch.Tensor | None = None


class Observer:
    """Collects one row per transformer call: step, branch, `x_<signal>` and `y_<target>` rel-L1s, seconds."""

    def __init__(self) -> None:
        self.state_manager = StateManager(_Previous)
        self.rows: list[dict] = []

    def begin(self, img_shapes, timestep: torch.Tensor) -> None:
        context = self.state_manager.context
        state = self.state_manager.get_state()
        if context.step_index is not None:
            state.step = context.step_index
        state.n_target = target_token_count(img_shapes)
        state.sigma = float(timestep.flatten()[0])  # Qwen pipelines pass t / 1000, which is sigma for flow matching
        state.current = {}
        state.started = _now()

    def end(self, output: torch.Tensor) -> None:
        context = self.state_manager.context
        state = self.state_manager.get_state()
        state.current["y_output"] = output[:, : state.n_target]
        self.rows.append(trace_row(state.step, context.name, state.sigma, state.current, state.values, _now() - state.started))
        state.step += 1

    def reset(self) -> None:
        self.state_manager.reset()


class _TransformerHook(ModelHook):
    _is_stateful = True

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        self.observer = observer
        self.state_manager = observer.state_manager

    def new_forward(self, module, *args, **kwargs):
        self.observer.begin(kwargs["img_shapes"], kwargs["timestep"])
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.observer.end(output[0] if isinstance(output, tuple) else output.sample)
        return output

    def reset_state(self, module):
        self.observer.reset()
        return module


class _HeadHook(ModelHook):
    def __init__(self, observer: Observer) -> None:
        super().__init__()
        self.observer = observer

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, temb=None, **kwargs):
        state = self.observer.state_manager.get_state()
        for signal in SIGNALS:
            state.current[f"x_{signal}"] = compute_signal(signal, module, hidden_states, temb, state.n_target)
        state.stack_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, temb=temb, **kwargs)


class _TailHook(ModelHook):
    def __init__(self, observer: Observer) -> None:
        super().__init__()
        self.observer = observer

    def post_forward(self, module, output):
        state = self.observer.state_manager.get_state()
        state.current["y_residual"] = (output[1] - state.stack_input)[:, : state.n_target]
        state.stack_input = None
        return output


@contextlib.contextmanager
def observe(transformer: torch.nn.Module):
    """Attach an `Observer` to a `QwenImageTransformer2DModel` for the duration of the block."""
    observer = Observer()
    blocks = transformer.transformer_blocks
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(_TransformerHook(observer), _OBSERVE_TRANSFORMER)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_HeadHook(observer), _OBSERVE_HEAD)
    HookRegistry.check_if_exists_or_initialize(blocks[-1]).register_hook(_TailHook(observer), _OBSERVE_TAIL)
    registry.invalidate_child_registries_cache()
    try:
        yield observer
    finally:
        for name in (_OBSERVE_TRANSFORMER, _OBSERVE_HEAD, _OBSERVE_TAIL):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


def _now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
