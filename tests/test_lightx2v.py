"""TeaCache on LightX2V's real Qwen-Image code, with the tiny model's weights.

Marked ``lightx2v``: they need a LightX2V checkout (``LIGHTX2V_SRC=/path/to/LightX2V``) or an installed lightx2v, and
its dependencies; the default run (and CI, which has no LightX2V) leaves them out. ``make test-lightx2v
LIGHTX2V_SRC=...`` builds that environment and runs them. Without an accelerator they run on the CPU through the
``teacal-lightx2v-cpu`` platform plugin (``integrations/lightx2v/cpu_platform``, ``PLATFORM=cpu``). Where LightX2V
cannot be imported, each test skips and says why. Nothing here fakes a LightX2V class.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calib.runfiles import unit_name
from calib.tiny.model import TRANSFORMER_CONFIG
from teacache.forecast import Forecast
from teacache.preset import Preset, PresetError
from tests.lightx2v_patch import patched_copy
from tests.tiny_qwen_folder import write_tiny_qwen_folder

REPO = Path(__file__).resolve().parent.parent
SIZE = (64, 64)  # 16 x 16 latents: 64 target + 64 reference tokens
STEPS = 8
SKIPPING = 1.5  # with identity coefficients: the tiny model's temb moves 0.3-0.7 rel-L1 per step at 8 steps


def _import_lightx2v():
    src = os.environ.get("LIGHTX2V_SRC")
    if src and src not in sys.path:
        sys.path.insert(0, src)
    # this checkout's CPU platform plugin, ahead of an installed copy (LightX2V loads it by its entry point's name)
    plugin = str(REPO / "integrations/lightx2v/cpu_platform")
    if plugin not in sys.path:
        sys.path.insert(0, plugin)
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
    from tests.lightx2v_tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-lightx2v"))


def make_preset(tmp_path: Path, model="tiny-qwen-image-edit", signal="temb", threshold=0.0, **changes) -> Path:
    preset = Preset(model=model, signal=signal, coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=threshold, **changes)
    return preset.save(tmp_path / f"{model}-{signal}.json")


@pytest.fixture(scope="session")
def request_inputs():
    """Prompt embeddings and reference latents, as the text and VAE encoders would hand them over."""
    from calib.tiny.model import embed_text

    g = torch.Generator().manual_seed(7)
    prompt, prompt_mask = embed_text("make the sky purple")
    negative, negative_mask = embed_text("blurry low quality")  # LightX2V squeezes a 1-token text to 1-D
    image_latents = torch.randn(1, (SIZE[0] // 8) * (SIZE[1] // 8), 16, generator=g)
    return dict(prompt=prompt, prompt_mask=prompt_mask, negative=negative, negative_mask=negative_mask, image_latents=image_latents)


def build(tiny_dir, **config):
    from tests.lightx2v_tiny import TinyLightX2V

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
def test_missing_preset_is_a_clear_error(tl, tiny_dir, tmp_path):
    with pytest.raises(PresetError, match="needs 'coefficients' .* or 'teacache_preset'"):
        build(tiny_dir, feature_caching="Tea")
    with pytest.raises(PresetError, match="either 'coefficients' .* or 'teacache_preset' .*, not both"):
        build(tiny_dir, feature_caching="Tea", coefficients=[1.0, 0.0], teacache_preset=str(make_preset(tmp_path)))


@pytest.mark.lightx2v
def test_inline_keys_select_teacache_as_the_patch_reads_them(tl, tiny_dir, request_inputs):
    """The keys of the upstreamable patch (and of LightX2VPipeline.enable_cache) run teacal's class too."""
    from teacache.lightx2v_config import config_keys

    lx = build(tiny_dir, feature_caching="Tea", coefficients=[1.0, 0.0], teacache_thresh=SKIPPING, teacache_signal="modin", teacache_max_skips=2)
    infer = lx.transformer_infer
    assert type(infer) is tl.QwenImageTeaCachingTransformerInfer
    assert (infer.preset.signal, infer.preset.max_consecutive_skips, infer.threshold) == ("modin", 2, SKIPPING)
    run(lx, request_inputs)
    skips = infer.stats.schedule("cond")
    assert not any(skips[i] is skips[i + 1] is skips[i + 2] is False for i in range(len(skips) - 2))  # never 3 skips in a row
    keys = config_keys(infer.preset)
    assert {k: keys[k] for k in ("coefficients", "teacache_thresh", "teacache_signal", "teacache_max_skips")} == {
        "coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING, "teacache_signal": "modin", "teacache_max_skips": 2}


@pytest.mark.lightx2v
def test_threshold_comes_from_config_or_preset(tl, tiny_dir, tmp_path):
    preset = str(make_preset(tmp_path, threshold=0.3))
    assert build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=None).transformer_infer.threshold == 0.3
    assert build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=0.1).transformer_infer.threshold == 0.1


@pytest.mark.lightx2v
@pytest.mark.parametrize("signal", ["temb", "modin", "sigma"])
def test_threshold_zero_gives_the_uncached_latents_exactly(tl, tiny_dir, tmp_path, request_inputs, signal):
    plain, _, _ = run(build(tiny_dir), request_inputs)
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, signal=signal)), teacache_thresh=0.0)
    cached, _, _ = run(lx, request_inputs)
    assert torch.equal(plain, cached)
    assert lx.transformer_infer.stats.skipped == 0
    assert lx.transformer_infer.stats.computed == 2 * STEPS  # cond + uncond, every step


@pytest.mark.lightx2v
@pytest.mark.parametrize("signal", ["temb", "modin", "sigma"])
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
    for call in calls:  # a skipped call adds the residual of its own branch's last computed call (forecast none)
        if call.computed:
            residual[call.branch] = call.residual
        else:
            assert torch.equal(call.residual, residual[call.branch])
    assert not torch.equal(calls[1].residual, calls[0].residual)  # and the branches' residuals differ
    # first step and last step are computed for both branches
    for branch in ("cond", "uncond"):
        schedule = stats.schedule(branch)
        assert schedule[0] and schedule[-1]
    assert not torch.equal(plain, cached)
    # Sanity only (the exact check is the residual reuse above): skipping on these random inputs moves the
    # trained model's latents, but not beyond their own magnitude.
    assert ((cached.float() - plain.float()).abs().mean() / plain.float().abs().mean()).item() < 1.0


@pytest.mark.lightx2v
def test_state_is_cleared_between_requests_and_after_warmup(tl, tiny_dir, tmp_path, request_inputs):
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(make_preset(tmp_path, threshold=SKIPPING)), teacache_thresh=None)
    first, inputs, info = run(lx, request_inputs)
    first_schedule = lx.transformer_infer.stats.schedule("cond")
    assert lx.transformer_infer._caches == {}  # scheduler.clear() at the end of the request freed them
    # the runner's warm-up: prepare, one step, clear; then the same request again
    # (its own size, 96x96, and a black reference image, as QwenImageRunner._run_warmup uses)
    warm_inputs = lx.inputs(request_inputs["prompt"], request_inputs["negative"], torch.zeros(1, 12 * 12, 16))
    lx.warmup(warm_inputs, lx.input_info(0, (96, 96), request_inputs["prompt"].shape[1], request_inputs["negative"].shape[1]))
    assert lx.transformer_infer._caches == {}
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


@pytest.fixture
def loguru_messages():
    """What LightX2V's logger (loguru) shows a user, message by message, while the test runs."""
    from loguru import logger

    messages: list[tuple[str, str]] = []
    sink = logger.add(lambda m: messages.append((m.record["level"].name, m.record["message"])), level="INFO")
    yield messages
    logger.remove(sink)


@pytest.mark.lightx2v
def test_each_request_logs_one_line_and_warns_once_outside_the_domain(tl, tiny_dir, tmp_path, request_inputs, loguru_messages):
    """In LightX2V's log: per request one line with computed/skipped per branch, and one warning (not one per call)
    when the preset's domain does not cover it; the stats carry the flag too."""
    preset = make_preset(tmp_path, threshold=SKIPPING, domain={"steps": [20, 40], "x_range": {"temb": [0.05, 0.2]}})
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=str(preset), teacache_thresh=None)
    for _ in range(2):
        run(lx, request_inputs)
    stats = lx.transformer_infer.stats
    lines = _tea_lines([m for level, m in loguru_messages if level == "INFO"])
    pattern = {b: "".join("x" if on else "." for on in stats.schedule(b)) for b in ("cond", "uncond")}
    counts = {b: stats.per_branch()[b] for b in pattern}
    expected = (f"TeaCache: {STEPS} steps, cond {counts['cond']['computed']} computed / {counts['cond']['skipped']} skipped [{pattern['cond']}], "
                f"uncond {counts['uncond']['computed']} computed / {counts['uncond']['skipped']} skipped [{pattern['uncond']}] (threshold {SKIPPING:g})")
    assert lines == [expected, expected]
    warnings = [m for level, m in loguru_messages if level == "WARNING" and "outside its calibrated domain" in m]
    assert len(warnings) == 2 * 2  # per request: the step count and the signal range, once each
    assert any(f"{STEPS} steps outside the calibrated 20..40" in w for w in warnings)
    assert stats.outside_domain == [f"{STEPS} steps outside the calibrated 20..40", "signal rel-L1 above the calibrated 0.05..0.2"]


@pytest.mark.lightx2v
def test_modin_under_block_offload_copies_img_mod_once_per_request(tl, tiny_dir, tmp_path, request_inputs):
    """Block offload keeps block 0's img_mod in host memory: the modin signal gets one device copy per request (not a
    transfer each way per call), the model's own weight object stays as the offload manager left it, and the
    images are those of the run without offload."""
    from lightx2v.common.ops.mm.mm_weight import MMWeight

    preset = str(make_preset(tmp_path, signal="modin", threshold=SKIPPING))
    plain = build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=None)
    expected, _, _ = run(plain, request_inputs)
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=None, cpu_offload=True, offload_granularity="block")
    img_mod = lx.model.transformer_weights.blocks[0].compute_phases[0].img_mod
    copies = []
    to_cuda = MMWeight.to_cuda

    def counted(self, *args, **kwargs):  # LightX2V's own to_cuda, counted for block 0's img_mod weights
        if self.weight_name == img_mod.weight_name:
            copies.append(self)
        return to_cuda(self, *args, **kwargs)

    MMWeight.to_cuda = counted
    try:
        for request in range(2):
            latents, _, _ = run(lx, request_inputs)
            assert len(copies) == request + 1  # 2 x 8 calls, one copy per request
            assert torch.equal(latents, expected)
    finally:
        MMWeight.to_cuda = to_cuda
    assert all(copy is not img_mod for copy in copies) and img_mod.weight is None  # the offloaded block is untouched
    assert lx.transformer_infer.stats.schedule("cond") == plain.transformer_infer.stats.schedule("cond")


@pytest.mark.lightx2v
def test_modin_with_lazy_load_is_refused_with_one_line(tl, tiny_dir, tmp_path):
    """lazy_load keeps block weights on disk, so the modin signal cannot be computed: refused when the model is made."""
    config = build(tiny_dir).config
    config.update({"feature_caching": "Tea", "cpu_offload": True, "lazy_load": True, "teacache_preset": str(make_preset(tmp_path, signal="modin"))})
    with pytest.raises(PresetError, match="'modin' needs block 0's img_mod weights at every call, and lazy_load keeps them on disk") as err:
        tl.QwenImageOffloadTeaCachingTransformerInfer(config)
    assert "\n" not in str(err.value)


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
    from calib.backends.tiny import TinyQwenImageEdit
    from teacache.diffusers import compute_signal

    transformer = TinyQwenImageEdit(seed=0).transformer  # the weights write_tiny_model gave LightX2V
    if dtype != torch.float32:
        transformer.to(dtype)
    h, w = SIZE[1] // 8, SIZE[0] // 8
    current: dict[str, object] = {}
    handles = [b.register_forward_hook(lambda m, a, out: current["blocks"].append(out[1][0])) for b in transformer.transformer_blocks]

    def head_hook(module, args, kwargs):
        current["signals"] = {k: compute_signal(k, module, kwargs["hidden_states"], kwargs["temb"], h * w, 0.0)[0] for k in ("temb", "modin")}

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


def _hand_damping(knots, reach):
    """The [sigma reach, damping] knots interpolated linearly at `reach`, constant beyond their ends."""
    if reach <= knots[0][0]:
        return knots[0][1]
    for (r0, a0), (r1, a1) in zip(knots, knots[1:], strict=False):
        if reach <= r1:
            return a0 + (a1 - a0) * (reach - r0) / (r1 - r0)
    return knots[-1][1]


def _hand_forecast(alpha, axis, calls):
    """r1 + alpha(reach) * (r1 - r0) * d(i, s1) / d(s1, s0) per skipped call, from the branch's own computed calls
    (issue 13); the reach is the longer of the slope's sigma span and the sigma distance it is carried ahead."""
    out, computed = {}, {}
    for call in calls:
        mine = computed.setdefault(call.branch, [])
        if call.computed:
            mine.append(call)
            continue
        if len(mine) < 2:
            out[call.step, call.branch] = mine[-1].residual
            continue
        (s0, r0, g0), (s1, r1, g1) = ((c.step, c.residual, c.sigma) for c in mine[-2:])
        span, ahead = (s1 - s0, call.step - s1) if axis == "step" else (g1 - g0, call.sigma - g1)
        damping = _hand_damping(alpha, max(abs(g0 - g1), abs(g1 - call.sigma)))
        out[call.step, call.branch] = r1 + damping * ahead / span * (r1 - r0)
    return out


@pytest.mark.lightx2v
@pytest.mark.parametrize("axis", ["step", "sigma"])
def test_forecast_is_the_same_in_diffusers_and_lightx2v(tl, tiny_dir, request_inputs, axis):
    """Same tiny weights, same inputs, same schedule: both runtimes form each skipped call's residual by the preset's
    forecast, from their own computed residuals; the two agree to bf16 precision (their blocks do), and each is
    exactly the hand computation."""
    import numpy as np

    from calib.backends.tiny import TinyQwenImageEdit
    from calib.simulate import StaticSchedulePolicy
    from teacache.diffusers import apply_teacache

    alpha = ((0.1, 0.5), (0.4, 0.25))  # [sigma reach, damping]: the tiny schedule reaches 0.20, 0.26 (interpolated) and 0.41 (held)
    preset = Preset(model=TINY, signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, forecast=Forecast("linear", axis, alpha))
    # a skip after one computed call (no slope yet: plain reuse), then gaps of 1 and 2 after two computed calls
    schedule = np.array([True, False, True, False, False, True, False, True])
    lx = build(tiny_dir, feature_caching="Tea", teacache_preset=preset, teacache_thresh=None)
    lx.transformer_infer.use_preset(preset, None, StaticSchedulePolicy(preset, schedule))
    calls, latents_at, timesteps = [], {}, {}
    lx.transformer_infer.observers.append(calls.append)
    inputs = lx.inputs(request_inputs["prompt"], request_inputs["negative"], request_inputs["image_latents"])
    info = lx.input_info(0, SIZE, request_inputs["prompt"].shape[1], request_inputs["negative"].shape[1])

    def before_step(step):
        latents_at[step] = lx.scheduler.latents.clone()
        timesteps[step] = lx.scheduler.timesteps[step].clone()

    lx.denoise(inputs, info, steps=STEPS, before_step=before_step)
    assert [c.computed for c in calls if c.branch == "cond"] == schedule.tolist()

    transformer = TinyQwenImageEdit(seed=0).transformer.to(torch.bfloat16)  # the weights write_tiny_model gave LightX2V
    df_calls = []
    apply_teacache(transformer, preset, policy=StaticSchedulePolicy(preset, schedule), observers=[df_calls.append])
    h, w = SIZE[1] // 8, SIZE[0] // 8
    for call in calls:  # LightX2V's own inputs at each call, in its order
        cond = call.branch == "cond"
        embeds, mask = (request_inputs["prompt"], request_inputs["prompt_mask"]) if cond else (request_inputs["negative"], request_inputs["negative_mask"])
        hidden = torch.cat([latents_at[call.step], request_inputs["image_latents"].to(torch.bfloat16)], dim=1)
        with torch.no_grad(), transformer.cache_context(call.branch, step_index=call.step, num_inference_steps=STEPS):
            transformer(hidden_states=hidden, timestep=timestep_input(timesteps[call.step], torch.bfloat16), encoder_hidden_states=embeds.to(torch.bfloat16),
                        encoder_hidden_states_mask=mask, img_shapes=[[(1, h, w), (1, h, w)]], return_dict=False)
    df_calls = [dataclasses.replace(c, residual=c.residual[0]) for c in df_calls]  # [batch, tokens, channels] -> LightX2V's [tokens, channels]
    assert [(c.step, c.branch, c.computed, c.sigma) for c in df_calls] == [(c.step, c.branch, c.computed, c.sigma) for c in calls]
    expected = {"lightx2v": _hand_forecast(alpha, axis, calls), "diffusers": _hand_forecast(alpha, axis, df_calls)}
    skipped = [(c, d) for c, d in zip(calls, df_calls, strict=True) if not c.computed]
    assert len(skipped) == 2 * 4
    for lx_call, df_call in skipped:
        key = lx_call.step, lx_call.branch
        assert torch.equal(lx_call.residual, expected["lightx2v"][key]) and torch.equal(df_call.residual, expected["diffusers"][key])
        assert _rel(lx_call.residual, df_call.residual) < 2e-2  # bf16, as every block output of the two backends
    # the forecast is not plain reuse once a branch has two computed calls
    last_computed = {c.branch: c for c in calls if c.computed and c.step == 2}
    assert not torch.equal(next(c for c in calls if c.step == 3).residual, last_computed["cond"].residual)


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
        "dist.barrier()  # gloo can abort a rank that tears down while its peer is still in a collective\n"
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


# -- shipped configs, export -------------------------------------------------------------------------------------------
# These run everywhere (CI has no LightX2V): files and keys only.
def test_shipped_lightx2v_configs_point_at_nothing_missing():
    """No shipped LightX2V config names a preset file that is not there (they carry their coefficients inline)."""
    configs = sorted((REPO / "presets/lightx2v").glob("*.json"))
    assert configs
    for path in configs:
        config = json.loads(path.read_text())
        assert config["feature_caching"] == "Tea" and config["coefficients"], path
        if "teacache_preset" in config:
            assert (path.parent / config["teacache_preset"]).is_file(), path


def test_shipped_tiny_config_is_the_exported_shipped_preset():
    """presets/lightx2v/tiny_qwen_image_edit_tea.json is `teacal export presets/tiny-qwen-image-edit.json`: the two
    cannot drift (after a new preset, rerun the export)."""
    from calib.export import REPLACED, lightx2v_config

    shipped = json.loads((REPO / "presets/lightx2v/tiny_qwen_image_edit_tea.json").read_text())
    base = {k: v for k, v in shipped.items() if k not in REPLACED}
    assert shipped == lightx2v_config(Preset.load(REPO / "presets/tiny-qwen-image-edit.json"), base), (
        "stale: teacal export presets/tiny-qwen-image-edit.json --base <its non-TeaCache keys> --out presets/lightx2v/tiny_qwen_image_edit_tea.json")


def test_export_writes_a_lightx2v_config_from_a_preset(tmp_path):
    """`teacal export`: a LightX2V config (its own keys kept, every TeaCache key the preset's) that the patch reads."""
    from calib.export import export_lightx2v

    preset = Preset(model="qwen-image-edit-2511", signal="modin", coefficients=(2.0, -0.5, 0.1), ret_steps=2, cutoff_steps=-1, threshold=0.3,
                    forecast=Forecast("linear", "step", ((0.0, 0.25),)), domain={"steps": [40], "x_range": {"modin": [0.01, 0.3]}}).save(tmp_path / "p.json")
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"infer_steps": 40, "enable_cfg": True, "feature_caching": "NoCaching", "teacache_preset": "old.json", "coefficients": [[1], [2]]}))
    config = export_lightx2v(preset, tmp_path / "out.json", base, threshold=0.2)
    assert json.loads((tmp_path / "out.json").read_text()) == config
    assert config == {
        "infer_steps": 40, "enable_cfg": True, "feature_caching": "Tea", "coefficients": [2.0, -0.5, 0.1], "teacache_thresh": 0.2,
        "teacache_signal": "modin", "teacache_ret_steps": 2, "teacache_cutoff_steps": -1, "teacache_branch_mode": "per-branch",
        "teacache_max_skips": None, "teacache_forecast": {"rule": "linear", "axis": "step", "alpha": [[0.0, 0.25]]},
        "teacache_x_range": [0.01, 0.3], "teacache_steps": [40],
    }


def test_export_cli(tmp_path):
    """The command line of the same; bad input is one line and exit code 2."""
    preset = Preset(model="qwen-image-edit-2511", signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=0.3).save(tmp_path / "p.json")
    result = _cli(["export", str(preset), "--out", str(tmp_path / "lx.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "lx.json").read_text())["teacache_thresh"] == 0.3
    result = _cli(["export", str(preset), "--out", str(tmp_path / "lx.json"), "--base", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and f"--base {tmp_path / 'none.json'}: no such file" in result.output and result.output.count("\n") == 1


@pytest.mark.lightx2v
def test_shipped_tiny_config_runs_on_lightx2v(tl, tiny_dir, request_inputs):
    """The shipped config, as it is, selects TeaCache on LightX2V's transformer with the tiny weights and skips."""
    config = json.loads((REPO / "presets/lightx2v/tiny_qwen_image_edit_tea.json").read_text())
    lx = build(tiny_dir, **config)
    run(lx, request_inputs, steps=config["infer_steps"])
    stats = lx.transformer_infer.stats
    assert stats.num_steps == 20 and 0 < stats.skipped and stats.schedule("cond") == stats.schedule("uncond")  # shared


@pytest.mark.lightx2v
def test_an_8_step_cfg_off_preset_exported_onto_lightx2vs_distill_config_runs_one_branch(tl, tiny_dir, request_inputs, tmp_path):
    """The seed's own case: a preset recorded at 8 steps with CFG off, `teacal export`ed onto LightX2V's own
    qwen_image_i2i_2511_distill.json, runs on LightX2V's transformer with the tiny weights: 8 steps, the cond branch
    only, forced first and last step, some skipped. The config's LoRA is the runner's to load and its flash_attn3
    needs a GPU, so the model here takes the config with torch attention."""
    base = _lightx2v_src() / "configs/qwen_image/qwen_image_i2i_2511_distill.json"
    from tests.conftest import SMALL_PROMPTS, write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", SMALL_PROMPTS[:2])
    assert _cli(["record", str(tmp_path / "run"), "--prompts", prompts, "--steps", "8", "--cfg", "1", "--size", "64x64"]).exit_code == 0
    assert _cli(["fit", str(tmp_path / "run"), "--out", str(tmp_path / "preset.json")]).exit_code == 0
    result = _cli(["export", str(tmp_path / "preset.json"), "--base", str(base), "--out", str(tmp_path / "distill_tea.json"), "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "distill_tea.json").read_text())
    assert config["enable_cfg"] is False and config["infer_steps"] == 8 and config["feature_caching"] == "Tea" and config["lora_configs"]
    lx = build(tiny_dir, **{k: v for k, v in config.items() if k not in ("attn_type", "lora_configs")})
    run(lx, request_inputs, steps=config["infer_steps"])
    stats = lx.transformer_infer.stats
    assert stats.num_steps == 8 and stats.branches == ["cond"]
    schedule = stats.schedule("cond")
    assert schedule[0] and schedule[-1] and 0 < stats.skipped < 6, schedule


@pytest.mark.lightx2v
def test_relative_preset_path_is_found_beside_the_config(tl, tmp_path):
    (tmp_path / "configs").mkdir()
    make_preset(tmp_path, model="qwen-image-edit-2511")
    config = {"teacache_preset": "../qwen-image-edit-2511-temb.json", "config_json": str(tmp_path / "configs" / "c.json"), "task": "i2i",
              "teacache_model": "qwen-image-edit-2511"}
    assert tl.load_preset(config).model == "qwen-image-edit-2511"
    # stock LightX2VPipeline drops config_json: then the error says what to do instead
    with pytest.raises(PresetError, match="does not say where its JSON is .* use an absolute path, or teacache.lightx2v.enable_teacache"):
        tl.load_preset({k: v for k, v in config.items() if k != "config_json"})


# -- the patch alone: a clean LightX2V tree, the patch, no teacal ----------------------------------------------------------
def _lightx2v_src() -> Path:
    src = os.environ.get("LIGHTX2V_SRC")
    if not src:
        pytest.skip("needs LIGHTX2V_SRC, a clean LightX2V checkout, to apply the patch to a copy of it")
    return Path(src)


def _cpu_runner_config(runner_dir: Path, path: Path, **keys) -> Path:
    """LightX2V's own qwen_image_i2i_2511 config on the tiny runner folder, torch kernels, few steps. On the CPU
    platform LightX2V moves weights to its device only when offloading (create_default_tensors keeps CPU-loaded
    weights as host copies), so `lightx2v.infer` runs there with model-granularity offload."""
    return tiny_runner_config(runner_dir, path, min_custom_size=32, infer_steps=RUNNER_STEPS, cpu_offload=True, offload_granularity="model", **keys)


def _standalone(spec: dict, tmp_path: Path, pythonpath: list[Path], name: str, torchrun: int = 0) -> list[list[str]] | list[list[list[str]]]:
    """Run tests/lightx2v_standalone.py (LightX2V's own entry points) in a fresh process with only `pythonpath`."""
    spec_file = tmp_path / f"{name}-spec.json"
    results = [tmp_path / f"{name}-result-{rank}.json" for rank in range(max(torchrun, 1))]
    spec_file.write_text(json.dumps({**spec, "result": str(tmp_path / f"{name}-result-{{rank}}.json")}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIGHTX2V_SRC")}
    env.update(PYTHONPATH=os.pathsep.join(map(str, [*pythonpath, REPO / "integrations/lightx2v/cpu_platform"])), PLATFORM="cpu", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, str(REPO / "tests/lightx2v_standalone.py"), str(spec_file)]
    if torchrun:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--master_addr=127.0.0.1", f"--master_port={port}", *command[1:]]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    logs = [json.loads(path.read_text())["logs"] for path in results]
    return logs if torchrun else logs[0]


def _infer_args(runner_dir: Path, config: Path, out: Path) -> list[str]:
    return ["--model_cls", "qwen_image", "--task", "i2i", "--model_path", str(runner_dir), "--config_json", str(config), "--prompt", "put a hat on the cat",
            "--negative_prompt", "blurry", "--image_path", str(_cat(out.parent)),
            "--save_result_path", str(out), "--target_shape", str(RUNNER_SIZE[1]), str(RUNNER_SIZE[0]), "--seed", "0"]


def _cat(folder: Path) -> Path:
    from PIL import Image
    from skimage import data

    path = folder / "cat.png"
    if not path.exists():
        Image.fromarray(data.chelsea()).save(path)
    return path


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _tea_lines(log: list[str]) -> list[str]:
    """The per-request summary lines of a LightX2V log."""
    return [m for m in log if re.match(r"TeaCache: \d+ steps, ", m)]


PATCH_KEYS = {"feature_caching": "Tea", "coefficients": [1.0, 0.0], "teacache_thresh": 100.0}  # identity on temb; 100: skip all it may


@pytest.fixture(scope="session")
def patched_lightx2v(tmp_path_factory):
    return patched_copy(_lightx2v_src(), tmp_path_factory.mktemp("patched") / "LightX2V")


@pytest.fixture(scope="session")
def patch_alone(runner_dir, patched_lightx2v, tmp_path_factory):
    """The patched LightX2V by itself (teacal absent from the process): `python -m lightx2v.infer` without caching,
    with "feature_caching": "Tea" at threshold 0 and at 100 from a config, and LightX2VPipeline.enable_cache("Tea",
    coefficients=..., teacache_thresh=100) on the plain config."""
    tmp = tmp_path_factory.mktemp("patch-alone")
    base = _cpu_runner_config(runner_dir, tmp / "base.json")
    configs = {"plain": base, "tea0": _cpu_runner_config(runner_dir, tmp / "tea0.json", **{**PATCH_KEYS, "teacache_thresh": 0.0}),
               "tea": _cpu_runner_config(runner_dir, tmp / "tea.json", **PATCH_KEYS)}
    runs = [{"via": "infer", "args": _infer_args(runner_dir, config, tmp / f"{name}.png")} for name, config in configs.items()]
    cache = {k if k != "feature_caching" else "cache_method": v for k, v in PATCH_KEYS.items()}
    runs.append({"via": "pipeline", "init": {"model_path": str(runner_dir), "model_cls": "qwen_image", "task": "i2i"}, "cache": cache,
                 "create": {"config_json": str(base)},
                 "generate": {"seed": 0, "prompt": "put a hat on the cat", "negative_prompt": "blurry", "image_path": str(_cat(tmp)),
                              "save_result_path": str(tmp / "pipe.png"), "target_shape": [RUNNER_SIZE[1], RUNNER_SIZE[0]]}})
    # the patched LightX2VPipeline keeps its config JSON, so a null there reaches the model (stock: silently 0.26)
    null = _cpu_runner_config(runner_dir, tmp / "null.json", **{**PATCH_KEYS, "teacache_thresh": None})
    runs.append({"via": "pipeline", "init": {"model_path": str(runner_dir), "model_cls": "qwen_image", "task": "i2i"}, "create": {"config_json": str(null)},
                 "expect_error": "TeaCacheConfigError"})
    logs = _standalone({"runs": runs}, tmp, [patched_lightx2v], "patch-alone")
    null_log = logs.pop()
    return {"logs": dict(zip([*configs, "pipe"], logs, strict=True)), "null": null_log, "images": {name: _pixels(tmp / f"{name}.png") for name in [*configs, "pipe"]},
            "configs": configs, "tmp": tmp}


@pytest.mark.lightx2v
def test_patch_alone_runs_teacache_from_a_config(patch_alone):
    """A clean LightX2V plus the patch, no teacal: "feature_caching": "Tea" with inline coefficients runs a
    Qwen-Image-Edit generation; threshold 0 is the uncached image bit for bit; LightX2V's log says what was skipped."""
    logs, images = patch_alone["logs"], patch_alone["images"]
    assert not _tea_lines(logs["plain"])
    assert (images["tea0"] == images["plain"]).all()
    assert _tea_lines(logs["tea0"]) == [f"TeaCache: {RUNNER_STEPS} steps, cond 4 computed / 0 skipped [xxxx], uncond 4 computed / 0 skipped [xxxx] (threshold 0)"]
    # threshold 100: only the forced first and last steps are computed
    assert _tea_lines(logs["tea"]) == [f"TeaCache: {RUNNER_STEPS} steps, cond 2 computed / 2 skipped [x..x], uncond 2 computed / 2 skipped [x..x] (threshold 100)"]
    assert images["tea"].shape == (RUNNER_SIZE[1], RUNNER_SIZE[0], 3) and (images["tea"] != images["plain"]).any()


@pytest.mark.lightx2v
def test_patch_enable_cache_gives_the_config_paths_schedule(patch_alone):
    """LightX2VPipeline.enable_cache("Tea", coefficients=..., teacache_thresh=...): the same schedule, and the same
    image bit for bit, as the same keys in a config run by lightx2v.infer."""
    assert _tea_lines(patch_alone["logs"]["pipe"]) == _tea_lines(patch_alone["logs"]["tea"])
    assert (patch_alone["images"]["pipe"] == patch_alone["images"]["tea"]).all()


@pytest.mark.lightx2v
def test_patched_pipeline_keeps_the_configs_null_values(patch_alone):
    """Stock LightX2VPipeline drops a config JSON's nulls (set_config skips None), so "teacache_thresh": null became
    LightX2V's default 0.26 without a word; patched, the null arrives, and the TeaCache class says what it needs."""
    assert patch_alone["null"] == ["error: TeaCache config key 'teacache_thresh': must be a finite number >= 0 (0 computes every call), got None"]


@pytest.mark.lightx2v
def test_patch_cfg_parallel_on_two_gloo_processes(patch_alone, patched_lightx2v, runner_dir, tmp_path):
    """cfg_parallel for real, two processes (gloo on the CPU): rank 0 runs and logs the cond branch, rank 1 the
    uncond one, each with its own TeaCache state; the image is the one-process image, bit for bit."""
    config = _cpu_runner_config(runner_dir, tmp_path / "cfgp.json", **PATCH_KEYS, parallel={"cfg_p_size": 2})
    ranks = _standalone({"runs": [{"via": "infer", "args": _infer_args(runner_dir, config, tmp_path / "cfgp.png")}]}, tmp_path, [patched_lightx2v], "cfgp", torchrun=2)
    single = _tea_lines(patch_alone["logs"]["tea"])[0]
    cond, uncond = (part.strip() for part in single.split("steps,")[1].split("(threshold")[0].split(", "))
    assert [_tea_lines(log[0]) for log in ranks] == [[f"TeaCache: {RUNNER_STEPS} steps, {cond} (threshold 100)"], [f"TeaCache: {RUNNER_STEPS} steps, {uncond} (threshold 100)"]]
    assert (_pixels(tmp_path / "cfgp.png") == patch_alone["images"]["tea"]).all()


@pytest.mark.lightx2v
def test_patch_class_takes_teacals_decisions_on_lightx2v(tiny_dir, patched_lightx2v, tmp_path):
    """On LightX2V's transformer with the trained tiny weights: the patch's own class and teacache.lightx2v's, given
    the same keys, give the same latents bit for bit (signals temb and modin, forecasts, shared branches, skip cap,
    block offload), so a config exported by teacal means the same on both."""
    cases = {
        "temb": {"coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING},
        "modin-linear": {"coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING, "teacache_signal": "modin",
                         "teacache_forecast": {"rule": "linear", "axis": "step", "alpha": [[0.1, 0.3], [0.4, 0.2]]}},
        "shared-sigma-capped": {"coefficients": [2.0, 0.0], "teacache_thresh": SKIPPING, "teacache_branch_mode": "shared", "teacache_max_skips": 2,
                                "teacache_forecast": {"rule": "linear", "axis": "sigma", "alpha": [[0.0, 0.25]]}},
        "modin-block-offload": {"coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING, "teacache_signal": "modin", "cpu_offload": True, "offload_granularity": "block"},
        "outside-domain": {"coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING, "teacache_steps": [20, 40], "teacache_x_range": [0.05, 0.2]},
        "last-step-free": {"coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING, "teacache_cutoff_steps": STEPS},  # fit frees it at few steps
        "sigma-adaptive": {"coefficients": [1.0, 0.0], "teacache_thresh": SKIPPING, "teacache_signal": "sigma",  # the per-prompt ratio
                           "teacache_adapt": {"strength": 1.0, "typical": 0.0, "clip": 2.0}},
    }
    script = tmp_path / "compare.py"
    script.write_text(
        "import json, re, sys, torch\n"
        "from tests.lightx2v_tiny import TinyLightX2V\n"
        "from calib.tiny.model import embed_text\n"
        "import lightx2v.models.networks.qwen_image.infer.feature_caching.transformer_infer as patched\n"
        "cases, tiny_dir, steps = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])\n"
        "prompt, _ = embed_text('make the sky purple'); negative, _ = embed_text('blurry low quality')\n"
        "image = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(7))\n"
        "from loguru import logger\n"
        "lines = []\n"
        "logger.add(lambda m: lines.append(m.record['message']), level='INFO')\n"
        "def run(lx):\n"
        "    info = lx.input_info(0, (64, 64), prompt.shape[1], negative.shape[1])\n"
        "    lines.clear()\n"
        "    latents = lx.denoise(lx.inputs(prompt, negative, image), info, steps=steps)\n"
        "    summary = [m for m in lines if re.match(r'TeaCache: \\d+ steps, ', m)]\n"
        "    outside = [m.split('(', 1)[1].rsplit('); the schedule', 1)[0] for m in lines if 'outside' in m and 'calibrated domain' in m]\n"
        "    return latents, summary, outside\n"
        "ours = {name: TinyLightX2V(tiny_dir, install=False, feature_caching='Tea', **keys) for name, keys in cases.items()}\n"
        "assert all(type(lx.transformer_infer) is patched.QwenImageTransformerInferTeaCaching for lx in ours.values())\n"
        "results = {}\n"
        "for name, lx in ours.items():\n"
        "    latents, summary, outside = run(lx)\n"
        "    teacal = TinyLightX2V(tiny_dir, install=True, feature_caching='Tea', **cases[name])\n"
        "    assert type(teacal.transformer_infer).__module__ == 'teacache.lightx2v'\n"
        "    other, other_summary, other_outside = run(teacal)\n"
        "    stats = teacal.transformer_infer.stats\n"
        "    results[name] = dict(equal=bool(torch.equal(latents, other)), skipped=stats.skipped, calls=len(stats.decisions), summary=summary,\n"
        "                         teacal_summary=other_summary, outside=outside, teacal_outside=other_outside, flags=stats.outside_domain)\n"
        "print(json.dumps(results))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, [patched_lightx2v, REPO, REPO / "integrations/lightx2v/cpu_platform"])), PLATFORM="cpu")
    env.pop("LIGHTX2V_SRC", None)
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases), str(tiny_dir), str(STEPS)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["equal"], name
        assert 0 < result["skipped"] < result["calls"] == 2 * STEPS, (name, result)
        # the same line in LightX2V's log, once per request, and the same warnings outside the domain
        assert len(result["summary"]) == 1 and result["summary"] == result["teacal_summary"], (name, result)
        assert result["outside"] == result["teacal_outside"] == result["flags"] == ([] if name != "outside-domain" else
                                                                                   [f"{STEPS} steps outside the calibrated 20..40", "signal rel-L1 above the calibrated 0.05..0.2"])


# -- teacal's side for a stock LightX2V: the launcher, the Python API, cfg_parallel ------------------------------------
def _preset_beside(config_folder: Path) -> str:
    """A qwen-image-edit-2511 preset in the parent folder of the config, named relative to the config."""
    Preset(model="qwen-image-edit-2511", signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=100.0).save(config_folder.parent / "lx-preset.json")
    return "../lx-preset.json"


@pytest.fixture(scope="session")
def launcher_run(runner_dir, tmp_path_factory):
    """`python -m teacache.lightx2v <lightx2v.infer arguments>` on a stock LightX2V, with a config that names a teacal
    preset by a path relative to itself and "teacache_thresh": null (the preset's threshold)."""
    tmp = tmp_path_factory.mktemp("launcher")
    (tmp / "configs").mkdir()
    config = _cpu_runner_config(runner_dir, tmp / "configs" / "tea.json", feature_caching="Tea", teacache_preset=_preset_beside(tmp / "configs"), teacache_thresh=None)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(map(str, [REPO, _lightx2v_src(), REPO / "integrations/lightx2v/cpu_platform"])), PLATFORM="cpu")
    proc = subprocess.run([sys.executable, "-m", "teacache.lightx2v", *_infer_args(runner_dir, config, tmp / "out.png")], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, tmp, config


@pytest.mark.lightx2v
def test_launcher_runs_lightx2v_infer_with_teacache(launcher_run):
    proc, tmp, _ = launcher_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"TeaCache: {RUNNER_STEPS} steps, cond 2 computed / 2 skipped [x..x], uncond 2 computed / 2 skipped [x..x] (threshold 100)" in proc.stderr
    assert _pixels(tmp / "out.png").shape == (RUNNER_SIZE[1], RUNNER_SIZE[0], 3)


@pytest.mark.lightx2v
def test_launcher_cfg_parallel_on_two_gloo_processes(launcher_run, runner_dir, tmp_path):
    """teacal's class under cfg_parallel on a stock LightX2V: each rank its own branch, the one-process image."""
    _, single, config = launcher_run
    parallel = tmp_path / "configs" / "tea.json"
    parallel.parent.mkdir()
    parallel.write_text(json.dumps({**json.loads(config.read_text()), "parallel": {"cfg_p_size": 2}}))
    _preset_beside(parallel.parent)
    spec = {"teacal_allowed": True, "runs": [{"via": "infer", "launcher": True, "args": _infer_args(runner_dir, parallel, tmp_path / "out.png")}]}
    ranks = _standalone(spec, tmp_path, [REPO, _lightx2v_src()], "launcher-cfgp", torchrun=2)
    assert [_tea_lines(log[0]) for log in ranks] == [[f"TeaCache: {RUNNER_STEPS} steps, cond 2 computed / 2 skipped [x..x] (threshold 100)"],
                                                     [f"TeaCache: {RUNNER_STEPS} steps, uncond 2 computed / 2 skipped [x..x] (threshold 100)"]]
    assert (_pixels(tmp_path / "out.png") == _pixels(single / "out.png")).all()


@pytest.mark.lightx2v
def test_python_api_on_stock_lightx2v_keeps_the_presets_settings(launcher_run, runner_dir, tmp_path):
    """A stock LightX2VPipeline drops a config's null values and its path; enable_teacache() hands it the preset's
    numbers instead, and the generation is the config path's (the launcher's) bit for bit."""
    _, single, _ = launcher_run
    base = _cpu_runner_config(runner_dir, tmp_path / "base.json")
    preset = single / "lx-preset.json"
    script = tmp_path / "api.py"
    script.write_text(
        "import sys\n"
        "from lightx2v import LightX2VPipeline\n"
        "import teacache.lightx2v as tl\n"
        "pipe = LightX2VPipeline(model_path=sys.argv[1], model_cls='qwen_image', task='i2i')\n"
        "keys = tl.enable_teacache(pipe, sys.argv[2])\n"
        "assert keys['teacache_thresh'] == 100.0, keys\n"
        "pipe.create_generator(config_json=sys.argv[3])\n"
        "infer = pipe.runner.model.transformer_infer\n"
        "assert isinstance(infer, tl.QwenImageTeaCachingTransformerInfer) and infer.threshold == 100.0, (type(infer), infer.threshold)\n"
        "pipe.generate(seed=0, prompt='put a hat on the cat', negative_prompt='blurry', image_path=sys.argv[4], save_result_path=sys.argv[5], target_shape=[int(sys.argv[6]), int(sys.argv[7])])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join(map(str, [REPO, _lightx2v_src(), REPO / "integrations/lightx2v/cpu_platform"])), PLATFORM="cpu")
    proc = subprocess.run([sys.executable, str(script), str(runner_dir), str(preset), str(base), str(_cat(tmp_path)), str(tmp_path / "api.png"), str(RUNNER_SIZE[1]), str(RUNNER_SIZE[0])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"TeaCache: {RUNNER_STEPS} steps, cond 2 computed / 2 skipped [x..x], uncond 2 computed / 2 skipped [x..x] (threshold 100)" in proc.stderr
    assert (_pixels(tmp_path / "api.png") == _pixels(single / "out.png")).all()


@pytest.mark.lightx2v
def test_import_errors_tell_a_device_problem_from_a_broken_package(tl, tmp_path):
    """A device LightX2V cannot set up is reported as one; a package that fails while importing (here a stand-in for a
    dependency built against another torch, which raises RuntimeError at import) is reported as that package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = [REPO, _lightx2v_src(), REPO / "integrations/lightx2v/cpu_platform"]
    code = "import teacache.lightx2v"
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": os.pathsep.join(map(str, path)), "PLATFORM": "nosuch"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: LightX2V is importable but could not set up its device (Unsupported PLATFORM: nosuch.") and "set PLATFORM=cpu" in last
    broken = tmp_path / "broken" / "einops"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('operator einops::rearrange does not exist')\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": os.pathsep.join(map(str, [broken.parent, *path])), "PLATFORM": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"importing LightX2V failed in {broken / '__init__.py'} with RuntimeError: operator einops::rearrange does not exist" in last
    assert "PLATFORM" not in last


# -- the lightx2v backend of `teacal record` and `teacal sweep` ----------------------------------------------------------
# The CLI checks run everywhere (CI has no LightX2V): each bad flag exits 2 with one line before anything loads.
def _weights_folder(path: Path) -> Path:
    """An (empty) folder in the layout LightX2V loads Qwen-Image from: enough for the flag checks, never loaded."""
    for part in ("transformer", "scheduler", "text_encoder", "vae"):
        (path / part).mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text("{}")
    return path


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from calib.cli import app

    return CliRunner().invoke(app, args)


def _record_args(tmp_path: Path, *args: str) -> list[str]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "cat", "prompt": "put a hat on the cat", "image": "skimage:chelsea"}) + "\n")
    return ["record", str(tmp_path / "o"), "--prompts", str(prompts), *args]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "lightx2v"], "model tiny-qwen-image-edit is an embedded model; it runs on its own backend, not lightx2v"),
        (["--lightx2v-config", "c.json"], "--lightx2v-config is for --backend lightx2v; this run uses tiny"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v"], "--backend lightx2v needs --model-path DIR"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{tmp}/nowhere"], "--model-path {tmp}/nowhere: not a folder"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{tmp}"], "--model-path {tmp}: no transformer"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{weights}"], "--backend lightx2v needs --lightx2v-config FILE"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{weights}", "--lightx2v-config", "{tmp}/none.json"],
         "--lightx2v-config {tmp}/none.json: no such file"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{weights}", "--lightx2v-config", "{tmp}/bad.json"],
         "--lightx2v-config {tmp}/bad.json: invalid JSON at line 2"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{weights}", "--lightx2v-config", "{tmp}/list.json"],
         "--lightx2v-config {tmp}/list.json: expected a JSON object"),
        (["--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", "{weights}", "--lightx2v-config", "{tmp}/parallel.json"],
         "--lightx2v-config {tmp}/parallel.json: 'parallel' is not supported here"),
    ],
)
def test_bad_lightx2v_backend_flags_exit_2_with_one_line(tmp_path, flags, message):
    """Runs anywhere: every flag is checked before LightX2V is imported or any weight loads."""
    weights = _weights_folder(tmp_path / "weights")
    (tmp_path / "bad.json").write_text('{"infer_steps": 40,\n "enable_cfg": tru}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "parallel.json").write_text(json.dumps({"parallel": {"cfg_p_size": 2}}))
    fill = lambda text: text.format(tmp=tmp_path, weights=weights)  # noqa: E731
    result = _cli(_record_args(tmp_path, *map(fill, flags)))
    assert result.exit_code == 2, result.output
    assert fill(message) in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_lightx2v_backend_without_lightx2v_says_how_to_install(tmp_path):
    """Runs where LightX2V is absent (CI, the default env): one line with the install command, not a traceback."""
    import importlib.util

    if importlib.util.find_spec("lightx2v") is not None:
        pytest.skip("lightx2v is importable in this Python; the message for its absence cannot be seen here")
    weights = _weights_folder(tmp_path / "weights")
    config = tmp_path / "c.json"
    config.write_text("{}")
    result = _cli(_record_args(tmp_path, "--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", str(weights),
                               "--lightx2v-config", str(config)))
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert "--backend lightx2v: LightX2V cannot be imported here" in result.output
    assert "pip install git+https://github.com/ModelTC/LightX2V" in result.output


def _lightx2v_run(tmp_path: Path, config: Path) -> Path:
    """The run folder `teacal record --backend lightx2v` starts, made with record's own functions (no model needed)."""
    from calib.backends.lightx2v import lightx2v_settings
    from calib.prompts import load_prompts
    from calib.record import write_run_file

    prompts = load_prompts(Path(conftest_write_prompts(tmp_path / "p.jsonl")), need_image=True)
    settings = {"model": "qwen-image-edit-2511", "backend": "lightx2v", "steps": [8], "cfg": 4.0, "sizes": [[256, 256]], "seeds": [0],
                "device": "cpu", "prompts": prompts.path.name, "inputs_sha256": prompts.sha256, "max_gap": 16, "residual_tokens": 64,
                **lightx2v_settings(config, "auto")}
    run = tmp_path / "run"
    write_run_file(run, settings, [], prompts)
    Preset(model="qwen-image-edit-2511", signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=0.1).save(tmp_path / "preset.json")
    return run


def conftest_write_prompts(path: Path) -> str:
    from tests.conftest import write_prompts

    return write_prompts(path, [{"id": "cat", "prompt": "put a hat on the cat", "image": "skimage:chelsea"}])


def test_sweep_reuses_the_recorded_lightx2v_config(tmp_path):
    """Runs anywhere: sweep takes --lightx2v-config from run.json, and refuses it once the file has changed."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"infer_steps": 8}))
    run = _lightx2v_run(tmp_path, config)
    assert json.loads((run / "run.json").read_text())["settings"]["lightx2v_config"] == str(config.resolve())
    sweep = ["sweep", str(run), "--preset", str(tmp_path / "preset.json"), "--thresh", "0.1"]
    result = _cli(sweep)  # the recorded config is found; the next missing piece is the weights folder
    assert result.exit_code == 2 and "--backend lightx2v needs --model-path DIR" in result.output and result.output.count("\n") == 1
    config.write_text(json.dumps({"infer_steps": 40}))
    result = _cli([*sweep, "--model-path", str(_weights_folder(tmp_path / "weights"))])
    assert result.exit_code == 2 and f"{config.resolve()}: changed since it was recorded in {run}" in result.output
    assert result.output.count("\n") == 1
    config.unlink()
    result = _cli([*sweep, "--model-path", str(tmp_path / "weights")])
    assert result.exit_code == 2 and f"--lightx2v-config {config.resolve()}: no such file" in result.output


# What runs for real on LightX2V: its transformer model and scheduler on the trained tiny weights (`TinyLightX2V`),
# through the same backend interface (run, observing, caching) that `record` and `sweep` use, compared with the
# diffusers backend; and, further down, `LightX2VQwenImage` on LightX2V's full runner (text encoder, VAE encoder,
# denoising, VAE decoder) on a tiny random model written per session, through `teacal record` and `teacal sweep`.
TINY = "tiny-qwen-image-edit"


@pytest.fixture(scope="session")
def tiny_backend(tl, tiny_dir):
    from calib.backends.lightx2v import recording_config
    from tests.lightx2v_tiny import TinyLightX2V

    return TinyLightX2V(tiny_dir, **recording_config(TINY))


@pytest.fixture(scope="session")
def prompt_items():
    from calib.prompts import PromptItem

    return [PromptItem("cat-hat", "put a hat on the cat", "skimage:chelsea", "blurry and dark", REPO),
            PromptItem("rocket-night", "make it night", "skimage:rocket", "", REPO)]


def _rel_diff(a, b) -> float:
    return float(((a - b).abs() / b.abs()).max())


@pytest.mark.lightx2v
def test_lightx2v_trace_matches_the_diffusers_backend(tiny_backend, prompt_items, record_property):
    """record's loop on both backends, same tiny weights: the same trace columns, rows and (to bf16) values."""
    import numpy as np

    from calib.backends.tiny import TinyQwenImageEdit
    from calib.record import TraceRecorder, Unit
    from calib.runfiles import TRACE_COLUMNS, trace_columns
    from tests.lightx2v_tiny import TINY_NEGATIVE_PROMPT

    diffusers_backend = TinyQwenImageEdit(dtype=torch.bfloat16)  # LightX2V runs Qwen-Image in bf16
    frames = {}
    for name, backend in (("lightx2v", tiny_backend), ("diffusers", diffusers_backend)):
        for seed, item in enumerate(prompt_items):  # as record does: one recorder per generation
            item = item if item.negative_prompt else dataclasses.replace(item, negative_prompt=TINY_NEGATIVE_PROMPT)
            unit = Unit(item, seed, STEPS, SIZE)
            recorder = TraceRecorder(max_gap=4, residual_tokens=0)
            with backend.observing(recorder.on_call):
                generation = backend.run(item, seed, STEPS, 4.0, SIZE)
            frames[name, item.id] = recorder.frame(unit), np.asarray(generation.image, dtype=float)
            assert generation.image.size == SIZE and 0 < generation.denoise_seconds <= generation.seconds
    for item in prompt_items:
        (lx, lx_image), (df, df_image) = frames["lightx2v", item.id], frames["diffusers", item.id]
        assert list(lx.columns) == trace_columns(4) and set(TRACE_COLUMNS) <= set(lx.columns)
        assert lx[["prompt_id", "seed", "step", "branch"]].equals(df[["prompt_id", "seed", "step", "branch"]])
        values = ["x_temb", "x_modin", "x_sigma", "y_output", "y_residual"]
        # each branch's first step has no previous value: null on both, never 0; every later value is finite
        assert lx[lx["step"] == 0][values].isna().all().all() and df[df["step"] == 0][values].isna().all().all()
        assert np.isfinite(lx[lx["step"] > 0][values].to_numpy()).all()
        np.testing.assert_allclose(lx[["timestep", "sigma", "x_sigma"]], df[["timestep", "sigma", "x_sigma"]], rtol=1e-6)
        later = lx["step"] > 0
        worst = {c: _rel_diff(lx[later][c], df[later][c]) for c in values}
        for column, value in worst.items():
            record_property(f"{item.id}_{column}", value)
        print(item.id, "LightX2V vs diffusers (bf16), worst relative difference:", json.dumps({k: float(f"{v:.3g}") for k, v in worst.items()}))
        # Each backend integrates its own bf16 trajectory, so rounding compounds over the steps, and y is a relative
        # difference of consecutive predictions, which magnifies it (measured on f8aee98: worst 2.0%, mean 0.5%).
        # Both stay far below the fit's own held-out error (MAE ~0.05 on y ~0.1), so a preset transfers.
        assert max(worst.values()) < 5e-2
        mean = {c: float(((lx[later][c] - df[later][c]).abs() / df[later][c].abs()).mean()) for c in values}
        assert max(mean.values()) < 1e-2, mean
        assert np.abs(lx_image - df_image).mean() < 2.0  # 0..255


@pytest.mark.lightx2v
def test_recording_on_lightx2v_does_not_change_the_image(tiny_backend, tiny_dir, prompt_items):
    """The recording preset (threshold 0) computes every call: the image is stock LightX2V's, bit for bit."""
    from tests.lightx2v_tiny import TinyLightX2V

    plain = TinyLightX2V(tiny_dir)  # "NoCaching": LightX2V's own infer class
    assert type(plain.transformer_infer).__name__ == "QwenImageTransformerInfer"
    item = prompt_items[0]
    calls = []
    with tiny_backend.observing(calls.append):
        recorded = tiny_backend.run(item, 0, STEPS, 4.0, SIZE)
    stock = plain.run(item, 0, STEPS, 4.0, SIZE)
    assert len(calls) == 2 * STEPS and all(c.computed and c.prediction is not None for c in calls)
    assert recorded.image.tobytes() == stock.image.tobytes() and (recorded.latents == stock.latents).all()
    assert tiny_backend.transformer_infer.stats.skipped == 0


@pytest.mark.lightx2v
def test_recording_ignores_a_configs_own_teacache_keys(tl, tiny_dir):
    """A LightX2V config exported by `teacal export` can be recorded with: the recording preset (every call
    computed) takes the place of its inline coefficients."""
    from calib.backends.lightx2v import recording_config

    config = json.loads((REPO / "presets/lightx2v/tiny_qwen_image_edit_tea.json").read_text())
    infer = build(tiny_dir, **{**config, **recording_config(TINY)}).transformer_infer
    assert infer.threshold == 0.0 and infer.preset.calibration["purpose"].startswith("recording")


@pytest.mark.lightx2v
def test_caching_interface_as_sweep_uses_it(tiny_backend, prompt_items):
    """sweep's calls on the backend: a preset and threshold skip calls, a fixed schedule is followed, and leaving
    `caching()` gives the uncached image again."""
    import numpy as np

    from calib.simulate import StaticSchedulePolicy

    item = prompt_items[0]
    uncached = tiny_backend.run(item, 0, STEPS, 4.0, SIZE).image
    preset = Preset(model=TINY, signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=0.3)
    with tiny_backend.caching(preset, SKIPPING) as cache:
        cached = tiny_backend.run(item, 0, STEPS, 4.0, SIZE).image
        stats = cache.stats()
        assert 0 < stats.skipped and stats.computed + stats.skipped == 2 * STEPS
        assert cache.block_forwards() == stats.computed * tiny_backend.num_blocks == stats.computed * TRANSFORMER_CONFIG["num_layers"]
        assert stats.schedule("cond")[0] and stats.schedule("cond")[-1]
    assert cached.tobytes() != uncached.tobytes()
    schedule = np.array([True, True, False, True, False, False, True, True])
    with tiny_backend.caching(preset, None, StaticSchedulePolicy(preset, schedule)) as cache:
        tiny_backend.run(item, 0, STEPS, 4.0, SIZE)
        assert cache.stats().schedule("cond") == cache.stats().schedule("uncond") == schedule.tolist()
        assert cache.block_forwards() == 2 * int(schedule.sum()) * tiny_backend.num_blocks
    again = tiny_backend.run(item, 0, STEPS, 4.0, SIZE).image
    assert again.tobytes() == uncached.tobytes()
    assert tiny_backend.transformer_infer.stats.skipped == 0


@pytest.mark.lightx2v
@pytest.mark.parametrize("offload", [None, "model", "block"])
def test_plain_runs_lightx2vs_own_infer_with_the_threshold_zero_latents(tl, tiny_dir, request_inputs, monkeypatch, offload):
    """`plain()`, sweep's uncached baseline: every call runs the infer class "NoCaching" picks (the offload one under
    cpu_offload) on the same object, with its own block loop (LightX2V's offloading one at block granularity); no
    method of TeaCache's classes runs and no observer is called. The latents are those of the threshold-0 TeaCache
    run (what record makes the references with) and of stock LightX2V, bit for bit; leaving plain() gives TeaCache
    back its calls, its state as it was."""
    import collections
    import inspect

    from lightx2v.models.networks.qwen_image.infer.offload.transformer_infer import QwenImageOffloadTransformerInfer
    from lightx2v.models.networks.qwen_image.infer.transformer_infer import QwenImageTransformerInfer

    from calib.backends.lightx2v import recording_config, stock_infer_class

    extra = {} if offload is None else {"cpu_offload": True, "offload_granularity": offload}
    stock = build(tiny_dir, **extra)  # "NoCaching"
    lx = build(tiny_dir, **recording_config(TINY), **extra)
    infer = lx.transformer_infer
    assert stock_infer_class(infer) is type(stock.transformer_infer) is (QwenImageOffloadTransformerInfer if offload else QwenImageTransformerInfer)
    block_loop = "infer_with_blocks_offload" if offload == "block" else "infer_calculating"
    assert infer.infer_func.__name__ == block_loop
    calls = []
    with lx.observing(calls.append):
        recorded, _, _ = run(lx, request_inputs)
    assert len(calls) == 2 * STEPS
    recorded_stats = infer.stats

    ran = collections.Counter()

    def counting(fn, name):
        def counted(*args, **kwargs):
            ran[name] += 1
            return fn(*args, **kwargs)
        return counted

    for cls in (tl.QwenImageTeaCachingTransformerInfer, tl.QwenImageOffloadTeaCachingTransformerInfer):
        for name, fn in list(vars(cls).items()):
            if inspect.isfunction(fn):
                monkeypatch.setattr(cls, name, counting(fn, f"TeaCache {name}"))
    monkeypatch.setattr(QwenImageTransformerInfer, "infer", counting(QwenImageTransformerInfer.infer, "LightX2V infer"))
    monkeypatch.setattr(infer, "infer_func", counting(infer.infer_func, block_loop))
    with lx.plain():
        plain, _, _ = run(lx, request_inputs)
    assert ran == {"LightX2V infer": 2 * STEPS, block_loop: 2 * STEPS}, ran  # and no "TeaCache ..." entry
    monkeypatch.undo()
    assert torch.equal(plain, recorded) and torch.equal(plain, run(stock, request_inputs)[0])
    assert "infer" not in vars(infer) and "clear" not in vars(infer) and infer.stats is recorded_stats
    with lx.observing(calls.append):
        again, _, _ = run(lx, request_inputs)
    assert len(calls) == 4 * STEPS and torch.equal(again, recorded)
    with pytest.raises(RuntimeError, match="inside observing"), lx.observing(calls.append), lx.plain():
        pass


# The full runner's tiny model: every folder QwenImageRunner loads (`tests.tiny_qwen_folder`, which says what LightX2V
# fixes about it).


def tiny_runner_config(model_dir: Path, path: Path, base: dict | None = None, **changes) -> Path:
    """LightX2V settings (default: LightX2V's own configs/qwen_image/qwen_image_i2i_2511.json),
    torch kernels, and the template's drop index for the tiny tokenizer: the tokens of the system turn, as Qwen's
    tokenizer makes 64 of the edit template's (34 of the text-to-image one's)."""
    from transformers import Qwen2Tokenizer

    from tests.lightx2v_tiny import TINY_LIGHTX2V_CONFIG

    if base is None:
        base = json.loads((_lightx2v_src() / "configs/qwen_image/qwen_image_i2i_2511.json").read_text())
    config = {k: v for k, v in base.items() if not k.startswith(("feature_caching", "teacache"))}
    template = config["prompt_template_encode"]
    system = template[: template.index("<|im_start|>user")]
    config["prompt_template_encode_start_idx"] = len(Qwen2Tokenizer.from_pretrained(model_dir / "tokenizer")(system)["input_ids"])
    path.write_text(json.dumps({**config, **TINY_LIGHTX2V_CONFIG, **changes}))
    return path


@pytest.fixture(scope="session")
def runner_dir(tl, tmp_path_factory):
    return write_tiny_qwen_folder(tmp_path_factory.mktemp("tiny-runner"))


@pytest.fixture
def teacal_deps():
    """record writes parquet and sweep measures PSNR: teacal's own dependencies, which `make test-lightx2v` installs."""
    for module in ("pyarrow", "torchmetrics"):
        pytest.importorskip(module, reason=f"{module} (a teacal dependency) is missing here; `make test-lightx2v` installs it")


RUNNER_STEPS = 4
RUNNER_SIZE = (64, 48)


@pytest.mark.lightx2v
def test_record_and_sweep_run_lightx2vs_full_runner_on_tiny_weights(runner_dir, teacal_deps, tmp_path, monkeypatch):
    """`teacal record|sweep --backend lightx2v` on LightX2V's own QwenImageRunner.run_pipeline: Qwen2.5-VL text
    encoder, VAE encoder, denoising with TeaCache's infer class, VAE decoder, all on the tiny random weights."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from calib.runfiles import TRACE_COLUMNS

    config = tiny_runner_config(runner_dir, tmp_path / "tiny.json", min_custom_size=32)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(item) + "\n" for item in (
        {"id": "cat-hat", "prompt": "put a hat on the cat", "image": "skimage:chelsea", "negative_prompt": "blurry"},
        {"id": "rocket-night", "prompt": "make it night", "image": "skimage:rocket"})))
    run = tmp_path / "run"
    common = ["--model-path", str(runner_dir), "--lightx2v-config", str(config)]
    result = _cli(["record", str(run), "--model", "qwen-image-edit-2511", "--backend", "lightx2v", *common, "--prompts", str(prompts),
                   "--steps", str(RUNNER_STEPS), "--size", "x".join(map(str, RUNNER_SIZE)), "--seed", "0"])
    assert result.exit_code == 0, result.output
    trace = pd.read_parquet(run / "trace.parquet")
    assert set(TRACE_COLUMNS) <= set(trace.columns)
    assert len(trace) == 2 * RUNNER_STEPS * 2 and not trace.duplicated(["prompt_id", "seed", "step", "branch"]).any()
    assert set(trace["branch"]) == {"cond", "uncond"} and set(trace["step"]) == set(range(RUNNER_STEPS))
    values = ["x_temb", "x_modin", "x_sigma", "y_output", "y_residual"]
    assert trace[trace["step"] == 0][values].isna().all().all()  # every branch of every prompt starts afresh
    later = trace[trace["step"] > 0][values].to_numpy()
    assert np.isfinite(later).all() and (later > 0).all()
    for _, per_branch in trace.groupby(["prompt_id", "branch"]):
        assert per_branch["timestep"].is_monotonic_decreasing and per_branch["timestep"].iloc[0] == 1000
    for name in (unit_name(p, 0, RUNNER_STEPS, RUNNER_SIZE) for p in ("cat-hat", "rocket-night")):
        with Image.open(run / "refs" / f"{name}.png") as ref:
            assert ref.size == RUNNER_SIZE and np.asarray(ref).std() > 0

    preset = Preset(model="qwen-image-edit-2511", signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, threshold=0.1).save(tmp_path / "preset.json")
    from calib.backends.lightx2v import LightX2VModelBackend

    plain_runs = []
    plain = LightX2VModelBackend.plain

    def counted_plain(self):
        plain_runs.append(type(self).__name__)
        return plain(self)

    monkeypatch.setattr(LightX2VModelBackend, "plain", counted_plain)
    # `teacal sweep RUN --preset P ...`, the command shape of the sweep being rewritten (its table columns may change)
    result = _cli(["sweep", str(run), "--preset", str(preset), "--thresh", "0,100", "--model-path", str(runner_dir), "--metrics", "psnr",
                   "--oracle", "none", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "sweep" / "sweep.parquet")
    # the uncached runs went through LightX2V's own infer (plain()), one per prompt, and each reproduced the reference
    # recorded through TeaCache at threshold 0 bit for bit (sweep stops otherwise): the same image, PSNR inf
    uncached = table[table["method"] == "uncached"]
    assert plain_runs == ["LightX2VQwenImage"] * 2 and len(uncached) == 2
    assert (uncached["computed"] == 2 * RUNNER_STEPS).all() and np.isinf(uncached["psnr"]).all()
    teacache = table[table["method"] == "teacache"]
    zero, high = teacache[teacache["threshold"] == 0], teacache[teacache["threshold"] == 100]
    assert len(zero) == len(high) == 2
    # threshold 0 computes every call and gives the recorded reference bit for bit (PSNR inf)
    assert (zero["computed"] == 2 * RUNNER_STEPS).all() and (zero["skipped"] == 0).all() and np.isinf(zero["psnr"]).all()
    # a huge threshold skips every call between the first and the last step of each branch
    assert (high["computed"] == 2 * 2).all() and (high["skipped"] == 2 * (RUNNER_STEPS - 2)).all()
    assert (high["block_forwards"] == high["computed"] * 2).all() and np.isfinite(high["psnr"]).all()


@pytest.mark.lightx2v
def test_record_runs_the_text_to_image_runner_on_tiny_weights(runner_dir, teacal_deps, tmp_path):
    """Qwen-Image (t2i): the runner's text-only encoder path, no reference image, one row per (step, branch)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    # LightX2V's configs/qwen_image/qwen_image_t2i_2512.json without infer_steps (the scheduler needs one when built;
    # the backend gives it the model's, and --steps decides each run's)
    base = {"aspect_ratio": "16:9", "prompt_template_encode": "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
            "quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            "prompt_template_encode_start_idx": 34, "enable_cfg": True, "sample_guide_scale": 4.0}
    config = tiny_runner_config(runner_dir, tmp_path / "t2i.json", base, min_custom_size=32)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "cat", "prompt": "a cat in a hat"}) + "\n")
    result = _cli(["record", str(tmp_path / "run"), "--model", "qwen-image", "--backend", "lightx2v", "--model-path", str(runner_dir), "--lightx2v-config", str(config),
                   "--prompts", str(prompts), "--steps", "3", "--size", "64x48"])
    assert result.exit_code == 0, result.output
    trace = pd.read_parquet(tmp_path / "run" / "trace.parquet")
    assert len(trace) == 3 * 2 and set(trace["branch"]) == {"cond", "uncond"}
    assert trace[trace["step"] == 0]["x_temb"].isna().all() and np.isfinite(trace[trace["step"] > 0]["y_output"]).all()
    with Image.open(tmp_path / "run" / "refs" / f"{unit_name('cat', 0, 3, (64, 48))}.png") as ref:
        assert ref.size == (64, 48)


@pytest.mark.lightx2v
@pytest.mark.parametrize("granularity", ["model", "block"])
def test_runner_with_cpu_offload_gives_the_same_image(runner_dir, tmp_path, granularity):
    """With cpu_offload the runner moves the transformer itself (the backend leaves it where LightX2V put it); at
    block granularity LightX2V's offloading block loop runs the computed calls. Recorded, plain and cached (residuals
    kept on the CPU), the images are those of the run without offload, bit for bit."""
    from calib.backends.lightx2v import LightX2VQwenImage
    from calib.models import get_model
    from calib.prompts import PromptItem

    item = PromptItem("cat-hat", "put a hat on the cat", "skimage:chelsea", "", REPO)
    preset = Preset(model="qwen-image-edit-2511", signal="temb", coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1)
    images = {}
    for name, extra in (("plain", {}), ("offload", {"cpu_offload": True, "offload_granularity": granularity})):
        backend = LightX2VQwenImage(get_model("qwen-image-edit-2511"), runner_dir, tiny_runner_config(runner_dir, tmp_path / f"{name}.json", min_custom_size=32, **extra))
        try:
            calls = []
            with backend.observing(calls.append):
                image = backend.run(item, 0, RUNNER_STEPS, 4.0, RUNNER_SIZE).image
            assert len(calls) == RUNNER_STEPS * 2
            with backend.caching(preset, 100.0) as cache:
                cached = backend.run(item, 0, RUNNER_STEPS, 4.0, RUNNER_SIZE).image
                stats = cache.stats()
            assert (stats.computed, stats.skipped) == (2 * 2, 2 * (RUNNER_STEPS - 2))  # first and last step of each branch
            with backend.plain():  # LightX2V's own infer: the recorded image again
                assert backend.run(item, 0, RUNNER_STEPS, 4.0, RUNNER_SIZE).image.tobytes() == image.tobytes()
            images[name] = image.tobytes(), cached.tobytes()
        finally:
            backend.close()
    assert images["offload"] == images["plain"]
    assert images["plain"][0] != images["plain"][1]


@pytest.mark.lightx2v
def test_a_size_lightx2v_would_change_is_refused(runner_dir, teacal_deps, tmp_path):
    """QwenImageRunner raises a size below min_custom_size (256 by default) to it; the reference would not have the
    recorded size, so record stops with one line instead."""
    config = tiny_runner_config(runner_dir, tmp_path / "tiny.json")
    result = _cli(_record_args(tmp_path, "--model", "qwen-image-edit-2511", "--backend", "lightx2v", "--model-path", str(runner_dir),
                               "--lightx2v-config", str(config), "--steps", "2", "--size", "64x64"))
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]  # after record's header: one line, no traceback
    assert last.startswith("error: --size 64x64: LightX2V made a 256x256 image") and "Traceback" not in result.output
    assert not list((tmp_path / "o").glob("refs/*.png"))


@pytest.mark.lightx2v
@pytest.mark.parametrize("signal, adapt", [("sigma", {}), ("temb", {}), ("modin", {}), ("sigma", {"strength": 1.0, "typical": -1.0, "clip": 2.0})])
def test_diffusers_and_lightx2v_take_the_same_schedule(tiny_backend, prompt_items, signal, adapt):
    """The same preset and threshold on the same tiny weights: TeaCache in diffusers (hooks) and in LightX2V (its infer
    class) computes and skips the same calls, bit for bit, per branch, at thresholds from few to many skips; with the
    per-prompt ratio too (each runtime measures the residual change of the calls it computed)."""
    from calib.backends.tiny import TinyQwenImageEdit

    diffusers_backend = TinyQwenImageEdit(dtype=torch.bfloat16)  # LightX2V runs Qwen-Image in bf16
    preset = Preset(model=TINY, signal=signal, coefficients=(1.0, 0.0), ret_steps=1, cutoff_steps=-1, adapt=adapt)
    item = prompt_items[0]
    skipped = []
    for threshold in (0.05, 0.15, 0.4, 1.0):
        schedules = []
        for backend in (diffusers_backend, tiny_backend):
            with backend.caching(preset, threshold) as handle:
                backend.run(item, 0, STEPS, 4.0, SIZE)
                stats = handle.stats()
            schedules.append({branch: stats.schedule(branch) for branch in stats.branches})
        assert schedules[0] == schedules[1], (signal, threshold)
        skipped.append(sum(not c for s in schedules[0].values() for c in s))
    assert skipped[0] < skipped[-1] and 0 < skipped[-1] < 2 * (STEPS - 2) + 1  # the thresholds span few to many skips
