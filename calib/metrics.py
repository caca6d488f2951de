"""Image quality against the uncached reference: LPIPS (AlexNet), PSNR and SSIM (torchmetrics)."""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from calib.errors import UserError

if TYPE_CHECKING:  # torch loads when a metric is computed: `teacal --help` reads METRICS without it
    import torch

METRICS = ("lpips", "psnr", "ssim")
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # what torchvision's alexnet(pretrained=True), used by lpips, loads
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> [1, 3, H, W] float in [0, 1]."""
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def alexnet_weights() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def lpips_unavailable_reason(try_download: bool = True) -> str | None:
    """None when LPIPS can run; otherwise one line on why and how to provide the weights."""
    import torch

    path = alexnet_weights()
    if path.is_file():
        return None
    if try_download:
        with contextlib.suppress(Exception):
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(10)
            try:
                torch.hub.download_url_to_file(ALEXNET_URL, str(path), progress=False)
            finally:
                socket.setdefaulttimeout(previous)
            if path.is_file():
                return None
    return f"LPIPS needs the AlexNet ImageNet weights, which are not in the torch hub cache and cannot be downloaded here; copy {ALEXNET_FILE} to {path}"


class Metrics:
    """Computes the requested metrics for (image, reference) pairs; LPIPS only when its weights are present."""

    def __init__(self, names: tuple[str, ...] = METRICS, lpips_random_backbone: bool = False) -> None:
        self.names = names
        self._lpips = None
        if "lpips" in names:
            import lpips

            with contextlib.redirect_stdout(io.StringIO()):  # lpips prints its loading banner
                # pnet_rand=True: a random AlexNet with the real linear heads. It tests the wiring, never a figure.
                self._lpips = lpips.LPIPS(net="alex", pnet_rand=lpips_random_backbone, verbose=False).eval()

    def __call__(self, image: Image.Image, reference: Image.Image) -> dict[str, float]:
        import torch
        from torchmetrics.functional.image import structural_similarity_index_measure

        x, ref = to_tensor(image), to_tensor(reference)
        if x.shape != ref.shape:
            raise UserError(f"image size {tuple(x.shape[-2:])} differs from its reference {tuple(ref.shape[-2:])}")
        values = {}
        if "psnr" in self.names:
            values["psnr"] = psnr(x, ref)
        if "ssim" in self.names:
            values["ssim"] = float(structural_similarity_index_measure(x, ref, data_range=1.0))
        if self._lpips is not None:
            with torch.no_grad():
                values["lpips"] = float(self._lpips(x * 2 - 1, ref * 2 - 1).flatten()[0])
        return values


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]; infinite for identical images."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float("inf") if torch.equal(x, ref) else float(peak_signal_noise_ratio(x, ref, data_range=1.0))


def parse_metrics(spec: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in METRICS]
    if not names or unknown:
        raise UserError(f"--metrics {spec!r}: expected a comma-separated subset of {', '.join(METRICS)}")
    return names
