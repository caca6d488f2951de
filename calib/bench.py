"""`make bench`: TeaCache's and recording's costs on the tiny model, as ratios measured in one run.

(a) overhead per transformer call at threshold 0 (every call computed) against the plain call; target <= 2%
(b) a cached run's wall-time speedup as a fraction of the ideal ratio (calls / computed calls); target >= 0.85
(c) recording's overhead against a plain run; target <= 5%

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
import time
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from skimage import data

from calib.backends import synchronize
from calib.backends.tiny import TinyQwenImageEdit
from teacache.preset import Preset

PROMPT = "make the suit red"


@contextlib.contextmanager
def timing_calls(model: TinyQwenImageEdit, into: list[float]) -> Iterator[None]:
    """Append each transformer call's seconds to `into`; torch's module hooks sit outside diffusers' hooks."""
    started = []

    def before(module, args, kwargs):
        synchronize(model.device)
        started.append(time.perf_counter())

    def after(module, args, kwargs, output):
        synchronize(model.device)
        into.append(time.perf_counter() - started.pop())

    handles = [model.transformer.register_forward_pre_hook(before, with_kwargs=True),
               model.transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="square image size in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-fraction", type=float, default=0.5, help="target fraction of calls skipped in (b)")
    args = parser.parse_args()

    model = TinyQwenImageEdit()
    image = Image.fromarray(data.astronaut())
    size = (args.size, args.size)

    def plain() -> float:
        return model.generate(PROMPT, image, seed=0, steps=args.steps, size=size)[1]["denoise_seconds"]

    def timed(name: str, run=plain) -> None:
        calls: list[float] = []
        with timing_calls(model, calls):
            run()
        per_call[name].append(calls)

    def cached(preset: Preset, threshold: float) -> float:
        with model.caching(preset, threshold, args.steps):
            return plain()

    def recorded() -> None:
        with model.observing():
            plain()

    base = Preset(model="tiny-qwen-image-edit", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1)
    threshold = find_threshold(model, base, args, image)
    with model.caching(base, threshold, args.steps) as cache:
        model.generate(PROMPT, image, seed=0, steps=args.steps, size=size)
        stats = cache.stats()
    ideal = (stats.computed + stats.skipped) / stats.computed
    plain()  # warm-up: first-call allocations stay out of every timing
    per_call: dict[str, list[list[float]]] = {"plain": [], "temb@0": [], "modin@0": [], "recorded": [], "plain again": []}
    loop: dict[str, list[float]] = {"plain": [], "cached": []}
    variants = [("plain", plain), ("temb@0", lambda: cached(base, 0.0)), ("modin@0", lambda: cached(base.replace(signal="modin"), 0.0)),
                ("recorded", recorded), ("plain again", plain)]
    for repeat in range(args.repeats):
        # rotated each repeat, so that no variant always runs right after the same neighbour
        for name, run in variants[repeat % len(variants):] + variants[: repeat % len(variants)]:
            timed(name, run)
        loop["plain"].append(plain())
        loop["cached"].append(cached(base, threshold))
    # per call position, the fastest repeat; summed over the positions
    call_time = {k: float(np.min(np.array(v), axis=0).sum()) for k, v in per_call.items()}
    # the baseline pools both plain series: it gets the most chances to run undisturbed, so overheads err high
    call_time["baseline"] = float(np.min(np.array(per_call["plain"] + per_call["plain again"]), axis=0).sum())
    fastest = {k: min(v) for k, v in loop.items()}

    def overhead(name: str, against: str = "baseline") -> str:
        return f"{(call_time[name] / call_time[against] - 1) * 100:+.2f}%"

    speedup = fastest["plain"] / fastest["cached"]
    calls = len(per_call["plain"][0])
    print(f"tiny-qwen-image-edit, {args.size}x{args.size}, {args.steps} steps, CFG 4, {args.repeats} interleaved repeats, "
          f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads")
    print(f"plain transformer call: {call_time['baseline'] / calls * 1000:.1f} ms ({calls} calls a run); "
          f"plain denoising loop: {fastest['plain']:.3f} s")
    print(f"noise floor: the same plain calls, timed as two series, differ by {overhead('plain again', 'plain')}")
    for signal in ("temb", "modin"):
        print(f"(a) TeaCache overhead per call at threshold 0, signal {signal}: {overhead(signal + '@0')}  (target <= 2%)")
    print(f"(b) cached speedup {speedup:.2f}x at threshold {threshold:g}, ideal {ideal:.2f}x: "
          f"fraction of ideal {speedup / ideal:.3f}  (target >= 0.85)")
    print(f"(c) recording overhead per call: {overhead('recorded')}  (target <= 5%)")


def find_threshold(model: TinyQwenImageEdit, preset: Preset, args, image) -> float:
    """The smallest threshold that skips about the requested fraction of calls on this prompt."""
    for threshold in (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        with model.caching(preset, threshold, args.steps) as cache:
            model.generate(PROMPT, image, seed=0, steps=args.steps, size=(64, 64))
            stats = cache.stats()
        if stats.skipped / (stats.computed + stats.skipped) >= args.skip_fraction:
            return threshold
    return threshold


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - started:.0f} s")
