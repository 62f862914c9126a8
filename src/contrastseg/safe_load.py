"""Reading a ``.pt``/``.pth`` file with ``torch.load(weights_only=True)``: the one place every
reader of outside files goes through (checkpoints, released files, backbone weights).

Besides torch's own set (tensors, numbers, strings, lists, tuples, dicts), the unpickler may
build the NumPy scalars and dtypes that a training script's config commonly holds (a
``numpy.float64`` mIoU from ``np.nanmean``, an ``np.int64`` count): the scalar constructor under
its NumPy 2 name (``numpy._core.multiarray.scalar``) and its NumPy 1 name
(``numpy.core.multiarray.scalar``), ``numpy.dtype``, and the numeric dtype classes
(``numpy.dtypes.Float64DType`` and the like), which rebuild a dtype's state. None of them
imports a module or calls code named by the file. NumPy arrays, and every other class or
function, stay refused.

A missing path, a folder, an empty file and a truncated or corrupt one raise ``CheckpointError``
with one line that names the file. torch writes each record of its zip format with a CRC-32 but
does not check it on load; :func:`check_zip` does, so a flipped byte anywhere in a tensor or in
the pickle is refused as damage rather than used. A file that needs more than the allow-list
fails with torch's own ``pickle.UnpicklingError`` (callers word that refusal themselves).
"""

from __future__ import annotations

import pickle
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch

from contrastseg.errors import CheckpointError, one_line

# dtype classes of plain numbers (numpy.dtypes, NumPy >= 1.25); object, void and string dtypes
# are left out.
_DTYPE_CLASSES = (
    "BoolDType",
    "Int8DType",
    "UInt8DType",
    "Int16DType",
    "UInt16DType",
    "Int32DType",
    "UInt32DType",
    "Int64DType",
    "UInt64DType",
    "LongDType",
    "ULongDType",
    "LongLongDType",
    "ULongLongDType",
    "Float16DType",
    "Float32DType",
    "Float64DType",
    "LongDoubleDType",
    "Complex64DType",
    "Complex128DType",
    "CLongDoubleDType",
)
SCALAR_NAMES = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")


def numpy_globals() -> list[Any]:
    """The allow-list of NumPy scalars and dtypes, as ``torch.serialization.safe_globals``
    takes it: objects, and ``(object, name)`` pairs for the names a pickle may spell them by."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [(scalar, name) for name in SCALAR_NAMES]
    allowed.append(np.dtype)
    dtypes = getattr(np, "dtypes", None)
    for name in _DTYPE_CLASSES:
        cls = getattr(dtypes, name, None)
        if cls is not None and cls not in allowed:
            allowed.append(cls)
    return allowed


def allowed_names() -> set[str]:
    """The ``module.name`` spellings :func:`numpy_globals` allows."""
    names = set()
    for entry in numpy_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def check_readable(path: Path, what: str = "checkpoint") -> Path:
    """``path`` when it is a non-empty file, else ``CheckpointError`` naming it and what is
    wrong (missing, a folder, empty)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a {what} file; give the file inside it")
    if not path.exists():
        raise CheckpointError(f"{path}: {what} not found")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path}: not a regular file (a pipe or device?); give a {what} file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), not a {what}")
    return path


def is_refusal(err: BaseException) -> bool:
    """Whether ``err`` is torch's weights_only refusal of a global (not a broken file)."""
    return isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err)


def first_line(err: BaseException) -> str:
    """The first sentence of an exception's message, or its type when it has none."""
    text = one_line(err)
    for stop in (". ", "\n"):
        text = text.split(stop)[0]
    return text.rstrip(".") or type(err).__name__


def check_zip(path: Path, what: str = "checkpoint") -> None:
    """Refuse a zip-format torch file (``torch.save``'s format since PyTorch 1.6) whose records
    fail their CRC-32, are compressed (torch stores them as they are) or cannot be listed, with
    ``CheckpointError`` naming the file and the record. Files in torch's older, non-zip format
    have no checksums and pass unchecked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{path}: record {info.filename!r} is compressed; torch writes "
                        f"uncompressed records, so this is not a {what} torch wrote (or it was "
                        "re-zipped): save it again with torch.save"
                    )
            bad = archive.testzip()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways
        raise CheckpointError(
            f"{path}: damaged {what} (its zip structure cannot be read: {first_line(err)})"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: damaged {what}: record {bad!r} fails its CRC-32 check (the file changed "
            "after it was written); use another copy"
        )


#: How deep a file's dicts, lists and tuples may nest, and how many values they may hold once
#: every shared reference is counted where it is used. contrastseg's checkpoints nest 6 deep and
#: hold some 10^4 values; a released checkpoint alike. A pickle can build a list that holds
#: itself, or 2^60 values from 60 lists that each hold the previous one twice; walking either
#: (a digest, a config check, an error message) would never end.
MAX_DEPTH = 64
MAX_VALUES = 1_000_000


def _containers(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, (list, tuple)):
        return list(node)
    return []


def structure_problem(obj: Any, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES):
    """Why the nested dicts/lists/tuples of ``obj`` cannot be walked safely (a cycle, nesting
    deeper than ``max_depth``, more than ``max_values`` values counting each use of a shared
    one), or None. Iterative: linear in the number of distinct containers."""
    size: dict[int, int] = {}  # id -> values under the container, counted as a tree
    alive: list[Any] = []  # keeps the ids valid while the walk lasts
    entered: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    while stack:
        node, depth, leaving = stack.pop()
        key = id(node)
        if leaving:
            entered.discard(key)
            size[key] = 1 + sum(size.get(id(c), 1) for c in _containers(node))
            if size[key] > max_values:
                return f"its values expand to more than {max_values:,} (shared references)"
            continue
        if key in size or not isinstance(node, (dict, list, tuple)):
            continue
        if key in entered:
            return "it holds a container that contains itself"
        if depth >= max_depth:
            return f"its values nest more than {max_depth} deep"
        entered.add(key)
        alive.append(node)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _containers(node))
    return None


def load_weights_only(path: Path, extra: list[Any] | None = None, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with :func:`numpy_globals`
    (and ``extra``) allowed. See the module docstring for the errors."""
    path = check_readable(path, what)
    check_zip(path, what)
    try:
        with torch.serialization.safe_globals([*numpy_globals(), *(extra or [])]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a broken file fails in many ways
        if is_refusal(err):
            raise
        raise CheckpointError(
            f"{path}: cannot read it as a {what} (truncated or corrupt?): {first_line(err)}"
        ) from err
    problem = structure_problem(obj)
    if problem is not None:
        raise CheckpointError(f"{path}: not a {what}: {problem}")
    return obj
