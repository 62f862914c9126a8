"""FolderSource: a user's own images and masks on disk.

Layout::

    root/classes.txt            one class name per line (line k = train id k)
    root/splits/<split>.txt     one sample name per line, no extension
    root/images/<name>.png|jpg|jpeg|bmp|tif|tiff
    root/masks/<name>.png       single channel (mode L, P or 1), one train id per pixel,
                                255 = ignore

Blank lines and ``#`` comments (to the end of the line) are ignored in both text files.
Extensions are matched without regard to case; two images of one name (``a.png`` and ``a.jpg``)
are refused. The image and mask modes accepted are those of :mod:`contrastseg.data.fileio`.
Label values are checked when a sample is loaded.

A folder is a :class:`~contrastseg.data.paired.PairedSource` whose masks store train ids (an
identity label table), so ``contrastseg data check`` scans it like the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contrastseg.data.fileio import IMAGE_EXTENSIONS, load_mask, read_list
from contrastseg.data.paired import PairedSource, identity_label_table
from contrastseg.data.palettes import default_palette
from contrastseg.errors import DataError

__all__ = ["FolderSource"]


class FolderSource(PairedSource):
    """Images and masks from ``root`` (see the module docstring for the layout).

    ``self[i]`` is (image (H, W, 3) uint8 RGB, mask (H, W) uint8). ``strict=False`` records
    incomplete pairs in ``self.missing`` instead of raising.
    """

    dataset = "folder"
    label_word = "mask"

    def __init__(self, root: Path, split: str, strict: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a directory")
        self.root = root
        self.split = split

        classes_file = root / "classes.txt"
        if not classes_file.is_file():
            raise DataError(f"{classes_file} is missing; write one class name per line")
        self.classes: list[str] = read_list(classes_file)
        if not self.classes:
            raise DataError(f"{classes_file} lists no classes; write one class name per line")
        if len(self.classes) > 255:
            raise DataError(f"{classes_file} lists {len(self.classes)} classes; at most 255")
        dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if dupes:
            raise DataError(f"{classes_file}: class names {dupes} are listed more than once")
        self.palette: np.ndarray = default_palette(len(self.classes))
        self.label_table = identity_label_table(len(self.classes))
        self.label_ids = f"0..{len(self.classes) - 1} and 255"

        split_file = root / "splits" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in (root / "splits").glob("*.txt"))
            raise DataError(
                f"split file {split_file} is missing (available splits: {available or 'none'})"
            )
        names = read_list(split_file)
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
        self._pair_folders(
            str(split_file),
            root / "images",
            IMAGE_EXTENSIONS,
            root / "masks",
            ".png",
            strict,
            names=names,
        )

    def read_label_ids(self, path: Path) -> np.ndarray:
        """The train ids of a mask, refusing values that are not ids of ``classes.txt``."""
        return load_mask(path, num_classes=len(self.classes), max_pixels=self.max_pixels)
