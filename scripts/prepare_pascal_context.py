#!/usr/bin/env python
"""Make the PASCAL-Context 59-class label PNGs and split lists from the official annotations.

Inputs:

* ``--voc``: ``VOCdevkit/VOC2010`` of the PASCAL VOC 2010 trainval release
  (``VOCtrainval_03-May-2010.tar``): ``JPEGImages/`` and ``ImageSets/Main/{train,val}.txt``.
* ``--context``: the unpacked PASCAL-Context release (``trainval.tar.gz``): ``trainval/`` with
  one ``<name>.mat`` per image (variable ``LabelMap``, the 459 full-label ids, 0 = unlabeled),
  and ``labels.txt`` (``id: name``) next to it if you have it (used only to check names).

Outputs, under ``--voc`` (or ``--out``):

* ``SegmentationClassContext/<name>.png``: 8-bit, 0 = background (every label outside the 59
  classes, and unlabeled), 1..59 = the classes in ``CONTEXT59_CLASSES`` order;
* ``ImageSets/SegmentationContext/train.txt`` and ``val.txt``: the names of VOC2010's
  ``ImageSets/Main`` train and val lists that have an annotation and an image.

The ``.mat`` files are read by ``contrastseg.data.load_mat_array`` (no SciPy needed).
Run ``contrastseg data check configs/pascal_context/_base.yaml`` afterwards.

Usage::

    python scripts/prepare_pascal_context.py --voc data/VOCdevkit/VOC2010 \\
        --context data/pascal_context_release [--workers 4]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from contrastseg.data.coco_stuff import load_mat_array
from contrastseg.data.pascal_context import (
    CONTEXT59_CLASSES,
    CONTEXT59_IDS_459,
    context59_from_459,
)
from contrastseg.errors import DataError


def _read_names(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def check_label_names(labels_txt: Path) -> list[str]:
    """Differences between the release's ``labels.txt`` and the 59 built-in (id, name) pairs."""
    names: dict[int, str] = {}
    for line in labels_txt.read_text(encoding="utf-8", errors="replace").splitlines():
        if ":" in line:
            key, name = line.split(":", 1)
            if key.strip().isdigit():
                names[int(key)] = name.strip()
    return [
        f"id {i}: labels.txt says {names.get(i)!r}, expected {name!r}"
        for i, name in zip(CONTEXT59_IDS_459, CONTEXT59_CLASSES, strict=True)
        if names.get(i, "").replace(" ", "").lower() != name
    ]


def convert_one(mat_path: Path, out_path: Path) -> None:
    label_map = load_mat_array(mat_path, "LabelMap")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(context59_from_459(label_map)).save(out_path)


def prepare(voc: Path, context: Path, out: Path | None = None, workers: int = 4) -> dict:
    """Convert every annotation and write the split lists; returns counts per split."""
    voc, context = Path(voc), Path(context)
    out = Path(out) if out is not None else voc
    mat_dir = context / "trainval"
    for path in (voc / "JPEGImages", voc / "ImageSets" / "Main", mat_dir):
        if not path.is_dir():
            raise DataError(f"{path} is missing (see the usage at the top of this script)")
    labels_txt = context / "labels.txt"
    if labels_txt.is_file():
        for line in check_label_names(labels_txt):
            print(f"warning: {line}", file=sys.stderr)
    mats = {p.stem: p for p in mat_dir.glob("*.mat")}
    if not mats:
        raise DataError(f"{mat_dir} holds no .mat files")
    label_dir = out / "SegmentationClassContext"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(
            pool.map(
                lambda item: convert_one(item[1], label_dir / f"{item[0]}.png"),
                sorted(mats.items()),
            )
        )

    counts = {}
    list_dir = out / "ImageSets" / "SegmentationContext"
    list_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        main_list = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not main_list.is_file():
            raise DataError(f"{main_list} is missing")
        names = [
            n
            for n in _read_names(main_list)
            if n in mats and (voc / "JPEGImages" / f"{n}.jpg").is_file()
        ]
        (list_dir / f"{split}.txt").write_text("".join(f"{n}\n" for n in sorted(names)))
        counts[split] = len(names)
    counts["labels"] = len(mats)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voc", type=Path, required=True, help="VOCdevkit/VOC2010")
    parser.add_argument("--context", type=Path, required=True, help="unpacked trainval.tar.gz")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: --voc)")
    parser.add_argument("--workers", type=int, default=4, help="conversion threads")
    args = parser.parse_args(argv)
    try:
        counts = prepare(args.voc, args.context, args.out, args.workers)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['labels']} label maps; train {counts['train']} and val {counts['val']} "
        f"images listed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
