"""Data: the synthetic default data set, user folders, joint transforms and the torch Dataset.

Images are (H, W, 3) uint8 RGB arrays, masks (H, W) uint8 train ids with 255 = ignore.
"""

from contrastseg.data.dataset import SOURCE_NAMES, SegmentationDataset, build_source, sample_seed
from contrastseg.data.folder import FolderDataset, load_image, load_mask
from contrastseg.data.palettes import colorize, default_palette
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
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCE_NAMES",
    "SYNTHETIC_CLASSES",
    "EvalTransform",
    "FolderDataset",
    "SegmentationDataset",
    "SyntheticShapes",
    "TrainTransform",
    "build_source",
    "colorize",
    "default_palette",
    "denormalize",
    "load_image",
    "load_mask",
    "normalize",
    "render_sample",
    "sample_seed",
]
