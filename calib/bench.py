"""`make bench`: TeaCache's and recording's costs on the tiny model, as ratios measured in one run.

(a) overhead per transformer call at threshold 0 (every call computed) against the plain call; target <= 2%
(b) a cached run's wall-time speedup as a fraction of the ideal ratio (calls / computed calls); target >= 0.85
(c) recording's overhead against a plain run; target <= 5%

Runs are interleaved and repeated, and each figure is a ratio of medians, so slow drift on a shared machine
hits both sides alike. Timings cover the denoising loop (the part TeaCache changes), device synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image
from skimage import data

from calib.backends.tiny import TinyQwenImageEdit
from teacache.preset import Preset


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
        return model.generate("make the suit red", image, seed=0, steps=args.steps, size=size)[1]["denoise_seconds"]

    def cached(preset: Preset, threshold: float) -> tuple[float, float]:
        with model.caching(preset, threshold, args.steps) as cache:
            seconds = plain()
            stats = cache.stats()
        return seconds, (stats.computed + stats.skipped) / stats.computed

    def recorded() -> float:
        with model.observing():
            return plain()

    base = Preset(model="tiny-qwen-image-edit", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1)
    threshold = find_threshold(model, base, args, image, size)
    plain()  # warm-up: first-call allocations stay out of every timing
    timings: dict[str, list[float]] = {"plain": [], "temb@0": [], "modin@0": [], "cached": [], "recorded": []}
    ideal = 1.0
    for _ in range(args.repeats):
        timings["plain"].append(plain())
        timings["temb@0"].append(cached(base, 0.0)[0])
        timings["modin@0"].append(cached(base.replace(signal="modin"), 0.0)[0])
        seconds, ideal = cached(base, threshold)
        timings["cached"].append(seconds)
        timings["recorded"].append(recorded())
    median = {k: statistics.median(v) for k, v in timings.items()}
    speedup = median["plain"] / median["cached"]
    print(f"tiny-qwen-image-edit, {args.size}x{args.size}, {args.steps} steps, CFG 4, {args.repeats} interleaved repeats, "
          f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads")
    print(f"plain denoising loop: median {median['plain']:.3f} s")
    for signal in ("temb", "modin"):
        overhead = median[f"{signal}@0"] / median["plain"] - 1
        print(f"(a) TeaCache overhead per call at threshold 0, signal {signal}: {overhead * 100:+.2f}%  (target <= 2%)")
    print(f"(b) cached speedup {speedup:.2f}x at threshold {threshold:g}, ideal {ideal:.2f}x: fraction of ideal {speedup / ideal:.3f}  (target >= 0.85)")
    print(f"(c) recording overhead: {(median['recorded'] / median['plain'] - 1) * 100:+.2f}%  (target <= 5%)")


def find_threshold(model, preset: Preset, args, image, size) -> float:
    """The smallest threshold that skips about the requested fraction of calls on this prompt."""
    for threshold in (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        with model.caching(preset, threshold, args.steps) as cache:
            model.generate("make the suit red", image, seed=0, steps=args.steps, size=(64, 64))
            stats = cache.stats()
        if stats.skipped / (stats.computed + stats.skipped) >= args.skip_fraction:
            return threshold
    return threshold


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - started:.0f} s")
