"""FolderDataset: a user's own images and masks on disk.

Layout::

    root/classes.txt            one class name per line (line k = train id k)
    root/splits/<split>.txt     one sample name per line, no extension
    root/images/<name>.png|jpg|jpeg
    root/masks/<name>.png       single channel (mode L, P or 1), one train id per pixel,
                                255 = ignore

Blank lines and ``#`` comments (to the end of the line) are ignored in both text files.
Images must have 8-bit channels: RGB, greyscale, palette, bilevel, CMYK and YCbCr are converted
to RGB (CMYK naively, without a colour profile); an alpha channel (RGBA, LA, PA) is dropped, not
blended. 16-bit, 32-bit and float images are refused, since 8-bit RGB would clip their values.
Palette ('P') masks are read by index, not by colour; masks with several channels (RGB, LA)
are refused. Label values are checked when a sample is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from contrastseg.data.indexing import check_index
from contrastseg.data.palettes import default_palette
from contrastseg.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IGNORE_INDEX = 255
_MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")
# Image modes ``load_image`` turns into RGB without clipping values (alpha is dropped).
IMAGE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr")


def _read_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of ``path`` with ``#`` comments removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _index_dir(directory: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Map file stem -> path for the files of ``directory`` with one of ``extensions``."""
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() not in extensions or not path.is_file():
            continue
        if path.stem in found:
            raise DataError(
                f"{directory}: two files for sample {path.stem!r} ({found[path.stem].name} and "
                f"{path.name}); keep one"
            )
        found[path.stem] = path
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


def load_mask(path: Path, num_classes: int | None = None) -> np.ndarray:
    """Read a single-channel mask file as (H, W) uint8 train ids (255 = ignore).

    With ``num_classes``, values ``>= num_classes`` other than 255 raise ``DataError``.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in _MASK_MODES:
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
            found = np.unique(values[bad])
            shown = ", ".join(str(v) for v in found[:10]) + (" ..." if len(found) > 10 else "")
            raise DataError(
                f"{path}: label values [{shown}] are not class ids; classes.txt lists "
                f"{num_classes} classes (ids 0..{num_classes - 1}) and 255 means ignore; set "
                "those pixels to a class id or to 255, or add the missing classes to classes.txt"
            )
    elif values.dtype != np.uint8 and ((values < 0) | (values > 255)).any():
        raise DataError(f"{path}: mask values outside 0..255; class ids must fit in 8 bits")
    return values.astype(np.uint8, copy=False)


class FolderDataset:
    """Images and masks from ``root`` (see the module docstring for the layout).

    ``self[i]`` is (image (H, W, 3) uint8 RGB, mask (H, W) uint8).
    """

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a directory")
        self.root = root
        self.split = split

        classes_file = root / "classes.txt"
        if not classes_file.is_file():
            raise DataError(f"{classes_file} is missing; write one class name per line")
        self.classes: list[str] = _read_list(classes_file)
        if not self.classes:
            raise DataError(f"{classes_file} lists no classes; write one class name per line")
        if len(self.classes) > 255:
            raise DataError(f"{classes_file} lists {len(self.classes)} classes; at most 255")
        dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dupes:
            raise DataError(f"{classes_file}: class names {dupes} are listed more than once")
        self.palette: np.ndarray = default_palette(len(self.classes))

        split_file = root / "splits" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in (root / "splits").glob("*.txt"))
            raise DataError(
                f"split file {split_file} is missing (available splits: {available or 'none'})"
            )
        names = _read_list(split_file)
        if not names:
            raise DataError(f"{split_file} lists no samples; write one sample name per line")
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise DataError(f"{split_file}: sample {name!r} is listed more than once")
            seen.add(name)

        for sub in ("images", "masks"):
            if not (root / sub).is_dir():
                raise DataError(f"directory {root / sub} is missing")
        images = _index_dir(root / "images", IMAGE_EXTENSIONS)
        masks = _index_dir(root / "masks", (".png",))
        self._names = names
        self._images: list[Path] = []
        self._masks: list[Path] = []
        for name in names:
            hint = " (list names without the extension)" if Path(name).suffix else ""
            if name not in images:
                raise DataError(
                    f"{split_file}: sample {name!r} has no image "
                    f"{root / 'images' / name}.png/.jpg/.jpeg{hint}; add the image or remove "
                    f"{name!r} from the split file"
                )
            if name not in masks:
                raise DataError(
                    f"{split_file}: sample {name!r} has no mask {root / 'masks' / name}.png{hint}; "
                    f"add the mask or remove {name!r} from the split file"
                )
            self._images.append(images[name])
            self._masks.append(masks[name])

    def __len__(self) -> int:
        return len(self._names)

    def _check_index(self, index: int) -> int:
        return check_index(index, len(self._names))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._check_index(index)
        image_path, mask_path = self._images[index], self._masks[index]
        image = load_image(image_path)
        mask = load_mask(mask_path, num_classes=len(self.classes))
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) differs from "
                f"image {image_path} size {image.shape[1]}x{image.shape[0]}; masks must match "
                f"their images pixel for pixel: save the mask at the image's size (when resizing "
                f"it, use nearest-neighbour so that ids stay ids) or fix the pairing"
            )
        return image, mask

    def name(self, index: int) -> str:
        """The sample's name as listed in the split file."""
        return self._names[self._check_index(index)]

    def image_path(self, index: int) -> Path:
        return self._images[self._check_index(index)]

    def mask_path(self, index: int) -> Path:
        return self._masks[self._check_index(index)]
