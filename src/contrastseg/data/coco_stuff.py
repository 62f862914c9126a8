"""COCO-Stuff, 10k and 164k splits, in the layouts of the official releases.

COCO-Stuff labels use the COCO ids 1..182 (91 thing ids, 1-91, and 91 stuff ids, 92-182) and 0
for 'unlabeled'. Eleven thing ids have no annotation in COCO (12 street sign, 26 hat, 29 shoe,
30 eye glasses, 45 plate, 66 mirror, 68 window, 69 desk, 71 door, 83 blender, 91 hair brush);
the remaining 171 ids become the contiguous train ids 0..170 in id order (person = 0, ...,
wood = 170). Unlabeled and the 11 unused ids are 255 = ignore.

**164k** (``variant="164k"``; images of COCO 2017, ``stuffthingmaps_trainval2017.zip``)::

    root/images/train2017/<12 digits>.jpg      root/annotations/train2017/<12 digits>.png
    root/images/val2017/<12 digits>.jpg        root/annotations/val2017/<12 digits>.png

The PNG label maps store ``COCO id - 1`` (0..181) and 255 for unlabeled. Splits ``train``
(118k) and ``val`` (5k); ``train2017`` and ``val2017`` are accepted too.

**10k** (``variant="10k"``; ``cocostuff-10k-v1.1.zip``)::

    root/images/COCO_train2014_<12 digits>.jpg
    root/annotations/COCO_train2014_<12 digits>.mat     variable S: COCO ids, 0 = unlabeled
    root/imageLists/train.txt, test.txt, all.txt        one image name per line

Splits ``train`` (9000) and ``test`` (1000) as listed by the release; ``val`` names the
``test`` list (the evaluation split), ``all`` both. The ``.mat`` files are read by
:func:`load_mat_array`, a reader of MATLAB 5 MAT-files (what the release ships) that needs no
extra package.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contrastseg.data.fileio import IGNORE_INDEX, read_list
from contrastseg.data.paired import PairedSource, label_table
from contrastseg.data.palettes import default_palette
from contrastseg.errors import DataError

if TYPE_CHECKING:
    from contrastseg.config import DataConfig

#: COCO-Stuff id -> name, for the 182 ids (labels.txt of the official release).
# fmt: off
_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror",
    "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "blender", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "hair brush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
    "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood",
)
# fmt: on
COCO_STUFF_NAMES: dict[int, str] = dict(enumerate(_NAMES, start=1))
#: COCO thing ids without any annotation in COCO (and so in COCO-Stuff).
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
#: The 171 COCO-Stuff ids that are classes, in train-id order.
COCO_STUFF_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_IDS)
SPLITS_164K = {
    "train": "train2017",
    "val": "val2017",
    "train2017": "train2017",
    "val2017": "val2017",
}
SPLITS_10K = {"train": "train", "test": "test", "val": "test", "all": "all"}


def coco_id_to_train_id() -> dict[int, int]:
    """COCO-Stuff id (0..182) -> train id (0..170, 255 for unlabeled and the unused ids)."""
    mapping = {i: IGNORE_INDEX for i in range(183)}
    mapping.update({coco: train for train, coco in enumerate(COCO_STUFF_IDS)})
    return mapping


def coco_stuff_label_table(variant: str) -> np.ndarray:
    """256-entry table raw value -> train id for the label files of ``variant``:
    164k PNGs hold ``id - 1`` and 255 (unlabeled); 10k ``.mat`` files hold the id, 0 unlabeled."""
    ids = coco_id_to_train_id()
    if variant == "164k":
        mapping = {coco - 1: train for coco, train in ids.items() if coco >= 1}
        mapping[255] = IGNORE_INDEX
    elif variant == "10k":
        mapping = dict(ids)
    else:
        raise DataError(f"COCO-Stuff variant must be '10k' or '164k', got {variant!r}")
    return label_table(mapping)


class CocoStuffSource(PairedSource):
    """One split of COCO-Stuff 10k or 164k (see the module docstring for the layouts)."""

    dataset = "coco_stuff"

    @classmethod
    def options(cls, data: DataConfig, split: str) -> dict[str, Any]:
        return {"root": data.root, "variant": data.coco_split}

    def __init__(self, root: Path, split: str, variant: str = "10k", strict: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"COCO-Stuff root {root} does not exist or is not a directory")
        self.root, self.split, self.variant = root, split, variant
        self.label_table = coco_stuff_label_table(variant)
        self.classes = [COCO_STUFF_NAMES[i] for i in COCO_STUFF_IDS]
        self.palette = default_palette(183)[list(COCO_STUFF_IDS)]
        if variant == "164k":
            self.label_ids = "0..181 (COCO-Stuff id - 1) and 255 (unlabeled)"
            self._init_164k(root, split, strict)
        else:
            self.label_ids = "0 (unlabeled) and the COCO-Stuff ids 1..182"
            self._init_10k(root, split, strict)

    def _init_164k(self, root: Path, split: str, strict: bool) -> None:
        if split not in SPLITS_164K:
            raise DataError(
                f"COCO-Stuff 164k has no split {split!r}; choose one of {list(SPLITS_164K)}"
            )
        folder = SPLITS_164K[split]
        image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
        for directory, archive in ((image_dir, f"{folder}.zip"), (label_dir, "stuffthingmaps")):
            if not directory.is_dir():
                raise DataError(
                    f"{directory} is missing; unpack {archive} as docs/datasets.md describes"
                )
        self._pair_folders(
            f"COCO-Stuff 164k {folder}",
            image_dir,
            ".jpg",
            label_dir,
            ".png",
            strict,
        )

    def _init_10k(self, root: Path, split: str, strict: bool) -> None:
        if split not in SPLITS_10K:
            raise DataError(
                f"COCO-Stuff 10k has no split {split!r}; choose one of {list(SPLITS_10K)}"
            )
        list_file = root / "imageLists" / f"{SPLITS_10K[split]}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file} is missing; unpack cocostuff-10k-v1.1.zip into {root}")
        names = read_list(list_file)
        if not names:
            raise DataError(f"{list_file} lists no images")
        image_dir, label_dir = root / "images", root / "annotations"
        for directory in (image_dir, label_dir):
            if not directory.is_dir():
                raise DataError(f"{directory} is missing; unpack cocostuff-10k-v1.1.zip")
        self._pair_folders(
            f"COCO-Stuff 10k {split} ({list_file})",
            image_dir,
            ".jpg",
            label_dir,
            ".mat",
            strict,
            names=names,
        )

    def read_label_ids(self, path: Path) -> np.ndarray:
        if Path(path).suffix == ".mat":
            return load_mat_array(path, "S")
        return super().read_label_ids(path)


# ---------------------------------------------------------------------------------------------
# MATLAB 5 MAT-files (the annotations of COCO-Stuff 10k and PASCAL-Context)

_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8"}
_MI_DTYPES[13] = "u8"
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4"}
_MX_DTYPES.update({14: "i8", 15: "u8"})


def load_mat_array(path: Path, name: str) -> np.ndarray:
    """The numeric array ``name`` of a MATLAB 5 MAT-file (compressed or not), in its MATLAB
    shape and type. ``DataError`` naming the file when it is not such a file, is cut short or
    has no numeric variable ``name``. (MAT 7.3 files are HDF5 and not read here.)"""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if data[:19] == b"MATLAB 7.3 MAT-file":
        raise DataError(f"{path}: a MAT 7.3 (HDF5) file; save it as MAT 5 (-v7) to read it")
    if len(data) < 128 or not data.startswith(b"MATLAB 5.0 MAT-file"):
        raise DataError(f"{path}: not a MATLAB 5 MAT-file")
    order = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if order is None:
        raise DataError(f"{path}: not a MATLAB 5 MAT-file (bad byte-order mark)")
    pos = 128
    while pos + 8 <= len(data):
        mtype, nbytes = struct.unpack_from(order + "II", data, pos)
        body = data[pos + 8 : pos + 8 + nbytes]
        if len(body) < nbytes:
            raise DataError(f"{path}: truncated MAT-file (element at byte {pos} is cut short)")
        pos += 8 + nbytes + (0 if mtype == _MI_COMPRESSED else -nbytes % 8)
        if mtype == _MI_COMPRESSED:
            try:
                inner = zlib.decompressobj().decompress(body)
            except zlib.error as exc:
                raise DataError(f"{path}: corrupt or truncated compressed data ({exc})") from None
            if len(inner) < 8:
                raise DataError(f"{path}: truncated compressed element")
            mtype, nbytes = struct.unpack_from(order + "II", inner, 0)
            body = inner[8 : 8 + nbytes]
            if len(body) < nbytes:
                raise DataError(f"{path}: truncated compressed element")
        if mtype != _MI_MATRIX:
            continue
        array = _parse_matrix(body, order, name, path)
        if array is not None:
            return array
    raise DataError(f"{path}: no variable {name!r} in this MAT-file")


def _sub_element(body: bytes, pos: int, order: str, path: Path) -> tuple[int, bytes, int]:
    """(type, data, next position) of the data element at ``pos`` (normal or small format)."""
    if pos + 8 > len(body):
        raise DataError(f"{path}: truncated array element")
    (first,) = struct.unpack_from(order + "I", body, pos)
    if first >> 16:  # small data element: type and size share the first word
        return first & 0xFFFF, body[pos + 4 : pos + 4 + (first >> 16)], pos + 8
    mtype, nbytes = struct.unpack_from(order + "II", body, pos)
    start = pos + 8
    if start + nbytes > len(body):
        raise DataError(f"{path}: truncated array element")
    return mtype, body[start : start + nbytes], start + nbytes + (-nbytes % 8)


def _parse_matrix(body: bytes, order: str, want: str, path: Path) -> np.ndarray | None:
    _, flags, pos = _sub_element(body, 0, order, path)
    _, dims_raw, pos = _sub_element(body, pos, order, path)
    _, name_raw, pos = _sub_element(body, pos, order, path)
    if name_raw.decode("latin-1") != want:
        return None
    (flag_word,) = struct.unpack_from(order + "I", flags, 0)
    mx_class = flag_word & 0xFF
    if mx_class not in _MX_DTYPES or flag_word & 0x800:
        raise DataError(f"{path}: variable {want!r} is not a real numeric array")
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=order + "i4"))
    mtype, values, _ = _sub_element(body, pos, order, path)
    if mtype not in _MI_DTYPES:
        raise DataError(f"{path}: variable {want!r} has unsupported storage type {mtype}")
    array = np.frombuffer(values, dtype=order + _MI_DTYPES[mtype])
    if array.size != int(np.prod(dims)):
        raise DataError(
            f"{path}: variable {want!r} holds {array.size} values for shape {dims} (truncated?)"
        )
    return array.reshape(dims, order="F").astype(_MX_DTYPES[mx_class])


__all__ = [
    "COCO_STUFF_IDS",
    "COCO_STUFF_NAMES",
    "UNUSED_IDS",
    "CocoStuffSource",
    "coco_id_to_train_id",
    "coco_stuff_label_table",
    "load_mat_array",
]
