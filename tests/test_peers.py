"""Peer caches on the tiny model: diffusers' FirstBlockCache, MagCache, SeaCache and cache-dit's DBCache.

Each runs for real on diffusers' Qwen-Image classes; "never skip" must reproduce the uncached image bit for bit,
and the call and block counts must add up the way each method skips (per call, or after block 0).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from calib import peers
from calib.cli import app
from calib.tiny.model import TRANSFORMER_CONFIG
from tests.conftest import SMALL_PROMPTS, pixels, write_prompts

runner = CliRunner()
STEPS, SIZE, CFG = 6, (64, 64), 4.0
CALLS = STEPS * 2  # cond + uncond per step
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None
needs_cache_dit = pytest.mark.skipif(not HAS_CACHE_DIT, reason="cache-dit is the optional extra teacal[peers] (`make compare` installs it); not installed here")
PEER_PARAMS = [pytest.param(m, marks=needs_cache_dit) if m == "dbcache" else m for m in peers.PEERS]
# Settings that skip on the tiny model, and what a skipped call still runs: FirstBlockCache and DBCache (F1B0)
# always run block 0 to decide; MagCache and SeaCache skip every block.
AGGRESSIVE = {
    "fbcache": ({"threshold": 0.6}, 1),
    "magcache": ({"threshold": 0.24, "max_skip_steps": 3, "retention_ratio": 0.2}, 0),
    "seacache": ({"threshold": 1.0}, 0),
    "dbcache": ({"residual_diff_threshold": 0.6}, 1),
}


@pytest.fixture(scope="module")
def item(tmp_path_factory):
    from calib.prompts import load_prompts

    path = write_prompts(tmp_path_factory.mktemp("peer-prompts") / "p.jsonl", SMALL_PROMPTS[:1])
    return load_prompts(path, need_image=True).items[0]


@pytest.fixture(scope="module")
def uncached(tiny, item):
    return tiny.run(item, 0, STEPS, CFG, SIZE).image


@pytest.fixture(scope="module")
def ratios(tiny, item):
    """MagCache ratios from diffusers' own calibrate=True run."""
    result = peers.calibrate_mag_ratios(tiny, [(item, 0)], STEPS, CFG, SIZE)
    assert result["series"] == 2 and len(result["mag_ratios"]) == STEPS and result["mag_ratios"][0] == 1.0
    return result["mag_ratios"]


@pytest.mark.parametrize("method", PEER_PARAMS)
def test_never_skip_is_the_uncached_image_and_skips_count_up(method, tiny, item, uncached, ratios):
    blocks = tiny.num_blocks
    with peers.applied(tiny.transformer, method, peers.NEVER_SKIP[method], STEPS, CFG, mag_ratios=ratios) as counter:
        image = tiny.run(item, 0, STEPS, CFG, SIZE).image
    assert np.array_equal(pixels(image), pixels(uncached))
    assert counter.row() == dict(computed=CALLS, skipped=0, block_forwards=CALLS * blocks, schedule="x" * STEPS, computed_cond=STEPS, computed_uncond=STEPS)

    params, blocks_on_skip = AGGRESSIVE[method]
    with peers.applied(tiny.transformer, method, params, STEPS, CFG, mag_ratios=ratios) as counter:
        tiny.run(item, 0, STEPS, CFG, SIZE)
    assert counter.skipped > 0 and counter.computed + counter.skipped == CALLS
    assert counter.row()["computed_cond"] + counter.row()["computed_uncond"] == counter.computed  # each branch's calls, as TeaCache's rows
    assert counter.block_forwards == counter.computed * blocks + counter.skipped * blocks_on_skip
    assert counter.schedule()[0] == "x" and len(counter.schedule()) == STEPS
    # Removed after the generation: the next plain run is the uncached image again.
    image = tiny.run(item, 0, STEPS, CFG, SIZE).image
    assert np.array_equal(pixels(image), pixels(uncached))


def test_seacache_on_qwen_needs_the_raw_vision_adapter(tiny, item):
    from diffusers import SeaCacheConfig

    # diffusers alone: no built-in Qwen adapter, so SeaCache silently runs every block ("fail-open").
    counter = peers.CallCounter(tiny.transformer, branches=2)
    tiny.transformer.enable_cache(SeaCacheConfig(threshold=1.0))
    try:
        tiny.run(item, 0, STEPS, CFG, SIZE)
    finally:
        tiny.transformer.disable_cache()
        counter.close()
    assert counter.skipped == 0
    # The adapter's latents are the target image only, unpacked: (C, T, H, W) at latent resolution.
    tokens = torch.randn(1, 16 + 16, 16)  # 4x4 target tokens, then 4x4 reference tokens, 4 channels x 2x2 patch
    (latent,) = peers.qwen_raw_vision(tiny.transformer, (), {"hidden_states": tokens, "img_shapes": [[(1, 4, 4), (1, 4, 4)]]})
    assert latent.shape == (4, 1, 8, 8)
    assert torch.equal(latent[:, 0, :2, :2].reshape(-1), tokens[0, 0])  # token 0 is the top-left 2x2 patch


def test_seacache_without_step_info_is_an_error_not_an_uncached_row(tiny):
    from calib.errors import UserError

    # A loop that calls the transformer outside `cache_context(name, step_index=, sigma=, num_inference_steps=)`
    # (the stock Qwen pipelines pass the name only) would make SeaCache run every block: refuse to measure that.
    config = tiny.transformer.config
    call = dict(hidden_states=torch.randn(1, 16, config.in_channels), encoder_hidden_states=torch.randn(1, 3, config.joint_attention_dim), encoder_hidden_states_mask=torch.ones(1, 3),
                timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], return_dict=False)
    with pytest.raises(UserError, match="SeaCache fell back to running every block.*step_index"):
        with peers.applied(tiny.transformer, "seacache", {"threshold": 1.0}, STEPS, CFG), torch.no_grad(), tiny.transformer.cache_context("cond"):
            tiny.transformer(**call)
    assert not tiny.transformer.is_cache_enabled
    # The diffusers backend runs the stock pipelines, which pass the name only: refused before any model loads.
    with pytest.raises(UserError, match="--method seacache: the diffusers backend runs diffusers' stock Qwen-Image pipeline"):
        peers.check_backend(("teacache", "seacache"), "diffusers")
    peers.check_backend(("teacache", "seacache"), "tiny")
    peers.check_backend(("fbcache", "magcache", "dbcache"), "diffusers")


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    from calib.fit import FitRequest, fit
    from calib.record import RecordRequest, record

    base = tmp_path_factory.mktemp("peer-run")
    prompts = write_prompts(base / "prompts.jsonl", SMALL_PROMPTS[:2])  # fit needs two prompts to cross-validate
    run = base / "run"
    record(RecordRequest(out=run, prompts=Path(prompts), seeds=(0,), steps=(STEPS,), size=SIZE, max_gap=4), echo=lambda *_: None)
    fit(FitRequest(runs=(run,), out=base / "preset.json", degree=2, folds=2), echo=lambda *_: None)
    return run, base / "preset.json"


def _sweep(run, preset, *extra):
    return runner.invoke(app, ["sweep", str(run), "--preset", str(preset), "--metrics", "psnr", "--metrics", "ssim", "--oracle", "none", *extra])


def test_every_method_is_measured_the_same_way_in_one_sweep(peer_run):
    run, preset = peer_run
    methods = [m for m in peers.METHODS if m != "dbcache" or HAS_CACHE_DIT]
    grids = ["fbcache.threshold=0.3", "magcache.threshold=0.1", "magcache.max_skip_steps=3", "seacache.threshold=0.5", "dbcache.residual_diff_threshold=0.3"]
    grids = [a for g in grids if g.split(".")[0] in methods for a in ("--peer-grid", g)]
    result = _sweep(run, preset, "--thresh", "0.3", *[a for m in methods for a in ("--method", m)], *grids)
    assert result.exit_code == 0, result.output
    assert "MagCache: calibrating mag_ratios on 2 generations" in result.output
    table = pd.read_parquet(run / "sweep.parquet")
    assert set(table["method"]) == {"uncached", *methods}
    assert table.groupby("method")["label"].nunique().eq(1).all()
    # Same prompts and seeds for every configuration, and every measurement column filled.
    pairs = {(p, s) for p, s in zip(table["prompt_id"], table["seed"], strict=True)}
    assert all({(p, s) for p, s in zip(g["prompt_id"], g["seed"], strict=True)} == pairs for _, g in table.groupby("config"))
    measured = table[["computed", "skipped", "calls", "block_forwards", "seconds", "speedup", "ideal_speedup", "psnr", "ssim"]]
    assert measured.notna().all().all()
    assert table[table["method"] != "uncached"]["schedule"].str.fullmatch(f"x[x.]{{{STEPS - 1}}}").all()
    assert (table["calls"] == CALLS).all()
    peers_only = table[table["method"].isin(peers.PEERS)]
    assert peers_only["threshold"].notna().all() and peers_only["predicted_computed"].isna().all()
    fb = table[table["method"] == "fbcache"].iloc[0]  # per-block: the ideal speedup counts block 0 on skipped calls
    blocks = TRANSFORMER_CONFIG["num_layers"]
    assert fb["ideal_speedup"] == pytest.approx(fb["calls"] * blocks / (fb["computed"] * blocks + fb["skipped"]))
    calibration = json.loads((run / "magcache.json").read_text())
    assert len(calibration["mag_ratios"]) == STEPS and calibration["series"] == 2 * 2  # two generations, two CFG branches

    # Another MagCache setting later: the ratios come from the run folder and only the new setting runs.
    again = _sweep(run, preset, "--method", "magcache", "--peer-grid", "magcache.threshold=0.1,0.2", "--peer-grid", "magcache.max_skip_steps=3")
    assert again.exit_code == 0, again.output
    assert "MagCache ratios from" in again.output and "calibrating" not in again.output
    assert "2 generations to run, and 2 uncached ones timed beside them; 2 already done" in again.output


def test_bad_method_or_grid_is_one_line(peer_run):
    run, preset = peer_run
    for args, message in [
        (["--method", "fbcach"], "error: Invalid value for '--method': Value error, 'fbcach' is not one of 'teacache', 'fbcache'"),
        (["--method", "magcache", "--peer-grid", "magcache.retention_ratio=1.5"], "error: --peer-grid magcache.retention_ratio=1.5: expected a comma list of numbers between 0 and 1"),
        (["--method", "fbcache", "--peer-grid", "fbcache.threshold=a"], "error: --peer-grid fbcache.threshold=a: expected a comma list of numbers"),
        (["--method", "fbcache", "--peer-grid", "fbcache.thresh=0.1"], "error: --peer-grid 'fbcache.thresh=0.1': expected METHOD.PARAM=V1,V2"),
        (["--method", "fbcache", "--peer-grid", "magcache.threshold=0.1"], "error: --peer-grid 'magcache.threshold=0.1': magcache is not measured; add --method magcache"),
    ]:
        result = _sweep(run, preset, *args)
        assert result.exit_code == 2 and result.output.startswith(message) and result.output.count("\n") == 1, result.output


def test_missing_cache_dit_is_a_clear_message_not_a_traceback(peer_run):
    run, preset = peer_run
    # `sys.modules["cache_dit"] = None` makes every `import cache_dit` raise ImportError, as when the package is
    # not installed; the CLI then runs its real code path.
    code = "import sys; sys.modules['cache_dit'] = None; from calib.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "sweep", str(run), "--preset", str(preset), "--method", "teacache", "--method", "dbcache", "--thresh", "0.3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: --method dbcache needs cache-dit, an optional extra: pip install 'teacal[peers]'")
