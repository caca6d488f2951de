"""`make bench` and `make bench-real`: TeaCache's and recording's costs, as ratios measured in one run.

`python -m calib.bench` (make bench) runs the embedded tiny model. `python -m calib.bench real` (make bench-real)
runs diffusers' `QwenImageTransformer2DModel` at Qwen-Image's published dimensions (60 layers of width 3072) with
random bf16 weights, on the target + reference tokens of a 1024² edit; without CUDA it runs at reduced layers,
width and tokens, as a smoke test. Both print:

(a) overhead per transformer call at threshold 0 (every call computed) against the plain call, each signal (temb,
    modin, sigma); target <= 2%
(b) a cached run's wall-time speedup as a fraction of the ideal ratio (calls / computed calls); target >= 0.85
(c) recording's overhead per call against a plain run (`calib.record.TraceRecorder`, as `teacal record` observes,
    reuse errors against the last max_gap calls included); target <= 5%
(d) each variant's peak memory against the plain run's (CUDA max_memory_allocated, or the peak RSS on CPU)

(a) and (c) time every transformer call from outside all hooks, so TeaCache's signal, decision and residual
bookkeeping and the recorder's reads are inside the timing; recording does all its work in such calls. Each call
position keeps its fastest repeat (interference on a shared machine only ever adds time) and the positions are
summed, which is far steadier than whole-run totals. Variants are interleaved in a rotating order, so drift and
neighbours hit all alike. A second plain series, timed against the first, prints the noise floor to read the
percentages against; the baseline is the faster of the two at each call position. (b) is the wall time of the
whole denoising loop. Device synchronised around every timing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calib.backends import HookedTransformerBackend, resolve_device, resolve_dtype, synchronize
from calib.backends.loop import Conditioning, denoise, qwen_scheduler
from calib.record import RecordRequest, TraceRecorder
from calib.simulate import StaticSchedulePolicy
from teacache.preset import SIGNALS, Preset

PROMPT = "make the suit red"
# What a recording really pays: `teacal record`'s defaults (--max-gap 16, --residual-tokens 64).
RECORD_GAP = RecordRequest.max_gap
RESIDUAL_TOKENS = RecordRequest.residual_tokens

# Qwen-Image's transformer/config.json, as diffusers' QwenImageTransformer2DModel defaults spell it; zero_cond_t as in
# Qwen-Image-Edit-2511 (reference tokens modulated at t=0).
QWEN_IMAGE_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
    zero_cond_t=True,
)
# The sizes `make bench-real` runs: with CUDA the real model's, on a target + reference pair of a 1024x1024 edit
# (128x128 latents packed 2x2 into 64x64 = 4096 tokens each) and Qwen2.5-VL prompt embeddings of about 200 tokens
# (the reference image's vision tokens, then the prompt's); without CUDA a reduced one that finishes in well under
# two minutes on two busy CPU cores. Every value can be set by its flag.
FULL = dict(layers=60, width=3072, tokens=4096, text_tokens=200, steps=20, repeats=2)
REDUCED = dict(layers=2, width=128, tokens=256, text_tokens=64, steps=18, repeats=2)

# -- timing and memory ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timing_calls(transformer: torch.nn.Module, device, into: list[float]) -> Iterator[None]:
    """Append each transformer call's seconds to `into`; torch's module hooks sit outside diffusers' hooks."""
    started = []

    def before(module, args, kwargs):
        synchronize(device)
        started.append(time.perf_counter())

    def after(module, args, kwargs, output):
        synchronize(device)
        into.append(time.perf_counter() - started.pop())

    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True),
               transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PeakMemory:
    """One run's peak memory: CUDA's max_memory_allocated, or on CPU the process's peak RSS (VmHWM, which Linux
    resets through /proc/self/clear_refs; where it cannot, the peak since the process started)."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.what = "CUDA max_memory_allocated" if self.cuda else "peak RSS"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
        except OSError:
            self.what = "peak RSS since the process started"

    def peak(self) -> int:
        """Bytes."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as file:
                return int(re.search(r"VmHWM:\s+(\d+) kB", file.read()).group(1)) * 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free(device) -> None:
    """Drop what the last phase left behind, so the next one starts from the same memory."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# -- the measurement, shared by both benches --------------------------------------------------------------------


@dataclass
class Measured:
    steps: int
    repeats: int
    per_call: dict[str, np.ndarray]  # variant -> [repeats, calls] seconds
    loop: dict[str, float]  # "plain" / "cached" -> fastest whole denoising loop, seconds
    peaks: dict[str, int]  # variant -> largest peak over its runs, bytes
    memory_kind: str
    ideal: float  # calls / computed calls of the cached run

    @property
    def calls(self) -> int:
        return self.per_call["plain"].shape[1]

    def fastest(self, names: Sequence[str], first: int = 0) -> float:
        """The fastest repeat at each call position (pooled over `names`), summed over the positions from `first`."""
        return float(np.concatenate([self.per_call[n] for n in names]).min(axis=0)[first:].sum())

    def overhead(self, name: str, against: str = "baseline", from_step: int = 0) -> float:
        """Per-call time over the baseline's, minus one; `from_step` keeps the calls from that step on.

        The baseline pools both plain series: it gets the most chances to run undisturbed, so overheads err high.
        """
        first = from_step * self.calls // self.steps
        base = ("plain", "plain again") if against == "baseline" else (against,)
        return self.fastest((name,), first) / self.fastest(base, first) - 1


def identity_preset(model: str) -> Preset:
    """TeaCache with the identity rescale on temb: the preset every variant runs (its threshold set per variant)."""
    return Preset(model=model, signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1)


def recorded_name(gap: int) -> str:
    return f"recorded, max_gap {gap}"


def variants_of(backend: HookedTransformerBackend, run: Callable[[], float], gaps: Sequence[int]) -> list[tuple[str, Callable[[], object]]]:
    """What (a) and (c) time: the plain run, TeaCache at threshold 0 on each signal, recording at each max_gap, and
    the plain run again (the noise floor between two identical variants)."""
    base = identity_preset(backend.model_name)

    def at_zero(preset: Preset) -> Callable[[], None]:
        def variant() -> None:
            with backend.caching(preset, 0.0):
                run()
        return variant

    def recorded(gap: int) -> Callable[[], None]:
        def variant() -> None:
            recorder = TraceRecorder(gap, RESIDUAL_TOKENS)  # a fresh one per generation, as record makes per unit
            with backend.observing(recorder.on_call):
                run()
        return variant

    variants = [("plain", run), *((f"{signal}@0", at_zero(base.replace(signal=signal))) for signal in SIGNALS)]
    return variants + [(recorded_name(gap), recorded(gap)) for gap in gaps] + [("plain again", run)]


def measure(
    backend: HookedTransformerBackend,
    run: Callable[[], float],
    steps: int,
    repeats: int,
    cached: Callable[[], contextlib.AbstractContextManager],
    gaps: Sequence[int] = (RECORD_GAP,),
    budget_s: float | None = None,
    echo: Callable[[str], None] = print,
) -> Measured:
    """Time `run` (one generation on `backend`, on its `device`; returns its denoising seconds) plain, under TeaCache at
    threshold 0, recorded at each max_gap of `gaps`, and inside `cached()` (a `backend.caching(...)` context) for (b).

    `budget_s` caps the timed repeats' estimated seconds (from the warm-up run): fewer repeats, never fewer than one.
    """
    device = backend.device
    variants = variants_of(backend, run, gaps)
    started = time.perf_counter()
    run()  # warm-up: first-call allocations stay out of every timing; its time sizes the repeats
    warm_up = time.perf_counter() - started
    with cached() as cache:
        run()
        stats = cache.stats()
    free(device)
    per_repeat = warm_up * (len(variants) + 2)  # the variants and (b)'s plain and cached loops; errs high
    if budget_s is not None and repeats * per_repeat > budget_s:
        repeats = max(1, int(budget_s // per_repeat))
        echo(f"budget {budget_s:.0f} s: {repeats} repeat(s)")
    echo(f"warm-up run {warm_up:.1f} s; timing {repeats} repeat(s) of {len(variants) + 2} runs, about {repeats * per_repeat:.0f} s at most")
    memory = PeakMemory(device)
    per_call: dict[str, list[list[float]]] = {name: [] for name, _ in variants}
    peaks: dict[str, int] = {}
    loop: dict[str, list[float]] = {"plain": [], "cached": []}
    for repeat in range(repeats):
        # rotated each repeat, so that no variant always runs right after the same neighbour
        for name, variant in variants[repeat % len(variants):] + variants[: repeat % len(variants)]:
            calls: list[float] = []
            memory.reset()
            with timing_calls(backend.transformer, device, calls):
                variant()
            peaks[name] = max(peaks.get(name, 0), memory.peak())
            per_call[name].append(calls)
            free(device)
        loop["plain"].append(run())
        with cached():
            loop["cached"].append(run())
        free(device)
    return Measured(steps=steps, repeats=repeats, per_call={k: np.array(v) for k, v in per_call.items()}, loop={k: min(v) for k, v in loop.items()},
                    peaks=peaks, memory_kind=memory.what, ideal=(stats.computed + stats.skipped) / stats.computed)


def report(measured: Measured, cached_label: str, gaps: Sequence[int], echo: Callable[[str], None] = print) -> None:
    """Print (a)-(d); every figure on its own line, each with its target where it has one."""
    m = measured

    def pct(value: float) -> str:
        return f"{value * 100:+.2f}%"

    echo(f"plain transformer call: {m.fastest(('plain', 'plain again')) / m.calls * 1000:.1f} ms ({m.calls} calls a run); "
         f"plain denoising loop: {m.loop['plain']:.3f} s; {m.repeats} interleaved repeat(s)")
    echo(f"noise floor: the same plain calls, timed as two series, differ by {pct(m.overhead('plain again', 'plain'))}")
    for signal in SIGNALS:
        echo(f"(a) TeaCache overhead per call at threshold 0, signal {signal}: {pct(m.overhead(signal + '@0'))}  (target <= 2%)")
    speedup = m.loop["plain"] / m.loop["cached"]
    echo(f"(b) cached speedup {speedup:.2f}x at {cached_label}, ideal {m.ideal:.2f}x: "
         f"fraction of ideal {speedup / m.ideal:.3f}  (target >= 0.85)")
    for gap in gaps:
        line = f"(c) recording overhead per call, max_gap {gap}: {pct(m.overhead(recorded_name(gap)))} over the run"
        if m.steps > gap:  # from step `gap` on, the recorder compares with a full history of `gap` calls
            line += f", {pct(m.overhead(recorded_name(gap), from_step=gap))} at full history (steps {gap}-{m.steps - 1})"
        echo(line + "  (target <= 5%)")
    plain = m.peaks["plain"]
    echo(f"(d) peak memory ({m.memory_kind}) of a plain run: {plain / 2**30:.3f} GiB; "
         f"noise floor: plain again x{m.peaks['plain again'] / plain:.4f}")
    for name in [n for n in m.peaks if n not in ("plain", "plain again")]:
        echo(f"(d) peak memory, {name}: x{m.peaks[name] / plain:.4f} ({(m.peaks[name] - plain) / 2**30:+.3f} GiB)")


# -- make bench: the tiny model ---------------------------------------------------------------------------------


def tiny_main(argv: Sequence[str]) -> None:
    from PIL import Image
    from skimage import data

    from calib.backends.tiny import TinyQwenImageEdit

    parser = argparse.ArgumentParser(prog="python -m calib.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="square image size in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-fraction", type=float, default=0.5, help="target fraction of calls skipped in (b)")
    args = parser.parse_args(argv)

    model = TinyQwenImageEdit()
    image = Image.fromarray(data.astronaut())
    size = (args.size, args.size)

    def run() -> float:
        return model.generate(PROMPT, image, seed=0, steps=args.steps, size=size).denoise_seconds

    base = identity_preset(model.model_name)
    threshold = find_threshold(model, base, args, image)
    print(f"tiny-qwen-image-edit, {args.size}x{args.size}, {args.steps} steps, CFG 4, "
          f"torch {torch.__version__} on {torch.get_num_threads()} CPU thread(s)")
    measured = measure(model, run, args.steps, args.repeats, lambda: model.caching(base, threshold))
    report(measured, f"threshold {threshold:g}", (RECORD_GAP,))


def find_threshold(model, preset: Preset, args, image) -> float:
    """The smallest threshold that skips about the requested fraction of calls on this prompt."""
    for threshold in (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        with model.caching(preset, threshold) as cache:
            model.generate(PROMPT, image, seed=0, steps=args.steps, size=(64, 64))
            stats = cache.stats()
        if stats.skipped / (stats.computed + stats.skipped) >= args.skip_fraction:
            return threshold
    return threshold


# -- make bench-real: the real model's dimensions, random weights -----------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class RandomQwenImageEdit(HookedTransformerBackend):
    """`QwenImageTransformer2DModel` with random weights, denoising random latents of an edit: the real model's cost.

    The weights are made where they live: under ``torch.device(device)`` and a default dtype of `dtype` (as diffusers'
    ``from_pretrained(torch_dtype=...)`` instantiates), every parameter is allocated on the device in that dtype and
    initialised there by its module's own init, seeded. No float32 copy and no CPU copy ever exist. (A meta-device
    build would not do: the RoPE tables are plain tensors, not buffers, and ``to_empty`` leaves them on meta.)
    """

    model_name = "qwen-image-edit-2511"

    def __init__(self, layers: int, width: int, tokens: int, text_tokens: int, device: str, dtype: torch.dtype, seed: int = 0) -> None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise SystemExit(f"--tokens {tokens}: expected a square number of target tokens (4096 = 64x64 for 1024x1024)")
        if width % QWEN_IMAGE_CONFIG["attention_head_dim"]:
            raise SystemExit(f"--width {width}: expected a multiple of the head dimension {QWEN_IMAGE_CONFIG['attention_head_dim']}")
        from diffusers import QwenImageTransformer2DModel

        self.config = dict(QWEN_IMAGE_CONFIG, num_layers=layers, num_attention_heads=width // QWEN_IMAGE_CONFIG["attention_head_dim"])
        self.device = torch.device(device)
        self.dtype = dtype
        torch.manual_seed(seed)
        with torch.device(self.device), default_dtype(dtype):
            self.transformer = QwenImageTransformer2DModel(**self.config).eval().requires_grad_(False)
        wrong = {p.dtype for p in self.transformer.parameters()} - {dtype}
        if wrong:
            raise RuntimeError(f"parameters built in {wrong}, not {dtype}")
        self.parameter_count = sum(p.numel() for p in self.transformer.parameters())
        channels = QWEN_IMAGE_CONFIG["in_channels"]
        generator = torch.Generator().manual_seed(seed)

        def random(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(self.device, dtype)

        self.latents, self.reference = random(1, tokens, channels), random(1, tokens, channels)
        # Batch 1 with every text token valid: the pipelines pass no mask then (encode_prompt drops an all-true one).
        self.conditioning = Conditioning(random(1, text_tokens, self.config["joint_attention_dim"]), None,
                                         random(1, text_tokens, self.config["joint_attention_dim"]), None)
        self.img_shapes = [[(1, side, side), (1, side, side)]]  # target, then the reference image
        self.scheduler = qwen_scheduler()
        self.finite = True

    @torch.no_grad()
    def denoise(self, steps: int, cfg: float = 4.0) -> float:
        """One generation's denoising loop (CFG as two cache_context branches); returns its seconds."""
        synchronize(self.device)
        started = time.perf_counter()
        latents = denoise(self.transformer, self.scheduler, self.latents, self.conditioning, self.img_shapes, steps, cfg,
                          image_latents=self.reference)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        self.finite = self.finite and bool(torch.isfinite(latents).all())
        return seconds


def real_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m calib.bench real", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="make bench-real: the figures of `make bench` at the real Qwen-Image-Edit's dimensions "
        "(random bf16 weights). With CUDA it runs the full size; without, a reduced one (a smoke test, not figures to quote).",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when present, LOCAL_RANK under torchrun), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU, where bf16 matmuls are emulated), bfloat16, float32")
    sizes = {"layers": "transformer blocks", "width": "inner dimension, heads x 128",
             "tokens": "target tokens, a square number; as many reference tokens", "text_tokens": "prompt embedding tokens per branch",
             "steps": f"denoising steps; more than {RECORD_GAP} to record with a full history", "repeats": "interleaved repeats"}
    for name, text in sizes.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"{text} (default: {FULL[name]} with CUDA, {REDUCED[name]} without)")
    parser.add_argument("--gaps", default=f"{RECORD_GAP},4", help="recording max_gap values to measure, comma-separated")
    parser.add_argument("--budget-s", type=float, default=420.0, help="cap on the timed repeats' estimated seconds (fewer repeats)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    full = device.startswith("cuda")
    dtype = resolve_dtype(args.dtype, device)
    size = {name: getattr(args, name) or (FULL if full else REDUCED)[name] for name in FULL}
    layers, width, tokens, steps = size["layers"], size["width"], size["tokens"], size["steps"]
    gaps = [int(g) for g in args.gaps.split(",") if g.strip()]

    started = time.perf_counter()
    bench = RandomQwenImageEdit(layers, width, tokens, size['text_tokens'], device, dtype, args.seed)
    synchronize(device)
    built = time.perf_counter() - started
    where = torch.cuda.get_device_name(device) if full else f"{torch.get_num_threads()} CPU thread(s)"
    real = all(size[k] == FULL[k] for k in ("layers", "width", "tokens"))
    print(f"QwenImageTransformer2DModel, {layers} layers, {width // 128} heads x 128 = {width}, joint_attention_dim "
          f"{bench.config['joint_attention_dim']}, zero_cond_t; {bench.parameter_count / 1e9:.3g}B random parameters in "
          f"{str(dtype).removeprefix('torch.')}, built on {device} in {built:.1f} s ({where}, torch {torch.__version__})")
    print(f"{tokens} target + {tokens} reference tokens, {size['text_tokens']} text tokens; {steps} steps, CFG 4 as "
          f"cond/uncond cache contexts; " + ("the real model's dimensions" if real else "REDUCED size: a smoke test, not figures to quote"))
    if full:
        print(f"weights: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated")

    schedule = np.arange(steps) % 2 == 0  # steps 0, 2, 4, ...: half the calls computed
    base = identity_preset(bench.model_name)
    policy = StaticSchedulePolicy(base, schedule)
    measured = measure(bench, lambda: bench.denoise(steps), steps, size["repeats"],
                       lambda: bench.caching(base, None, policy=policy), gaps, budget_s=args.budget_s)
    report(measured, f"a static schedule computing {int(schedule.sum())} of {steps} steps", gaps)
    print(f"final latents finite (random weights): {bench.finite}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["real"]:
        real_main(argv[1:])
    else:
        tiny_main(argv)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - started:.0f} s")
