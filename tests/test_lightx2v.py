"""TeaCache on LightX2V's real Qwen-Image code, with the tiny model's weights.

Marked ``lightx2v``: they need a LightX2V checkout (``LIGHTX2V_SRC=/path/to/LightX2V``) or an installed lightx2v, and
its dependencies; the default run (and CI, which has no LightX2V) leaves them out. ``make test-lightx2v
LIGHTX2V_SRC=...`` builds that environment and runs them. Without an accelerator they run on the CPU through the
``teacal-lightx2v-cpu`` platform plugin (``integrations/lightx2v/cpu_platform``, ``PLATFORM=cpu``). Where LightX2V
cannot be imported, each test skips and says why. Nothing here fakes a LightX2V class.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teacache.preset import Preset, PresetError

REPO = Path(__file__).resolve().parent.parent
SIZE = (64, 64)  # 16 x 16 latents: 64 target + 64 reference tokens
STEPS = 8
SKIPPING = 1.5  # with identity coefficients: the tiny model's temb moves 0.3-0.7 rel-L1 per step at 8 steps


def _import_lightx2v():
    src = os.environ.get("LIGHTX2V_SRC")
    if src and src not in sys.path:
        sys.path.insert(0, src)
    if not torch.cuda.is_available():
        os.environ.setdefault("PLATFORM", "cpu")
    try:
        return importlib.import_module("teacache.lightx2v")
    except ImportError as err:
        pytest.skip(f"LightX2V is not usable here ({err}); run `make test-lightx2v LIGHTX2V_SRC=/path/to/LightX2V`")


@pytest.fixture(scope="session")
def tl():
    module = _import_lightx2v()
    module.install()
    return module


@pytest.fixture(scope="session")
def tiny_dir(tl, tmp_path_factory):
    from calib.backends.lightx2v import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-lightx2v"))


def make_preset(tmp_path: Path, model="tiny-qwen-image-edit", signal="temb", threshold=0.0, **changes) -> Path:
    preset = Preset(model=model, signal=signal, coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=threshold, **changes)
    return preset.save(tmp_path / f"{model}-{signal}.json")


@pytest.fixture(scope="session")
def request_inputs():
    """Prompt embeddings and reference latents, as the text and VAE encoders would hand them over."""
    from calib.backends.tiny import embed_text

    g = torch.Generator().manual_seed(7)
    prompt, prompt_mask = embed_text("make the sky purple")
    negative, negative_mask = embed_text("blurry low quality")  # LightX2V squeezes a 1-token text to 1-D
    image_latents = torch.randn(1, (SIZE[0] // 8) * (SIZE[1] // 8), 16, generator=g)
    return dict(prompt=prompt, prompt_mask=prompt_mask, negative=negative, negative_mask=negative_mask, image_latents=image_latents)


def build(tiny_dir, **config):
    from calib.backends.lightx2v import TinyLightX2V

    return TinyLightX2V(tiny_dir, **config)


def run(lx, request_inputs, seed=0, steps=STEPS):
    inputs = lx.inputs(request_inputs["prompt"], request_inputs["negative"], request_inputs["image_latents"])
    info = lx.input_info(seed, SIZE, request_inputs["prompt"].shape[1], request_inputs["negative"].shape[1])
    return lx.denoise(inputs, info, steps=steps), inputs, info


def test_import_without_lightx2v_says_what_is_missing():
    """Runs anywhere: a Python without LightX2V gets a clear ImportError, not a stack of internals."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTX2V_SRC", "PYTHONPATH")}
    code = (
        "import sys, importlib.util\n"
        "if importlib.util.find_spec('lightx2v') is not None: print('HAS-LIGHTX2V'); sys.exit(0)\n"
        "import teacache.lightx2v\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if "HAS-LIGHTX2V" in proc.stdout:
        pytest.skip("lightx2v is installed in this Python; the message for its absence cannot be seen here")
    assert proc.returncode != 0
    assert "ImportError: teacache.lightx2v needs LightX2V" in proc.stderr


@pytest.mark.lightx2v
def test_tea_selects_teacache_infer_class(tl, tiny_dir, tmp_path):
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path)), teacache_thresh=None)
    assert type(lx.transformer_infer) is tl.QwenImageTeaCachingTransformerInfer
    assert lx.scheduler.transformer_infer is lx.transformer_infer
    plain = build(tiny_dir)
    assert type(plain.transformer_infer).__name__ == "QwenImageTransformerInfer"


@pytest.mark.lightx2v
def test_without_install_lightx2v_main_cannot_select_tea(tl, tiny_dir, tmp_path):
    """The gap `install()` and the patch fill: upstream _init_infer_class leaves the class unset for "Tea"."""
    from lightx2v.models.networks.qwen_image.model import QwenImageTransformerModel

    config = build(tiny_dir).config
    config.update({"feature_caching": "Tea", "teacache_preset": str(make_preset(tmp_path))})
    tl.uninstall()
    try:
        with pytest.raises(AttributeError, match="transformer_infer_class"):
            QwenImageTransformerModel(str(tiny_dir / "transformer"), config, torch.device("cpu"))
    finally:
        tl.install()


@pytest.mark.lightx2v
def test_cpu_offload_selects_the_offload_variant(tl, tiny_dir, tmp_path, request_inputs):
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, threshold=SKIPPING)), teacache_thresh=None,
               cpu_offload=True, offload_granularity="model")
    assert type(lx.transformer_infer) is tl.QwenImageOffloadTeaCachingTransformerInfer
    run(lx, request_inputs)
    assert lx.transformer_infer.stats.skipped > 0


@pytest.mark.lightx2v
@pytest.mark.parametrize(
    ("model", "config", "message"),
    [
        ("flux-dev", {}, "not a Qwen-Image model"),
        ("qwen-image", {}, "is a text-to-image model"),
        ("qwen-image-edit-2509", {"teacache_model": "qwen-image-edit-2511"}, "calibrated for 'qwen-image-edit-2509', not 'qwen-image-edit-2511'"),
    ],
)
def test_preset_for_another_model_is_rejected(tl, tiny_dir, tmp_path, model, config, message):
    with pytest.raises(PresetError, match=message):
        build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, model=model)), **config)


@pytest.mark.lightx2v
def test_missing_preset_is_a_clear_error(tl, tiny_dir):
    with pytest.raises(PresetError, match="needs 'teacache_preset'"):
        build(tiny_dir, feature_caching="Tea")


@pytest.mark.lightx2v
def test_threshold_comes_from_config_or_preset(tl, tiny_dir, tmp_path):
    preset = str(make_preset(tmp_path, threshold=0.3))
    assert build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=None).transformer_infer.threshold == 0.3
    assert build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=0.1).transformer_infer.threshold == 0.1


@pytest.mark.lightx2v
@pytest.mark.parametrize("signal", ["temb", "modin"])
def test_threshold_zero_gives_the_uncached_latents_exactly(tl, tiny_dir, tmp_path, request_inputs, signal):
    plain, _, _ = run(build(tiny_dir), request_inputs)
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, signal=signal)), teacache_thresh=0.0)
    cached, _, _ = run(lx, request_inputs)
    assert torch.equal(plain, cached)
    assert lx.transformer_infer.stats.skipped == 0
    assert lx.transformer_infer.stats.computed == 2 * STEPS  # cond + uncond, every step


@pytest.mark.lightx2v
@pytest.mark.parametrize("signal", ["temb", "modin"])
def test_skipped_call_adds_its_own_branch_residual(tl, tiny_dir, tmp_path, request_inputs, signal):
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, signal=signal, threshold=SKIPPING)), teacache_thresh=None)
    calls = []
    lx.transformer_infer.observers.append(calls.append)
    plain, _, _ = run(build(tiny_dir), request_inputs)
    cached, _, _ = run(lx, request_inputs)
    stats = lx.transformer_infer.stats
    assert 0 < stats.skipped < stats.computed + stats.skipped
    assert {c.branch for c in calls} == {"cond", "uncond"}
    residual = {}
    for call in calls:
        if call.computed:
            residual[call.branch] = call.output - call.hidden_states
        else:
            torch.testing.assert_close(call.output, call.hidden_states + residual[call.branch], rtol=0, atol=0)
    # first step and last step are computed for both branches
    for branch in ("cond", "uncond"):
        schedule = stats.schedule(branch)
        assert schedule[0] and schedule[-1]
    assert not torch.equal(plain, cached)
    assert ((cached.float() - plain.float()).abs().mean() / plain.float().abs().mean()).item() < 0.5


@pytest.mark.lightx2v
def test_state_is_cleared_between_requests_and_after_warmup(tl, tiny_dir, tmp_path, request_inputs):
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, threshold=SKIPPING)), teacache_thresh=None)
    first, inputs, info = run(lx, request_inputs)
    first_schedule = lx.transformer_infer.stats.schedule("cond")
    assert lx.transformer_infer._residuals == {}  # scheduler.clear() at the end of the request freed them
    # the runner's warm-up: prepare, one step, clear; then the same request again
    # (its own size, 96x96, and a black reference image, as QwenImageRunner._run_warmup uses)
    warm_inputs = lx.inputs(request_inputs["prompt"], request_inputs["negative"], torch.zeros(1, 12 * 12, 16))
    lx.warmup(warm_inputs, lx.input_info(0, (96, 96), request_inputs["prompt"].shape[1], request_inputs["negative"].shape[1]))
    assert lx.transformer_infer._residuals == {}
    second, _, _ = run(lx, request_inputs)
    assert torch.equal(first, second)
    assert lx.transformer_infer.stats.schedule("cond") == first_schedule


@pytest.mark.lightx2v
def test_a_new_request_without_clear_starts_fresh(tl, tiny_dir, tmp_path, request_inputs):
    """Even when nothing calls scheduler.clear(), scheduler.prepare() of a new request resets TeaCache."""
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, threshold=SKIPPING)), teacache_thresh=None)
    inputs = lx.inputs(request_inputs["prompt"], request_inputs["negative"], request_inputs["image_latents"])
    info = lx.input_info(0, SIZE, request_inputs["prompt"].shape[1], request_inputs["negative"].shape[1])
    results = []
    for _ in range(2):
        lx.scheduler.generator = None
        lx.scheduler.prepare(info)
        for step in range(lx.scheduler.infer_steps):
            lx.scheduler.step_pre(step_index=step)
            lx.model.infer(inputs)
            lx.scheduler.step_post()
        results.append(lx.scheduler.latents.clone())
    assert torch.equal(results[0], results[1])


# -- equivalence with diffusers --------------------------------------------------------------------------------------
def timestep_input(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The timestep both backends feed their transformer: t rounded to bf16, then / 1000.

    LightX2V's QwenImageScheduler.step_pre builds ``torch.tensor([t], dtype=bfloat16) / 1000``; diffusers' Qwen
    pipelines build ``t.to(latents.dtype) / 1000``, the same for bf16 latents. Rounding t (e.g. 743.43 -> 744)
    moves the high-frequency sinusoids of the timestep embedding, so both sides must get the same rounded t.
    """
    return (t.reshape(1).to(torch.bfloat16).to(dtype)) / 1000


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


def _diffusers_calls(calls, latents_at, timesteps, request_inputs, dtype, fp32_timestep=False):
    """Run diffusers' QwenImageTransformer2DModel (same tiny weights) on each LightX2V call's inputs.

    Returns, per call, the signals as `teacache.diffusers.compute_signal` defines them and every block's image output.
    """
    from calib.backends.tiny import build_tiny
    from teacache.diffusers import compute_signal

    transformer, _ = build_tiny(0)
    if dtype != torch.float32:
        transformer.to(dtype)
    h, w = SIZE[1] // 8, SIZE[0] // 8
    current: dict[str, object] = {}
    handles = [b.register_forward_hook(lambda m, a, out: current["blocks"].append(out[1][0])) for b in transformer.transformer_blocks]

    def head_hook(module, args, kwargs):
        current["signals"] = {k: compute_signal(k, module, kwargs["hidden_states"], kwargs["temb"], h * w)[0] for k in ("temb", "modin")}

    handles.append(transformer.transformer_blocks[0].register_forward_pre_hook(head_hook, with_kwargs=True))
    results = []
    for call in calls:
        cond = call.branch == "cond"
        embeds, mask = (request_inputs["prompt"], request_inputs["prompt_mask"]) if cond else (request_inputs["negative"], request_inputs["negative_mask"])
        hidden = torch.cat([latents_at[call.step], request_inputs["image_latents"].to(torch.bfloat16)], dim=1)
        t = timesteps[call.step].reshape(1)
        timestep = t.float() / 1000 if fp32_timestep else timestep_input(t, dtype)
        current["blocks"] = []
        with torch.no_grad():
            transformer(hidden_states=hidden.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                        encoder_hidden_states_mask=mask, img_shapes=[[(1, h, w), (1, h, w)]], return_dict=False)
        results.append(dict(signals=current["signals"], blocks=current["blocks"]))
    for handle in handles:
        handle.remove()
    return results


def _distances(calls, signal_of) -> dict[str, list[float]]:
    """The trace's x: rel-L1 of each branch's signal against its previous step."""
    from teacache.policy import rel_l1

    out: dict[str, list[float]] = {}
    previous: dict[str, torch.Tensor] = {}
    for index, call in enumerate(calls):
        signal = signal_of(index, call).float().flatten()
        if call.branch in previous:
            out.setdefault(call.branch, []).append(rel_l1(signal, previous[call.branch]))
        previous[call.branch] = signal
    return out


@pytest.mark.lightx2v
def test_signals_and_block_outputs_match_diffusers(tl, tiny_dir, tmp_path, request_inputs, record_property):
    """Same weights, same inputs: LightX2V and diffusers agree on the signals, the per-step distances and every block."""
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path)), teacache_thresh=0.0)
    infer = lx.transformer_infer
    blocks_lx: list[torch.Tensor] = []
    infer_block = infer.infer_block

    def record_block(*args, **kwargs):  # observe LightX2V's own per-block outputs
        out = infer_block(*args, **kwargs)
        blocks_lx.append(out[1])
        return out

    infer.infer_block = record_block
    calls, latents_at, timesteps = [], {}, {}
    infer.observers.append(calls.append)
    inputs = lx.inputs(request_inputs["prompt"], request_inputs["negative"], request_inputs["image_latents"])
    info = lx.input_info(0, SIZE, request_inputs["prompt"].shape[1], request_inputs["negative"].shape[1])

    def before_step(step):
        latents_at[step] = lx.scheduler.latents.clone()
        timesteps[step] = lx.scheduler.timesteps[step].clone()

    lx.denoise(inputs, info, steps=STEPS, before_step=before_step)
    n_blocks = lx.config["num_layers"]
    assert len(blocks_lx) == n_blocks * len(calls) == n_blocks * 2 * STEPS

    numbers: dict[str, float] = {}
    lx_distances = {kind: _distances(calls, lambda i, c, k=kind: c.signals[k]) for kind in ("temb", "modin")}
    for name, dtype, fp32_timestep in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, True)):
        df = _diffusers_calls(calls, latents_at, timesteps, request_inputs, dtype, fp32_timestep)
        for kind in ("temb", "modin"):
            numbers[f"{kind}_{name}"] = max(_rel(c.signals[kind].reshape(d["signals"][kind].shape), d["signals"][kind]) for c, d in zip(calls, df, strict=True))
            df_distances = _distances(calls, lambda i, c, k=kind, df=df: df[i]["signals"][k])
            numbers[f"x_{kind}_{name}"] = max(
                abs(a - b) / b for branch in df_distances for a, b in zip(lx_distances[kind][branch], df_distances[branch], strict=True)
            )
        for b in range(n_blocks):
            numbers[f"block{b}_{name}"] = max(_rel(blocks_lx[i * n_blocks + b], d["blocks"][b]) for i, d in enumerate(df))
    for key, value in sorted(numbers.items()):
        record_property(key, value)
    print("LightX2V (bf16) vs diffusers, worst over calls:", json.dumps({k: float(f"{v:.3g}") for k, v in sorted(numbers.items())}))
    # Diffusers in bf16, the dtype Qwen-Image runs in, on the same inputs: the same numbers up to bf16 rounding.
    assert max(v for k, v in numbers.items() if k.endswith("bf16")) < 1e-2
    # Diffusers in fp32 with an unrounded timestep: blocks agree to bf16 precision; the temb signal itself differs
    # (LightX2V rounds t and t/1000 to bf16 before the sinusoidal embedding), but the step-to-step distances that
    # TeaCache accumulates stay close, so a preset fitted on either backend holds on the other.
    assert max(numbers[f"block{b}_fp32"] for b in range(n_blocks)) < 2e-2
    assert numbers["x_modin_fp32"] < 0.1 and numbers["x_temb_fp32"] < 0.25


@pytest.mark.lightx2v
def test_seq_parallel_rel_l1_is_the_full_tensor_rel_l1(tl, tmp_path):
    """The all-reduced distance a sequence-parallel rank uses equals rel-L1 on the whole signal (gloo, 2 processes)."""
    script = tmp_path / "sp.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "from teacache.lightx2v import QwenImageTeaCachingTransformerInfer as T\n"
        "from teacache.policy import rel_l1\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a, b = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)\n"
        "r = dist.get_rank(); rows = [slice(0, 7), slice(7, 10)][r]\n"
        "class Obj: seq_p_group = None\n"
        "d = T._seq_parallel_rel_l1(Obj(), a[rows], b[rows])\n"
        "assert abs(d - rel_l1(a, b)) < 1e-6, (d, rel_l1(a, b))\n"
        "print('rank', r, 'ok', d)\n"
        "dist.destroy_process_group()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("LIGHTX2V_SRC"), os.environ.get("PYTHONPATH")])))
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["GLOO_SOCKET_IFNAME"] = "lo"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={port}", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2


# -- shipped configs and patch -----------------------------------------------------------------------------------------
@pytest.mark.lightx2v
def test_example_configs_extend_lightx2vs_own_config(tl):
    src = os.environ.get("LIGHTX2V_SRC")
    upstream = Path(src) / "configs/qwen_image/qwen_image_i2i_2511.json" if src else None
    for path in sorted((REPO / "presets/lightx2v").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["feature_caching"] == "Tea" and config["teacache_model"] == "qwen-image-edit-2511"
        assert "teacache_thresh" in config and config["teacache_thresh"] is None  # keeps LightX2V's 0.26 default out
        if upstream is not None and upstream.exists():
            base = json.loads(upstream.read_text())
            assert {k: config[k] for k in base} == base


@pytest.mark.lightx2v
def test_relative_preset_path_is_found_beside_the_config(tl, tmp_path):
    (tmp_path / "configs").mkdir()
    make_preset(tmp_path, model="qwen-image-edit-2511")
    config = {"teacache_preset": "../qwen-image-edit-2511-temb.json", "config_json": str(tmp_path / "configs" / "c.json"), "task": "i2i",
              "teacache_model": "qwen-image-edit-2511"}
    assert tl.load_preset(config).model == "qwen-image-edit-2511"


@pytest.mark.lightx2v
def test_patch_applies_to_lightx2v_and_selects_tea_without_install(tl, tiny_dir, tmp_path):
    src = os.environ.get("LIGHTX2V_SRC")
    if not src:
        pytest.skip("needs LIGHTX2V_SRC (a LightX2V checkout) to apply the patch to a copy of it")
    import shutil

    copy = tmp_path / "LightX2V"
    for part in ("lightx2v", "lightx2v_platform"):
        shutil.copytree(Path(src) / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    patch = REPO / "integrations/lightx2v/qwen_image_tea.patch"
    subprocess.run(["git", "apply", "--check", str(patch)], cwd=src, check=True)
    subprocess.run(["git", "apply", str(patch)], cwd=copy, check=True)
    preset = make_preset(tmp_path)
    code = (
        "import sys, torch\n"
        "from calib.backends.lightx2v import TinyLightX2V\n"
        "import calib.backends.lightx2v as b\n"
        "b._lightx2v = lambda: None  # no install(): the patched LightX2V selects Tea by itself\n"
        f"lx = TinyLightX2V({str(tiny_dir)!r}, feature_caching='Tea', teacache_preset={str(preset)!r}, teacache_thresh=None)\n"
        "print(type(lx.transformer_infer).__name__)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), str(REPO)]))
    env.pop("LIGHTX2V_SRC", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("QwenImageTeaCachingTransformerInfer")
