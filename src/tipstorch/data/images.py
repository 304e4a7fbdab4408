"""Decoding one image file: the one place every reader (CLI, training folders and shards, evaluation sets)
opens images.

- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored sideways with an
  orientation tag is returned upright, as viewers show it.
- A pixel limit guards against decompression bombs: an image whose header announces more than
  ``max_image_pixels()`` pixels is refused before it is decoded, with ``ImageTooLargeError`` naming the
  size, the limit and how to raise it. The limit is ``$TIPSTORCH_MAX_IMAGE_PIXELS`` (0 = no limit),
  by default Pillow's own (89,478,485 pixels, about 9459 x 9459).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

MAX_PIXELS_ENV = "TIPSTORCH_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS

# Pillow's own check (a warning above its limit, an error above twice it) is switched off while we open
# a file, so that our limit alone decides; the lock keeps two threads from interleaving that switch
_PIL_LIMIT_LOCK = threading.Lock()


class ImageTooLargeError(ValueError):
    """An image announces more pixels than the limit (a decompression bomb, or a very large photo)."""


def max_image_pixels() -> int | None:
    """The pixel limit: ``$TIPSTORCH_MAX_IMAGE_PIXELS`` if set (0 = none), else ``DEFAULT_MAX_PIXELS``."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(text)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV} must be an integer number of pixels (0 = no limit), got {text!r}") from None
    return limit if limit > 0 else None


def open_image(source: str | os.PathLike | bytes, mode: str | None = "RGB") -> Image.Image:
    """The decoded image in a file path or in encoded bytes, upright (EXIF orientation applied) and
    converted to ``mode`` (None keeps the file's mode: label maps, 16-bit depth PNGs).

    Raises ``ImageTooLargeError`` above the pixel limit, FileNotFoundError for a missing file and
    Pillow's errors (OSError, UnidentifiedImageError, ...) for undecodable data.
    """
    where = "image bytes" if isinstance(source, bytes) else str(Path(source))
    with _PIL_LIMIT_LOCK:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    with image:
        limit = max_image_pixels()
        if limit is not None and image.width * image.height > limit:
            raise ImageTooLargeError(
                f"{where}: {image.width}x{image.height} = {image.width * image.height:,} pixels exceeds the "
                f"limit of {limit:,} pixels (a decompression bomb?); to read it, raise the limit with "
                f"{MAX_PIXELS_ENV}=<pixels> (0 = no limit)"
            )
        upright = ImageOps.exif_transpose(image)  # a new image (transposed, or a copy), decoded here
        return upright.convert(mode) if mode is not None and upright.mode != mode else upright
