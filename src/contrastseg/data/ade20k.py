"""ADE20K, the 150 classes of the MIT Scene Parsing benchmark, in the layout of its release
``ADEChallengeData2016.zip``.

Layout (``root`` is the unpacked ``ADEChallengeData2016`` folder)::

    root/images/training/ADE_train_<8 digits>.jpg          20,210 images
    root/annotations/training/ADE_train_<8 digits>.png     one 8-bit value per pixel
    root/images/validation/ADE_val_<8 digits>.jpg          2,000 images
    root/annotations/validation/ADE_val_<8 digits>.png

(``objectInfo150.csv`` and ``sceneCategories.txt`` beside them are not read.) An annotation
holds 0 for "other objects", which the benchmark does not score, and k = 1..150 for the k-th
class of the release's ``objectInfo150`` list. Mapping to train ids: 0 -> 255 (ignore), k ->
k - 1 (what mmsegmentation calls ``reduce_zero_label``); values 151..255 never occur in the
release and raise ``DataError`` naming the file.

Splits: ``training`` and ``validation``, the release's folder names; ``train`` and ``val`` name
them too (as COCO-Stuff's ``train``/``val`` name ``train2017``/``val2017``). The images are
paired with the annotations by name; a folder holding more files than the other is reported
with both counts and the first file without its partner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contrastseg.data.fileio import IGNORE_INDEX, index_files
from contrastseg.data.paired import PairedSource, Problem, label_table, pair_files
from contrastseg.data.palettes import default_palette
from contrastseg.errors import DataError

__all__ = ["ADE20K_CLASSES", "ADE20KSource", "SPLITS", "ade20k_label_table"]

#: The 150 classes in train-id order: for each row of the release's objectInfo150 list (ids
#: 1..150), the first of its names.
# fmt: off
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage",
    "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on
#: Split name -> the release's folder name.
SPLITS = {
    "training": "training",
    "validation": "validation",
    "train": "training",
    "val": "validation",
}
LAYOUT = (
    "expected the layout of ADEChallengeData2016.zip: data.root/images/{training,validation}/"
    "ADE_*.jpg and data.root/annotations/{training,validation}/ADE_*.png (docs/datasets.md, "
    "ADE20K)"
)


def ade20k_label_table() -> np.ndarray:
    """PNG value -> train id: 0 -> 255 (ignore), k -> k - 1 for k = 1..150; 151..255 unknown."""
    mapping = {k: k - 1 for k in range(1, len(ADE20K_CLASSES) + 1)}
    mapping[0] = IGNORE_INDEX
    return label_table(mapping)


class ADE20KSource(PairedSource):
    """One split (``training``/``train`` or ``validation``/``val``) of ADE20K (see the module
    docstring for the layout)."""

    dataset = "ade20k"
    label_ids = "0 (other, ignored) and 1..150 (the classes)"
    label_word = "annotation"

    def __init__(self, root: Path, split: str, strict: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"ADE20K root {root} does not exist or is not a directory; {LAYOUT}")
        if split not in SPLITS:
            raise DataError(f"ADE20K has no split {split!r}; choose one of {list(SPLITS)}")
        self.root, self.split = root, split
        self.classes = list(ADE20K_CLASSES)
        # The VOC colour of each class's PNG value (1..150), so that an annotation and a
        # coloured prediction look alike; black (value 0, ignored) stays unused.
        self.palette = default_palette(len(ADE20K_CLASSES) + 1)[1:]
        self.label_table = ade20k_label_table()

        folder = SPLITS[split]
        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                nested = root / "ADEChallengeData2016"
                hint = f" (data.root should be {nested}?)" if nested.is_dir() else ""
                raise DataError(f"ADE20K: {directory} is missing{hint}; {LAYOUT}")
        images, labels = index_files(image_dir, ".jpg"), index_files(label_dir, ".png")
        names, image_paths, label_paths, problems = pair_files(
            f"ADE20K {folder}",
            images,
            labels,
            lambda n: image_dir / f"{n}.jpg",
            lambda n: label_dir / f"{n}.png",
            strict=False,
            label_word=self.label_word,
        )
        if problems:
            if len(images) != len(labels):
                counts = (
                    f"{len(images)} images in {image_dir} but {len(labels)} annotations in "
                    f"{label_dir}"
                )
            else:
                counts = (
                    f"{len(images)} images in {image_dir} and as many annotations in "
                    f"{label_dir}, but their names differ"
                )
            if strict:
                more = len(problems) - 1
                suffix = (
                    f" (and {more} more incomplete pair(s); `contrastseg data check CONFIG` "
                    "lists them)"
                    if more
                    else ""
                )
                raise DataError(f"ADE20K {folder}: {counts}; {problems[0].detail}{suffix}")
            first = problems[0]
            problems[0] = Problem(first.kind, first.path, f"{first.detail} ({counts})")
        self._set_pairs(names, image_paths, label_paths, problems)
