from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from calib.backends.tiny import TinyQwenImageEdit


@pytest.fixture(scope="session")
def tiny() -> TinyQwenImageEdit:
    return TinyQwenImageEdit()


@pytest.fixture(scope="session")
def reference_image() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((128, 128))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


SMALL = dict(steps=6, size=(64, 64))


def write_prompts(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


SMALL_PROMPTS = [
    {"id": "cat-hat", "prompt": "put a hat on the cat", "image": "skimage:chelsea"},
    {"id": "rocket-night", "prompt": "make it night", "image": "skimage:rocket"},
    {"id": "coffee-green", "prompt": "make the cup green", "image": "skimage:coffee"},
    {"id": "coins-gold", "prompt": "make every coin gold", "image": "skimage:coins"},
]


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory):
    """One small real recording on the tiny model, shared by the tests that only read it."""
    from calib.record import RecordRequest, record

    base = tmp_path_factory.mktemp("recorded")
    prompts = write_prompts(base / "prompts.jsonl", SMALL_PROMPTS)
    out = base / "run"
    record(RecordRequest(out=out, prompts=Path(prompts), seeds=(0, 1), steps=(SMALL["steps"],), size=SMALL["size"], max_gap=4), echo=lambda *_: None)
    return out


# Tiny tensors: one thread per process avoids oversubscribing 2 cores when tests spawn CLI processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
