"""Prompt sets: JSONL rows `{id, prompt, image, negative_prompt?}`, validated before any model is loaded.

`image` is `skimage:NAME` (an image bundled in scikit-image's wheel) or a path relative to the prompt file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image

from calib.errors import UserError

# Images that ship inside the scikit-image wheel; the others in skimage.data need a download (REFERENCE §5).
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text",
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = {"id", "prompt", "image", "negative_prompt"}


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str
    image: str | None
    negative_prompt: str
    base: Path  # folder that relative image paths resolve against

    def load_image(self) -> Image.Image | None:
        if self.image is None:
            return None
        if self.image.startswith("skimage:"):
            return _skimage(self.image.removeprefix("skimage:")).copy()
        with Image.open(self.base / self.image) as img:
            return img.convert("RGB")


@dataclass(frozen=True)
class PromptSet:
    path: Path
    items: tuple[PromptItem, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.items)


def load_prompts(path: str | Path, need_image: bool = False) -> PromptSet:
    """Read and validate a prompt set; every problem is a `UserError` naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    raw = path.read_bytes()
    items: list[PromptItem] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(raw.decode("utf-8", errors="strict").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: bad JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        unknown = sorted(set(row) - _FIELDS)
        if unknown:
            raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: id, prompt, image, negative_prompt")
        for name in ("id", "prompt"):
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise UserError(f"{where}: field '{name}' must be a non-empty string")
        if not _ID.match(row["id"]):
            raise UserError(f"{where}: id {row['id']!r} must be 1-64 letters, digits, '.', '_' or '-' (it names files)")
        if row["id"] in seen:
            raise UserError(f"{where}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = lineno
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise UserError(f"{where}: field 'image' must be 'skimage:NAME' or a path")
            _check_image(image, path.parent, where)
        elif need_image:
            raise UserError(f"{where}: this model edits an image, so field 'image' is required")
        negative = row.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise UserError(f"{where}: field 'negative_prompt' must be a string")
        items.append(PromptItem(row["id"], row["prompt"], image, negative, path.parent))
    if not items:
        raise UserError(f"{path}: no prompts in file")
    return PromptSet(path, tuple(items), hashlib.sha256(raw).hexdigest())


def _check_image(image: str, base: Path, where: str) -> None:
    if image.startswith("skimage:"):
        name = image.removeprefix("skimage:")
        if name not in SKIMAGE_IMAGES:
            raise UserError(f"{where}: unknown skimage image {name!r}; offline ones: {', '.join(SKIMAGE_IMAGES)}")
        return
    file = base / image
    if not file.is_file():
        raise UserError(f"{where}: image not found: {file}")


@cache
def _skimage(name: str) -> Image.Image:
    from skimage import data

    array = getattr(data, name)()
    image = Image.fromarray(array)
    return image.convert("RGB")
