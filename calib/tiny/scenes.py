"""Open scenes: the dataset of the second embedded model, whose edits the input does not determine.

Real diffusion models are sensitive early because their conditional distribution has many modes: the composition
(where things go, how many, what colour) is chosen at high noise, fine detail late. The tiny model's edits are
determined ("move the red circle left" has one answer), so its flow is nearly straight and early skips are free.
Here most instructions leave the outcome open, and the scenes have detail at several scales:

    add         "add a red star", "add a star", "add three shapes", "add some dots"   where, which, how many: open
    recolour    "recolour the red circle"                                             which colour: open
    move        "move the red circle"                                                 where to: open
    background  "change the background", "make the background striped"              colour, pattern, its phase: open
    draw        "draw a scene", "draw two shapes on a checked background" (blank ref) everything open, like text-to-image
    exact       "make the red circle blue", "remove the red circle"                   determined, so the text matters

Backgrounds carry textures with random parameters (stripe angle, period and phase; checker cell and phase; scattered
dots; a gradient's direction; smooth blobs), and shapes may be hatched with a random phase: detail decided late.
Everything is drawn from a seeded `numpy.random.Generator`, so a seed names a dataset exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from calib.tiny.shapes import COLOURS, SHAPES, Shape, coverage, write_edits

SIZE = 64
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (232, 232, 228),
    "gray": (128, 128, 132),
    "black": (28, 28, 32),
    "beige": (215, 195, 160),
    "navy": (35, 45, 95),
}
TEXTURES = ("plain", "stripes", "checks", "dots", "gradient", "blobs")
TEXTURE_WORDS = {"plain": "plain", "stripes": "striped", "checks": "checked", "dots": "dotted", "gradient": "shaded", "blobs": "cloudy"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MARGIN = 2.0
KINDS = ("add", "recolour", "move", "background", "draw", "exact")
BLANK = "gray"  # the reference canvas of `draw` edits


@dataclass(frozen=True)
class Texture:
    kind: str = "plain"
    amplitude: float = 0.0  # +- this much around the background colour
    params: tuple[float, ...] = ()  # the pattern's random parameters (angle, period, phase, seed, ...)


@dataclass(frozen=True)
class Item:
    shape: Shape
    hatch: tuple[float, float, float] | None = None  # (angle, period, phase) of light hatching inside the shape


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    background: str = "white"
    texture: Texture = field(default_factory=Texture)


@dataclass(frozen=True)
class Edit:
    kind: str
    prompt: str
    source: Scene
    target: Scene


# -- drawing --------------------------------------------------------------------------------------------------


def _pattern(texture: Texture, size: int) -> np.ndarray:
    """The texture's shade in [-1, 1], [size, size]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    p = texture.params
    if texture.kind == "plain":
        return np.zeros((size, size))
    if texture.kind == "stripes":
        angle, period, phase = p
        u = xx * math.cos(angle) + yy * math.sin(angle)
        return np.tanh(3 * np.sin(2 * math.pi * (u / period + phase)))
    if texture.kind == "checks":
        cell, ox, oy = p
        return np.where(((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0, 1.0, -1.0)
    if texture.kind == "gradient":
        (angle,) = p
        u = (xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)
        return np.clip(u / (size / 2), -1, 1)
    if texture.kind in ("dots", "blobs"):
        rng = np.random.default_rng(int(p[0]))
        shade = np.zeros((size, size))
        count, radius = (int(p[1]), 1.8) if texture.kind == "dots" else (int(p[1]), size / 6)
        for _ in range(count):
            cx, cy = rng.uniform(0, size, 2)
            d2 = (xx - cx) ** 2 + (yy - cy) ** 2
            if texture.kind == "dots":
                shade = np.maximum(shade, np.clip(radius + 0.5 - np.sqrt(d2), 0, 1))
            else:
                shade += rng.choice([-1.0, 1.0]) * np.exp(-d2 / (2 * radius**2))
        return shade if texture.kind == "dots" else np.tanh(1.5 * shade)
    raise ValueError(f"unknown texture {texture.kind!r}")


def background_image(scene: Scene, size: int = SIZE) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene.background], float)
    shade = _pattern(scene.texture, size)
    sign = -1.0 if base.mean() > 128 else 1.0  # dots and stripes stand out the same way on light and dark grounds
    return np.clip(base[None, None] + sign * scene.texture.amplitude * shade[..., None], 0, 255)


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as [size, size, 3] uint8 RGB."""
    image = background_image(scene, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    for item in scene.items:
        alpha = coverage(item.shape, size)[..., None]
        colour = np.array(COLOURS[item.shape.colour], float)[None, None] * np.ones((size, size, 1))
        if item.hatch is not None:
            angle, period, phase = item.hatch
            u = xx * math.cos(angle) + yy * math.sin(angle)
            colour = colour * (1 - 0.3 * (np.sin(2 * math.pi * (u / period + phase)) > 0.3)[..., None])
        image = image * (1 - alpha) + colour * alpha
    return np.round(image).astype(np.uint8)


def to_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))


# -- sampling -------------------------------------------------------------------------------------------------


def _fits(shape: Shape, others, gap: float = 2.0) -> bool:
    lo, hi = shape.r + MARGIN, SIZE - shape.r - MARGIN
    if not (lo <= shape.x <= hi and lo <= shape.y <= hi):
        return False
    return all(math.hypot(shape.x - o.shape.x, shape.y - o.shape.y) >= shape.r + o.shape.r + gap for o in others)


def random_texture(rng: np.random.Generator, kind: str | None = None) -> Texture:
    kind = str(rng.choice(TEXTURES, p=(0.1, 0.2, 0.15, 0.25, 0.1, 0.2))) if kind is None else kind  # mostly textured: detail to decide
    amplitude = float(rng.uniform(18, 40))
    if kind == "plain":
        return Texture()
    if kind == "stripes":
        params = (float(rng.choice([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])), float(rng.uniform(5, 12)), float(rng.uniform(0, 1)))
    elif kind == "checks":
        cell = float(rng.integers(4, 11))
        params = (cell, float(rng.uniform(0, cell)), float(rng.uniform(0, cell)))
    elif kind == "gradient":
        params = (float(rng.uniform(0, 2 * math.pi)),)
    elif kind == "dots":
        params = (float(rng.integers(0, 2**31)), float(rng.integers(15, 50)))
    else:
        params = (float(rng.integers(0, 2**31)), float(rng.integers(3, 7)))
    return Texture(kind, amplitude, params)


def random_item(rng: np.random.Generator, others, kind: str | None = None, colour: str | None = None, small: bool = False) -> Item | None:
    kind = str(rng.choice(SHAPES)) if kind is None else kind
    colour = str(rng.choice(list(COLOURS))) if colour is None else colour
    r = float(rng.uniform(2.5, 4.0)) if small else float(rng.uniform(5.0, 10.0))
    hatch = None if small or rng.random() < 0.4 else (float(rng.uniform(0, math.pi)), float(rng.uniform(3, 6)), float(rng.uniform(0, 1)))
    for _ in range(60):
        x, y = rng.uniform(r + MARGIN, SIZE - r - MARGIN, size=2)
        shape = Shape(kind, colour, round(float(x), 2), round(float(y), 2), round(r, 2))
        if _fits(shape, others):
            return Item(shape, hatch)
    return None


def random_scene(rng: np.random.Generator, n_items: int | None = None, background: str | None = None, texture: str | None = None) -> Scene:
    n = int(rng.integers(0, 5)) if n_items is None else n_items
    items: list[Item] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n):
        item = random_item(rng, items)
        if item is not None and (item.shape.kind, item.shape.colour) not in used:
            items.append(item)
            used.add((item.shape.kind, item.shape.colour))
    background = str(rng.choice(list(BACKGROUNDS))) if background is None else background
    return Scene(tuple(items), background, random_texture(rng, texture))


def _unique(scene: Scene, item: Item) -> bool:
    """The scene's only shape of this kind and colour: an instruction naming both means exactly this one."""
    return sum((i.shape.kind, i.shape.colour) == (item.shape.kind, item.shape.colour) for i in scene.items) == 1


def _without(scene: Scene, item: Item) -> tuple[Item, ...]:
    return tuple(i for i in scene.items if i is not item)


def _draw(rng: np.random.Generator) -> Edit:
    """A random scene drawn from the blank canvas: text-to-image in the edit layout."""
    blank = Scene((), BLANK, Texture())
    n = int(rng.integers(1, 6))
    texture = str(rng.choice(TEXTURES)) if rng.random() < 0.5 else None
    target = random_scene(rng, n_items=n, texture=texture)
    words = ["draw", "a scene"] if rng.random() < 0.4 else ["draw", f"{NUMBERS[len(target.items)]} shapes" if len(target.items) > 1 else "one shape"]
    if texture is not None:
        words.append(f"on a {TEXTURE_WORDS[texture]} background")
    return Edit("draw", " ".join(words), blank, target)


def _add(rng: np.random.Generator, scene: Scene) -> Edit | None:
    """Scattered dots, one shape (its colour named or not) or two or three shapes: where, and often what, is open."""
    mode = rng.integers(0, 4)
    items = list(scene.items)
    if mode == 3:
        colour = str(rng.choice(list(COLOURS)))
        for _ in range(int(rng.integers(4, 9))):
            dot = random_item(rng, items, kind="circle", colour=colour, small=True)
            if dot is not None:
                items.append(dot)
        return Edit("add", f"add some {colour} dots", scene, Scene(tuple(items), scene.background, scene.texture))
    count = 1 if mode < 2 else int(rng.integers(2, 4))
    shape_kind = str(rng.choice(SHAPES)) if count == 1 else None
    colour = str(rng.choice(list(COLOURS))) if mode == 0 else None
    for _ in range(count):
        item = random_item(rng, items, kind=shape_kind, colour=colour)
        if item is None:
            return None
        items.append(item)
    if count > 1:
        prompt = f"add {NUMBERS[count]} shapes"
    else:
        prompt = f"add a {colour} {shape_kind}" if colour else f"add a {shape_kind}"
    return Edit("add", prompt, scene, Scene(tuple(items), scene.background, scene.texture))


def _background(rng: np.random.Generator, scene: Scene) -> Edit:
    if rng.random() < 0.5:
        texture = str(rng.choice(TEXTURES[1:]))
        return Edit("background", f"make the background {TEXTURE_WORDS[texture]}", scene, Scene(scene.items, scene.background, random_texture(rng, texture)))
    background = str(rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    return Edit("background", "change the background", scene, Scene(scene.items, background, random_texture(rng)))


def _about(rng: np.random.Generator, scene: Scene, kind: str, item: Item) -> Edit | None:
    """An edit about one named shape: recolour (the colour open), move (where to open), or an exact one."""
    name = f"{item.shape.colour} {item.shape.kind}"
    others = _without(scene, item)
    if kind == "move":
        for _ in range(30):
            x, y = rng.uniform(item.shape.r + MARGIN, SIZE - item.shape.r - MARGIN, size=2)
            if math.hypot(x - item.shape.x, y - item.shape.y) < 12:
                continue
            new = Item(Shape(item.shape.kind, item.shape.colour, round(float(x), 2), round(float(y), 2), item.shape.r), item.hatch)
            if _fits(new.shape, others):
                return Edit(kind, f"move the {name}", scene, Scene(others + (new,), scene.background, scene.texture))
        return None
    if kind == "exact" and rng.random() < 0.5:
        return Edit(kind, f"remove the {name}", scene, Scene(others, scene.background, scene.texture))
    colour = str(rng.choice([c for c in COLOURS if c != item.shape.colour]))
    new = Item(Shape(item.shape.kind, colour, item.shape.x, item.shape.y, item.shape.r), item.hatch)
    prompt = f"recolour the {name}" if kind == "recolour" else f"make the {name} {colour}"
    return Edit(kind, prompt, scene, Scene(others + (new,), scene.background, scene.texture))


def sample_edit(rng: np.random.Generator, kind: str) -> Edit | None:
    """One edit of `kind` on a fresh random scene, or None when it cannot apply (draw again)."""
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}")
    if kind == "draw":
        return _draw(rng)
    scene = random_scene(rng)
    named = [i for i in scene.items if _unique(scene, i)]
    if kind == "add":
        return _add(rng, scene)
    if kind == "background":
        return _background(rng, scene)
    if not named:
        return None
    return _about(rng, scene, kind, named[int(rng.integers(len(named)))])


KIND_WEIGHTS = (0.3, 0.05, 0.15, 0.1, 0.3, 0.1)  # of KINDS: most edits leave the outcome open
# Prompt sets cycle through these: the open kinds (draw, add, move) twice as often as the rest
PROMPT_CYCLE = ("draw", "add", "move", "background", "draw", "add", "move", "recolour", "exact")


def sample_edits(seed: int, n: int, balanced: bool = False):
    """Yield `n` edits drawn from `seed`: cycling through PROMPT_CYCLE when `balanced`, else by KIND_WEIGHTS."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < n:
        kind = PROMPT_CYCLE[made % len(PROMPT_CYCLE)] if balanced else str(rng.choice(KINDS, p=KIND_WEIGHTS))
        edit = sample_edit(rng, kind)
        if edit is not None:
            made += 1
            yield edit


# -- prompt sets ----------------------------------------------------------------------------------------------
# Calibration and held-out sets of the TeaCache evaluation on this model: distinct seeds; nothing is tuned on the
# held-out one. Training draws from its own seed (calib.training.scenes).
CALIBRATION_SEED = 12
CALIBRATION_PROMPTS = 12
HELD_OUT_PROMPT_SEED = 20_261_206
HELD_OUT_PROMPTS = 27  # three turns of PROMPT_CYCLE, less the inputs the calibration set holds or the set repeats


def write_prompt_set(path: Path, n: int, seed: int, exclude_seed: int | None = None) -> list[dict]:
    """Write `n` edits (cycling through PROMPT_CYCLE) as a prompt set: `path` (jsonl) and one reference PNG each in
    `<stem>/`. An input drawn twice (a `draw` prompt starts from the one blank canvas) is written once, and none that
    the set of `exclude_seed` holds is written: `teacal evaluate` refuses a prompt that calibrated the preset."""
    seen = {(e.prompt, e.source) for e in sample_edits(exclude_seed, CALIBRATION_PROMPTS, balanced=True)} if exclude_seed is not None else set()

    def repeated(edit: Edit) -> bool:
        key = (edit.prompt, edit.source)
        if key in seen:
            return True
        seen.add(key)
        return False

    return write_edits(path, sample_edits(seed, n, balanced=True), lambda edit: to_pil(edit.source), skip=repeated)
