"""`teacal fit`: the rescale polynomial from recorded traces, cross-validated by prompt, into a preset.

x is a signal's rel-L1 between consecutive steps; y the rel-L1 of the transformer output (or of the block
residual) over the same steps. The polynomial maps one to the other, so TeaCache's accumulator estimates how
far the output has moved since the last computed step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
from scipy.optimize import least_squares

from calib.errors import UserError
from calib.runfiles import check_finite, library_versions, load_run, load_trace, now_iso
from calib.simulate import threshold_for_speedup
from teacache.preset import SIGNALS, Preset

LOSSES = ("linear", "soft_l1", "huber", "cauchy")
SETTINGS_THAT_MUST_MATCH = ("model", "backend", "steps", "cfg", "size", "dtype", "weights")


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int, loss: str = "linear") -> np.ndarray:
    """Coefficients, highest power first (np.poly1d order). `linear` is plain least squares = np.polyfit."""
    if loss not in LOSSES:
        raise UserError(f"--loss {loss!r}: expected one of {', '.join(LOSSES)}")
    vandermonde = np.vander(x, degree + 1)
    scale = np.sqrt((vandermonde * vandermonde).sum(axis=0))  # column scaling, as np.polyfit does, for conditioning
    scale[scale == 0] = 1.0
    start = scipy.linalg.lstsq(vandermonde / scale, y)[0] / scale
    if loss == "linear":
        return start
    # Robust losses down-weight outlier steps; f_scale is the residual size where that starts.
    f_scale = float(np.median(np.abs(np.polyval(start, x) - y))) or 1e-3
    result = least_squares(lambda c: np.polyval(c, x) - y, start, loss=loss, f_scale=f_scale, x_scale=np.abs(start) + 1e-12, method="trf")
    return result.x


def r2(y: np.ndarray, predicted: np.ndarray) -> float:
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else float("nan")


def group_folds(groups: np.ndarray, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k folds of row indices; all rows of one group (prompt) fall in the same fold."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(unique)
    folds = []
    for i in range(k):
        test_groups = order[i::k]
        test = np.isin(groups, test_groups)
        folds.append((np.flatnonzero(~test), np.flatnonzero(test)))
    return folds


@dataclass(frozen=True)
class CrossValidation:
    signal: str
    degree: int
    r2: float
    mae: float
    points: int


def cross_validate(x, y, groups, degree: int, loss: str, k: int, signal: str) -> CrossValidation:
    predicted = np.empty_like(y)
    for train, test in group_folds(groups, k):
        predicted[test] = np.polyval(fit_polynomial(x[train], y[train], degree, loss), x[test])
    return CrossValidation(signal, degree, r2(y, predicted), float(np.mean(np.abs(y - predicted))), len(y))


def fit_points(trace: pd.DataFrame, signal: str, target: str, branch_mode: str, ret_steps: int, cutoff: int) -> pd.DataFrame:
    """Rows the polynomial is fit on: no forced step, no series' first step (it has no previous value)."""
    x_col, y_col = f"x_{signal}", f"y_{target}"
    rows = trace[(trace["step"] >= max(ret_steps, 1)) & (trace["step"] < cutoff)]
    if branch_mode == "shared":
        # One decision serves both branches, so it must be safe for the branch whose output moves most.
        rows = rows.groupby(["prompt_id", "seed", "step"], as_index=False).agg(x=(x_col, "first"), y=(y_col, "max"))
    else:
        rows = rows.rename(columns={x_col: "x", y_col: "y"})[["prompt_id", "seed", "step", "x", "y"]]
    return rows


def signal_is_branch_independent(trace: pd.DataFrame, signal: str) -> bool:
    """Qwen's image-stream signals do not see the text, so cond and uncond carry the same x (REFERENCE §2)."""
    if trace["branch"].nunique() < 2:
        return True
    wide = trace.pivot_table(index=["prompt_id", "seed", "step"], columns="branch", values=f"x_{signal}")
    return bool(np.allclose(wide.min(axis=1), wide.max(axis=1), rtol=1e-4, atol=1e-7))


@dataclass(frozen=True)
class FitRequest:
    runs: tuple[str, ...]
    out: str
    signal: str = "auto"
    degree: int = 4
    target: str = "output"
    branch_mode: str = "auto"
    loss: str = "linear"
    folds: int = 5
    ret_steps: int = 1
    cutoff_steps: int = -1
    speedup: float = 1.6


def load_traces(runs: tuple[str, ...]) -> tuple[pd.DataFrame, dict]:
    if not runs:
        raise UserError("give at least one run folder written by `teacal record`")
    frames, settings = [], None
    for run in runs:
        info = load_run(run)
        current = {k: info["settings"].get(k) for k in SETTINGS_THAT_MUST_MATCH}
        if settings is not None and current != settings:
            diff = ", ".join(f"{k}: {settings[k]!r} vs {current[k]!r}" for k in current if current[k] != settings[k])
            raise UserError(f"{run}: recorded with other settings than {runs[0]} ({diff}); fit one model and setting at a time")
        settings = current
        frame = load_trace(run)
        frame.insert(0, "run", str(run))
        frames.append(frame)
    trace = pd.concat(frames, ignore_index=True)
    trace["prompt_id"] = trace["run"] + ":" + trace["prompt_id"]
    return trace, dict(settings, prompts_sha256=sorted({load_run(r)["settings"]["prompts_sha256"] for r in runs}))


def fit(request: FitRequest, echo=print) -> Preset:
    if request.signal not in ("auto", *SIGNALS):
        raise UserError(f"--signal {request.signal!r}: expected auto, {', '.join(SIGNALS)}")
    if request.target not in ("output", "residual"):
        raise UserError(f"--target {request.target!r}: expected output or residual")
    if request.branch_mode not in ("auto", "per-branch", "shared"):
        raise UserError(f"--branch-mode {request.branch_mode!r}: expected auto, per-branch or shared")
    if not 1 <= request.degree <= 8:
        raise UserError(f"--degree {request.degree}: expected 1 to 8")
    if request.folds < 2:
        raise UserError(f"--folds {request.folds}: need at least 2")
    trace, settings = load_traces(request.runs)
    steps = int(settings["steps"])
    probe = Preset(model=settings["model"], signal="temb", coefficients=[1.0, 0.0], ret_steps=request.ret_steps, cutoff_steps=request.cutoff_steps)
    try:
        cutoff = probe.resolve_cutoff(steps)
    except ValueError as err:
        raise UserError(str(err).replace("preset <memory>: ", "")) from None

    for run, part in trace.groupby("run", sort=False):
        check_finite(part.assign(prompt_id=part["prompt_id"].str.split(":", n=1).str[1]), run)

    candidates = SIGNALS if request.signal == "auto" else (request.signal,)
    results: list[tuple[CrossValidation, str, pd.DataFrame]] = []
    for signal in candidates:
        mode = request.branch_mode
        if mode == "auto":
            mode = "shared" if signal_is_branch_independent(trace, signal) else "per-branch"
        points = fit_points(trace, signal, request.target, mode, request.ret_steps, cutoff)
        groups = points["prompt_id"].to_numpy()
        n_groups = len(np.unique(groups))
        if len(points) < 2 * (request.degree + 1):
            raise UserError(f"only {len(points)} fit points for degree {request.degree}: record more prompts or steps, or lower --degree")
        if n_groups < 2:
            raise UserError(f"cross-validation by prompt needs at least 2 prompts; the trace has {n_groups}")
        k = min(request.folds, n_groups)
        x, y = points["x"].to_numpy(float), points["y"].to_numpy(float)
        for degree in sorted({1, 2, 3, request.degree}):
            results.append((cross_validate(x, y, groups, degree, request.loss, k, signal), mode, points))

    echo(f"{'signal':<7}{'degree':>7}{'held-out R2':>13}{'held-out MAE':>14}{'points':>8}")
    for cv, mode, _ in results:
        echo(f"{cv.signal:<7}{cv.degree:>7}{cv.r2:>13.4f}{cv.mae:>14.5f}{cv.points:>8}   ({mode})")
    at_degree = [r for r in results if r[0].degree == request.degree]
    best, mode, points = min(at_degree, key=lambda r: r[0].mae)
    coefficients = fit_polynomial(points["x"].to_numpy(float), points["y"].to_numpy(float), request.degree, request.loss)
    preset = Preset(
        model=settings["model"],
        signal=best.signal,
        coefficients=[float(c) for c in coefficients],
        ret_steps=request.ret_steps,
        cutoff_steps=request.cutoff_steps,
        branch_mode=mode,
        threshold=0.2,
        calibration={
            "runs": [str(r) for r in request.runs], "backend": settings["backend"], "steps": steps, "size": settings["size"],
            "cfg": settings["cfg"], "dtype": settings["dtype"], "prompts_sha256": settings["prompts_sha256"],
            "prompts": int(points["prompt_id"].nunique()), "points": int(len(points)), "target": request.target,
            "loss": request.loss, "versions": library_versions(), "date": now_iso(),
        },
        fit={
            "r2_heldout": round(best.r2, 6), "mae_heldout": round(best.mae, 6), "folds": min(request.folds, points["prompt_id"].nunique()),
            "candidates": [{"signal": cv.signal, "degree": cv.degree, "r2_heldout": round(cv.r2, 6), "mae_heldout": round(cv.mae, 6)} for cv, _, _ in results],
        },
        source=request.out,
    )
    # Default threshold: the one whose simulated schedule on this trace reaches the requested speedup.
    preset = preset.replace(threshold=threshold_for_speedup(trace, preset, request.speedup))
    preset.save(request.out)
    echo(f"chose signal {best.signal} (degree {request.degree}, {mode}): held-out R2 {best.r2:.4f}, MAE {best.mae:.5f}; "
         f"default threshold {preset.threshold:.4g} (simulated {request.speedup}x)")
    echo(f"wrote {Path(request.out)}")
    return preset
