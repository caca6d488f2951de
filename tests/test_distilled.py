"""The distilled scenes models (scenes-qwen-image-edit-8step, -4step): CFG off, one transformer call a step, and an
image closer to the teacher's guided 50-step image than the teacher's own few-step image without guidance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calib.backends import load_backend
from calib.models import get_model
from calib.prompts import load_prompts
from calib.tiny.model import EMBEDDED
from calib.training.distill import HELD_OUT, fidelity_psnr


def _backend(name: str):
    return load_backend(get_model(name), "tiny", None, "cpu", torch.float32)


@pytest.mark.parametrize("steps", [8, 4])
def test_the_registry_runs_the_student_with_cfg_off_at_its_steps(steps):
    spec = get_model(f"scenes-qwen-image-edit-{steps}step")
    assert (spec.steps, spec.cfg) == (steps, 1.0)
    info = json.loads(EMBEDDED[spec.name].weights.with_suffix(".json").read_text())
    assert info["distillation"]["teacher"] == "scenes-qwen-image-edit" and info["distillation"]["steps"] == steps
    backend = _backend(spec.name)
    calls = []
    handle = backend.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        item = load_prompts(HELD_OUT).items[0]
        backend.run(item, 0, spec.steps, spec.cfg, spec.size)
    finally:
        handle.remove()
    assert len(calls) == steps  # one branch: no uncond call


@pytest.mark.parametrize("steps", [8, 4])
def test_the_student_is_closer_to_the_guided_teacher_than_the_teacher_in_as_few_steps(steps):
    rows = fidelity_psnr(steps, prompts=4)  # per prompt: the student, the teacher in as many steps without CFG, with CFG
    gains = rows[:, 0] - rows[:, 1]
    assert np.mean(gains) > 1.0, gains
