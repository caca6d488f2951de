"""Shapes: the procedural edit dataset the tiny Qwen-Image-Edit is trained on, and its edit-success metric.

A scene is a small canvas with one to three coloured shapes (circle, square, triangle, star) on a plain,
striped or gradient background. An edit is an instruction from a small grammar plus the scene it should
produce; everything is drawn from a seeded `numpy.random.Generator`, so a seed names a dataset exactly.

    recolour    "make the red circle blue"
    move        "move the red circle left"            (a third of the canvas)
    remove      "remove the red circle"
    add         "add a blue star in the top right"    (at that quadrant's centre)
    background  "make the background black"

Within a scene, shapes have distinct kinds and distinct colours, and instructions name a shape by both,
so each instruction is unambiguous. `edit_success` judges an output image against the edit it was asked
for: the edit must show (colour in the region, presence, absence, centroid shift) and every other shape
must survive. It classifies each pixel to the nearest colour of the palette, so it never needs a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as draw_polygon

SIZE = 48  # canvas side in pixels
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "yellow": (235, 205, 45),
    "green": (50, 170, 70),
    "cyan": (40, 190, 210),
    "blue": (50, 80, 220),
    "purple": (150, 70, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
TEXTURES = ("plain", "stripes", "gradient")
TEXTURE_WEIGHTS = (0.6, 0.2, 0.2)
TEXTURE_AMPLITUDE = 18  # +- this much around the background colour
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_DISTANCE = SIZE // 3  # 16 px: exactly two transformer tokens (8x8 px each), so a move is a whole-token shift
CORNERS: dict[str, tuple[float, float]] = {
    "top left": (SIZE * 0.25, SIZE * 0.25),
    "top right": (SIZE * 0.75, SIZE * 0.25),
    "bottom left": (SIZE * 0.25, SIZE * 0.75),
    "bottom right": (SIZE * 0.75, SIZE * 0.75),
}
RADII = (6.0, 7.0, 8.0)
ADD_RADIUS = 7.0
EDIT_KINDS = ("recolour", "move", "remove", "add", "background")
MARGIN = 1.5  # pixels between a shape and the canvas edge


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, pixels
    y: float
    r: float  # circumradius, pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str = "white"
    texture: str = "plain"


@dataclass(frozen=True)
class Edit:
    kind: str
    prompt: str
    source: Scene
    target: Scene
    shape: Shape | None = None  # the shape the edit is about, as it is in the target (None: background)
    before: Shape | None = None  # that shape in the source (recolour, move, remove)
    info: dict = field(default_factory=dict)


# -- drawing --------------------------------------------------------------------------------------------


def _vertices(shape: Shape) -> np.ndarray:
    """Polygon vertices (x, y) in pixels for the polygonal kinds."""
    if shape.kind == "square":
        h = 0.8 * shape.r  # a little larger than inscribed, so a square's area is close to a circle's
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]]) + (shape.x, shape.y)
    if shape.kind == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        # equilateral, pointing up; shifted down a little so its area sits around the centre
        return np.stack([np.cos(angles), np.sin(angles)], 1) * shape.r + (shape.x, shape.y + 0.15 * shape.r)
    if shape.kind == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, shape.r, shape.r * 0.45)
        return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1) + (shape.x, shape.y)
    raise ValueError(f"no polygon for {shape.kind!r}")


def coverage(shape: Shape, size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel the shape covers, [size, size] floats in [0, 1]."""
    n = size * SUPERSAMPLE
    if shape.kind == "circle":
        c = (np.arange(n) + 0.5) / SUPERSAMPLE
        mask = (c[None, :] - shape.x) ** 2 + (c[:, None] - shape.y) ** 2 <= shape.r**2
    else:
        v = _vertices(shape) * SUPERSAMPLE - 0.5
        rr, cc = draw_polygon(v[:, 1], v[:, 0], shape=(n, n))
        mask = np.zeros((n, n), bool)
        mask[rr, cc] = True
    return mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def background_image(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The background alone, [size, size, 3] floats in 0..255."""
    base = np.array(BACKGROUNDS[scene.background], float)
    yy, xx = np.mgrid[0:size, 0:size]
    if scene.texture == "plain":
        shade = np.zeros((size, size))
    elif scene.texture == "stripes":
        shade = np.where(((xx + yy) // 6) % 2 == 0, 1.0, -1.0)
    elif scene.texture == "gradient":
        shade = (yy / (size - 1)) * 2 - 1
    else:
        raise ValueError(f"unknown texture {scene.texture!r}")
    return np.clip(base[None, None] + TEXTURE_AMPLITUDE * shade[..., None], 0, 255)


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as [size, size, 3] uint8 RGB."""
    image = background_image(scene, size)
    for shape in scene.shapes:
        alpha = coverage(shape, size)[..., None]
        image = image * (1 - alpha) + np.array(COLOURS[shape.colour], float) * alpha
    return np.round(image).astype(np.uint8)


def to_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))


# -- sampling -------------------------------------------------------------------------------------------


def _fits(shape: Shape, others: tuple[Shape, ...] | list[Shape], gap: float = 2.0) -> bool:
    lo, hi = shape.r + MARGIN, SIZE - shape.r - MARGIN
    if not (lo <= shape.x <= hi and lo <= shape.y <= hi):
        return False
    return all(np.hypot(shape.x - o.x, shape.y - o.y) >= shape.r + o.r + gap for o in others)


def _random_shape(rng: np.random.Generator, kind: str, colour: str, others, r: float | None = None) -> Shape | None:
    r = float(rng.choice(RADII)) if r is None else r
    for _ in range(50):
        x, y = rng.uniform(r + MARGIN, SIZE - r - MARGIN, size=2)
        shape = Shape(kind, colour, round(float(x), 2), round(float(y), 2), r)
        if _fits(shape, others):
            return shape
    return None


def sample_scene(rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    kinds = rng.permutation(SHAPES)[:n]
    colours = rng.permutation(list(COLOURS))[:n]
    shapes: list[Shape] = []
    for kind, colour in zip(kinds, colours, strict=True):
        shape = _random_shape(rng, str(kind), str(colour), shapes)
        if shape is not None:
            shapes.append(shape)
    texture = str(rng.choice(TEXTURES, p=TEXTURE_WEIGHTS))
    return Scene(tuple(shapes), str(rng.choice(list(BACKGROUNDS))), texture)


def _replace_shape(scene: Scene, old: Shape, new: Shape | None) -> Scene:
    shapes = tuple(s for s in scene.shapes if s != old)
    return replace(scene, shapes=shapes + ((new,) if new is not None else ()))


def sample_edit(rng: np.random.Generator, scene: Scene, kind: str) -> Edit | None:
    """One edit of `kind` on `scene`, or None when that edit cannot apply (then draw another scene)."""
    used_colours = {s.colour for s in scene.shapes}
    if kind == "recolour" and scene.shapes:
        old = scene.shapes[int(rng.integers(len(scene.shapes)))]
        colour = str(rng.choice([c for c in COLOURS if c not in used_colours]))
        new = replace(old, colour=colour)
        return Edit(kind, f"make the {old.name} {colour}", scene, _replace_shape(scene, old, new), new, old)
    if kind == "remove" and scene.shapes:
        old = scene.shapes[int(rng.integers(len(scene.shapes)))]
        return Edit(kind, f"remove the {old.name}", scene, _replace_shape(scene, old, None), None, old)
    if kind == "move" and scene.shapes:
        for i in rng.permutation(len(scene.shapes)):
            old = scene.shapes[int(i)]
            others = [s for s in scene.shapes if s != old]
            for direction in rng.permutation(list(DIRECTIONS)):
                dx, dy = DIRECTIONS[str(direction)]
                new = replace(old, x=old.x + dx * MOVE_DISTANCE, y=old.y + dy * MOVE_DISTANCE)
                if _fits(new, others):
                    prompt = f"move the {old.name} {direction}"
                    return Edit(kind, prompt, scene, _replace_shape(scene, old, new), new, old, {"direction": str(direction)})
        return None
    if kind == "add" and len(scene.shapes) < len(SHAPES):
        kinds = [k for k in SHAPES if k not in {s.kind for s in scene.shapes}]
        colours = [c for c in COLOURS if c not in used_colours]
        for corner in rng.permutation(list(CORNERS)):
            x, y = CORNERS[str(corner)]
            new = Shape(str(rng.choice(kinds)), str(rng.choice(colours)), x, y, ADD_RADIUS)
            if _fits(new, scene.shapes):
                prompt = f"add a {new.name} in the {corner}"
                return Edit(kind, prompt, scene, replace(scene, shapes=scene.shapes + (new,)), new, None, {"corner": str(corner)})
        return None
    if kind == "background":
        background = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
        target = replace(scene, background=background, texture="plain")
        return Edit(kind, f"make the background {background}", scene, target, info={"background": background})
    return None


def sample_edits(seed: int, n: int, kinds: tuple[str, ...] = EDIT_KINDS, balanced: bool = False):
    """Yield `n` edits drawn from `seed`. `balanced` cycles through `kinds`; otherwise each kind is drawn at random."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < n:
        kind = kinds[made % len(kinds)] if balanced else str(rng.choice(kinds))
        edit = sample_edit(rng, sample_scene(rng), kind)
        if edit is not None:
            made += 1
            yield edit


# -- the edit-success metric ------------------------------------------------------------------------------


PALETTE_NAMES = np.array(list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS], dtype=object)
PALETTE_RGB = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), float)


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Each pixel's nearest palette entry: a shape colour name or 'bg:<background>'. [H, W] array of str."""
    distance = ((image[..., None, :].astype(float) - PALETTE_RGB[None, None]) ** 2).sum(-1)
    return PALETTE_NAMES[distance.argmin(-1)]


def core_mask(shape: Shape, size: int = SIZE) -> np.ndarray:
    """The pixels well inside a shape: fully covered and one pixel away from its edge (never empty)."""
    full = coverage(shape, size) >= 0.999
    core = ndimage.binary_erosion(full)
    return core if core.sum() >= 3 else full


def _fraction(labels: np.ndarray, mask: np.ndarray, name: str) -> float:
    return float((labels[mask] == name).mean()) if mask.any() else 0.0


def present(labels: np.ndarray, shape: Shape, mask: np.ndarray | None = None) -> bool:
    """A shape is present when at least half of its core pixels have its colour."""
    return _fraction(labels, core_mask(shape) if mask is None else mask, shape.colour) >= 0.5


def centroid(labels: np.ndarray, colour: str) -> np.ndarray | None:
    ys, xs = np.nonzero(labels == colour)
    return None if len(xs) == 0 else np.array([xs.mean(), ys.mean()])


def edit_success(edit: Edit, output: Image.Image | np.ndarray) -> dict:
    """Judge an output image: {"success": bool, "edit_ok": bool, "kept_ok": bool, "detail": str}.

    The edit must show, and every shape the instruction did not name must still be there in its colour.
    - recolour: at least half of the shape's core pixels have the new colour.
    - remove: at most a fifth of the removed shape's core pixels keep its colour.
    - add: at least half of the new shape's core pixels (at the named corner) have its colour.
    - move: the centroid of the shape's colour moves at least half the distance in the named direction and
      less than half of it sideways, and the shape is present at its new place and absent from its old one.
    - background: at least 70% of the pixels away from all shapes have the new background colour.
    """
    image = np.asarray(output.convert("RGB") if isinstance(output, Image.Image) else output)
    if image.shape[:2] != (SIZE, SIZE):
        image = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC))
    labels = classify_pixels(image)
    named = {edit.before, edit.shape} - {None}
    kept = [s for s in edit.target.shapes if s not in named]
    kept_ok = all(present(labels, s) for s in kept)
    if edit.kind in ("recolour", "add"):
        fraction = _fraction(labels, core_mask(edit.shape), edit.shape.colour)
        edit_ok, detail = fraction >= 0.5, f"{edit.shape.colour} in {fraction:.0%} of the shape"
    elif edit.kind == "remove":
        fraction = _fraction(labels, core_mask(edit.before), edit.before.colour)
        edit_ok, detail = fraction <= 0.2, f"{edit.before.colour} left in {fraction:.0%} of the old shape"
    elif edit.kind == "move":
        before, after = edit.before, edit.shape
        old_only = core_mask(before) & ~(coverage(after) > 0)
        c = centroid(labels, after.colour)
        dx, dy = DIRECTIONS[edit.info["direction"]]
        if c is None:
            edit_ok, detail = False, f"no {after.colour} pixels"
        else:
            shift = c - np.array([before.x, before.y])
            along, across = shift @ np.array([dx, dy]), abs(shift @ np.array([dy, dx]))
            at_new, at_old = present(labels, after), _fraction(labels, old_only, after.colour) if old_only.any() else 0.0
            edit_ok = along >= 0.5 * MOVE_DISTANCE and across < 0.5 * MOVE_DISTANCE and at_new and at_old < 0.5
            detail = f"centroid moved {along:+.1f}px along, {across:.1f}px across; new place {'yes' if at_new else 'no'}, old {at_old:.0%}"
    elif edit.kind == "background":
        away = np.ones((SIZE, SIZE), bool)
        for s in edit.target.shapes:
            away &= ~ndimage.binary_dilation(coverage(s) > 0, iterations=2)
        fraction = _fraction(labels, away, f"bg:{edit.info['background']}")
        edit_ok, detail = fraction >= 0.7, f"{fraction:.0%} of the background is {edit.info['background']}"
    else:
        raise ValueError(f"unknown edit kind {edit.kind!r}")
    return {"success": bool(edit_ok and kept_ok), "edit_ok": bool(edit_ok), "kept_ok": bool(kept_ok), "detail": detail}


# -- prompt sets ------------------------------------------------------------------------------------------

HELD_OUT_SEED = 20_260_806  # the tiny model's own evaluation scenes; training draws from its own seed (see calib.training.tiny)
# The prompt sets of the TeaCache calibration (prompts/calib.jsonl) and of its held-out measurement
# (prompts/heldout.jsonl): distinct seeds, and nothing is ever tuned on the held-out one.
CALIBRATION_SEED = 11
CALIBRATION_PROMPTS = 12
HELD_OUT_PROMPT_SEED = 20_261_202
HELD_OUT_PROMPTS = 24


def write_prompt_set(path: Path, n: int = 30, seed: int = HELD_OUT_SEED) -> list[dict]:
    """Write `n` held-out edits as a prompt set: `path` (jsonl) and one reference PNG each in `<stem>/`."""
    return write_edits(path, sample_edits(seed, n, balanced=True), lambda edit: to_pil(edit.source))


def write_edits(path: Path, edits, reference, skip=lambda edit: False) -> list[dict]:
    """Edits (each with `kind` and `prompt`) as a prompt set: `path` (jsonl) and each one's reference image
    (`reference(edit)`, a PIL image) as a PNG in `<stem>/`; ids number them as drawn and say their kind. Edits that
    `skip` leave their number unused, so dropping one leaves the other ids as they were."""
    path = Path(path)
    folder = path.parent / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, edit in enumerate(edits):
        if skip(edit):
            continue
        row_id = f"{i:03d}-{edit.kind}"
        reference(edit).save(folder / f"{row_id}.png")
        rows.append({"id": row_id, "prompt": edit.prompt, "image": f"{path.stem}/{row_id}.png"})
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
    return rows
