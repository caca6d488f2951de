"""Distil an embedded model to a few-step student with CFG off, as Qwen-Image-Edit-Lightning is distilled.

    python -m calib.training.distill train --steps 8 --out W.safetensors   # scenes-qwen-image-edit -> the 8-step student
    python -m calib.training.distill fidelity --steps 8                    # how close it comes to the teacher's image

The teacher runs true CFG (4) with fine Euler substeps between the student's own sigmas (the Qwen scheduler's at 8 or
4 steps), from the same noise; the student, initialised from the teacher, learns in one conditional call per step
the average velocity that carries the teacher from one of its sigmas to the next. So the student's 8 (or 4) calls
reproduce the teacher's 24-step guided trajectory, as Lightning's 8-step LoRA imitates the base model's 50 steps
with CFG. Each step count has its own student: one model cannot learn two jump sizes from the same sigma.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from calib.backends.loop import qwen_shift, qwen_sigmas, true_cfg
from calib.backends.tiny import TinyQwenImageEdit
from calib.tiny import scenes as S
from calib.tiny.model import EMBEDDED, SCENES, Embedded
from calib.training.common import log_progress, predict_target, save_weights

TEACHER_CFG = 4.0
SUBSTEPS = 24  # the teacher's Euler steps per trajectory, spread evenly over the student's steps
POOL_SEED = 5  # the distillation prompts: a seed apart from the training pool's and both prompt sets'
HELD_OUT = Path(__file__).resolve().parents[2] / "prompts/scenes/heldout.jsonl"
GRID = SCENES.size[1] // (2 * SCENES.vae_scale_factor)  # 8x8 target tokens, and as many reference tokens

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.callback()
def main() -> None:
    """Few-step students of the scenes model."""


def student_of(teacher: Embedded, steps: int) -> Embedded:
    return EMBEDDED[f"{teacher.name}-{steps}step"]


def student_sigmas(steps: int) -> np.ndarray:
    """The student's sigmas, then 0: exactly the ones the Qwen loop uses at `steps` steps for the scenes model's tokens."""
    return np.append(qwen_sigmas(steps, qwen_shift(GRID * GRID)), 0.0)


@torch.no_grad()
def teacher_trajectories(teacher: TinyQwenImageEdit, edits: list[S.Edit], sigmas: np.ndarray, seed: int):
    """Per edit: the teacher's latents at each student sigma [steps+1, N, C], its reference tokens and prompt."""
    substeps = SUBSTEPS // (len(sigmas) - 1)
    width, height = SCENES.size
    generator = torch.Generator().manual_seed(seed)
    out, started = [], time.perf_counter()
    for i, edit in enumerate(edits):
        reference = teacher.encode_image(S.to_pil(edit.source), width, height)
        c = teacher.conditioning(edit.prompt)
        x = torch.randn(reference.shape, generator=generator)
        path = [x]
        for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
            for s, t in zip(np.linspace(a, b, substeps + 1)[:-1], np.linspace(a, b, substeps + 1)[1:], strict=True):
                timestep = torch.full((1,), float(s))
                cond = predict_target(teacher.transformer, x, reference, c.prompt_embeds, c.prompt_mask, timestep, (GRID, GRID))
                uncond = predict_target(teacher.transformer, x, reference, c.negative_embeds, c.negative_mask, timestep, (GRID, GRID))
                x = x + (float(t) - float(s)) * true_cfg(cond, uncond, TEACHER_CFG)
            path.append(x)
        out.append((torch.cat(path), reference[0], c.prompt_embeds[0], c.prompt_mask[0]))
        log_progress("teacher", i, len(edits), started, "trajectories")
    return out


def distil(teacher: TinyQwenImageEdit, trajectories, sigmas: np.ndarray, steps: int, batch: int, lr: float, seed: int, log: list):
    student = teacher.transformer  # initialised from the teacher, whose trajectories are taken by now
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n, length = len(trajectories), max(t[2].shape[0] for t in trajectories)
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(n, (batch,), generator=generator).tolist()
        k = torch.randint(len(sigmas) - 1, (batch,), generator=generator).tolist()
        text = torch.zeros(batch, length, trajectories[0][2].shape[-1])
        mask = torch.zeros(batch, length, dtype=torch.long)
        for row, i in enumerate(idx):
            text[row, : trajectories[i][2].shape[0]], mask[row, : trajectories[i][3].shape[0]] = trajectories[i][2], 1
        x = torch.stack([trajectories[i][0][j] for i, j in zip(idx, k, strict=True)])
        target = torch.stack([(trajectories[i][0][j + 1] - trajectories[i][0][j]) / (sigmas[j + 1] - sigmas[j]) for i, j in zip(idx, k, strict=True)])
        reference = torch.stack([trajectories[i][1] for i in idx])
        timestep = torch.tensor([sigmas[j] for j in k], dtype=torch.float32)
        loss = (predict_target(student, x, reference, text, mask, timestep, (GRID, GRID)) - target.float()).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        log.append({"phase": "distil", "step": step, "loss": loss.item(), "seconds": time.perf_counter() - started})
        log_progress("distil", step, steps, started, f"velocity loss {loss.item():.4f}")
    return student.eval()


@app.command()
def train(
    steps: Annotated[int, typer.Option(help="the student's denoising steps: 8 or 4")] = 8,
    out: Annotated[Path | None, typer.Option(help="weights file (default: the student's shipped one)")] = None,
    prompts: Annotated[int, typer.Option(help="distillation edits (teacher trajectories)")] = 400,
    train_steps: Annotated[int, typer.Option(help="optimiser steps")] = 600,
    batch: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
) -> None:
    """Distil scenes-qwen-image-edit (CFG 4) to a `steps`-step student with CFG off."""
    torch.set_num_threads(1)  # the weights are the same on any machine with the same torch build
    torch.manual_seed(seed)
    student = student_of(SCENES, steps)
    out = out or student.weights
    teacher = TinyQwenImageEdit(model=SCENES)
    edits = list(S.sample_edits(POOL_SEED, prompts))
    sigmas = student_sigmas(steps)
    started = time.perf_counter()
    trajectories = teacher_trajectories(teacher, edits, sigmas, seed)
    teacher_seconds = time.perf_counter() - started
    log: list[dict] = []
    transformer = distil(teacher, trajectories, sigmas, train_steps, batch, lr, seed, log)
    info = json.loads(SCENES.weights.with_suffix(".json").read_text())
    info["distillation"] = dict(teacher=SCENES.name, teacher_cfg=TEACHER_CFG, teacher_euler_steps=SUBSTEPS, steps=steps,
                                prompts=prompts, prompt_seed=POOL_SEED, train_steps=train_steps, batch=batch, lr=lr, seed=seed,
                                final_loss=float(np.mean([r["loss"] for r in log[-20:]])))
    info["seconds"] = dict(teacher=round(teacher_seconds, 1), total=round(time.perf_counter() - started, 1))
    info["command"] = f"python -m calib.training.distill train --steps {steps} --prompts {prompts} --train-steps {train_steps}"
    save_weights(transformer, teacher.vae, {k: v for k, v in info.items() if k not in ("format", "transformer", "vae")}, out)
    print(f"wrote {out} in {(time.perf_counter() - started) / 60:.1f} min; final velocity loss {info['distillation']['final_loss']:.4f}")


def fidelity_psnr(steps: int, prompts: int) -> np.ndarray:
    """[prompt, 3] PSNR against the teacher's 50-step image with CFG 4, on the first `prompts` held-out prompts: the
    student (CFG off), the teacher in as many steps without CFG (as many calls), and with CFG (twice the calls)."""
    from calib.metrics import psnr, to_tensor
    from calib.prompts import load_prompts

    teacher, student = TinyQwenImageEdit(model=SCENES), TinyQwenImageEdit(model=student_of(SCENES, steps))
    rows = []
    for item in load_prompts(HELD_OUT).items[:prompts]:
        target = to_tensor(teacher.run(item, 0, 50, TEACHER_CFG, SCENES.size).image)
        runs = ((student, 1.0), (teacher, 1.0), (teacher, TEACHER_CFG))
        rows.append([psnr(to_tensor(backend.run(item, 0, steps, cfg, SCENES.size).image), target) for backend, cfg in runs])
    return np.array(rows)


@app.command()
def fidelity(
    steps: Annotated[int, typer.Option(help="the student's steps: 8 or 4")] = 8,
    prompts: Annotated[int, typer.Option(help="the first N held-out scenes prompts")] = 10,
) -> None:
    """How close the student comes to its teacher's guided 50-step image, beside the teacher in as few steps."""
    torch.set_num_threads(1)
    rows = fidelity_psnr(steps, prompts)
    mean, worst = rows.mean(axis=0), rows.min(axis=0)
    print(f"PSNR against the teacher's 50-step image with CFG {TEACHER_CFG:g}, {len(rows)} held-out prompts, mean (worst):")
    for label, m, w in zip((f"student, {steps} calls", f"teacher, {steps} steps, CFG off", f"teacher, {steps} steps, CFG {TEACHER_CFG:g}"), mean, worst, strict=True):
        print(f"  {label:<28} {m:5.1f} ({w:.1f}) dB")


if __name__ == "__main__":
    app()
