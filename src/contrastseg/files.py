"""Writing files so that a reader never sees a torn one, with the permissions any other new
file gets; refusing output paths that cannot be written; reading JSON-lines records."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from contrastseg.errors import ContrastSegError, OutputError

T = TypeVar("T")


def atomic_write(path: Path, write: Callable[[Path], T]) -> T:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, rename it to
    ``path`` and sync the folder: ``path`` is then the old file or the new one whole. On any
    failure (an exception, a full disk) the temporary file is removed and ``path`` is untouched;
    a process killed mid-write leaves only the hidden ``.NAME.*.tmp`` file. Returns what
    ``write`` returns.

    A new file gets the permissions of any file the process creates, ``0o666 & ~umask`` (0644
    under umask 022), not the 0600 of the temporary file; a replaced file keeps its own, as
    editors do. Missing folders are created; a ``path`` that is a folder or lies under a file
    raises ``OutputError`` (:func:`check_output_file`)."""
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = write(Path(tmp))
        os.chmod(tmp, _mode_for(path))
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)
    return result


def atomic_write_folder(path: Path, write: Callable[[Path], T]) -> T:
    """The folder counterpart of :func:`atomic_write`: ``write(tmp)`` fills a hidden temporary
    folder beside ``path`` (``path`` must not exist or be an empty folder), whose files are
    flushed to disk before it is renamed to ``path``: ``path`` then appears whole or not at
    all. On any failure the temporary folder is removed. Its files get the permissions of any
    new file, the folder those of any new folder. Returns what ``write`` returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        result = write(tmp)
        umask = current_umask()
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~umask)
            _fsync(file, os.O_RDONLY)
        os.chmod(tmp, 0o777 & ~umask)
        if path.is_dir():
            path.rmdir()  # empty, or rmdir refuses; the rename needs the name free
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent, os.O_RDONLY)
    return result


def real_path(path: Path | str) -> Path:
    """``path`` absolute, with symlinks resolved, like ``Path.resolve()``, except that a symlink
    loop (which ``resolve`` raises ``RuntimeError`` for) is left as it is for the reader of the
    path to report."""
    return Path(os.path.realpath(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`: the old file or the new one
    whole, never a torn one."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _mode_for(path: Path) -> int:
    """The permission bits ``path`` gets: those of the file it replaces, else a new file's."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask. Linux shows it in ``/proc/self/status`` (read without changing it,
    so no other thread can create a file under a wrong mask); elsewhere it is set to 0o077 and
    back at once, which at worst gives another thread's new file fewer permissions."""
    try:
        text = Path("/proc/self/status").read_text()
        found = re.search(r"^Umask:\s*([0-7]+)$", text, re.MULTILINE)
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def _first_existing(path: Path) -> Path | None:
    """The nearest of ``path``'s parents that exists (as anything), None when none does."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return None


def _check_parents(path: Path, what: str) -> None:
    parent = _first_existing(path)
    if parent is not None and not parent.is_dir():
        raise OutputError(
            f"{path}: {parent} is a file, not a folder, so {what} cannot be written under it; "
            "give another path"
        )


def check_output_file(path: Path, what: str = "the output") -> Path:
    """``path`` as a ``Path``, refused with ``OutputError`` (one line naming it) when a file
    cannot be written there: it is a folder, or a parent of it is a file. Call it before the
    work whose result goes there; ``atomic_write`` calls it too."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {what} needs a file path, e.g. {path / 'NAME'}")
    _check_parents(path, what)
    return path


def check_output_dir(path: Path, what: str = "the output") -> Path:
    """``path`` as a ``Path``, refused with ``OutputError`` (one line naming it) when it cannot
    be a folder: it is a file, or a parent of it is a file. Nothing is created."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(
            f"{path}: is a file, not a folder; {what} needs a folder (created when the first "
            "file is written): give another path or remove the file"
        )
    _check_parents(path, what)
    return path


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: The largest JSON file (``eval.json``, a sidecar) read whole: a run's files take a few KiB.
MAX_JSON_BYTES = 16 << 20


def parse_json(text: str) -> Any:
    """``json.loads(text)``; ``ValueError`` (with a message) for text that is not JSON or nests
    deeper than the parser's recursion allows."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise ValueError("not valid JSON here (its values nest too deep)") from None


def read_json(path: Path, error: type[ContrastSegError] = ContrastSegError, fix: str = "") -> Any:
    """The value of the UTF-8 JSON file ``path`` (at most :data:`MAX_JSON_BYTES`); ``error``
    naming the file, what is wrong and ``fix`` when it is missing, too large, not UTF-8 or not
    JSON."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size:,} bytes, more than a JSON file here holds{fix}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}){fix}") from None
    except OSError as err:
        raise error(f"{path}: cannot be read ({err.strerror or err}){fix}") from None
    try:
        return parse_json(text)
    except ValueError as err:
        raise error(f"{path}: {err}{fix}") from None


def json_lines(
    path: Path, error: type[ContrastSegError] = ContrastSegError
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file (UTF-8); a line that
    is not UTF-8 or not JSON raises ``error`` naming the file and the line."""
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, parse_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            what = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else str(err)
            raise error(f"{path}, line {number}: {what}; repair or delete that line") from None
