"""Reading image and label-map files with PIL, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tfa_widgets.core.errors import DatasetError


def as_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Return ``(height, width)`` from an int, a pair or None."""
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    if int(h) < 1 or int(w) < 1:
        raise DatasetError(f"image size must be positive, got {size}")
    return int(h), int(w)


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"missing file {path} (expected {what})")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path} is not a readable image (expected {what}): {err}") from err
    return img


def read_rgb(path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    """Return the image at ``path`` as ``[3, H, W]`` float in [0, 1], resized to ``size``."""
    img = _open(path, "an RGB image (PNG, JPEG, ...)").convert("RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def read_label_map(path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    """Return a palette/greyscale label PNG as ``[H, W]`` int64 indices (nearest resize)."""
    img = _open(path, "a palette or greyscale PNG of label indices")
    if img.mode not in ("P", "L"):
        raise DatasetError(
            f"{path} has mode {img.mode}, expected a palette (P) or greyscale (L) PNG"
        )
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).astype(np.int64))
