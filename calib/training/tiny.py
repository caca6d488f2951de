"""Train the tiny Qwen-Image-Edit on the shapes dataset, measure its edit success, write its prompt set.

    python -m calib.training.tiny train --out W.safetensors --docs DIR   # VAE, then transformer; the weights, DIR/loss.*
    python -m calib.training.tiny evaluate --docs DIR                     # 50 held-out edits at 20 steps, CFG 4: DIR/eval.*, samples.png
    python -m calib.training.tiny prompts --out P.jsonl [--seed S]        # a shapes prompt set and its reference PNGs

Each command writes only where it is told (`make train-tiny` tells it calib/tiny/weights/ and docs/tiny/). How
both embedded models train is `calib.training.common`; here are the shapes: the VAE weighs shape pixels 5x, and
every scene of the pool tries a move first (moving is the hardest edit: erase here, redraw there).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from calib.backends.tiny import TinyQwenImageEdit
from calib.tiny import model as tiny
from calib.tiny import shapes as S
from calib.training.common import Pool, TrainConfig, build_pool, to_pixels, train_model

EVAL_SEED = S.HELD_OUT_SEED
EVAL_SCENES = 50


def render_pool(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random scenes as pixels [n, 3, 1, H, W] and loss weights [n, 1, 1, H, W]: 1 on background, 5 on shapes."""
    scenes = [S.sample_scene(rng) for _ in range(n)]
    images = [S.render(s) for s in scenes]
    shape_pixels = [np.abs(im.astype(float) - S.background_image(s)).sum(-1) > 30 for s, im in zip(scenes, images, strict=True)]
    weights = 1 + 4 * torch.from_numpy(np.stack(shape_pixels)).float()[:, None, None]
    return to_pixels(images), weights


def edit_pool(cfg: TrainConfig) -> tuple[list[S.Scene], list[S.Edit]]:
    rng = np.random.default_rng([cfg.seed, 2])
    scenes, edits = [], []
    while len(scenes) < cfg.scenes:
        scene = S.sample_scene(rng)
        made = []
        # every scene tries a move first: moving is the hardest edit (erase here, redraw there), so it gets a third of the pool
        for kind in ["move", *rng.permutation([k for k in S.EDIT_KINDS if k != "move"])]:
            edit = S.sample_edit(rng, scene, str(kind))
            if edit is not None:
                made.append(edit)
            if len(made) == cfg.edits_per_scene:
                break
        scenes.append(scene)
        edits.extend(made)
    return scenes, edits


def make_pool(cfg: TrainConfig, vae) -> tuple[Pool, list[float], list[float]]:
    scenes, edits = edit_pool(cfg)
    scene_index = {id(s): i for i, s in enumerate(scenes)}
    return build_pool(tiny.TINY, vae, [S.render(s) for s in scenes], [S.render(e.target) for e in edits],
                      [scene_index[id(e.source)] for e in edits], [e.prompt for e in edits], [e.kind for e in edits])


app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="weights file to write (a .json with configs and provenance goes beside it)")],
    docs: Annotated[Path, typer.Option(help="folder for loss.csv, loss.png and vae.png")],
    seed: Annotated[int, typer.Option(help="seed for the dataset, the initial weights and the noise")] = 0,
    steps: Annotated[int, typer.Option(help="transformer optimiser steps")] = TrainConfig.steps,
    vae_steps: Annotated[int, typer.Option(help="VAE optimiser steps")] = TrainConfig.vae_steps,
    scenes: Annotated[int, typer.Option(help="scenes in the training pool (each gets up to 3 edits)")] = TrainConfig.scenes,
    threads: Annotated[int, typer.Option(help="torch CPU threads (pinned, so the weights do not depend on the machine)")] = TrainConfig.threads,
) -> None:
    """Train the VAE, then the transformer; write the weights and the loss curve."""
    cfg = TrainConfig(seed=seed, steps=steps, vae_steps=vae_steps, scenes=scenes, threads=threads)
    rng = np.random.default_rng(S.HELD_OUT_SEED)
    preview = [S.render(S.sample_scene(rng)) for _ in range(8)]
    command = f"python -m calib.training.tiny train --seed {seed} --steps {steps} --vae-steps {vae_steps} --scenes {scenes} --threads {threads}"
    train_model(tiny.TINY, cfg, render_pool, preview, lambda vae: make_pool(cfg, vae), out, docs, command)


def evaluate_edits(model, n: int = EVAL_SCENES, seed: int = EVAL_SEED, steps: int = 20, cfg: float = 4.0) -> list[dict]:
    """Run `n` held-out edits through `model` (a TinyQwenImageEdit) and judge each with `shapes.edit_success`."""
    rows = []
    for i, edit in enumerate(S.sample_edits(seed, n, balanced=True)):
        output = model.generate(edit.prompt, S.to_pil(edit.source), seed=i, steps=steps, cfg=cfg, size=(S.SIZE, S.SIZE)).image
        rows.append({"index": i, "kind": edit.kind, "prompt": edit.prompt, **S.edit_success(edit, output), "edit": edit, "output": output})
    return rows


def _sample_grid(rows: list[dict], path: Path, per_kind: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for kind in S.EDIT_KINDS for r in [r for r in rows if r["kind"] == kind][:per_kind]]
    fig, axes = plt.subplots(len(chosen), 4, figsize=(7.2, 1.55 * len(chosen)), gridspec_kw={"width_ratios": [1, 1.6, 1, 1]})
    for row, ax in zip(chosen, axes, strict=True):
        ax[0].imshow(S.render(row["edit"].source))
        ax[1].text(0.5, 0.5, row["prompt"].replace(" in the ", "\nin the "), ha="center", va="center", fontsize=9, wrap=True)
        ax[2].imshow(np.asarray(row["output"]))
        ax[3].imshow(S.render(row["edit"].target))
        ax[2].set_title("ok" if row["success"] else "FAILED", fontsize=8, color="green" if row["success"] else "red", pad=2)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
        ax[1].axis("off")
    for a, title in zip(axes[0], ["reference", "instruction", "output", "expected"], strict=True):
        a.set_title(title if title != "output" else a.get_title(), fontsize=9)
    axes[0][2].set_title("output\n" + axes[0][2].get_title(), fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(table) -> str:
    header = "| kind | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 1)]
    for kind, row in table.iterrows():
        cells = [f"{v:.0%}" if c != "n" else f"{int(v)}" for c, v in row.items()]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@app.command()
def evaluate(
    docs: Annotated[Path, typer.Option(help="folder for eval.csv, eval.md and samples.png")],
    weights: Annotated[Path, typer.Option(help="weights file to evaluate")] = tiny.DEFAULT_WEIGHTS,
    n: Annotated[int, typer.Option(help="held-out edits, balanced over the five kinds")] = EVAL_SCENES,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 20,
    cfg: Annotated[float, typer.Option(help="true-CFG scale")] = 4.0,
) -> None:
    """Edit-success rate on held-out scenes, per edit kind, plus a sample grid."""
    import pandas as pd

    torch.set_num_threads(1)  # one 48x48 edit is a chain of tiny ops: one thread is fastest, and stable under load
    model = TinyQwenImageEdit(weights=weights)
    started = time.perf_counter()
    rows = evaluate_edits(model, n=n, steps=steps, cfg=cfg)
    seconds = time.perf_counter() - started
    docs.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in ("edit", "output")} for r in rows])
    frame.to_csv(docs / "eval.csv", index=False)
    table = frame.groupby("kind", sort=False)[["success", "edit_ok", "kept_ok"]].mean().reindex(S.EDIT_KINDS)
    table.loc["all"] = frame[["success", "edit_ok", "kept_ok"]].mean()
    table["n"] = list(frame.groupby("kind", sort=False).size().reindex(S.EDIT_KINDS)) + [len(frame)]
    text = (
        f"# tiny-qwen-image-edit: edit success on {len(frame)} held-out scenes\n\n"
        f"`python -m calib.training.tiny evaluate --n {n} --steps {steps} --cfg {cfg}` "
        f"({seconds:.0f} s, {seconds / len(frame):.2f} s per edit with decode)\n\n"
        "success = the edit shows (edit_ok) and every other shape survives (kept_ok); see `calib.shapes.edit_success`.\n\n"
        + _markdown(table) + "\n"
    )
    (docs / "eval.md").write_text(text)
    _sample_grid(rows, docs / "samples.png")
    print(text)


@app.command()
def prompts(
    out: Annotated[Path, typer.Option(help="prompt set to write (JSONL); the reference PNGs go in a folder named after it")],
    seed: Annotated[int, typer.Option(help="seed of the scenes and edits: a seed names a prompt set exactly")],
    n: Annotated[int, typer.Option(help="number of prompts")] = 30,
) -> None:
    """Write a shapes prompt set (balanced over the five edit kinds)."""
    path = out
    rows = S.write_prompt_set(path, n=n, seed=seed)
    print(f"wrote {path} ({len(rows)} prompts)")


if __name__ == "__main__":
    app()
