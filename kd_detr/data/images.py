"""Image files as the data sets read them: 8-bit RGB (high-bit-depth grayscale scaled down, with one
warning per data set), and any failure (missing, corrupt, decompression bomb) one :class:`DatasetError`
naming the file."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from PIL import Image, ImageOps

from .dataset_error import DatasetError, one_line
from .transforms import HIGH_BIT_DEPTH_MODES, to_rgb

__all__ = ["read_image", "read_rgb", "warn_high_bit", "bomb_message", "oriented_size"]

# EXIF orientations that turn the stored pixels by 90 degrees (width and height swap when applied)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)

# the data sets' logger: their warnings keep one name wherever the reading code lives
logger = logging.getLogger("kd_detr.data.coco")


def bomb_message(path: Path, e: BaseException, where: str) -> str:
    """Why PIL refused ``path`` as a decompression bomb (pixel count, limit) and how to raise the limit."""
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
    size = f"{int(m.group(1)):,} pixels, over PIL's decompression-bomb limit of {int(m.group(2)):,}" if m else str(e)
    return (f"image file {path}{where} is too large to open safely: {size} (PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}; PIL refuses twice that and warns above it); if the file is trusted, "
            f"raise the limit before loading (e.g. `PIL.Image.MAX_IMAGE_PIXELS = None` to disable it) or "
            f"downscale the image")


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file as it is read: after its EXIF orientation (a JPEG taken
    sideways and tagged to be turned has its sides swapped). Reads the header only."""
    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation
    return (h, w) if orientation in _TRANSPOSED_ORIENTATIONS else (w, h)


def read_rgb(path: Path, where: str = "") -> tuple[Image.Image, str | None]:
    """``(8-bit RGB image, source mode if it was high-bit-depth else None)``, turned upright by its EXIF
    orientation (as ``PIL.ImageOps.exif_transpose``; boxes are annotated on the upright image, as every
    viewer shows it); any failure is a :class:`DatasetError` naming ``path`` (``where``: extra context such
    as " (image id 3, ann.json)")."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            upright = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
            image = to_rgb(upright)
    except FileNotFoundError:
        raise DatasetError(f"image file {path}{where} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(bomb_message(path, e, where)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise DatasetError(f"cannot read image file {path}{where}: {one_line(e)}") from e
    return image, (mode if mode in HIGH_BIT_DEPTH_MODES else None)


_WARNED_HIGH_BIT: set[str] = set()  # data sets (or folders) already warned about, per process


def warn_high_bit(key: str, path: Path, mode: str) -> None:
    """Warn once per ``key`` (a data set's annotation file, or a folder) that its images are converted to 8 bits."""
    if key in _WARNED_HIGH_BIT:
        return
    _WARNED_HIGH_BIT.add(key)
    how = ("16-bit values divided by 257" if mode.startswith("I;16") else
           "values scaled to 0..255 (see kd_detr.data.transforms.to_rgb)")
    logger.warning("%s: image %s is %s (high bit depth): converting such images to 8-bit RGB, %s; "
                   "no further warning for this data set", key, path, mode, how)


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file as an 8-bit RGB PIL image, as the data sets read it.

    16-bit and other high-bit-depth grayscale files are scaled to 8 bits (:func:`~kd_detr.data.transforms.to_rgb`)
    with one warning per folder and process; a missing, corrupt or too large (decompression bomb) file
    is a one-line :class:`DatasetError` naming it.
    """
    path = Path(path)
    image, mode = read_rgb(path)
    if mode is not None:
        warn_high_bit(str(path.parent), path, mode)
    return image
