"""`make bench` and `make bench-real` print every figure they promise, as finite ratios with their targets.

Speed itself is never asserted (DESIGN.md: the benchmark prints ratios); these runs use tiny sizes, so they take
seconds, and check that each figure is there and is a number.
"""

from __future__ import annotations

import math
import re

from calib import bench

NUMBER = r"([-+]?\d+\.\d+)"
FIGURES = {
    "call": rf"plain transformer call: {NUMBER} ms \((\d+) calls a run\); plain denoising loop: {NUMBER} s",
    "noise": rf"noise floor: the same plain calls, timed as two series, differ by {NUMBER}%",
    "temb": rf"\(a\) TeaCache overhead per call at threshold 0, signal temb: {NUMBER}%  \(target <= 2%\)",
    "modin": rf"\(a\) TeaCache overhead per call at threshold 0, signal modin: {NUMBER}%  \(target <= 2%\)",
    "fraction": rf"\(b\) cached speedup {NUMBER}x at .*, ideal {NUMBER}x: fraction of ideal {NUMBER}  \(target >= 0.85\)",
    "memory": rf"\(d\) peak memory \(.*\) of a plain run: {NUMBER} GiB; noise floor: plain again x{NUMBER}",
}


def recording(gap: int, full_history: bool) -> str:
    history = rf", {NUMBER}% at full history \(steps {gap}-\d+\)" if full_history else ""
    return rf"\(c\) recording overhead per call, max_gap {gap}: {NUMBER}% over the run{history}  \(target <= 5%\)"


def memory(variant: str) -> str:
    return rf"\(d\) peak memory, {re.escape(variant)}: x{NUMBER} \({NUMBER} GiB\)"


def parse(out: str, patterns: dict[str, str]) -> dict[str, tuple[float, ...]]:
    """Every pattern's numbers; each pattern must match and every number be finite."""
    found = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, out)
        assert match, (name, out)
        found[name] = tuple(float(g) for g in match.groups())
        assert all(math.isfinite(g) for g in found[name]), (name, match.group(0))
    return found


def test_make_bench_prints_each_ratio(capsys):
    """`make bench` on a small size: every figure the README promises is printed, finite, with its target."""
    bench.main(["--size", "64", "--steps", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    patterns = dict(FIGURES, recording=recording(bench.RECORD_GAP, full_history=False))
    patterns |= {name: memory(name) for name in ("temb@0", "modin@0", bench.recorded_name(bench.RECORD_GAP))}
    figures = parse(out, patterns)
    assert figures["fraction"][1] > 1.5  # the bench threshold really skips calls


def test_make_bench_real_prints_every_figure_at_reduced_size(capsys):
    """`make bench-real`'s script at a tiny size, weights built in bf16: every figure printed and finite."""
    bench.main(["real", "--device", "cpu", "--dtype", "bfloat16", "--layers", "2", "--width", "128", "--tokens", "16",
                "--text-tokens", "8", "--steps", "6", "--repeats", "1", "--gaps", "4,2"])
    out = capsys.readouterr().out
    assert "random parameters in bfloat16, built on cpu" in out
    assert "16 target + 16 reference tokens, 8 text tokens; 6 steps" in out
    assert "REDUCED size: a smoke test" in out
    patterns = dict(FIGURES, gap4=recording(4, full_history=True), gap2=recording(2, full_history=True))
    patterns |= {name: memory(name) for name in ("temb@0", "modin@0", bench.recorded_name(4), bench.recorded_name(2))}
    figures = parse(out, patterns)
    assert figures["call"][1] == 12  # 6 steps x 2 CFG branches
    assert "at a static schedule computing 3 of 6 steps" in out
    assert figures["fraction"][1] == 2.0  # half the calls computed
    assert "final latents finite (random weights): True" in out
