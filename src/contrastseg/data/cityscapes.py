"""Cityscapes in its official layout, label ids mapped with the official label table.

Layout (``root`` holds the unpacked ``leftImg8bit_trainvaltest.zip`` and
``gtFine_trainvaltest.zip``; ``gtCoarse.zip`` and ``leftImg8bit_trainextra.zip`` optional)::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    root/gtCoarse/<split>/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png

Splits: ``train`` (2975), ``val`` (500), ``test`` (1525, images only: its public label files
hold no annotation, so every mask pixel is 255) and, with coarse labels, ``train_extra``
(19998). With ``coarse=True`` the labels come from ``gtCoarse`` instead of ``gtFine``.

Labels: the ``*_labelIds.png`` files store the label ids of ``cityscapesscripts.helpers.labels``
(0..33). Each is mapped to its ``trainId`` (19 classes, 0..18); ids whose train id is 255 or -1
(unlabeled, ego vehicle, ..., guard rail, caravan, trailer, license plate) become 255 = ignore.
The license plate's id is -1: no official label file holds it (its polygons are not drawn), and
written to an 8-bit PNG it reads as 255, which the table also maps to 255. Ids 34..254 are not
Cityscapes ids and raise ``DataError``.

Export: :func:`export_cityscapes_predictions` writes train-id predictions as label-id PNGs
named ``<city>/<city>_<seq>_<frame>_leftImg8bit.png``, which the official
``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling`` finds when
``CITYSCAPES_RESULTS`` points at the output folder (it matches ``<city>_<seq>_<frame>*.png``
anywhere below it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from contrastseg.data.fileio import IGNORE_INDEX, index_files
from contrastseg.data.paired import PairedSource, label_table, pair_files
from contrastseg.errors import DataError

if TYPE_CHECKING:
    from contrastseg.config import DataConfig

SPLITS = ("train", "val", "test", "train_extra")
_IMAGE_SUFFIX = "_leftImg8bit.png"
_NAME = re.compile(r"^([^_/\\]+)_(\d{6})_(\d{6})$")


def _official_labels():
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as exc:  # a declared dependency; this only fires in a broken install
        raise DataError(
            f"Cityscapes needs the cityscapesscripts package ({exc}); "
            f"install it with `pip install cityscapesscripts`"
        ) from None
    return labels


def cityscapes_label_table() -> np.ndarray:
    """256-entry table label id -> train id (255 = ignore, -1 = not a Cityscapes id), built
    from the official label list. Id -1 (license plate) sits at index 255 (its 8-bit value)."""
    mapping: dict[int, int] = {}
    for label in _official_labels():
        train = label.trainId if 0 <= label.trainId < 255 else IGNORE_INDEX
        mapping[label.id % 256] = train
    return label_table(mapping)


def cityscapes_classes() -> list[str]:
    """The 19 evaluated classes, in train-id order (road ... bicycle)."""
    return [_train_label(t).name for t in range(19)]


def cityscapes_palette() -> np.ndarray:
    """(19, 3) uint8: the official colour of each train id."""
    return np.array([_train_label(t).color for t in range(19)], dtype=np.uint8)


def _train_label(train_id: int):
    """The first label of the official list with this train id (what the official inverse
    mapping uses too)."""
    for label in _official_labels():
        if label.trainId == train_id:
            return label
    raise DataError(f"the official Cityscapes label table has no train id {train_id}")


def train_to_label_ids() -> np.ndarray:
    """256-entry uint8 table train id -> label id (0..18 -> 7 ... 33; others -> 0 'unlabeled')."""
    table = np.zeros(256, dtype=np.uint8)
    for t in range(19):
        table[t] = _train_label(t).id
    return table


class CityscapesSource(PairedSource):
    """One split of Cityscapes (see the module docstring for the layout and the label mapping).

    ``strict=False`` records incomplete pairs in ``self.missing`` instead of raising.
    """

    dataset = "cityscapes"
    label_ids = "the ids 0..33 of cityscapesscripts' label table, and 255 (license plate, -1)"

    @classmethod
    def options(cls, data: DataConfig, split: str) -> dict[str, Any]:
        return {"root": data.root, "coarse": data.cityscapes_coarse}

    def __init__(self, root: Path, split: str, coarse: bool = False, strict: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Cityscapes root {root} does not exist or is not a directory")
        if split not in SPLITS:
            raise DataError(f"Cityscapes has no split {split!r}; choose one of {list(SPLITS)}")
        if split == "train_extra" and not coarse:
            raise DataError(
                "Cityscapes split 'train_extra' has coarse labels only; set "
                "data.cityscapes_coarse: true"
            )
        self.root, self.split, self.coarse = root, split, bool(coarse)
        self.classes = cityscapes_classes()
        self.palette = cityscapes_palette()
        self.label_table = cityscapes_label_table()

        image_dir = root / "leftImg8bit" / split
        if not image_dir.is_dir():
            available = sorted(p.name for p in (root / "leftImg8bit").glob("*") if p.is_dir())
            raise DataError(
                f"{image_dir} is missing (splits found under {root / 'leftImg8bit'}: "
                f"{available or 'none'}); unpack leftImg8bit_trainvaltest.zip into {root}"
            )
        gt = "gtCoarse" if self.coarse else "gtFine"
        label_suffix = f"_{gt}_labelIds.png"
        has_labels = split != "test"
        label_dir = root / gt / split
        if has_labels and not label_dir.is_dir():
            archive = "gtCoarse.zip" if self.coarse else "gtFine_trainvaltest.zip"
            raise DataError(f"{label_dir} is missing; unpack {archive} into {root}")

        images: dict[str, Path] = {}
        labels: dict[str, Path] | None = {} if has_labels else None
        cities = {p.name for p in image_dir.iterdir() if p.is_dir()}
        if labels is not None:
            cities |= {p.name for p in label_dir.iterdir() if p.is_dir()}
        for city in sorted(cities):
            if (image_dir / city).is_dir():
                images.update(index_files(image_dir / city, _IMAGE_SUFFIX))
            if labels is not None and (label_dir / city).is_dir():
                labels.update(index_files(label_dir / city, label_suffix))

        def image_for(name: str) -> Path:
            return image_dir / name.split("_", 1)[0] / f"{name}{_IMAGE_SUFFIX}"

        def label_for(name: str) -> Path:
            return label_dir / name.split("_", 1)[0] / f"{name}{label_suffix}"

        where = f"Cityscapes {split} ({gt})" if has_labels else f"Cityscapes {split}"
        self._set_pairs(
            *pair_files(where, images, labels, image_for, label_for, strict=bool(strict))
        )


def evaluate_with_cityscapesscripts(
    root: Path, results_dir: Path, split: str = "val", quiet: bool = True
) -> dict:
    """Score the label-id PNGs under ``results_dir`` against ``root/gtFine/<split>`` with the
    functions of the official ``evalPixelLevelSemanticLabeling`` (what its command line runs
    with ``CITYSCAPES_DATASET=root CITYSCAPES_RESULTS=results_dir``), in this process.

    The instance-weighted nIoU is switched off (it needs ``numpy.in1d``, gone in NumPy 2.4);
    class IoUs and their mean are the official ones. Returns the evaluator's result dict:
    ``averageScoreClasses`` (mIoU over the 19 classes, NaN classes skipped), ``classScores``,
    ``confMatrix`` (label ids), ...
    """
    import contextlib
    import copy
    import io
    import os

    _official_labels()
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)
    args.cityscapesPath = str(root)
    args.groundTruthSearch = os.path.join(str(root), "gtFine", split, "*", "*_gtFine_labelIds.png")
    args.predictionPath, args.predictionWalk = str(results_dir), None
    args.evalInstLevelScore, args.evalPixelAccuracy = False, False
    args.JSONOutput, args.quiet, args.colorized = False, quiet, False
    args.bold = args.nocol = ""
    printed = io.StringIO()
    capture = contextlib.redirect_stdout(printed) if quiet else contextlib.nullcontext()
    try:
        with capture:
            gts = sorted(official.glob.glob(args.groundTruthSearch))
            if not gts:
                raise DataError(f"no ground truth matches {args.groundTruthSearch}")
            preds = [official.getPrediction(args, gt) for gt in gts]
            return official.evaluateImgLists(preds, gts, args)
    except SystemExit:  # the evaluator's printError
        raise DataError(f"the official evaluator stopped: {printed.getvalue().strip()}") from None


def export_cityscapes_predictions(predictions, names: list[str], out_dir: Path) -> list[Path]:
    """Write train-id predictions as label-id PNGs for the official evaluator or server.

    Args:
        predictions: one (H, W) array or tensor of train ids (0..18; 255 is written as label
            id 0 'unlabeled', which the evaluator counts as a miss) per name.
        names: ``<city>_<seq>_<frame>`` of each image (``CityscapesSource.name(i)``).
        out_dir: the results folder; files go to ``out_dir/<city>/<name>_leftImg8bit.png``.
    Returns:
        The written paths.
    """
    predictions = list(predictions)
    if len(predictions) != len(names):
        raise DataError(f"{len(predictions)} predictions for {len(names)} names")
    out_dir = Path(out_dir)
    table = train_to_label_ids()
    valid = np.zeros(256, dtype=bool)
    valid[:19] = True
    valid[IGNORE_INDEX] = True
    written: list[Path] = []
    for pred, name in zip(predictions, names, strict=True):
        match = _NAME.match(name)
        if match is None:
            raise DataError(
                f"{name!r} is not a Cityscapes image name <city>_<seq>_<frame> "
                f"(e.g. frankfurt_000000_000294)"
            )
        if hasattr(pred, "detach"):
            pred = pred.detach().cpu().numpy()
        pred = np.asarray(pred)
        if pred.ndim != 2:
            raise DataError(f"prediction for {name} must be (H, W), got shape {pred.shape}")
        ids = pred.astype(np.int64)
        bad = (ids < 0) | (ids > 255)
        if not bad.any():
            bad = ~valid[ids]
        if bad.any():
            values = np.unique(ids[bad])[:10].tolist()
            raise DataError(f"prediction for {name} holds {values}; train ids are 0..18 or 255")
        path = out_dir / match.group(1) / f"{name}{_IMAGE_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(table[ids.astype(np.uint8)]).save(path)
        written.append(path)
    return written
