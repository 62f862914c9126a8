"""CamVid, 11 classes (or 12 with void), in the common layout (the SegNet tutorial's release).

Layout::

    root/train/<name>.png       root/trainannot/<name>.png      367 images
    root/val/<name>.png         root/valannot/<name>.png        101 images
    root/test/<name>.png        root/testannot/<name>.png       233 images

Images are 480x360 RGB; an ``annot`` PNG has the image's name and one value per pixel:
0..10 for the 11 classes below, 11 for void (unlabelled), which becomes 255 = ignore (255 in a
file is read as ignore too). Other values raise ``DataError``.

``void_class=True`` (``data.camvid_void_class``) keeps void as a 12th class, ``void`` = 11,
trained and scored like the others: the authors' ``configs/camvid/H_48_D_4.json`` does so
(``num_classes 12``, ``label_list`` 0..11). The 11-class benchmark ignores void.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contrastseg.data.fileio import IGNORE_INDEX
from contrastseg.data.paired import PairedSource, label_table
from contrastseg.errors import DataError

if TYPE_CHECKING:
    from contrastseg.config import DataConfig

CAMVID_CLASSES: tuple[str, ...] = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
#: The colours of these classes in the original CamVid label images.
CAMVID_PALETTE = np.array(
    [
        (128, 128, 128),
        (128, 0, 0),
        (192, 192, 128),
        (128, 64, 128),
        (0, 0, 192),
        (128, 128, 0),
        (192, 128, 128),
        (64, 64, 128),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
    ],
    dtype=np.uint8,
)
VOID_ID = 11
SPLITS = ("train", "val", "test")


VOID_COLOUR = (0, 0, 0)


def camvid_label_table(void_class: bool = False) -> np.ndarray:
    """PNG value -> train id: 0..10 -> themselves, 11 (void) -> 255 (``void_class``: 11), and
    255 -> 255."""
    mapping = {k: k for k in range(len(CAMVID_CLASSES))}
    mapping.update({VOID_ID: VOID_ID if void_class else IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX})
    return label_table(mapping)


class CamVidSource(PairedSource):
    """One split of CamVid-11 (see the module docstring for the layout)."""

    dataset = "camvid"
    label_ids = "0..10 (the classes), 11 (void) and 255"

    @classmethod
    def options(cls, data: DataConfig, split: str) -> dict[str, Any]:
        return {"root": data.root, "void_class": data.camvid_void_class}

    def __init__(
        self, root: Path, split: str, void_class: bool = False, strict: bool = True
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"CamVid root {root} does not exist or is not a directory")
        if split not in SPLITS:
            raise DataError(f"CamVid has no split {split!r}; choose one of {list(SPLITS)}")
        self.root, self.split = root, split
        self.classes = list(CAMVID_CLASSES) + (["void"] if void_class else [])
        palette = [CAMVID_PALETTE] + ([np.array([VOID_COLOUR], np.uint8)] if void_class else [])
        self.palette = np.concatenate(palette)
        self.label_table = camvid_label_table(void_class)
        image_dir, label_dir = root / split, root / f"{split}annot"
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DataError(f"{directory} is missing; see docs/datasets.md (CamVid)")
        self._pair_folders(
            f"CamVid {split}",
            image_dir,
            ".png",
            label_dir,
            ".png",
            strict,
        )
