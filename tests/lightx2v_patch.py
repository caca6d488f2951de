"""The upstreamable LightX2V patch (``integrations/lightx2v/qwen_image_tea.patch``), applied as a user applies it.

`rule_module` loads the patch's pure rule module (``teacache_rule.py``, no torch or LightX2V imports) from the patch
itself, so the default suite can check it against `teacache.policy` without a LightX2V checkout.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
PATCH = REPO / "integrations/lightx2v/qwen_image_tea.patch"
RULE_PATH = "lightx2v/models/networks/qwen_image/infer/feature_caching/teacache_rule.py"


def git_apply(target: Path, *options: str) -> None:
    """`git apply` the patch in `target` (a LightX2V tree, or an empty folder with --include of new files)."""
    if shutil.which("git") is None:
        raise RuntimeError("git is needed to apply the LightX2V patch")
    proc = subprocess.run(["git", "apply", *options, str(PATCH)], cwd=target, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git apply {' '.join(options)} {PATCH.name} failed in {target}: {proc.stderr.strip()}")


def rule_module(folder: Path) -> ModuleType:
    """The patch's teacache_rule.py, written into `folder` by `git apply --include` and imported from there."""
    folder.mkdir(parents=True, exist_ok=True)
    git_apply(folder, f"--include={RULE_PATH}")
    spec = importlib.util.spec_from_file_location("lightx2v_patch_teacache_rule", folder / RULE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def patched_copy(src: Path, target: Path) -> Path:
    """A copy of a clean LightX2V checkout's packages with the patch applied (the checkout itself stays clean)."""
    git_apply(src, "--check")
    for part in ("lightx2v", "lightx2v_platform"):
        shutil.copytree(src / part, target / part, ignore=shutil.ignore_patterns("__pycache__"))
    git_apply(target)
    return target
