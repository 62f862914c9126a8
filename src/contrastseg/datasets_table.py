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

__all__ = ["DATA_SETS", "DATA_SET_NAMES", "DataSetEntry"]


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
    )
}
#: The allowed values of ``data.name``, in the order of the table.
DATA_SET_NAMES: tuple[str, ...] = tuple(DATA_SETS)
