"""Decoding one image file: the one place every reader (CLI, demo, dense commands, training folders and
shards, evaluation sets, data engine) opens images.

- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored sideways with an
  orientation tag is returned upright, as viewers show it.
- Limits guard against decompression bombs and huge inputs, checked before anything is decoded: the
  pixel count the header announces (``$TIPSTORCH_MAX_IMAGE_PIXELS``, default Pillow's own 89,478,485
  pixels, about 9459 x 9459) and the encoded size (``$TIPSTORCH_MAX_IMAGE_BYTES``, default 256 MiB);
  0 means no limit.
- Anything that is not a usable image (missing, empty, too large, not an image, damaged or truncated)
  raises ``ImageFileError`` whose message names the file, the problem and, for a limit, the limit and
  how to raise it.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS_ENV = "TIPSTORCH_MAX_IMAGE_PIXELS"
MAX_BYTES_ENV = "TIPSTORCH_MAX_IMAGE_BYTES"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS
DEFAULT_MAX_BYTES = 256 << 20  # above an uncompressed 8-bit RGB image at the pixel limit (~256 MiB)

# Pillow's own check (a warning above its limit, an error above twice it) is switched off while we open
# a file, so that our limit alone decides; the lock keeps two threads from interleaving that switch
_PIL_LIMIT_LOCK = threading.Lock()


class ImageFileError(ValueError):
    """An input that cannot be used as an image. ``where``: the file (or the name given for bytes);
    ``problem``: why, with the limit and how to raise it when a limit refused it."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _limit(variable: str, default: int, unit: str) -> int | None:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        limit = int(text)
    except ValueError:
        raise ValueError(
            f"{variable} must be an integer number of {unit} (0 = no limit), got {text!r}"
        ) from None
    return limit if limit > 0 else None


def max_image_pixels() -> int | None:
    """The pixel limit: ``$TIPSTORCH_MAX_IMAGE_PIXELS`` if set (0 = none), else ``DEFAULT_MAX_PIXELS``."""
    return _limit(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "pixels")


def max_image_bytes() -> int | None:
    """The encoded-size limit: ``$TIPSTORCH_MAX_IMAGE_BYTES`` if set (0 = none), else ``DEFAULT_MAX_BYTES``."""
    return _limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, "bytes")


def _how_to_raise(variable: str, unit: str) -> str:
    return f"to read it, raise the limit with {variable}=<{unit}> (0 = no limit)"


def _check_file_size(size: int, where: str) -> None:
    if size == 0:
        raise ImageFileError(where, "the file is empty")
    limit = max_image_bytes()
    if limit is not None and size > limit:
        raise ImageFileError(
            where,
            f"{size:,} bytes exceeds the file-size limit of {limit:,} bytes; "
            + _how_to_raise(MAX_BYTES_ENV, "bytes"),
        )


def _check_pixels(image: Image.Image, where: str) -> None:
    limit = max_image_pixels()
    if limit is not None and image.width * image.height > limit:
        raise ImageFileError(
            where,
            f"{image.width} x {image.height} = {image.width * image.height:,} pixels exceeds the "
            f"limit of {limit:,} pixels (a decompression bomb or a huge image); "
            + _how_to_raise(MAX_PIXELS_ENV, "pixels"),
        )


def open_image(
    source: str | os.PathLike | bytes, mode: str | None = "RGB", name: str | None = None
) -> Image.Image:
    """The decoded image in a file path or in encoded bytes, upright (EXIF orientation applied) and
    converted to ``mode`` (None keeps the file's mode: label maps, 16-bit depth PNGs). ``name`` is how
    messages call the input (default: the path, or "image bytes").

    Raises ``ImageFileError`` when the input is missing, empty, beyond a limit, not an image Pillow can
    identify, or damaged / truncated.
    """
    where = name or ("image bytes" if isinstance(source, bytes) else str(Path(source)))
    if isinstance(source, bytes):
        _check_file_size(len(source), where)
        stream = io.BytesIO(source)
    else:
        if not Path(source).is_file():
            raise ImageFileError(where, "no such file")
        _check_file_size(Path(source).stat().st_size, where)
        stream = Path(source)
    with _PIL_LIMIT_LOCK:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image = Image.open(stream)
        except UnidentifiedImageError:
            raise ImageFileError(where, "not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
        except OSError as error:
            raise ImageFileError(where, f"cannot read the file ({error})") from error
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    with image:
        _check_pixels(image, where)
        try:
            upright = ImageOps.exif_transpose(image)  # a new image (transposed, or a copy), decoded here
            return upright.convert(mode) if mode is not None and upright.mode != mode else upright
        except Exception as error:  # Pillow raises many types on damaged data (OSError, SyntaxError, ...)
            raise ImageFileError(
                where, f"the image data is damaged or truncated ({type(error).__name__}: {error})"
            ) from error
