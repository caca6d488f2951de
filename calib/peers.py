"""Peer caches, measured on the same chart as calibrated TeaCache.

diffusers' own FirstBlockCache, MagCache and SeaCache (through the public `enable_cache`/`disable_cache`) and
cache-dit's DBCache (an optional extra: `pip install 'teacal[peers]'`) are applied to a backend's
`QwenImageTransformer2DModel` for one generation at a time, exactly as a user would apply them, while torch hooks
count what really ran:

* a transformer call is *computed* when its last block ran, *skipped* otherwise;
* `block_forwards` counts every block that ran. Some peers skip per block, not per call: FirstBlockCache and
  DBCache (F1B0) always run block 0 to decide, so a skipped call still costs one block.

Qwen quirks handled here (diffusers 0.42.1):

* MagCache needs `mag_ratios`. They come from diffusers' own `calibrate=True` run on the recorded prompts and
  settings, once, averaged over every (prompt, seed) and CFG branch (the config holds one array for both), and
  are cached in the run folder (`magcache.json`).
* SeaCache builds its indicator from "raw vision latents" that diffusers only extracts for Cosmos 3 and Wan; for
  Qwen it needs a `raw_vision_callback` (`qwen_raw_vision` below: the target image's packed tokens, unpacked to
  `(C, T, H, W)`), and `cache_context(name, step_index=, sigma=, num_inference_steps=)`. Without either it
  silently runs every block ("fail-open"); here any fail-open warning is an error, so a measured SeaCache row is
  never an uncached run in disguise. The tiny backend's loop passes the step fields; diffusers' stock Qwen
  pipelines pass the branch name only, so SeaCache is refused up front on the diffusers backend (`check_backend`).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from calib.errors import UserError

if TYPE_CHECKING:  # torch loads only when a peer runs: `teacal --help` reads the grids below without it
    import torch

METHODS = ("teacache", "fbcache", "magcache", "seacache", "dbcache")
PEERS = METHODS[1:]
LABELS = {
    "fbcache": "FirstBlockCache (diffusers)",
    "magcache": "MagCache (diffusers)",
    "seacache": "SeaCache (diffusers)",
    "dbcache": "DBCache (cache-dit)",
}
CACHE_DIT_MISSING = "--method dbcache needs cache-dit, an optional extra: pip install 'teacal[peers]'"
MAGCACHE_FILE = "magcache.json"


@dataclass(frozen=True)
class GridParam:
    name: str  # the peer's own config field; `--peer-grid METHOD.NAME=VALUES` sets its values
    short: str  # in the configuration id
    kind: type
    default: str
    low: float = 0.0
    high: float = math.inf


# Each peer's parameter grid: the product of its parameters' values. The first parameter is the row's `threshold`.
GRIDS: dict[str, tuple[GridParam, ...]] = {
    "fbcache": (GridParam("threshold", "t", float, "0.05,0.1,0.2,0.3,0.4,0.6"),),
    "magcache": (
        GridParam("threshold", "t", float, "0.02,0.06,0.12,0.24"),
        GridParam("max_skip_steps", "k", int, "2,3"),
        GridParam("retention_ratio", "r", float, "0.2", high=1.0),
    ),
    "seacache": (GridParam("threshold", "t", float, "0.1,0.25,0.5,1"),),
    "dbcache": (GridParam("residual_diff_threshold", "t", float, "0.05,0.1,0.2,0.3,0.4,0.6"),),
}
# The setting under which each peer never skips: its image must equal the uncached one bit for bit.
NEVER_SKIP = {
    "fbcache": {"threshold": 0.0},
    "magcache": {"threshold": 0.0, "max_skip_steps": 0, "retention_ratio": 0.0},
    "seacache": {"threshold": 0.0},
    "dbcache": {"residual_diff_threshold": 0.0},
}
# DBCache's fixed structure: Fn=1 (block 0 decides, as in FirstBlockCache), Bn=0, step 0 always computed.
DBCACHE_FIXED = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1)


def parse_methods(values) -> tuple[str, ...]:
    """`--method` values, each possibly a comma list -> distinct method names in the order given."""
    names: list[str] = []
    for value in values or ("teacache",):
        for name in (v.strip().lower() for v in value.split(",")):
            if not name:
                continue
            if name not in METHODS:
                raise UserError(f"--method {name!r}: expected one or more of {', '.join(METHODS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise UserError(f"--method: expected one or more of {', '.join(METHODS)}")
    return tuple(names)


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def check_installed(methods) -> None:
    """Fail before any expensive work when a chosen peer's package is missing."""
    if "dbcache" in methods:
        _cache_dit()


def check_backend(methods, backend: str) -> None:
    """SeaCache needs the step, sigma and step count in `cache_context`. The tiny backend's loop passes them; the
    stock Qwen-Image pipelines of diffusers 0.42.1 (what the diffusers backend runs) pass the branch name only, and
    `CacheContext` is frozen, so no hook can add them: SeaCache would run every block there."""
    if "seacache" in methods and backend != "tiny":
        raise UserError(f"--method seacache: the {backend} backend runs diffusers' stock Qwen-Image pipeline, whose cache_context "
                        "passes only the branch name; SeaCache also needs step_index, sigma and num_inference_steps and would "
                        "run every block (use the tiny backend, or a denoising loop that passes them)")


def _cache_dit():
    try:
        import cache_dit
    except ImportError as err:
        raise UserError(f"{CACHE_DIT_MISSING} ({err})") from None
    return cache_dit


def parse_values(key: str, param: GridParam, spec: str) -> list:
    bad = UserError(f"--peer-grid {key}={spec}: expected a comma list of {'integers' if param.kind is int else 'numbers'} "
                    f"between {param.low:g} and {param.high:g}")
    try:
        values = [param.kind(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise bad from None
    if not values or any(not math.isfinite(v) or not param.low <= v <= param.high for v in values):
        raise bad
    return sorted(set(values))


def grid_keys() -> list[str]:
    """Every `--peer-grid` key with its default values, as `--help` lists them."""
    return [f"{method}.{p.name}={p.default}" for method, grid in GRIDS.items() for p in grid]


def parse_peer_grids(values, methods) -> dict[str, str]:
    """`--peer-grid METHOD.PARAM=V1,V2` values -> {"METHOD.PARAM": "V1,V2"}, for peers among `methods`."""
    known = {f"{method}.{p.name}" for method, grid in GRIDS.items() for p in grid}
    out = {}
    for value in values or ():
        key, _, spec = value.partition("=")
        key = key.strip()
        if key not in known or not spec.strip():
            raise UserError(f"--peer-grid {value!r}: expected METHOD.PARAM=V1,V2 with METHOD.PARAM one of {', '.join(sorted(known))}")
        if key.split(".")[0] not in methods:
            raise UserError(f"--peer-grid {value!r}: {key.split('.')[0]} is not measured; add --method {key.split('.')[0]}")
        out[key] = spec
    return out


@dataclass(frozen=True)
class PeerSetting:
    method: str
    params: tuple[tuple[str, float | int], ...]

    @property
    def id(self) -> str:
        shorts = {p.name: p.short for p in GRIDS[self.method]}
        return self.method + "".join(f"-{shorts[name]}{value:g}" for name, value in self.params)

    @property
    def label(self) -> str:
        return LABELS[self.method]

    @property
    def threshold(self) -> float:
        return float(self.params[0][1])


def settings_grid(methods, specs: dict[str, str] | None = None) -> list[PeerSetting]:
    """Every peer setting to measure. `specs` maps a grid key (e.g. "magcache.threshold") to its comma list."""
    specs = specs or {}
    settings = []
    for method in methods:
        if method not in PEERS:
            continue
        grid = GRIDS[method]
        axes = [parse_values(f"{method}.{p.name}", p, specs.get(f"{method}.{p.name}") or p.default) for p in grid]
        settings += [PeerSetting(method, tuple((p.name, v) for p, v in zip(grid, combo, strict=True))) for combo in product(*axes)]
    return settings


# -- counting ---------------------------------------------------------------------------------------------------


class CallCounter:
    """Counts, with plain torch hooks, every transformer call and every transformer block that really ran.

    A block "ran" when its attention ran, which every cache under test bypasses on a skip. Calls alternate cond,
    uncond within a step (as every Qwen loop and pipeline runs them), so with CFG the cond calls are the even ones.
    """

    def __init__(self, transformer: torch.nn.Module, branches: int) -> None:
        blocks = transformer.transformer_blocks
        self.branches = branches
        self.ran: list[bool] = []  # per transformer call: did its last block run?
        self.block_forwards = 0
        self._handles = [transformer.register_forward_pre_hook(self._on_call)]
        for index, block in enumerate(blocks):
            self._handles.append(block.attn.register_forward_pre_hook(self._on_block(index == len(blocks) - 1)))

    def _on_call(self, module, args) -> None:
        self.ran.append(False)

    def _on_block(self, is_tail: bool):
        def hook(module, args) -> None:
            self.block_forwards += 1
            if is_tail and self.ran:
                self.ran[-1] = True

        return hook

    @property
    def computed(self) -> int:
        return sum(self.ran)

    @property
    def skipped(self) -> int:
        return len(self.ran) - self.computed

    def schedule(self) -> str:
        """The cond branch's steps: x computed, . skipped."""
        from calib.simulate import schedule_text  # pandas: not at `teacal` start-up, which imports this module

        return schedule_text(self.ran[:: self.branches])

    def row(self) -> dict:
        per_branch = [sum(self.ran[b :: self.branches]) for b in range(self.branches)]
        return dict(computed=self.computed, skipped=self.skipped, block_forwards=self.block_forwards, schedule=self.schedule(),
                    computed_cond=per_branch[0], computed_uncond=per_branch[1] if self.branches > 1 else 0)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# -- Qwen adapters ----------------------------------------------------------------------------------------------


def qwen_raw_vision(module: torch.nn.Module, args, kwargs) -> list[torch.Tensor] | None:
    """SeaCache's `raw_vision_callback` for `QwenImageTransformer2DModel`.

    The transformer gets packed latents `[B, tokens, C*p*p]`: the target image's tokens first, then the reference
    image's (edit models). SeaCache wants the generated output only, as `(C, T, H, W)` latents, so this keeps the
    first `frames*h*w` tokens (the first `img_shapes` entry) and undoes `_pack_latents`' 2x2 patching.
    """
    import torch

    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    img_shapes = kwargs.get("img_shapes")
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3 or not img_shapes:
        return None
    p = getattr(getattr(module, "config", None), "patch_size", 2)
    latents = []
    for index, sample in enumerate(hidden_states):
        shapes = img_shapes[index] if len(img_shapes) == len(hidden_states) else img_shapes[0]
        frames, h, w = shapes[0] if isinstance(shapes[0], (list, tuple)) else shapes
        tokens = sample[: prod((frames, h, w))]
        channels = tokens.shape[-1] // (p * p)
        tokens = tokens.reshape(frames, h, w, channels, p, p).permute(3, 0, 1, 4, 2, 5)
        latents.append(tokens.reshape(channels, frames, h * p, w * p))
    return latents


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _captured(name: str, level: int, propagate: bool = True) -> Iterator[_Capture]:
    logger = logging.getLogger(name)
    capture = _Capture()
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(capture)
    logger.setLevel(level)
    logger.propagate = propagate
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


@contextlib.contextmanager
def _quiet_cache_dit() -> Iterator[None]:
    """cache-dit logs several INFO lines per `enable_cache` and a warning per `disable_cache`; keep errors only."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in ("cache_dit", "CACHE_DIT")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# -- apply / remove ---------------------------------------------------------------------------------------------


def peer_config(method: str, params: dict, steps: int, cfg: float, mag_ratios=None):
    """The peer's own config object, validated by its own `__post_init__` where it has one."""
    if method == "fbcache":
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=float(params["threshold"]))
    if method == "magcache":
        from diffusers import MagCacheConfig

        if mag_ratios is None:
            raise ValueError("MagCache needs mag_ratios: calibrate them first (calib.peers.mag_ratios)")
        return MagCacheConfig(threshold=float(params["threshold"]), max_skip_steps=int(params["max_skip_steps"]),
                              retention_ratio=float(params["retention_ratio"]), num_inference_steps=steps, mag_ratios=list(mag_ratios))
    if method == "seacache":
        from diffusers import SeaCacheConfig

        return SeaCacheConfig(threshold=float(params["threshold"]), raw_vision_callback=qwen_raw_vision)
    if method == "dbcache":
        from cache_dit import DBCacheConfig

        return DBCacheConfig(residual_diff_threshold=float(params["residual_diff_threshold"]), num_inference_steps=steps,
                             enable_separate_cfg=cfg > 1, **DBCACHE_FIXED)
    raise ValueError(f"unknown peer {method!r}")


@contextlib.contextmanager
def applied(transformer: torch.nn.Module, method: str, params: dict, steps: int, cfg: float, mag_ratios=None) -> Iterator[CallCounter]:
    """The peer on `transformer` while active (one generation); yields its `CallCounter`; removed on exit."""
    if method == "dbcache":
        cache_dit = _cache_dit()
        config = peer_config(method, params, steps, cfg)
        with _quiet_cache_dit():
            cache_dit.enable_cache(transformer, cache_config=config)
        remove = lambda: cache_dit.disable_cache(transformer)  # noqa: E731
    else:
        transformer.enable_cache(peer_config(method, params, steps, cfg, mag_ratios))
        remove = transformer.disable_cache
    counter = CallCounter(transformer, 2 if cfg > 1 else 1)
    try:
        with _captured("diffusers.hooks.sea_cache", logging.WARNING) as warnings:
            yield counter
        if method == "seacache" and warnings.messages:
            raise UserError(f"SeaCache fell back to running every block on this backend: {warnings.messages[0]}")
    finally:
        counter.close()
        with _quiet_cache_dit():
            remove()


# -- MagCache calibration ---------------------------------------------------------------------------------------


def calibrate_mag_ratios(backend, pairs, steps: int, cfg: float, size) -> dict:
    """diffusers' MagCache `calibrate=True` on every (prompt, seed): per-step ratios, averaged over the runs and
    branches. Calibration never skips, so each generation is an uncached one."""
    import torch
    from diffusers import MagCacheConfig

    transformer = backend.transformer
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        # The ratios are printed and logged at INFO; the log record is what is read, the print is kept off stdout.
        with _captured("diffusers.hooks.mag_cache", logging.INFO, propagate=False) as log, contextlib.redirect_stdout(io.StringIO()):
            for item, seed in pairs:
                backend.run(item, seed, steps, cfg, size)
    finally:
        transformer.disable_cache()
    prefix = "MagCache Calibration Results:"
    series = [ast.literal_eval(m[len(prefix):].strip()) for m in log.messages if m.startswith(prefix)]
    branches = 2 if cfg > 1 else 1
    if len(series) != len(pairs) * branches or any(len(s) != steps for s in series):
        raise RuntimeError(f"MagCache calibration gave {len(series)} series of lengths {sorted({len(s) for s in series})}; "
                           f"expected {len(pairs) * branches} of {steps}")
    mean = torch.tensor(series, dtype=torch.float64).mean(0)
    by_branch = {name: torch.tensor(series[i::branches], dtype=torch.float64).mean(0).tolist() for i, name in enumerate(("cond", "uncond")[:branches])}
    return {"mag_ratios": mean.tolist(), "by_branch": by_branch, "series": len(series)}


def mag_ratios(backend, run: Path, key: dict, pairs, steps: int, cfg: float, size, echo=print) -> list[float]:
    """The run's calibrated MagCache ratios: from `<run>/magcache.json` when calibrated with the same `key`
    (record settings, device, dtype, library version), else calibrated now and saved there."""
    from calib.runfiles import now_iso, read_json, write_json

    path = Path(run) / MAGCACHE_FILE
    if path.exists():
        cached = read_json(path)
        if cached.get("key") == key:
            echo(f"MagCache ratios from {path}")
            return cached["mag_ratios"]
    echo(f"MagCache: calibrating mag_ratios on {len(pairs)} generations (diffusers calibrate=True)")
    result = calibrate_mag_ratios(backend, pairs, steps, cfg, size)
    write_json(path, {"kind": "magcache-calibration", "key": key, **result, "created": now_iso()})
    echo(f"wrote {path}")
    return result["mag_ratios"]
