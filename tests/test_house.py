"""The house a newcomer can change (issue 26): small modules and functions, imports that only run downwards, no dead
function, and ruff's complexity rules; checked here so that CI keeps them."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60  # in calib/; the CLI's commands are typer signatures and are left out
# Layers, lowest first: a module imports only from layers below its own (and a package from its own members).
LAYERS = [
    ("teacache", "calib.errors", "calib.progress", "calib.budgets", "calib.models", "calib.backends.loop", "calib.tiny"),
    ("calib.prompts", "calib.runfiles", "calib.metrics", "calib.simulate"),
    ("calib.backends", "calib.costmodel", "calib.configs", "calib.regression"),
    ("calib.tables", "calib.peers"),
    ("calib.oracle",),
    ("calib.search", "calib.reuse_rule"),
    ("calib.record", "calib.probe", "calib.fit", "calib.tune", "calib.sweep", "calib.report", "calib.export"),
    ("calib.bench", "calib.training", "calib.calibrate"),
    ("calib.cli",),
]


def _modules() -> dict[str, Path]:
    paths = sorted((ROOT / "calib").rglob("*.py")) + sorted((ROOT / "teacache").glob("*.py"))
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in paths}


def _room(module: str) -> tuple[int, str]:
    """The layer of `module` and the room it is in: the longest prefix of LAYERS naming it (calib.backends.tiny is in
    calib.backends). Modules of one room (a package) may import each other."""
    best = max(((len(prefix), i, prefix) for i, names in enumerate(LAYERS) for prefix in names if module == prefix or module.startswith(prefix + ".")),
               default=None)
    assert best is not None, f"{module} is in no layer of tests/test_house.py: place it"
    return best[1], best[2]


def test_modules_are_small_and_functions_short():
    long_modules = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long_modules == {}, f"modules over {MAX_MODULE_LINES} lines"
    long_functions = []
    for module, path in _modules().items():
        if not module.startswith("calib") or module == "calib.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append(f"{module}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long_functions == [], f"functions over {MAX_FUNCTION_LINES} lines"


def test_imports_run_downwards_only():
    """Lazy imports inside functions count too: a layer that needs a higher one is in the wrong room."""
    upwards = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in ("calib", "teacache"):
                imported = [node.module] if node.module != "calib" else [f"calib.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names if a.name.split(".")[0] in ("calib", "teacache")]
            else:
                continue
            for target in imported:
                (layer, room), (target_layer, target_room) = _room(module), _room(target)
                if room != target_room and target_layer >= layer:
                    upwards.append(f"{module} imports {target}")
    assert upwards == []


def test_every_function_and_class_is_used_somewhere():
    sources = [*_modules().values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "integrations").rglob("*.py"), ROOT / "Makefile"]
    text = "\n".join(p.read_text() for p in sources)
    dead = []
    for module, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            registered = any(isinstance(d, ast.Name | ast.Attribute | ast.Call) for d in getattr(node, "decorator_list", []))
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("__") and not registered:
                if len(re.findall(rf"\b{re.escape(node.name)}\b", text)) <= 1:
                    dead.append(f"{module}.{node.name}")
    assert dead == [], "defined but never used"


def test_ruff_complexity_rules_hold():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail("ruff is part of the [dev] extra that make install installs")
    done = subprocess.run([str(ruff), "check", "calib", "teacache", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
