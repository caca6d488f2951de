from __future__ import annotations

import numpy as np
import pytest
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
