"""`teacal report RUN`: figures and report.md from what record, probe, fit and sweep wrote. No torch.

Figures (PNG, matplotlib Agg, written atomically) in `RUN/report/`:
  pareto_psnr.png, pareto_lpips.png  speedup against quality: each method's front (its non-dominated configurations)
  calls_psnr.png                     computed calls against PSNR: the equal-compute view of the same fronts
  fit.png                            the preset's polynomial over the recorded signal range; accumulator against window cost
  steps.png                          per-step rel-L1 of the signals, the output and the residual per CFG branch; the probed
                                     sensitivity of the final image
  skipmap.png                        step x threshold: the fraction of calls computed at each step
report.md holds the tables: every configuration, each method at equal computed calls, best speedup at equal quality.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from calib.budgets import best_within, budget_steps  # noqa: E402
from calib.errors import UserError  # noqa: E402
from calib.runfiles import SWEEP_FILE, SWEEP_TABLE, load_run, load_trace, read_json, read_table  # noqa: E402
from calib.tables import aggregate, static_configs  # noqa: E402
from teacache._files import atomic_write, remove_stale_temp_files  # noqa: E402
from teacache.preset import SIGNALS, Preset  # noqa: E402

QUALITY_LEVELS = (("psnr", 30.0), ("psnr", 35.0), ("psnr", 40.0), ("psnr", 45.0), ("psnr", 50.0), ("lpips", 0.05), ("lpips", 0.1))
METHOD_STYLE = {
    "teacache": dict(marker="o", lw=2.2),
    "baseline": dict(marker="s", lw=1.2, ls="--"),
    "oracle": dict(marker="*", lw=1.5, ls=":", color="black"),
    "static": dict(marker="d", lw=1.0, ls=":", color="grey"),
    "oracle pick": dict(marker="x", lw=1.0, ls="--", color="black"),
}
WEAK_R2 = 0.5
YLABELS = {"psnr": "PSNR against uncached (dB, mean over prompts)", "psnr_worst": "PSNR of the worst prompt against uncached (dB)",
           "lpips": "LPIPS against uncached (mean; lower is better)"}


def _title(settings: dict, steps: int | None, what: str) -> str:
    w, h = settings["sizes"][0]
    return f"{what}\n{settings['model']} ({settings['backend']}), {steps or settings['steps']} steps, {w}x{h}, CFG {settings['cfg']:g}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())  # a killed report leaves no half-written figure
    return path


def front(group: pd.DataFrame, x: str, metric: str, more_x_is_better: bool) -> pd.DataFrame:
    """The configurations no other one beats on both `x` and quality (higher PSNR, lower LPIPS)."""
    better = (lambda a, b: a >= b) if metric != "lpips" else (lambda a, b: a <= b)
    rows = group.dropna(subset=[metric, x])
    keep = []
    for r in rows.itertuples():
        rx, rq = getattr(r, x), getattr(r, metric)
        dominated = any(
            ((getattr(o, x) >= rx) if more_x_is_better else (getattr(o, x) <= rx)) and better(getattr(o, metric), rq)
            and (getattr(o, x) != rx or getattr(o, metric) != rq)
            for o in rows.itertuples()
        )
        if not dominated:
            keep.append(r.Index)
    return rows.loc[keep].sort_values(x)


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Labels that do not collide: a label whose box (as drawn, with a margin) would overlap one already placed is
    left out. Call after the figure's layout is final."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for x, y, text in points:
        note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        box = note.get_window_extent(renderer).expanded(1.15, 1.3)
        if any(box.overlaps(other) for other in placed):
            note.remove()
        else:
            placed.append(box)


def pareto(view: pd.DataFrame, metric: str, x: str, settings: dict, steps: int, path: Path) -> Path | None:
    """Each method's front of `metric` against `x` (speedup, or computed calls); identical images are marked, not plotted."""
    if view[metric].isna().all():
        return None
    more_x_is_better = x == "speedup"
    fig, ax = plt.subplots(figsize=(8.5, 5.8))
    labels = []
    finite = view[np.isfinite(view[metric])]
    for label, group in finite[finite["method"] != "uncached"].groupby("label", sort=False):
        method = group["method"].iloc[0]
        edge = front(group, x, metric, more_x_is_better)
        ax.plot(edge[x], edge[metric], label=label, **METHOD_STYLE.get(method, dict(marker="^", lw=1.2)))
        if method in ("teacache", "oracle"):  # labelled: TeaCache's thresholds, the oracle's budgets (steps per branch)
            value = "threshold" if method == "teacache" else "budget"
            labels += [(getattr(r, x), getattr(r, metric), f"{v:.3g}" if method == "teacache" else f"{int(v)} calls")
                       for r in edge.itertuples() if math.isfinite(v := getattr(r, value))]
    identical = view[~np.isfinite(view[metric]) & (view["method"] != "uncached")] if metric.startswith("psnr") else view.iloc[:0]
    base = view[view["method"] == "uncached"]
    if len(base) and x == "speedup":
        ax.axvline(float(base["speedup"].iloc[0]), color="grey", lw=0.8, ls="--", label="uncached (identical images, PSNR infinite)")
    if len(identical):
        ax.text(0.01, 0.01, f"{len(identical)} configuration(s) give images identical to uncached (not plotted)", transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("speedup against uncached (total time, same process per prompt)" if x == "speedup" else "computed transformer calls per generation")
    ax.set_ylabel(YLABELS[metric])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_title(settings, steps, f"{YLABELS[metric].split(' against')[0]} against {'speed' if x == 'speedup' else 'compute'}: each method's front"
                        + ("; labels: thresholds" if labels else "")), fontsize=10)
    fig.tight_layout()  # the final layout first: labels are placed where they will be drawn
    _label_points(ax, labels)
    return _save(fig, path)


def with_measured_oracle(view: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The oracle as a ceiling of static schedules on the prompts this sweep measured: every static configuration
    measured here (the preset's oracle candidates, uniform spacing, TeaCache or a borrowed set on a timestep-only
    signal) joins the oracle's rows, so its front is, at each budget, the best static schedule measured on these
    prompts. The calibration's own pick keeps a line of its own ("oracle pick"): on prompts it was not chosen on,
    another static schedule can beat it. The runners-up appear only through the ceiling."""
    static = static_configs(table).index
    if static.empty:
        return view
    ceiling = view[view["config"].isin(static)].assign(method="oracle", label=f"oracle (best of {len(static)} static schedules measured on these prompts)")
    ceiling["budget"] = ceiling["computed"]  # a static schedule computes the same calls on every prompt
    pick = view[(view["method"] == "oracle") & view["config"].str.fullmatch(r"oracle-\d+")].assign(method="oracle pick")
    return pd.concat([view[view["method"] != "oracle"], pick, ceiling], ignore_index=True)


def equal_calls(view: pd.DataFrame, metric: str, calls: int, steps: int) -> pd.DataFrame:
    """For each budget of computed calls (`calib.budgets.COMPARED` of the `calls`), each method's best mean `metric`
    among its configurations that compute no more (its measured front; a step function), with the worst prompt of
    that configuration."""
    branches = calls // steps
    budgets = [k * branches for k in budget_steps(steps)]
    sign = -1.0 if metric == "lpips" else 1.0  # lower LPIPS is better
    rows = [{"computed calls": f"{b} of {calls}"} for b in budgets]
    for label, group in view[view["method"] != "uncached"].groupby("label", sort=False):
        best = best_within(group["computed"], sign * group[metric], budgets)
        for row, i in zip(rows, best, strict=True):
            if i < 0:
                row[label] = "-"
            else:
                value, worst = group[metric].iloc[i], group[f"{metric}_worst"].iloc[i]
                row[label] = f"{value:.2f} ({worst:.1f})" if metric == "psnr" else f"{value:.4f} ({worst:.4f})"
    return pd.DataFrame(rows)


def _without_unmeasured_lpips(table: pd.DataFrame) -> pd.DataFrame:
    """LPIPS not measured (no AlexNet weights here): no empty LPIPS columns in the report's tables."""
    return table.drop(columns=[c for c in table.columns if c.lower().startswith("lpips") and table[c].isna().all()])


def fit_figure(trace: pd.DataFrame, preset: Preset, settings: dict, path: Path) -> Path:
    """The polynomial over the recorded x values (within its calibrated range), with their distribution beneath it."""
    x = trace.loc[trace["step"] > 0, f"x_{preset.signal}"].dropna().to_numpy(float)
    low, high = float(x.min()), float(x.max())
    if preset.x_range:  # outside its calibrated range the runtime clamps x: the polynomial is never evaluated there
        low, high = max(low, preset.x_range[0]), min(high, preset.x_range[1])
        if low >= high:
            low, high = preset.x_range
    fig, ax = plt.subplots(figsize=(7, 5))
    grid = np.linspace(low, high, 200)  # over the data only: a polynomial's ends swing where no point holds them
    ax.plot(grid, np.clip(np.polyval(preset.coefficients, grid), 0, None), color="C3", lw=2, label=f"preset polynomial (degree {len(preset.coefficients) - 1}), clamped at 0")
    ax.hist(x, bins=40, weights=np.full(len(x), 1.0 / len(x)) * max(1e-12, float(np.polyval(preset.coefficients, grid).max())) * 3,
            color="C0", alpha=0.35, label=f"recorded x ({len(x)} calls), distribution")
    fit = preset.fit
    quality = f"held-out R² {_num(fit.get('r2_heldout'))}, {_num(fit.get('db_vs_oracle_heldout'), '+.2f')} dB against the cost model's oracle" if fit else "no fit quality recorded"
    target = preset.calibration.get("target", "?")
    calibrated = f"calibrated range {preset.x_range[0]:.3g}..{preset.x_range[1]:.3g}" if preset.x_range else "no calibrated range"
    ax.set_xlabel(f"x: rel-L1 of signal '{preset.signal}' between steps\n(curve over {low:.3g}..{high:.3g}; {calibrated})")
    ax.set_ylabel(f"accumulated per step ({preset.calibration.get('transform', '?')} of the {target} window cost)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(settings, None, f"Rescale fit: {quality}"), fontsize=10)
    return _save(fig, path)


def steps_figure(trace: pd.DataFrame, settings: dict, preset: Preset | None, path: Path) -> Path:
    columns = [("y_output", "output"), ("y_residual", "block residual"), *((f"x_{s}", f"signal {s}") for s in SIGNALS)]
    gain = (preset.calibration.get("cost_model", {}).get("gain") or {}) if preset is not None else {}
    panels = len(columns) + bool(gain)
    rows = math.ceil(panels / 3)  # three panels a row: readable at the report's width
    fig, grid = plt.subplots(rows, 3, figsize=(13, 4 * rows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.remove()
    for ax, (column, name) in zip(axes, columns, strict=False):
        for (branch, steps), group in trace.groupby(["branch", "steps"]):
            stats = group.groupby("step")[column].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], label=f"{branch}, {steps} steps")
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("rel-L1 against previous step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if gain:
        ax = axes[panels - 1]
        for steps, curve in sorted(gain.items(), key=lambda kv: int(kv[0])):
            sigma = np.array(curve["sigma"])
            ax.plot(sigma, curve["gain"], marker=".", label=f"{steps} steps")
        ax.invert_xaxis()
        ax.set_title("probed sensitivity of the final image", fontsize=10)
        ax.set_xlabel("sigma (noise level; the run goes left to right)")
        ax.set_ylabel("final rel-L1 per unit of reuse error and of sigma step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(settings, None, "Per-step change per CFG branch (mean, band = min..max over prompts)"), fontsize=10)
    return _save(fig, path)


def skipmap_figure(table: pd.DataFrame, settings: dict, steps: int, path: Path) -> Path | None:
    rows = table[(table["method"] == "teacache") & table["schedule"].notna()]
    if rows.empty:
        return None
    thresholds = sorted(rows["threshold"].unique())
    grid = np.array([np.mean([[c == "x" for c in s] for s in rows[rows["threshold"] == t]["schedule"]], axis=0) for t in thresholds])
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(thresholds) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(thresholds)), [f"{t:.3g}" for t in thresholds], fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("step")
    ax.set_ylabel("threshold")
    fig.colorbar(image, ax=ax, label="fraction computed (cond)")
    ax.set_title(_title(settings, steps, "Which steps calibrated TeaCache computes"), fontsize=10)
    return _save(fig, path)


def best_at_quality(view: pd.DataFrame) -> pd.DataFrame:
    """Each method's best measured speedup among configurations meeting each quality level (mean over prompts)."""
    rows = []
    for label, group in view[view["method"] != "uncached"].groupby("label", sort=False):
        row = {"method": label}
        for metric, level in QUALITY_LEVELS:
            ok = group[group[metric] >= level] if metric == "psnr" else group[group[metric] <= level]
            key = f"{metric.upper()} {'>=' if metric == 'psnr' else '<='} {level:g}"
            row[key] = float(ok["speedup"].max()) if len(ok) and not group[metric].isna().all() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _num(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def _markdown(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    def cell(v):
        if isinstance(v, float):
            return "same" if math.isinf(v) else "-" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def report(run: str | Path, preset_path: str | None = None, echo=print) -> Path:
    """report.md and the figures of a run folder, or of a sweep's --out folder, in RUN/report/."""
    run = Path(run)
    sweep_info = read_json(run / SWEEP_FILE) if (run / SWEEP_FILE).exists() else None
    # A sweep written to its own --out folder points back (relative to itself) at the recording it measured.
    recording = run if (run / "run.json").exists() or sweep_info is None else (run / sweep_info["run"]).resolve()
    settings = load_run(recording)["settings"]
    trace = load_trace(recording)
    folder = run / "report"
    remove_stale_temp_files(folder)  # what a killed report left half-written
    named = preset_path
    if preset_path is None and sweep_info is not None and (run / sweep_info["preset"]).exists():
        preset_path = run / sweep_info["preset"]  # the copy the sweep measured, named as the user gave it
        named = sweep_info.get("preset_source", preset_path)
    preset = Preset.load(preset_path) if preset_path else None
    steps = sweep_info["settings"]["steps"] if sweep_info else None
    figures: list[tuple[str, Path | None]] = [("Per-step changes", steps_figure(trace, settings, preset, folder / "steps.png"))]
    lines = [f"# teacal report: {run}\n", f"Model **{settings['model']}** ({settings['backend']}), {', '.join(map(str, settings['steps']))} steps, "
             f"{settings['sizes'][0][0]}x{settings['sizes'][0][1]}, CFG {settings['cfg']:g}, dtype {settings['dtype']}, "
             f"{trace['prompt_id'].nunique()} prompts x {len(settings['seeds'])} seeds.\n"]
    if preset is not None:
        figures.append(("Rescale fit", fit_figure(trace, preset, settings, folder / "fit.png")))
        lines += preset_lines(preset, named, steps, echo)
    if (run / SWEEP_TABLE).exists():
        table = read_table(run / SWEEP_TABLE)
        view = aggregate(table)
        fronts = with_measured_oracle(view, table)
        if preset is not None:
            lines += answer_lines(view, preset, table, (sweep_info or {}).get("target") or {})
        lines += sweep_lines(table, view, fronts, steps)
        figures += sweep_figures(table, fronts, settings, steps, folder)
    else:
        lines.append(f"No sweep yet: run `teacal sweep {run} --preset P ...` for speed and quality.\n")
    written = [(title, path) for title, path in figures if path is not None]
    for title, path in written:
        lines.append(f"\n## {title}\n\n![{title}]({path.name})\n")
    atomic_write(folder / "report.md", "\n".join(lines))
    echo(f"wrote {folder / 'report.md'} and {len(written)} figure{'s' if len(written) != 1 else ''}")
    return folder


def preset_lines(preset: Preset, named, steps: int | None, echo=print) -> list[str]:
    """What the preset is, how well it fits, and whether the swept run lies in its calibrated domain."""
    fit = preset.fit
    lines = [f"Preset `{named}`: signal `{preset.signal}`, coefficients {[round(c, 6) for c in preset.coefficients]}, "
             f"branch mode {preset.branch_mode}, ret_steps {preset.ret_steps}, cutoff_steps {preset.cutoff_steps}, forecast "
             f"{preset.forecast.rule}, default threshold {preset.threshold:.6g}; held-out R² {_num(fit.get('r2_heldout'), '.4f')}, "
             f"simulated {_num(fit.get('db_vs_oracle_heldout'), '+.2f')} dB against the cost model's oracle on held-out folds of the "
             "calibration prompts.\n"]
    r2 = fit.get("r2_heldout")
    if r2 is not None and r2 < WEAK_R2:
        weak = (f"held-out R² {r2:.2f} is below {WEAK_R2}: the polynomial explains little of what skips cost. Record more prompts "
                "or seeds, probe the run (`teacal probe`), or try `--signal modin` or a lower `--degree`.")
        lines.append(f"**Weak fit**: {weak}\n")
        echo(f"warning: weak fit: {weak}")
    if preset.domain.get("steps") and steps is not None and preset.outside_domain(steps):
        lines.append(f"**Outside the calibrated domain**: {'; '.join(preset.outside_domain(steps))}.\n")
    return lines


def answer_lines(view: pd.DataFrame, preset: Preset, table: pd.DataFrame, target: dict) -> list[str]:
    """What to use, measured: the preset's default threshold, and the fewest calls meeting the sweep's target on every prompt."""
    calls = int(table.loc[table["method"] == "uncached", "calls"].max())
    own = view[(view["method"] == "teacache") & (view["forecast"] == ("calibrated" if preset.forecast.extrapolates else "none"))]

    def measured(r) -> str:
        return (f"{r.speedup:.2f}x measured, {r.psnr:.1f} dB mean PSNR, {r.psnr_worst:.1f} dB on the worst prompt, at {r.computed:.1f} of "
                f"{calls} calls")

    lines = ["## The answer\n"]
    default = own[np.isclose(own["threshold"], preset.threshold, rtol=1e-9, atol=0)] if preset.threshold is not None else own.iloc[:0]
    if len(default):
        lines.append(f"**Use threshold {preset.threshold:.6g}** (the preset's default): {measured(default.iloc[0])}.\n")
    for metric, value in ((m, v) for m, v in target.items() if v is not None):
        ok = own[own[f"{metric}_worst"] >= value] if metric == "psnr" else own[own[f"{metric}_worst"] <= value]
        if ok.empty:
            lines.append(f"No measured threshold keeps every prompt at {metric.upper()} {'>=' if metric == 'psnr' else '<='} {value:g}.\n")
        else:
            r = ok.sort_values(["computed", "speedup"], ascending=[True, False]).iloc[0]
            lines.append(f"**For {metric.upper()} {'>=' if metric == 'psnr' else '<='} {value:g} on every prompt, use threshold {r.threshold:.6g}**: {measured(r)}.\n")
    return lines if len(lines) > 1 else []


def sweep_lines(table: pd.DataFrame, view: pd.DataFrame, fronts: pd.DataFrame, steps: int) -> list[str]:
    """The tables: each method at equal computed calls (PSNR, SSIM, LPIPS), every configuration, speed at equal quality.
    `view`: the table aggregated; `fronts`: with the measured oracle."""
    calls = int(table.loc[table["method"] == "uncached", "calls"].max())
    lines = []
    if view["lpips"].isna().all():
        lines.append("LPIPS was not measured (AlexNet weights unavailable); the LPIPS chart is omitted.\n")
    lines.append("## Each method at equal computed calls\n")
    lines.append(f"Mean PSNR over the prompts (worst prompt in brackets), dB, of {calls} calls per generation: each method's best "
                 "configuration that computes no more calls than the budget (its measured front). The oracle is the best static "
                 "schedule measured on these prompts: it sees their results, so no static schedule with plain reuse beats it; a "
                 "forecast is not plain reuse and can. Its pick is the schedule the calibration chose.\n")
    lines.append(_markdown(equal_calls(fronts, "psnr", calls, steps)))
    for metric, name in (("ssim", "SSIM"), ("lpips", "LPIPS")):
        if view[metric].notna().any():
            lines.append(f"\n{name} at the same budgets (worst prompt in brackets):\n")
            lines.append(_markdown(equal_calls(fronts, metric, calls, steps)))
    columns = ["label", "config", "threshold", "budget", "computed", "predicted", "speedup", "ideal_speedup", "lpips", "lpips_worst", "psnr", "psnr_worst", "ssim"]
    configs = _without_unmeasured_lpips(view[columns].assign(threshold=view["threshold"].map(lambda t: "" if pd.isna(t) else f"{t:.6g}")))
    lines.append("\n## Measured configurations\n")
    lines.append(f"Means over the prompts; budget and computed in calls of {calls}; speedup = total uncached time / total time (each "
                 "prompt's uncached run timed in the same process as its configurations); `same` = every image identical to the uncached one.\n")
    lines.append(_markdown(configs))
    lines.append("\n## Best speedup at equal quality\n")
    lines.append(_markdown(_without_unmeasured_lpips(best_at_quality(fronts)), ".2f"))
    return lines


def sweep_figures(table: pd.DataFrame, fronts: pd.DataFrame, settings: dict, steps: int, folder: Path) -> list[tuple[str, Path | None]]:
    return [
        ("Pareto: speed against PSNR", pareto(fronts, "psnr", "speedup", settings, steps, folder / "pareto_psnr.png")),
        ("Equal compute: computed calls against PSNR", pareto(fronts, "psnr", "computed", settings, steps, folder / "calls_psnr.png")),
        ("Equal compute, the worst prompt: computed calls against its PSNR", pareto(fronts, "psnr_worst", "computed", settings, steps, folder / "calls_psnr_worst.png")),
        ("Pareto: speed against LPIPS", pareto(fronts, "lpips", "speedup", settings, steps, folder / "pareto_lpips.png")),
        ("Skip map", skipmap_figure(table, settings, steps, folder / "skipmap.png")),
    ]


def require_run(run: str | Path) -> None:
    if not Path(run).is_dir():
        raise UserError(f"{run}: no such run folder")
