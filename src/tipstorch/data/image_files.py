"""Reading untrusted image files: one clear error for anything that is not a reasonable image.

``read_image`` checks the size in the file header before decoding, so a decompression bomb (a small
file that decodes to billions of pixels) is refused without allocating it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # 40 megapixels (a 7,700 x 5,200 photo), far below what exhausts memory
MAX_FILE_BYTES = 64 << 20


class ImageFileError(ValueError):
    """An input that cannot be used as an image; the message says why, naming the file."""


def read_image(
    source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """The RGB PIL image in a file (path) or in encoded bytes, fully decoded and upright (EXIF orientation).

    Raises ``ImageFileError`` when the input is missing, empty, larger than ``MAX_FILE_BYTES``, not an
    image PIL can identify, truncated, or more than ``max_pixels`` pixels (decompression bomb).
    """
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded data")
    if isinstance(source, bytes):
        size, stream = len(source), io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageFileError(f"{label}: no such file")
        size, stream = path.stat().st_size, path
    if size == 0:
        raise ImageFileError(f"{label}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise ImageFileError(
            f"{label}: {size / 2**20:.0f} MiB is larger than the {MAX_FILE_BYTES >> 20} MiB limit"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageFileError(
                        f"{label}: {width} x {height} = {width * height:,} pixels is more than the limit of "
                        f"{max_pixels:,} (a decompression bomb or a huge image); resize it first"
                    )
                return ImageOps.exif_transpose(image).convert("RGB")  # upright, as a phone shows it
    except ImageFileError:
        raise
    except UnidentifiedImageError as error:
        raise ImageFileError(f"{label}: not an image file PIL can read (PNG, JPEG, WebP, ...)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageFileError(f"{label}: refused as a decompression bomb ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageFileError(f"{label}: the image data is damaged or truncated ({error})") from error
