"""The data sets contrastseg reads: one row each, the only place a data set is registered.

A row names the value of ``data.name``, how reports name the data set, the source class that
reads it and whether it reads files under ``data.root``. ``config`` takes its allowed
``data.name`` values from here, ``report`` its display names, and ``contrastseg.data`` imports
the source class when it opens a split (``contrastseg.data.open_source``). The class is named
by its import path so that this module, which ``config`` reads, imports nothing above it.

Adding a data set: write its source (a ``contrastseg.data.paired.PairedSource`` subclass for
image/label file pairs) and add its row here; options of its own go into ``DataConfig`` and
its ``options`` classmethod.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DATA_SETS", "DATA_SET_NAMES", "MAX_IMAGE_PIXELS", "DataSetEntry"]


@dataclass(frozen=True)
class DataSetEntry:
    """One registered data set."""

    name: str  # the value of data.name
    display: str  # its name in reports (``contrastseg report``)
    source: str  # the source class, "module:Class"
    reads_root: bool = True  # read from files under data.root (which is then required)


DATA_SETS: dict[str, DataSetEntry] = {
    row.name: row
    for row in (
        DataSetEntry("synthetic", "synthetic", "contrastseg.data.synthetic:SyntheticShapes", False),
        DataSetEntry("folder", "folder", "contrastseg.data.folder:FolderSource"),
        DataSetEntry("cityscapes", "Cityscapes", "contrastseg.data.cityscapes:CityscapesSource"),
        DataSetEntry(
            "pascal_context",
            "PASCAL-Context",
            "contrastseg.data.pascal_context:PascalContextSource",
        ),
        DataSetEntry("coco_stuff", "COCO-Stuff", "contrastseg.data.coco_stuff:CocoStuffSource"),
        DataSetEntry("camvid", "CamVid", "contrastseg.data.camvid:CamVidSource"),
        DataSetEntry("ade20k", "ADE20K", "contrastseg.data.ade20k:ADE20KSource"),
    )
}
#: The allowed values of ``data.name``, in the order of the table.
DATA_SET_NAMES: tuple[str, ...] = tuple(DATA_SETS)

#: The default pixel limit of an image or mask file (``data.max_image_pixels``, ``predict
#: --max-pixels``): 2**26 = 67,108,864 pixels, e.g. 8192 x 8192. It admits every image of the
#: data sets above (Cityscapes 2048 x 1024, CamVid 960 x 720, PASCAL-Context and COCO-Stuff at
#: most 640 on a side) and camera photos up to 61 MP (9504 x 6336), and refuses a header that
#: claims billions of pixels before they are decoded; at the limit an image takes 192 MiB as
#: 8-bit RGB and 768 MiB as the float tensor the model reads.
MAX_IMAGE_PIXELS = 2**26
