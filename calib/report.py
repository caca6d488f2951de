"""`teacal report RUN`: figures and report.md from what record, fit and sweep wrote.

Figures (PNG, matplotlib Agg) in `RUN/report/`:
  pareto_lpips.png, pareto_psnr.png  speedup against quality, every method's front, thresholds labelled, oracle ceiling
  fit.png                            recorded signal change x against output change y, the preset's polynomial
  steps.png                          per-step rel-L1 of the signals and the output, per CFG branch
  skipmap.png                        step x threshold: the fraction of calls computed at each step
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from calib.errors import UserError  # noqa: E402
from calib.fit import fit_points  # noqa: E402
from calib.runfiles import SWEEP_FILE, aggregate, load_run, load_trace, read_json  # noqa: E402
from teacache._files import atomic_write  # noqa: E402
from teacache.preset import Preset  # noqa: E402

QUALITY_LEVELS = (("psnr", 30.0), ("psnr", 35.0), ("psnr", 40.0), ("psnr", 45.0), ("psnr", 50.0), ("lpips", 0.05), ("lpips", 0.1))
METHOD_STYLE = {"teacache": dict(marker="o", lw=2.2), "baseline": dict(marker="s", lw=1.2, ls="--"), "oracle": dict(marker="*", lw=1.5, ls=":", color="black")}


def _title(settings: dict, what: str) -> str:
    w, h = settings["size"]
    return f"{what}\n{settings['model']} ({settings['backend']}), {settings['steps']} steps, {w}x{h}, CFG {settings['cfg']:g}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto(view: pd.DataFrame, metric: str, settings: dict, path: Path) -> Path | None:
    """Speedup (x) against quality (y) for every method; lower LPIPS / higher PSNR is better."""
    if view[metric].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, group in view[view["method"] != "uncached"].groupby("label", sort=False):
        method = group["method"].iloc[0]
        group = group.sort_values("speedup")
        ax.plot(group["speedup"], group[metric], label=label, **METHOD_STYLE.get(method, dict(marker="^", lw=1.2)))
        if method in ("teacache",):
            for r in group.itertuples():
                ax.annotate(f"{r.threshold:g}", (r.speedup, getattr(r, metric)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if method == "oracle":
            for r in group.itertuples():
                ax.annotate(f"k={int(r.budget)}", (r.speedup, getattr(r, metric)), textcoords="offset points", xytext=(4, -10), fontsize=7)
    base = view[view["method"] == "uncached"]
    if len(base):
        ax.scatter(base["speedup"], base[metric], color="grey", zorder=5, label="uncached")
    ax.set_xlabel("speedup against uncached (wall time, x)")
    ax.set_ylabel("LPIPS against uncached (lower is better)" if metric == "lpips" else "PSNR against uncached (dB, higher is better; 100 = identical)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(settings, f"Speed against {metric.upper()}; labels are thresholds"), fontsize=10)
    return _save(fig, path)


def fit_figure(trace: pd.DataFrame, preset: Preset, settings: dict, path: Path) -> Path:
    cutoff = preset.resolve_cutoff(settings["steps"])
    target = preset.calibration.get("target", "output")
    points = fit_points(trace, preset.signal, target, preset.branch_mode, preset.ret_steps, cutoff)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(points["x"], points["y"], s=10, alpha=0.5, label=f"recorded steps ({len(points)})")
    # Drawn over the recorded range only: outside it the polynomial is extrapolation.
    grid = np.linspace(float(points["x"].min()), float(points["x"].max()), 200)
    ax.plot(grid, np.clip(np.polyval(preset.coefficients, grid), 0, None), color="C3", lw=2, label=f"preset polynomial (degree {len(preset.coefficients) - 1})")
    fit = preset.fit
    quality = f"held-out R² {fit.get('r2_heldout', float('nan')):.3f}, MAE {fit.get('mae_heldout', float('nan')):.4f}" if fit else "no fit quality recorded"
    ax.set_xlabel(f"x: rel-L1 of signal '{preset.signal}' between steps")
    ax.set_ylabel(f"y: rel-L1 of the {target} between steps" + (" (worst branch)" if preset.branch_mode == "shared" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(settings, f"Rescale fit: {quality}"), fontsize=10)
    return _save(fig, path)


def steps_figure(trace: pd.DataFrame, settings: dict, path: Path) -> Path:
    columns = [("y_output", "output"), ("y_residual", "block residual"), ("x_temb", "signal temb"), ("x_modin", "signal modin")]
    fig, axes = plt.subplots(1, len(columns), figsize=(15, 4), sharex=True)
    for ax, (column, name) in zip(axes, columns, strict=True):
        for branch, group in trace.groupby("branch"):
            stats = group.groupby("step")[column].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], label=branch)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("rel-L1 against previous step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(settings, "Per-step change per CFG branch (mean, band = min..max over prompts)"), fontsize=10)
    return _save(fig, path)


def skipmap_figure(table: pd.DataFrame, settings: dict, path: Path) -> Path | None:
    rows = table[(table["method"] == "teacache") & table["schedule"].notna()]
    if rows.empty:
        return None
    thresholds = sorted(rows["threshold"].unique())
    grid = np.array([
        np.mean([[c == "x" for c in s] for s in rows[rows["threshold"] == t]["schedule"]], axis=0) for t in thresholds
    ])
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(thresholds) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("step")
    ax.set_ylabel("threshold")
    fig.colorbar(image, ax=ax, label="fraction computed (cond)")
    ax.set_title(_title(settings, "Which steps TeaCache computes"), fontsize=10)
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


def _markdown(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def report(run: str | Path, preset_path: str | None = None, echo=print) -> Path:
    run = Path(run)
    sweep_info = read_json(run / SWEEP_FILE) if (run / SWEEP_FILE).exists() else None
    # A sweep written to its own --out folder points back at the recording it measured.
    recording = run if (run / "run.json").exists() or sweep_info is None else Path(sweep_info["settings"]["run"])
    settings = load_run(recording)["settings"]
    trace = load_trace(recording)
    folder = run / "report"
    folder.mkdir(parents=True, exist_ok=True)
    sweep_table = pd.read_parquet(run / "sweep.parquet") if (run / "sweep.parquet").exists() else None
    if preset_path is None and sweep_info is not None:
        preset_path = sweep_info.get("preset")
    preset = Preset.load(preset_path) if preset_path else None

    figures: list[tuple[str, Path | None]] = [("Per-step changes", steps_figure(trace, settings, folder / "steps.png"))]
    if preset is not None:
        figures.append(("Rescale fit", fit_figure(trace, preset, settings, folder / "fit.png")))
    lines = [f"# teacal report: {run}\n", f"Model **{settings['model']}** ({settings['backend']}), {settings['steps']} steps, "
             f"{settings['size'][0]}x{settings['size'][1]}, CFG {settings['cfg']:g}, dtype {settings['dtype']}, "
             f"{trace['prompt_id'].nunique()} prompts x {len(settings['seeds'])} seeds.\n"]
    if preset is not None:
        lines.append(f"Preset `{preset_path}`: signal `{preset.signal}`, coefficients {[round(c, 6) for c in preset.coefficients]}, "
                     f"branch mode {preset.branch_mode}, ret_steps {preset.ret_steps}, cutoff_steps {preset.cutoff_steps}, "
                     f"default threshold {preset.threshold:g}; held-out R² {preset.fit.get('r2_heldout', float('nan')):.4f}.\n")
    if sweep_table is not None:
        view = aggregate(sweep_table)
        figures.append(("Pareto: speed against LPIPS", pareto(view, "lpips", settings, folder / "pareto_lpips.png")))
        figures.append(("Pareto: speed against PSNR", pareto(view, "psnr", settings, folder / "pareto_psnr.png")))
        figures.append(("Skip map", skipmap_figure(sweep_table, settings, folder / "skipmap.png")))
        if view["lpips"].isna().all():
            lines.append("LPIPS was not measured (AlexNet weights unavailable); the LPIPS chart is omitted.\n")
        table = view[["label", "config", "threshold", "budget", "computed", "predicted", "calls", "speedup", "ideal_speedup", "lpips", "lpips_worst", "psnr", "psnr_worst", "ssim"]]
        lines.append("## Measured configurations (means over prompts; PSNR 100 = identical)\n")
        lines.append(_markdown(table))
        lines.append("\n## Best speedup at equal quality\n")
        lines.append(_markdown(best_at_quality(view), ".2f"))
    else:
        lines.append("No sweep yet: run `teacal sweep --run " + str(run) + " ...` for speed and quality.\n")
    for title, path in figures:
        if path is not None:
            lines.append(f"\n## {title}\n\n![{title}]({path.name})\n")
    atomic_write(folder / "report.md", "\n".join(lines))
    echo(f"wrote {folder / 'report.md'} and {sum(p is not None for _, p in figures)} figures")
    return folder


def require_run(run: str) -> None:
    if not Path(run).is_dir():
        raise UserError(f"{run}: no such run folder")
