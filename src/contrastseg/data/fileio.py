"""Reading the files of a data set: images, masks (label maps), name lists, directory indexes.

Images must have 8-bit channels: RGB, greyscale, palette, bilevel, CMYK and YCbCr are converted
to RGB (CMYK naively, without a colour profile); an alpha channel (RGBA, LA, PA) is dropped, not
blended. 16-bit, 32-bit and float images are refused, since 8-bit RGB would clip their values.
Masks hold one id per pixel (mode L, P, 1 or a 16/32-bit integer mode); palette ('P') masks are
read by index, not by colour; masks with several channels (RGB, LA) are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from contrastseg.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "IMAGE_MODES",
    "MASK_MODES",
    "image_mode_problem",
    "index_files",
    "load_image",
    "load_mask",
    "read_list",
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
        text = Path(path).read_text(encoding="utf-8")
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


def load_image(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (see the module docstring for the modes)."""
    try:
        with Image.open(path) as img:
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


def load_mask(path: Path, num_classes: int | None = None) -> np.ndarray:
    """Read a single-channel mask file as (H, W) uint8 ids (255 = ignore).

    With ``num_classes``, values ``>= num_classes`` other than 255 raise ``DataError``.
    """
    try:
        with Image.open(path) as img:
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
