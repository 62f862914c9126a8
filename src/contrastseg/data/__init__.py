"""Data: the synthetic default data set, user folders, the benchmarks in their official
layouts (Cityscapes, PASCAL-Context, COCO-Stuff, CamVid), integrity checks, joint transforms and
the torch Dataset.

Images are (H, W, 3) uint8 RGB arrays, masks (H, W) uint8 train ids with 255 = ignore.
"""

from contrastseg.data.camvid import CAMVID_CLASSES, CamVidDataset
from contrastseg.data.check import (
    CheckReport,
    PairedSource,
    Problem,
    check_source,
    check_split,
    format_report,
)
from contrastseg.data.cityscapes import (
    CityscapesDataset,
    evaluate_with_cityscapesscripts,
    export_cityscapes_predictions,
)
from contrastseg.data.coco_stuff import CocoStuffDataset, load_mat_array
from contrastseg.data.dataset import SOURCE_NAMES, SegmentationDataset, build_source, sample_seed
from contrastseg.data.folder import FolderDataset, load_image, load_mask
from contrastseg.data.palettes import colorize, default_palette
from contrastseg.data.pascal_context import CONTEXT59_CLASSES, PascalContextDataset
from contrastseg.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from contrastseg.data.synthetic import SyntheticShapes, render_sample
from contrastseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    denormalize,
    normalize,
)

__all__ = [
    "CAMVID_CLASSES",
    "CONTEXT59_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCE_NAMES",
    "SYNTHETIC_CLASSES",
    "CamVidDataset",
    "CheckReport",
    "CityscapesDataset",
    "CocoStuffDataset",
    "EvalTransform",
    "FolderDataset",
    "PairedSource",
    "PascalContextDataset",
    "Problem",
    "SegmentationDataset",
    "SyntheticShapes",
    "TrainTransform",
    "build_source",
    "check_source",
    "check_split",
    "colorize",
    "default_palette",
    "denormalize",
    "evaluate_with_cityscapesscripts",
    "export_cityscapes_predictions",
    "format_report",
    "load_image",
    "load_mat_array",
    "load_mask",
    "normalize",
    "render_sample",
    "sample_seed",
]
