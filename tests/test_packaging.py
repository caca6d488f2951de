"""Packaging for two audiences: the runtime `teacache` (torch and numpy) installs and imports without the toolkit,
and the `teacal` command says in one line what to install when the toolkit is missing.

The runtime-only environments are real ones: a folder holding exactly the installed distributions that pip would
install for `teacal` (or `teacal[diffusers]`), resolved from their metadata, and a Python started without site-packages.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TOOLKIT_ONLY = ("matplotlib", "lpips", "pandas", "typer", "scipy", "pyarrow", "skimage", "torchmetrics", "rich")


def _installable(requirements: list[str], target: Path) -> Path:
    """`target` filled (by symlinks) with every installed distribution `pip install` of `requirements` would bring."""
    todo = [(Requirement(r), ("",)) for r in requirements]
    seen: set[str] = set()
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:  # not needed on this platform (or an optional extra's part)
            continue
        todo += [(Requirement(r), ("", *requirement.extras)) for r in dist.requires or ()]
        for top in {f.parts[0] for f in dist.files or () if not f.parts[0].startswith("..") and not f.parts[0].endswith(".pth")}:
            link, source = target / top, dist.locate_file(top)
            if not link.exists() and Path(source).exists():
                link.symlink_to(source)
    return target


def _python(site: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Python without site-packages: only `site` (what pip would have installed) and this project's packages."""
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=site, env=env, capture_output=True, text=True, timeout=300)


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_the_base_install_is_the_runtime_alone_and_the_toolkit_an_extra():
    project = PYPROJECT["project"]
    assert _names(project["dependencies"]) == {"torch", "numpy"}
    extras = project["optional-dependencies"]
    assert _names(extras["diffusers"]) == {"diffusers"}
    assert {"typer", "rich", "scipy", "pandas", "pyarrow", "matplotlib", "lpips", "torchmetrics", "diffusers", "safetensors", "pillow",
            "scikit-image", "torchvision"} <= _names(extras["toolkit"])
    # make install installs the toolkit, and the build backend reads the SPDX license string
    assert ".[toolkit,dev,peers,real]" in (ROOT / "Makefile").read_text()
    assert project["license"] == "Apache-2.0" and PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_every_pin_accepts_what_is_installed_so_pip_never_swaps_torch():
    project = PYPROJECT["project"]
    for text in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        requirement = Requirement(text)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        assert requirement.specifier.contains(installed, prereleases=True), f"{text} rejects the installed {installed}"


def test_pyproject_gives_setuptools_no_deprecation_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.install_requires == ["torch>=2.4", "numpy>=1.26"]


def test_make_echoes_no_recipe_comments():
    """make prints every recipe line it runs, `#` comments in a recipe included: they belong above the target."""
    dry = subprocess.run(["make", "-n", "-B", "install", "demo", "eval", "ladder", "train-tiny", "train-scenes"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, MAKEFLAGS=""))
    assert dry.returncode == 0, dry.stderr
    assert not [line for line in dry.stdout.splitlines() if line.lstrip().startswith("#")]
    assert "REFERENCE" not in (ROOT / "Makefile").read_text()


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory) -> Path:
    return _installable(PYPROJECT["project"]["dependencies"], tmp_path_factory.mktemp("runtime-site"))


def test_the_runtime_alone_imports_and_decides_without_the_toolkit(runtime_only):
    code = (
        "import sys\n"
        "from teacache.policy import TeaCachePolicy\n"
        "from teacache.preset import Preset\n"
        "import teacache.forecast\n"
        "preset = Preset.load(sys.argv[1])\n"
        f"print(sorted(m for m in {TOOLKIT_ONLY + ('calib', 'diffusers')!r} if m in sys.modules), preset.signal)\n"
    )
    done = _python(runtime_only, code, str(ROOT / "presets" / "tiny-qwen-image-edit.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("[] ")
    # without the [diffusers] extra, its adapter says which extra brings diffusers
    done = _python(runtime_only, "import teacache.diffusers")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: teacache.diffusers needs diffusers (>=0.42.1,<0.43): pip install 'teacal[diffusers]'")


def test_teacal_without_the_toolkit_says_what_to_install_in_one_line(runtime_only):
    # what the `teacal` console script runs
    done = _python(runtime_only, "import sys; from calib.cli import main; sys.argv[0] = 'teacal'; sys.exit(main())", "fit", "--help")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: the teacal command needs the toolkit (missing: typer")
    assert "pip install 'teacal[toolkit]'" in done.stderr


RUN_A_HOOKED_TRANSFORMER = """
import sys
import torch
from diffusers import QwenImageTransformer2DModel
from teacache.diffusers import apply_teacache, teacache_stats
from teacache.preset import Preset
torch.manual_seed(0)
t = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=24, num_attention_heads=4,
                                joint_attention_dim=32, axes_dims_rope=(4, 10, 10)).eval()
apply_teacache(t, Preset(model="m", signal="temb", coefficients=[1.0, 0.0], ret_steps=1, cutoff_steps=-1), threshold=1e9)
hidden, text, mask = torch.randn(1, 16, 16), torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.long)
with torch.no_grad():
    for step in range(4):
        with t.cache_context("cond", step_index=step, num_inference_steps=4):
            t(hidden_states=hidden, timestep=torch.tensor([1 - step / 4]), encoder_hidden_states=text, encoder_hidden_states_mask=mask,
              img_shapes=[[(1, 4, 4)]], return_dict=False)
print(teacache_stats(t).schedule("cond"))
print(sorted(m for m in ("matplotlib", "lpips", "pandas", "typer", "calib") if m in sys.modules))
"""


def test_the_runtime_with_the_diffusers_extra_runs_teacache_without_the_toolkit(tmp_path):
    project = PYPROJECT["project"]
    site = _installable([*project["dependencies"], *project["optional-dependencies"]["diffusers"]], tmp_path)
    absent = _python(site, "import importlib.util as u; print([m for m in ('matplotlib', 'lpips', 'pandas', 'typer') if u.find_spec(m)])")
    assert absent.stdout.strip() == "[]", absent.stderr[-2000:]  # the environment really lacks them
    done = _python(site, RUN_A_HOOKED_TRANSFORMER)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["[True, False, False, True]", "[]"]


def test_importing_teacache_diffusers_pulls_in_no_toolkit_module():
    code = "import sys, teacache.diffusers; print(sorted(m for m in ('matplotlib', 'lpips', 'pandas', 'typer', 'calib') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_fit_and_report_import_no_torch():
    code = "import calib.fit, calib.report, sys; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("command", "choices"), [("fit", "auto|temb|modin"), ("sweep", "auto|float32|bfloat16|float16"),
                                                  ("record", "auto|float32|bfloat16|float16")])
def test_help_lists_the_choices(command, choices):
    done = subprocess.run([sys.executable, "-m", "calib.cli", command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="220", TERM="dumb"))
    assert done.returncode == 0, done.stderr
    assert choices in re.sub(r"\s+", "", done.stdout)


def _architecture_rooms() -> list[str]:
    """The paths docs/ARCHITECTURE.md's tree names, folders ending in /, from each line's indentation."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    tree = text.split("```")[1]
    rooms, stack = [], []
    for line in tree.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match or not re.search(r"[/.]", match.group(2)) or line.startswith(" " * 20):  # a continued description
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        rooms.append("".join(stack))
    return rooms


def test_the_architecture_tree_names_every_module_and_only_what_exists():
    rooms = _architecture_rooms()
    for room in rooms:
        assert list(ROOT.glob(room.rstrip("/"))), f"docs/ARCHITECTURE.md names {room}, which does not exist"
    named = {r for r in rooms if not r.endswith("/")}
    modules = {str(p.relative_to(ROOT)) for package in ("calib", "teacache") for p in (ROOT / package).rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "backends"}
    assert sorted(modules - named) == [], "modules missing from docs/ARCHITECTURE.md"
