"""Reading the files of a data set: images, masks (label maps), name lists, directory indexes.

Images must have 8-bit channels: RGB, greyscale, palette, bilevel, CMYK and YCbCr are converted
to RGB (CMYK naively, without a colour profile); an alpha channel (RGBA, LA, PA) is dropped, not
blended. 16-bit, 32-bit and float images are refused, since 8-bit RGB would clip their values;
so are files whose samples have 16 bits although PIL opens them in an 8-bit mode (a 48-bit RGB
PNG or TIFF opens as 'RGB' and would lose its low bytes). Masks hold one id per pixel (mode L,
P, 1 or a 16/32-bit integer mode); palette ('P') masks are read by index, not by colour; masks
with several channels (RGB, LA) are refused.

Every image and mask is opened through :func:`open_image`, which refuses a file whose header
claims more than a pixel limit (default :data:`MAX_IMAGE_PIXELS`; ``data.max_image_pixels``,
``predict --max-pixels``) before any pixel is decoded, so a decompression bomb (a few bytes
that claim 100000 x 100000 pixels) is one ``ImageTooLarge`` error naming the file and its size.
PIL's own global limit (``PIL.Image.MAX_IMAGE_PIXELS``) is left as it is.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from contrastseg.datasets_table import MAX_IMAGE_PIXELS
from contrastseg.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "IMAGE_MODES",
    "MASK_MODES",
    "MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "image_mode_problem",
    "index_files",
    "load_image",
    "load_mask",
    "open_image",
    "pixel_limit",
    "read_list",
    "sixteen_bit_image_problem",
    "sixteen_bit_mask_problem",
    "wide_samples",
]

#: The mask value (train id) of a pixel that is not labelled; losses and metrics skip it.
IGNORE_INDEX = 255
#: The image file name extensions read from a folder (a folder data set's images, the image
#: folders given to ``predict``); matched without regard to case.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Image modes ``load_image`` turns into RGB without clipping values (alpha is dropped).
IMAGE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")
#: Mask (label map) modes: one integer id per pixel.
MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


def read_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of the text file ``path`` with ``#`` comments (to the end of
    the line) removed: a split's sample names, a class list."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a leading BOM is no name
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def index_files(directory: Path, suffixes: str | tuple[str, ...]) -> dict[str, Path]:
    """Key -> path for the files directly in ``directory`` whose names end with one of
    ``suffixes`` (e.g. ``".png"`` or ``"_leftImg8bit.png"``, matched without regard to case);
    the key is the name without that suffix. Two files with one key (``a.png`` and ``a.jpg``)
    raise ``DataError``."""
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    lowered = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name.lower()
            suffix = next((s for s in lowered if name.endswith(s)), None)
            if suffix is None or not entry.is_file():
                continue
            key = entry.name[: -len(suffix)]
            if key in found:
                first, second = sorted((found[key].name, entry.name))
                raise DataError(
                    f"{directory}: two files for sample {key!r} ({first} and {second}); keep one"
                )
            found[key] = Path(entry.path)
    return found


class ImageTooLarge(DataError):
    """An image or mask whose header claims more pixels than the limit (nothing was decoded)."""


# The limit of open_image calls that pass none: MAX_IMAGE_PIXELS, or pixel_limit's value.
_PIXEL_LIMIT: ContextVar[int] = ContextVar("contrastseg_max_image_pixels", default=MAX_IMAGE_PIXELS)
# Serialises this module's Image.open calls, each of which silences PIL's own bomb warning in
# a warnings.catch_warnings block (which swaps the process's filter list: two threads in such
# blocks at once could leave a filter behind). A child process starts with a fresh lock.
_OPEN_LOCK = threading.Lock()


def _new_open_lock() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_open_lock)

_LIMIT_FIX = (
    "if the file is genuine, raise the limit (--set data.max_image_pixels=N for train, eval and "
    "data check; --max-pixels N for predict)"
)


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[int]:
    """Within the block, ``open_image`` (``load_image``, ``load_mask``) calls that pass no
    ``max_pixels`` refuse files of more than ``max_pixels`` pixels (W x H): how ``predict
    --max-pixels`` reaches the files it reads."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"the pixel limit must be a positive integer, got {max_pixels!r}")
    token = _PIXEL_LIMIT.set(max_pixels)
    try:
        yield max_pixels
    finally:
        _PIXEL_LIMIT.reset(token)


def _claimed(size: tuple[int, int] | None, pixels: int | None) -> str:
    """``"W x H = N pixels"``, or what of it is known."""
    if pixels is None:
        return "more pixels"
    return f"{size[0]} x {size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels"


def _too_large(
    path: Path, what: str, size: tuple[int, int] | None, pixels: int, limit: int
) -> ImageTooLarge:
    claimed = _claimed(size, pixels)
    return ImageTooLarge(
        f"{path}: {what} header claims {claimed}, over the limit of {limit:,} pixels; {_LIMIT_FIX}"
    )


def _bomb(path: Path, what: str, err: Exception, limit: int) -> ImageTooLarge:
    """The error for PIL's ``DecompressionBombError``: the claimed size from the header when it
    can be read without PIL's check, else the pixel count PIL's message gives."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(err))
    size = _header_size(path)
    pixels = size[0] * size[1] if size else int(found.group(1)) if found else None
    if pixels is not None and pixels > limit:
        return _too_large(path, what, size, pixels, limit)
    pil_limit = f"{int(found.group(2)):,} pixels" if found else "its limit"
    return ImageTooLarge(
        f"{path}: {what} header claims {_claimed(size, pixels)}, over PIL's own limit of "
        f"{pil_limit} (2 x PIL.Image.MAX_IMAGE_PIXELS), which data.max_image_pixels and "
        "--max-pixels do not lift; downscale or tile the image"
    )


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as the file's header states it, read by the PIL plugin that accepts the
    file but without PIL's bomb check (which hides the size); None when no plugin reads it."""
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for name in list(Image.ID):
                factory, accept = Image.OPEN[name]
                accepted = not accept or accept(prefix)  # a str is a near miss: PIL's rule
                if not accepted or isinstance(accepted, str):
                    continue
                fp.seek(0)
                try:
                    return factory(fp, str(path)).size
                except Exception:  # noqa: BLE001 - any plugin failure: try the next one
                    continue
    except OSError:
        return None
    return None


@contextmanager
def open_image(
    path: Path, what: str = "image", max_pixels: int | None = None
) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)`` (the header only, nothing decoded) refusing, with
    ``ImageTooLarge``, a file of more than ``max_pixels`` pixels (W x H; default: the current
    :func:`pixel_limit`, else :data:`MAX_IMAGE_PIXELS`), also when PIL's own check stops it at
    open or while decoding in the block; PIL's warning for large images is not shown. ``what``
    names the file in messages ("image", "mask"). PIL's other errors pass through."""
    limit = _PIXEL_LIMIT.get() if max_pixels is None else max_pixels
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as err:
            raise _bomb(path, what, err, limit) from None
    with img:
        width, height = img.size
        if width * height > limit:
            raise _too_large(path, what, (width, height), width * height, limit)
        try:
            yield img
        except Image.DecompressionBombError as err:  # checked while decoding (TIFF tiles, GIF)
            raise _bomb(path, what, err, limit) from None


_SIXTEEN_BIT = re.compile(r";16[BLN]")  # PIL raw modes of 16-bit samples ("BGR;16" is 5-6-5)


def wide_samples(img: Image.Image) -> str | None:
    """The raw mode of a file whose samples have 16 bits although PIL opened it in an 8-bit
    mode (a 48-bit RGB PNG is mode 'RGB' from raw mode 'RGB;16B', and decoding keeps only the
    high bytes), else None. Call it before ``load()``, which drops the tiles it reads."""
    if img.mode.startswith(("I", "F")):  # 16/32-bit modes keep their values
        return None
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and _SIXTEEN_BIT.search(rawmode):
            return rawmode
    return None


def sixteen_bit_image_problem(rawmode: str, mode: str) -> str:
    """Why an image with 16-bit samples that PIL opens as ``mode`` cannot be used, with the
    fix."""
    return (
        f"image has 16 bits per channel (stored as {rawmode!r}, opened as mode {mode!r}), which "
        "8-bit RGB would clip; save it as an 8-bit RGB or greyscale PNG/JPEG (an alpha channel "
        "is allowed and dropped)"
    )


def image_mode_problem(mode: str, bands: int) -> str | None:
    """Why an image of PIL ``mode`` cannot be used, with the fix; None when it can."""
    if mode in IMAGE_MODES:
        return None
    if mode.startswith(("I", "F")):
        what = "16-bit or 32-bit/float values that 8-bit RGB would clip"
    else:
        what = "a colour space contrastseg does not convert"
    return (
        f"image has mode {mode!r} ({bands} channel(s), {what}); save it as an 8-bit RGB or "
        "greyscale PNG/JPEG (an alpha channel is allowed and dropped)"
    )


def load_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (see the module docstring for the modes and
    ``max_pixels``, the pixel limit of :func:`open_image`)."""
    try:
        with open_image(path, "image", max_pixels) as img:
            rawmode = wide_samples(img)
            if rawmode:
                raise DataError(f"{path}: {sixteen_bit_image_problem(rawmode, img.mode)}")
            img.load()
            problem = image_mode_problem(img.mode, len(img.getbands()))
            if problem:
                raise DataError(f"{path}: {problem}")
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if "A" in img.mode else img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: cannot read the image ({exc}); replace the file with a complete PNG or "
            "JPEG (`contrastseg data check CONFIG` lists every broken file of a data set)"
        ) from None


def sixteen_bit_mask_problem(rawmode: str, mode: str, what: str = "mask") -> str:
    """Why a mask (label map) with 16-bit samples that PIL opens in the 8-bit ``mode`` cannot be
    used; ``what`` is its name in the message."""
    return (
        f"{what} has 16-bit values (stored as {rawmode!r}) that PIL reads as 8-bit mode {mode!r}, "
        "which would cut its ids; save it as a single-channel PNG, 8-bit (mode L or P) or "
        "16-bit greyscale"
    )


def _not_class_ids(path: Path | str, values: np.ndarray, num_classes: int) -> DataError:
    """The error for mask ``values`` that are neither class ids ``0..num_classes - 1`` nor
    ``IGNORE_INDEX`` (the classes being those of a folder data set's ``classes.txt``)."""
    found = np.unique(values)
    shown = ", ".join(str(v) for v in found[:10]) + (" ..." if len(found) > 10 else "")
    return DataError(
        f"{path}: label values [{shown}] are not class ids; classes.txt lists "
        f"{num_classes} classes (ids 0..{num_classes - 1}) and {IGNORE_INDEX} means ignore; set "
        f"those pixels to a class id or to {IGNORE_INDEX}, or add the missing classes to "
        "classes.txt"
    )


def load_mask(
    path: Path, num_classes: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Read a single-channel mask file as (H, W) uint8 ids (255 = ignore).

    With ``num_classes``, values ``>= num_classes`` other than 255 raise ``DataError``;
    ``max_pixels``: the pixel limit of :func:`open_image`.
    """
    try:
        with open_image(path, "mask", max_pixels) as img:
            rawmode = wide_samples(img)
            if rawmode:
                raise DataError(f"{path}: {sixteen_bit_mask_problem(rawmode, img.mode)}")
            img.load()
            mode = img.mode
            if mode not in MASK_MODES:
                if mode in ("LA", "PA"):
                    hint = "drop the alpha channel and save it as mode L or P"
                elif mode.startswith("RGB") or mode in ("CMYK", "YCbCr", "HSV", "LAB"):
                    hint = (
                        "map each colour to its class id and save a single-channel PNG "
                        "(mode L, or P with the colours as a palette)"
                    )
                else:
                    hint = "save it as a single-channel 8-bit PNG (mode L or P)"
                raise DataError(
                    f"{path}: mask has mode {mode!r} ({len(img.getbands())} channels) but "
                    f"must hold one class id per pixel; {hint}"
                )
            values = np.asarray(img)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: cannot read the mask ({exc}); replace the file with a complete "
            "single-channel PNG (`contrastseg data check CONFIG` lists every broken file)"
        ) from None
    values = values.astype(np.int64) if values.dtype != np.uint8 else values
    if num_classes is not None:
        bad = (values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise _not_class_ids(path, values[bad], num_classes)
    elif values.dtype != np.uint8 and ((values < 0) | (values > 255)).any():
        raise DataError(f"{path}: mask values outside 0..255; class ids must fit in 8 bits")
    return values.astype(np.uint8, copy=False)
