"""PASCAL-Context with 59 classes, in the widely used VOC2010 layout.

Layout (``root`` is ``VOCdevkit/VOC2010``)::

    root/JPEGImages/<name>.jpg
    root/SegmentationClassContext/<name>.png         0 = background, 1..59 = the 59 classes
    root/ImageSets/SegmentationContext/train.txt     4996 names
    root/ImageSets/SegmentationContext/val.txt       5104 names

The label PNGs are made from the official annotations (``trainval.tar.gz`` of the PASCAL-Context
release: one ``<name>.mat`` per image with a ``LabelMap`` of the 459 full-label ids of its
``labels.txt``) by keeping the 59 most frequent classes and making every other pixel background:
:func:`context59_from_459` does it and ``scripts/prepare_pascal_context.py`` runs it over the
release (docs/datasets.md). PNGs made from the same annotations by mmsegmentation's converter
(through the Detail API) use the same values and work as they are.

Mapping to train ids: 0 (background) -> 255 = ignore, k -> k - 1 for k = 1..59; 255 in a label
file is read as ignore too. Other values raise ``DataError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contrastseg.data.fileio import IGNORE_INDEX, read_list
from contrastseg.data.paired import PairedSource, label_table
from contrastseg.data.palettes import default_palette
from contrastseg.errors import DataError

#: The 59 classes in train-id order (alphabetical, as the 459 labels are).
# fmt: off
CONTEXT59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)
# fmt: on
#: Their ids among the 459 labels of the official release's labels.txt, in the same order.
CONTEXT59_IDS_459: tuple[int, ...] = (
    2,
    9,
    18,
    19,
    22,
    23,
    25,
    31,
    33,
    34,
    44,
    45,
    46,
    59,
    65,
    68,
    72,
    80,
    85,
    98,
    104,
    105,
    113,
    115,
    144,
    158,
    159,
    162,
    187,
    189,
    207,
    220,
    232,
    258,
    259,
    260,
    284,
    295,
    296,
    308,
    324,
    326,
    347,
    349,
    354,
    355,
    360,
    366,
    368,
    397,
    415,
    416,
    420,
    424,
    427,
    440,
    445,
    454,
    458,
)  # fmt: skip


def context59_from_459(label_map: np.ndarray, ids_459: tuple[int, ...] = CONTEXT59_IDS_459):
    """A 459-label ``LabelMap`` (0 = unlabeled) -> (H, W) uint8 with 0 = background and
    k = 1..59 for the k-th class of ``ids_459``; every other label becomes background."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise DataError(f"a LabelMap must be (H, W), got shape {label_map.shape}")
    values = label_map.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError("LabelMap values must be 0..65535")
    table = np.zeros(max(int(values.max(initial=0)), max(ids_459)) + 1, dtype=np.uint8)
    table[list(ids_459)] = np.arange(1, len(ids_459) + 1, dtype=np.uint8)
    return table[values]


def context_label_table() -> np.ndarray:
    """PNG value -> train id: 0 and 255 -> 255 (ignore), k -> k - 1 for k = 1..59."""
    mapping = {k: k - 1 for k in range(1, len(CONTEXT59_CLASSES) + 1)}
    mapping.update({0: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX})
    return label_table(mapping)


class PascalContextSource(PairedSource):
    """One split (``train`` or ``val``) of PASCAL-Context 59 (see the module docstring)."""

    dataset = "pascal_context"
    label_ids = "0 (background), 1..59 (the classes) and 255"

    def __init__(self, root: Path, split: str, strict: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"PASCAL-Context root {root} does not exist or is not a directory")
        self.root, self.split = root, split
        self.classes = list(CONTEXT59_CLASSES)
        # The VOC colour of each class's PNG value (1..59), so a label file and a coloured
        # prediction look alike; black (background) stays unused.
        self.palette = default_palette(len(CONTEXT59_CLASSES) + 1)[1:]
        self.label_table = context_label_table()

        list_dir = root / "ImageSets" / "SegmentationContext"
        list_file = list_dir / f"{split}.txt"
        if not list_file.is_file():
            available = sorted(p.stem for p in list_dir.glob("*.txt")) if list_dir.is_dir() else []
            raise DataError(
                f"split file {list_file} is missing (available: {available or 'none'}); "
                f"scripts/prepare_pascal_context.py writes train.txt and val.txt"
            )
        names = read_list(list_file)
        if not names:
            raise DataError(f"{list_file} lists no images")
        image_dir, label_dir = root / "JPEGImages", root / "SegmentationClassContext"
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DataError(f"{directory} is missing; see docs/datasets.md (PASCAL-Context)")
        self._pair_folders(
            f"PASCAL-Context {split} ({list_file})",
            image_dir,
            ".jpg",
            label_dir,
            ".png",
            strict,
            names=names,
        )
