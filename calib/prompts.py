"""Prompt sets: JSONL rows `{id, prompt, image, negative_prompt?}`, validated before any model is loaded.

`image` is `skimage:NAME` (an image bundled in scikit-image's wheel) or a path relative to the prompt file. Every
image is opened and decoded while the set loads, so a broken one fails before a model loads, naming its line.
`record` copies the set and its images into the run folder (`inputs/`), so the run folder stands on its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from calib.errors import UserError
from teacache._files import atomic_write

# Images that ship inside the scikit-image wheel; the others in skimage.data need a download.
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text",
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELDS = {"id", "prompt", "image", "negative_prompt"}
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"  # the repository's prompt sets (a source checkout)
COPY_FILE = "prompts.jsonl"  # the copy inside a run folder's inputs/


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

    def same_request(self, other: PromptItem) -> bool:
        """The same prompt, negative prompt and image pixels."""
        if (self.prompt, self.negative_prompt) != (other.prompt, other.negative_prompt):
            return False
        mine, theirs = self.load_image(), other.load_image()
        return (mine is None) == (theirs is None) and (mine is None or mine.tobytes() == theirs.tobytes())


@dataclass(frozen=True)
class PromptSet:
    path: Path
    items: tuple[PromptItem, ...]
    sha256: str  # of the prompt file's bytes and every image file it names: what a run's results depend on

    def __len__(self) -> int:
        return len(self.items)

    def copy_into(self, folder: Path) -> Path:
        """The set and its image files under `folder` (inputs/ of a run), same relative paths; returns the copy's path."""
        folder.mkdir(parents=True, exist_ok=True)
        for item in self.items:
            if item.image is None or item.image.startswith("skimage:"):
                continue
            target = folder / item.image
            if not target.exists():
                atomic_write(target, (item.base / item.image).read_bytes())
        copy = folder / COPY_FILE
        if not copy.exists():
            atomic_write(copy, self.path.read_bytes())
        return copy


def default_prompts(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise UserError(f"no default prompt set here ({path} is missing: teacal runs from a source checkout); pass --prompts FILE")
    return path


def load_prompts(path: str | Path, need_image: bool = False) -> PromptSet:
    """Read and validate a prompt set; every problem is a `UserError` naming `file:line`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a prompt file (JSONL)")
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the prompt file as UTF-8") from None
    digest = hashlib.sha256(raw)
    items: list[PromptItem] = []
    seen: dict[str, int] = {}
    images_checked: dict[str, bytes] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = _row(line, f"{path}:{lineno}", seen, lineno)
        image = row.get("image")
        if image is not None and image not in images_checked:
            images_checked[image] = _check_image(image, path.parent, f"{path}:{lineno}")
        elif image is None and need_image:
            raise UserError(f"{path}:{lineno}: this model edits an image, so field 'image' is required")
        items.append(PromptItem(row["id"], row["prompt"], image, row.get("negative_prompt", ""), path.parent))
    if not items:
        raise UserError(f"{path}: no prompts in file")
    for name in sorted(images_checked):
        digest.update(name.encode() + b"\0" + images_checked[name])
    return PromptSet(path, tuple(items), digest.hexdigest())


def _row(line: str, where: str, seen: dict[str, int], lineno: int) -> dict:
    """One line's object, its fields checked; `seen` (id -> line) catches duplicate ids."""
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
    if row.get("image") is not None and (not isinstance(row["image"], str) or not row["image"]):
        raise UserError(f"{where}: field 'image' must be 'skimage:NAME' or a path")
    if not isinstance(row.get("negative_prompt", ""), str):
        raise UserError(f"{where}: field 'negative_prompt' must be a string")
    return row


def _check_image(image: str, base: Path, where: str) -> bytes:
    """The image's identity for the set's hash (file bytes, or the skimage name), after decoding it once."""
    if image.startswith("skimage:"):
        name = image.removeprefix("skimage:")
        if name not in SKIMAGE_IMAGES:
            raise UserError(f"{where}: unknown skimage image {name!r}; offline ones: {', '.join(SKIMAGE_IMAGES)}")
        return image.encode()
    file = base / image
    if Path(image).is_absolute() or ".." in Path(image).parts:
        raise UserError(f"{where}: image path {image!r} must be relative to the prompt file and stay inside its folder")
    if not file.is_file():
        raise UserError(f"{where}: image not found: {file}")
    try:
        with Image.open(file) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"{where}: image {file} cannot be decoded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'})") from None
    return hashlib.sha256(file.read_bytes()).digest()


@cache
def _skimage(name: str) -> Image.Image:
    from skimage import data

    array = getattr(data, name)()
    image = Image.fromarray(array)
    return image.convert("RGB")
