"""Train the scenes model (`scenes-qwen-image-edit`) on the open-ended edits of `calib.tiny.scenes`.

    python -m calib.training.scenes train --out W.safetensors --docs DIR   # VAE, then transformer; DIR/loss.*, vae.png
    python -m calib.training.scenes samples --docs DIR                      # DIR/samples.png: each edit at several seeds
    python -m calib.training.scenes prompts --out P.jsonl --seed S --n N [--exclude-seed C]  # a prompt set and its PNGs

`make train-scenes` runs `train` then `samples` into calib/tiny/weights/ and docs/scenes/. How both embedded models
train is `calib.training.common`. Every edit of the pool starts from its own random scene (`draw` edits from the
blank canvas); the VAE weighs shape pixels 4x.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from calib.tiny import scenes as S
from calib.tiny.model import SCENES
from calib.training.common import Pool, TrainConfig, build_pool, to_pixels, train_model

# 4 blocks at 128 wide, 64 + 64 tokens: about 1 s per optimiser step of 64 on one thread.
DEFAULTS = TrainConfig(vae_steps=2000, vae_scenes=3000, scenes=24000, edits_per_scene=1, steps=3800, batch=64, lr=1e-3,
                       text_dropout=0.1, changed_weight=1.0)
POOL_SEED = 3  # the pool's edits; the prompt sets draw from scenes.CALIBRATION_SEED and scenes.HELD_OUT_PROMPT_SEED
SAMPLE_SEED = 20_261_207


def render_pool(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random scenes (of every kind a pool holds) as pixels and loss weights: 1, and 4 on shapes."""
    scenes = [S.random_scene(rng) for _ in range(n)]
    images = [S.render(s) for s in scenes]
    shape_pixels = [np.abs(im.astype(float) - S.background_image(s)).sum(-1) > 30 for s, im in zip(scenes, images, strict=True)]
    weights = 1 + 3 * torch.from_numpy(np.stack(shape_pixels)).float()[:, None, None]
    return to_pixels(images), weights


def make_pool(cfg: TrainConfig, vae) -> tuple[Pool, list[float], list[float]]:
    edits = list(S.sample_edits(cfg.seed * 1000 + POOL_SEED, cfg.scenes))
    return build_pool(SCENES, vae, [S.render(e.source) for e in edits], [S.render(e.target) for e in edits], list(range(len(edits))),
                      [e.prompt for e in edits], [e.kind for e in edits])


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="weights file to write (a .json with configs and provenance goes beside it)")] = SCENES.weights,
    docs: Annotated[Path, typer.Option(help="folder for loss.csv, loss.png and vae.png")] = Path("docs/scenes"),
    seed: Annotated[int, typer.Option(help="seed for the dataset, the initial weights and the noise")] = 0,
    steps: Annotated[int, typer.Option(help="transformer optimiser steps")] = DEFAULTS.steps,
    vae_steps: Annotated[int, typer.Option(help="VAE optimiser steps")] = DEFAULTS.vae_steps,
    edits: Annotated[int, typer.Option(help="edits in the training pool, each on its own scene")] = DEFAULTS.scenes,
    threads: Annotated[int, typer.Option(help="torch CPU threads (pinned, so the weights do not depend on the machine)")] = DEFAULTS.threads,
) -> None:
    """Train the VAE, then the transformer; write the weights and the loss curve."""
    from dataclasses import replace

    cfg = replace(DEFAULTS, seed=seed, steps=steps, vae_steps=vae_steps, scenes=edits, threads=threads)
    rng = np.random.default_rng(SAMPLE_SEED)
    preview = [S.render(S.random_scene(rng)) for _ in range(8)]
    command = f"python -m calib.training.scenes train --seed {seed} --steps {steps} --vae-steps {vae_steps} --edits {edits} --threads {threads}"
    train_model(SCENES, cfg, render_pool, preview, lambda vae: make_pool(cfg, vae), out, docs, command)


@app.command()
def samples(
    docs: Annotated[Path, typer.Option(help="folder for samples.png")] = Path("docs/scenes"),
    weights: Annotated[Path, typer.Option(help="weights file to sample")] = SCENES.weights,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 50,
    cfg: Annotated[float, typer.Option(help="true-CFG scale")] = 4.0,
    seeds: Annotated[int, typer.Option(help="noise seeds per edit: how open each outcome is")] = 4,
) -> None:
    """One edit of each kind at several noise seeds: reference, then the outputs (samples.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calib.backends.tiny import TinyQwenImageEdit

    torch.set_num_threads(1)
    model = TinyQwenImageEdit(weights=weights, model=SCENES)
    edits = list(S.sample_edits(SAMPLE_SEED, len(S.PROMPT_CYCLE) + 3, balanced=True))
    fig, axes = plt.subplots(len(edits), seeds + 1, figsize=(1.4 * (seeds + 1), 1.5 * len(edits)))
    for row, edit in zip(axes, edits, strict=True):
        row[0].imshow(S.render(edit.source))
        row[0].set_title(edit.prompt, fontsize=6, loc="left")
        for seed, ax in enumerate(row[1:]):
            ax.imshow(np.asarray(model.generate(edit.prompt, S.to_pil(edit.source), seed=seed, steps=steps, cfg=cfg, size=SCENES.size).image))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    docs.mkdir(parents=True, exist_ok=True)
    tmp = docs / "samples.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, docs / "samples.png")
    print(f"wrote {docs / 'samples.png'}")


@app.command()
def prompts(
    out: Annotated[Path, typer.Option(help="prompt set to write (JSONL); the reference PNGs go in a folder named after it")],
    seed: Annotated[int, typer.Option(help="seed of the scenes and edits: a seed names a prompt set exactly")],
    n: Annotated[int, typer.Option(help="number of prompts to draw (repeats are dropped)")] = 24,
    exclude_seed: Annotated[int | None, typer.Option(help="drop the inputs of the calibration set of this seed")] = None,
) -> None:
    """Write a scenes prompt set (balanced over the edit kinds)."""
    rows = S.write_prompt_set(out, n=n, seed=seed, exclude_seed=exclude_seed)
    print(f"wrote {out} ({len(rows)} prompts)")


if __name__ == "__main__":
    app()
