"""`teacal record`: uncached runs, observed call by call, into trace parts, references and run.json.

Layout of a run folder (one *unit* is one generation: prompt, seed, step count and size)::

    run.json                        settings (the resume key: a rerun with other settings is refused) and status
    inputs/prompts.jsonl + images   a copy of the prompt set: the folder stands on its own when moved or copied
    trace/<unit>.parquet            one complete part per finished unit; readers concatenate them
    trace.parquet                   all parts merged, written once every unit of the run is done
    refs/<unit>.png, refs/<unit>.npy  the uncached image and its final latents: what sweep and probe compare with
    residuals/<unit>.npy            a fixed sample of target tokens of every call's block residual, float16,
                                    [steps, branches, tokens, channels]: fit evaluates reuse rules (forecasts) on it

The trace has one row per (unit, step, branch): the candidate signals' rel-L1 against the branch's previous call
(`x_temb`, `x_modin`, `x_sigma`), the output's and residual's (`y_output`, `y_residual`), and the reuse errors of every gap up to
`--max-gap` (`r_output_<k>`, `r_residual_<k>`): what a call skipped k steps after a computed one really substitutes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from calib.backends import check_backend, check_lora, load_backend, resolve_device, resolve_dtype, weights_id
from calib.errors import UserError
from calib.models import DEFAULT_MODEL, get_model
from calib.progress import progress
from calib.prompts import default_prompts, load_prompts
from calib.runfiles import (
    RUN_FILE,
    check_output_folder,
    check_same_settings,
    library_versions,
    load_trace,
    now_iso,
    read_json,
    resolve_shard,
    trace_columns,
    unit_name,
    write_array,
    write_json,
    write_png,
    write_table,
)
from teacache._files import remove_stale_temp_files
from teacache.policy import TeaCacheCall, rel_l1
from teacache.preset import SIGNALS

BRANCHES = ("cond", "uncond")
INPUTS = "inputs"


@dataclass(frozen=True)
class RecordRequest:
    out: Path
    model: str = DEFAULT_MODEL
    prompts: Path | None = None  # default: the model's calibration set
    steps: tuple[int, ...] = ()  # default: the model's
    cfg: float | None = None
    size: tuple[int, int] | None = None
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    dtype: str = "auto"
    backend: str | None = None
    model_path: Path | None = None
    shard: str | None = None
    lightx2v_config: Path | None = None  # --backend lightx2v: the LightX2V JSON config
    lora_path: Path | None = None  # a distilled model's LoRA file (calib.models.ModelSpec.lora)
    max_gap: int = 16  # reuse errors r_<target>_k for k up to this
    residual_tokens: int = 64  # target tokens sampled per call into residuals/ (0: none)


@dataclass(frozen=True)
class Unit:
    item: object  # PromptItem
    seed: int
    steps: int
    size: tuple[int, int]

    @property
    def name(self) -> str:
        return unit_name(self.item.id, self.seed, self.steps, self.size)


class TraceRecorder:
    """Turns one generation's `TeaCacheCall`s into trace rows and a residual sample (the observer of `record`)."""

    def __init__(self, max_gap: int, residual_tokens: int) -> None:
        self.max_gap = max_gap
        self.residual_tokens = residual_tokens
        self.rows: list[dict] = []
        self._signals: dict[str, dict[str, torch.Tensor]] = {}
        self._history: dict[str, deque] = {}  # branch -> the last max_gap calls' (residual, prediction)
        self._samples: dict[str, list[np.ndarray]] = {}
        self._rows_of_tokens: torch.Tensor | None = None

    def on_call(self, call: TeaCacheCall) -> None:
        residual, prediction = _first_sample(call.residual), _first_sample(call.prediction)
        row: dict = {"step": call.step, "branch": call.branch, "timestep": call.sigma * 1000, "sigma": call.sigma}
        previous = self._signals.setdefault(call.branch, {})
        for kind in SIGNALS:
            signal = call.signals[kind]
            row[f"x_{kind}"] = rel_l1(signal, previous[kind]) if kind in previous else None
            previous[kind] = signal.detach().clone()
        history = self._history.setdefault(call.branch, deque(maxlen=self.max_gap))
        for k in range(1, self.max_gap + 1):
            back = history[-k] if k <= len(history) else None
            for target, now in (("output", prediction), ("residual", residual)):
                column = f"y_{target}" if k == 1 else f"r_{target}_{k}"
                row[column] = None if back is None else rel_l1(now, back[target])
        # clones: the call's tensors are slices of the whole sequence (reference tokens too), which a view would keep alive
        history.append({"output": prediction.detach().clone(), "residual": residual.detach().clone()})
        row["seconds"] = call.seconds
        self.rows.append(row)
        if self.residual_tokens:
            self._samples.setdefault(call.branch, []).append(self._sample(residual))

    def _sample(self, residual: torch.Tensor) -> np.ndarray:
        """The same seeded subset of target tokens for every call, so rel-L1s between calls are consistent estimates."""
        if self._rows_of_tokens is None:
            n = residual.shape[-2]
            chosen = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: self.residual_tokens]
            self._rows_of_tokens = chosen.sort().values
        return residual[..., self._rows_of_tokens.to(residual.device), :].float().cpu().numpy().astype(np.float16)

    def residual_sample(self) -> np.ndarray:
        """[steps, branches, tokens, channels], branches in the order cond, uncond."""
        branches = [b for b in BRANCHES if b in self._samples]
        return np.stack([np.stack(self._samples[b]) for b in branches], axis=1)

    def frame(self, unit: Unit) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        branches = frame["branch"].nunique()
        if len(frame) != unit.steps * branches or sorted(frame["step"].unique()) != list(range(unit.steps)):
            raise RuntimeError(f"observed {len(frame)} transformer calls for {unit.steps} steps x {branches} branches")
        frame = frame.assign(prompt_id=unit.item.id, seed=unit.seed, steps=unit.steps, width=unit.size[0], height=unit.size[1])
        columns = trace_columns(self.max_gap)
        return frame.reindex(columns=columns).astype({c: float for c in columns if c.startswith(("x_", "y_", "r_"))}).sort_values(["step", "branch"]).reset_index(drop=True)


def _first_sample(tensor: torch.Tensor) -> torch.Tensor:
    """[tokens, channels] of the batch's first sample (diffusers gives [batch, tokens, channels]; LightX2V [tokens, channels])."""
    return tensor[0] if tensor.ndim == 3 else tensor


def check_request(request: RecordRequest):
    """Everything a user can get wrong, checked before a model is loaded."""
    spec = get_model(request.model)
    backend_name = check_backend(spec, request.backend, request.model_path, request.lightx2v_config)
    check_lora(spec, backend_name, request.lora_path)
    prompts = load_prompts(request.prompts or default_prompts(spec.prompts), need_image=spec.edit)
    steps = tuple(sorted(set(request.steps or (spec.steps,))))
    if min(steps) < 2:
        raise UserError(f"--steps {min(steps)}: need at least 2 steps to measure a change between steps")
    cfg = spec.cfg if request.cfg is None else request.cfg
    if not math.isfinite(cfg) or cfg < 1:
        raise UserError(f"--cfg {cfg}: expected a finite true-CFG scale >= 1 (1 turns CFG off)")
    if not request.seeds or min(request.seeds) < 0 or len(set(request.seeds)) != len(request.seeds):
        raise UserError(f"--seed {list(request.seeds)}: expected distinct non-negative integers")
    if not 1 <= request.max_gap <= 64:
        raise UserError(f"--max-gap {request.max_gap}: expected 1 to 64")
    if request.residual_tokens < 0:
        raise UserError(f"--residual-tokens {request.residual_tokens}: expected >= 0")
    check_output_folder(request.out, "run folder")
    return spec, backend_name, prompts, steps, cfg


def record(request: RecordRequest, echo=print) -> Path:
    spec, backend_name, prompts, steps, cfg = check_request(request)
    size = request.size or spec.size
    device = resolve_device(request.device)
    dtype = resolve_dtype(request.dtype, device)
    shard_index, shard_count = resolve_shard(request.shard)
    out = Path(request.out)
    settings = {
        "model": spec.name, "backend": backend_name, "steps": list(steps), "cfg": cfg, "sizes": [list(size)],
        "seeds": list(request.seeds), "dtype": str(dtype).removeprefix("torch."), "device": device.split(":")[0],
        "prompts": prompts.path.name, "inputs_sha256": prompts.sha256, "weights": weights_id(spec, backend_name, request.model_path, request.lora_path),
        "max_gap": request.max_gap, "residual_tokens": request.residual_tokens,
        "lora": str(Path(request.lora_path).resolve()) if request.lora_path else None,  # later stages load it from here
        # CPU kernels sum in an order that depends on the thread count: references reproduce only with the same one
        "cpu_threads": torch.get_num_threads() if device == "cpu" else None,
    }
    if backend_name == "lightx2v":  # sweep reuses the config; the dtype is LightX2V's own
        from calib.backends.lightx2v import lightx2v_settings

        settings.update(lightx2v_settings(request.lightx2v_config, request.dtype))
    check_same_settings(out / RUN_FILE, settings, "recording", flag="another run folder",
                        files={"inputs_sha256": f"prompt set {prompts.path}: other text or images than recorded",
                               "lightx2v_config_sha256": f"--lightx2v-config {request.lightx2v_config}: other contents"})
    remove_stale_temp_files(out)
    units = [Unit(item, seed, n, tuple(size)) for item in prompts.items for seed in request.seeds for n in steps]
    mine = [u for u in units if prompts.items.index(u.item) % shard_count == shard_index]
    todo = [u for u in mine if not (out / "trace" / f"{u.name}.parquet").exists()]
    echo(f"record {spec.name} ({backend_name}, {device}, {settings['dtype']}): {len(prompts)} prompts x {len(request.seeds)} seeds x "
         f"{len(steps)} step count(s) {', '.join(map(str, steps))}, {size[0]}x{size[1]}, CFG {cfg}; "
         f"shard {shard_index}/{shard_count}: {len(todo)} to run, {len(mine) - len(todo)} done")
    if todo:
        # The model loads before anything is written: a failed load leaves nothing that blocks the corrected rerun.
        backend = load_backend(spec, backend_name, request.model_path, device, dtype, request.lightx2v_config, request.lora_path)
        try:
            write_run_file(out, settings, units, prompts)
            with progress("record", len(todo)) as advance:
                for unit in todo:
                    record_unit(backend, unit, cfg, out, request.max_gap, request.residual_tokens)
                    write_run_file(out, settings, units, prompts)
                    advance(f"record {unit.name}")
        finally:
            backend.close()
    else:
        write_run_file(out, settings, units, prompts)
    merged = merge_if_complete(out, units)
    echo(f"wrote {out / ('trace.parquet' if merged else 'trace')} and {out / 'refs'}")
    return out


def record_unit(backend, unit: Unit, cfg: float, out: Path, max_gap: int, residual_tokens: int) -> None:
    recorder = TraceRecorder(max_gap, residual_tokens)
    with backend.observing(recorder.on_call):
        generation = backend.run(unit.item, unit.seed, unit.steps, cfg, unit.size)
    frame = recorder.frame(unit)
    # The references and samples first, then the trace part that marks the unit as done.
    write_png(out / "refs" / f"{unit.name}.png", generation.image)
    write_array(out / "refs" / f"{unit.name}.npy", generation.latents)
    if residual_tokens:
        write_array(out / "residuals" / f"{unit.name}.npy", recorder.residual_sample())
    write_table(out / "trace" / f"{unit.name}.parquet", frame)


def write_run_file(out: Path, settings: dict, units: list[Unit], prompts) -> None:
    prompts.copy_into(out / INPUTS)
    done = {p.stem for p in (out / "trace").glob("*.parquet")}
    existing = read_json(out / RUN_FILE) if (out / RUN_FILE).exists() else {}
    write_json(out / RUN_FILE, {
        "kind": "record",
        "settings": settings,
        "prompt_file": f"{INPUTS}/prompts.jsonl",  # relative to the run folder
        "created": existing.get("created", now_iso()),
        "updated": now_iso(),
        "versions": library_versions(),
        "status": {u.name: ("done" if u.name in done else "pending") for u in units},
    })


def merge_if_complete(out: Path, units: list[Unit]) -> bool:
    if not all((out / "trace" / f"{u.name}.parquet").exists() for u in units):
        return False
    write_table(out / "trace.parquet", load_trace(out))
    return True
