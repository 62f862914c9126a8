"""Data: the synthetic default data set, user folders, the benchmarks in their official
layouts (Cityscapes, PASCAL-Context, COCO-Stuff, CamVid, ADE20K), integrity checks, joint
transforms and the torch Dataset.

Images are (H, W, 3) uint8 RGB arrays, masks (H, W) uint8 train ids with 255 = ignore.
``open_source(cfg.data, split)`` opens the source a config names (the data sets are registered
in ``contrastseg.datasets_table``); every source that reads files is a ``PairedSource``.
"""

from contrastseg.data.ade20k import ADE20K_CLASSES, ADE20KSource
from contrastseg.data.build import (
    build_eval_dataset,
    build_source,
    build_train_dataset,
    open_source,
    source_class,
)
from contrastseg.data.camvid import CAMVID_CLASSES, CamVidSource
from contrastseg.data.check import CheckReport, check_source, check_split, format_report
from contrastseg.data.cityscapes import (
    CityscapesSource,
    evaluate_with_cityscapesscripts,
    export_cityscapes_predictions,
)
from contrastseg.data.coco_stuff import CocoStuffSource, load_mat_array
from contrastseg.data.dataset import SegmentationDataset, Source, sample_seed
from contrastseg.data.fileio import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageTooLarge,
    index_files,
    load_image,
    load_mask,
    pixel_limit,
    read_list,
)
from contrastseg.data.folder import FolderSource
from contrastseg.data.paired import PairedSource, Problem, label_table, pair_files
from contrastseg.data.palettes import colorize, default_palette
from contrastseg.data.pascal_context import CONTEXT59_CLASSES, PascalContextSource
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
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CONTEXT59_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "SYNTHETIC_CLASSES",
    "ADE20KSource",
    "CamVidSource",
    "CheckReport",
    "CityscapesSource",
    "CocoStuffSource",
    "EvalTransform",
    "FolderSource",
    "ImageTooLarge",
    "PairedSource",
    "PascalContextSource",
    "Problem",
    "SegmentationDataset",
    "Source",
    "SyntheticShapes",
    "TrainTransform",
    "build_eval_dataset",
    "build_source",
    "build_train_dataset",
    "check_source",
    "check_split",
    "colorize",
    "default_palette",
    "denormalize",
    "evaluate_with_cityscapesscripts",
    "export_cityscapes_predictions",
    "format_report",
    "index_files",
    "label_table",
    "load_image",
    "load_mask",
    "load_mat_array",
    "normalize",
    "open_source",
    "pair_files",
    "pixel_limit",
    "read_list",
    "render_sample",
    "sample_seed",
    "source_class",
]
