"""The real-model path of the diffusers backend, run for real: `--model qwen-image-edit-2511 --model-path DIR` loads the
stock diffusers pipeline (Qwen2.5-VL text encoder and processor, transformer, VAE, scheduler) from a local folder.

The folder is `tests.tiny_qwen_folder`: the real classes at toy size with random weights, so everything but the
weights' size and the GPU is the real thing. What these tests cannot show: bf16 on CUDA and the real weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from calib.cli import app
from calib.runfiles import trace_columns
from teacache.preset import Preset
from tests.conftest import write_prompts
from tests.tiny_qwen_folder import write_tiny_qwen_folder

STEPS = 4
SIZE = (64, 48)
EDITS = [
    {"id": "cat-hat", "prompt": "put a hat on the cat", "image": "skimage:chelsea", "negative_prompt": "blurry"},
    {"id": "rocket-night", "prompt": "make it night", "image": "skimage:rocket"},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One local model folder per stock pipeline, by the model name that loads it."""
    base = tmp_path_factory.mktemp("tiny-qwen")
    pipelines = {"qwen-image-edit-2511": "QwenImageEditPlusPipeline", "qwen-image-edit": "QwenImageEditPipeline", "qwen-image": "QwenImagePipeline"}
    return {model: write_tiny_qwen_folder(base / model, pipeline) for model, pipeline in pipelines.items()}


def _cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_tiny_folder_is_small_and_deterministic(folders, tmp_path):
    folder = folders["qwen-image-edit-2511"]
    again = write_tiny_qwen_folder(tmp_path / "again")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert {p.parts[0] for p in files} == {"model_index.json", "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "processor"}
    assert sum((folder / p).stat().st_size for p in files) < 3.5e6
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3
    for path in weights:
        assert (folder / path).read_bytes() == (again / path).read_bytes(), path


def test_record_and_sweep_through_the_stock_edit_plus_pipeline(folders, tmp_path):
    """record: the documented trace and reference PNGs; sweep: threshold 0 is the reference bit for bit, a huge one
    computes only the forced steps and the blocks really do not run on the skipped calls."""
    folder, run = folders["qwen-image-edit-2511"], tmp_path / "run"
    prompts = write_prompts(tmp_path / "p.jsonl", EDITS)
    result = _cli("record", run, "--model", "qwen-image-edit-2511", "--model-path", folder, "--device", "cpu", "--prompts", prompts,
                  "--steps", STEPS, "--size", "x".join(map(str, SIZE)), "--max-gap", 3)
    assert result.exit_code == 0, result.output
    settings = json.loads((run / "run.json").read_text())
    assert settings["settings"]["backend"] == "diffusers"
    trace = pd.read_parquet(run / "trace.parquet")
    assert list(trace.columns) == trace_columns(3)
    assert len(trace) == len(EDITS) * STEPS * 2 and not trace.duplicated(["prompt_id", "seed", "step", "branch"]).any()
    values = ["x_temb", "x_modin", "x_sigma", "y_output", "y_residual"]
    assert trace[trace["step"] == 0][values].isna().all().all()  # each branch starts afresh
    later = trace[trace["step"] > 0][values].to_numpy()
    assert np.isfinite(later).all() and (later > 0).all()
    for _, series in trace.groupby(["prompt_id", "branch"]):
        assert series["timestep"].is_monotonic_decreasing and series["timestep"].iloc[0] == 1000
    for item in EDITS:
        with Image.open(run / "refs" / f"{item['id']}-0-{STEPS}st-{SIZE[0]}x{SIZE[1]}.png") as ref:
            assert ref.size == SIZE and np.asarray(ref).std() > 0

    preset = Preset(model="qwen-image-edit-2511", signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=0.1)
    preset = preset.save(tmp_path / "preset.json")
    out = tmp_path / "sweep"
    result = _cli("sweep", run, "--preset", preset, "--model-path", folder, "--device", "cpu", "--thresh", "0,100", "--metrics", "psnr",
                  "--oracle", "none", "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "sweep.parquet")
    teacache = table[table["method"] == "teacache"]
    zero, high = teacache[teacache["threshold"] == 0], teacache[teacache["threshold"] == 100]
    assert len(zero) == len(high) == len(EDITS)
    assert (zero["computed"] == 2 * STEPS).all() and (zero["skipped"] == 0).all() and np.isinf(zero["psnr"]).all()
    # ret_steps 1 and the last step are forced; everything between is skipped in both branches
    assert (high["computed"] == 2 * 2).all() and (high["skipped"] == 2 * (STEPS - 2)).all()
    assert (high["block_forwards"] == high["computed"] * 2).all()  # 2 blocks, only on computed calls
    assert all(math.isfinite(p) for p in high["psnr"])


@pytest.mark.parametrize("model", ["qwen-image-edit", "qwen-image"])
def test_record_runs_the_other_stock_pipelines(folders, tmp_path, model):
    """QwenImageEditPipeline (2508) and the text-to-image QwenImagePipeline, from their local folders."""
    items = EDITS[:1] if model != "qwen-image" else [{"id": "cat", "prompt": "a cat in a hat"}]
    run = tmp_path / "run"
    result = _cli("record", run, "--model", model, "--model-path", folders[model], "--device", "cpu", "--prompts", write_prompts(tmp_path / "p.jsonl", items),
                  "--steps", 3, "--size", "64x48")
    assert result.exit_code == 0, result.output
    trace = pd.read_parquet(run / "trace.parquet")
    assert len(trace) == 3 * 2 and set(trace["branch"]) == {"cond", "uncond"}
    assert np.isfinite(trace[trace["step"] > 0]["y_output"]).all()
    with Image.open(run / "refs" / f"{items[0]['id']}-0-3st-64x48.png") as ref:
        assert ref.size == (64, 48)


def test_a_folder_without_weights_is_one_line_and_writes_nothing(folders, tmp_path):
    """model_index.json present, a component's weights missing: one clear line, exit 2, no run folder content."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["qwen-image-edit-2511"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    run = tmp_path / "run"
    result = _cli("record", run, "--model", "qwen-image-edit-2511", "--model-path", broken, "--device", "cpu", "--prompts", write_prompts(tmp_path / "p.jsonl", EDITS),
                  "--steps", 3, "--size", "64x48")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot load qwen-image-edit-2511 weights from {broken}: ")
    assert "Traceback" not in result.output
    assert not run.exists()  # nothing that would block the corrected rerun


def test_the_sweep_times_the_denoising_loop(folders):
    """Speedups compare the loop that TeaCache shortens, as on the other backends: text encoding and VAE stay out."""
    from calib.backends.diffusers import DiffusersBackend
    from calib.models import get_model
    from calib.prompts import PromptItem

    backend = DiffusersBackend(get_model("qwen-image-edit-2511"), str(folders["qwen-image-edit-2511"]), "cpu", torch.float32)
    try:
        steps = []
        generation = backend.run(PromptItem("cat-hat", "put a hat on the cat", "skimage:chelsea", "", Path.cwd()), 0, 3, 4.0, SIZE, on_step=steps.append)
    finally:
        backend.close()
    assert generation.image.size == SIZE and steps == [0, 1, 2]
    assert 0 < generation.denoise_seconds < generation.seconds
    assert generation.latents.shape[1] == (SIZE[0] // 16) * (SIZE[1] // 16)  # packed target tokens


def _lora(folder: Path, path: Path) -> Path:
    """A small random LoRA on the tiny transformer's attention (to_q, to_v), in the diffusers/PEFT key layout."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(next((folder / "transformer").glob("*.safetensors"))))
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for key, weight in state.items():
        if key.endswith(("attn.to_q.weight", "attn.to_v.weight")):
            name = key.removesuffix(".weight")
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=generator) * 0.2
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=generator) * 0.2
    save_file(lora, str(path))
    return path


def test_a_distilled_model_runs_its_lora_with_cfg_off_and_later_stages_reuse_it(folders, tmp_path):
    """qwen-image-edit-2511-lightning: the 2511 base weights with a Lightning LoRA from a local file, 8 steps by
    default, CFG off: one branch. The LoRA changes the images; sweep loads it from the recording; a missing one is one line."""
    folder = folders["qwen-image-edit-2511"]
    lora = _lora(folder, tmp_path / "lightning.safetensors")
    prompts = write_prompts(tmp_path / "p.jsonl", EDITS[:1])
    common = ["--model-path", folder, "--device", "cpu", "--prompts", prompts, "--steps", 3, "--size", "64x48"]
    missing = _cli("record", tmp_path / "none", "--model", "qwen-image-edit-2511-lightning", *common)
    assert missing.exit_code == 2 and "--lora-path FILE: qwen-image-edit-2511-lightning runs the base weights with the Lightning LoRA" in missing.output
    assert not (tmp_path / "none").exists()
    run = tmp_path / "lightning"
    result = _cli("record", run, "--model", "qwen-image-edit-2511-lightning", "--lora-path", lora, *common)
    assert result.exit_code == 0, result.output
    settings = json.loads((run / "run.json").read_text())["settings"]
    assert settings["cfg"] == 1.0 and settings["lora"] == str(lora.resolve()) and "LoRA" in settings["weights"]
    assert set(pd.read_parquet(run / "trace.parquet")["branch"]) == {"cond"}
    base = tmp_path / "base"
    assert _cli("record", base, "--model", "qwen-image-edit-2511", "--cfg", 1, *common).exit_code == 0
    name = f"{EDITS[0]['id']}-0-3st-64x48.npy"
    assert not np.array_equal(np.load(run / "refs" / name), np.load(base / "refs" / name))  # the LoRA is in
    preset = Preset(model="qwen-image-edit-2511-lightning", signal="sigma", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=0.1)
    result = _cli("sweep", run, "--preset", preset.save(tmp_path / "preset.json"), "--model-path", folder, "--device", "cpu", "--thresh", "0",
                  "--metrics", "psnr", "--oracle", "none", "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output  # threshold 0 reproduced the recorded reference, LoRA included
    assert (pd.read_parquet(tmp_path / "sweep" / "sweep.parquet")["calls"] == 3).all()
