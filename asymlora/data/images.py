"""Image files: checking them at load time and opening them at encode time.

``check_images`` (a mixture / loader option) says how much is verified when a data file is loaded:

* ``"none"``: nothing (problems surface when the sample is encoded);
* ``"exists"``: the file exists (one ``stat``);
* ``"open"`` (default): PIL can identify the file from its header (cheap; catches missing, empty
  and non-image files);
* ``"decode"``: the whole image is decoded (slow on large sets; catches truncated files).

Whatever is not caught at load time is caught when the sample is encoded (``unreadable_image``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from PIL import Image

__all__ = ["CheckImages", "CHECK_IMAGES_CHOICES", "check_image", "load_image", "expand_to_square"]

CheckImages = Literal["none", "exists", "open", "decode"]
CHECK_IMAGES_CHOICES: tuple[str, ...] = ("none", "exists", "open", "decode")


def check_image(path: Path, mode: str) -> str | None:
    """Check one image file; return ``None`` if fine, else ``"missing_image"`` or
    ``"unreadable_image: <why>"``."""
    if mode == "none":
        return None
    if not path.is_file():
        return "missing_image"
    if mode == "exists":
        return None
    try:
        with Image.open(path) as img:
            if mode == "decode":
                img.load()
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
        return f"unreadable_image: {type(exc).__name__}: {exc}"
    return None


def load_image(path: Path) -> Image.Image:
    """Open and fully decode ``path`` as an RGB image (raises the PIL / OS error on failure)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def expand_to_square(img: Image.Image, background: Sequence[int]) -> Image.Image:
    """Pad ``img`` to a square with ``background`` (LLaVA-1.5's ``image_aspect_ratio: pad``)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), tuple(background))
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result
