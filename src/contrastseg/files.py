"""Writing files so that a reader never sees a torn one; reading JSON-lines records."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from contrastseg.errors import ContrastSegError

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, rename it to
    ``path`` and sync the folder: ``path`` is then the old file or the new one whole. On any
    failure (an exception, a full disk) the temporary file is removed and ``path`` is untouched;
    a process killed mid-write leaves only the hidden ``.NAME.*.tmp`` file. Returns what
    ``write`` returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = write(Path(tmp))
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)
    return result


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_lines(
    path: Path, error: type[ContrastSegError] = ContrastSegError
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file (UTF-8); a line that
    is not JSON raises ``error`` naming the file and the line."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise error(
                f"{path}, line {number}: not valid JSON ({err.msg}); repair or delete that line"
            ) from None
