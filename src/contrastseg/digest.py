"""A checkpoint's content digest: SHA-256 over every value it holds, written at save and checked
at load, so that a changed weight, optimizer moment, random state or config value is refused
instead of used.

The digest covers the checkpoint's contents, not its bytes: dict keys in their order, the type
of every value, numbers exactly (floats by their 8 bytes), strings as UTF-8, and each tensor's
dtype, shape and the SHA-256 of its element bytes (row-major; a view hashes like its copy).
Files are read through :func:`contrastseg.safe_load.load_weights_only`, which bounds how far
their values nest and expand, so the walk here is never deep or long. The state-dict version
``_metadata`` that torch attaches to ``state_dict()`` results is not covered. The same contents
give the same digest on any machine and after any number of save/load round trips.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch

#: The key of the digest in a checkpoint: ``"sha256:<64 hex digits>"``.
DIGEST_KEY = "digest"
_PREFIX = "sha256:"


class Unhashable(TypeError):
    """A value of a type a checkpoint does not hold; its place is in the message."""


def _tensor_record(t: torch.Tensor, where: str) -> bytes:
    """A tensor's dtype, shape and the SHA-256 of its row-major element bytes."""
    t = t.detach().to("cpu")
    if t.layout != torch.strided or t.is_quantized:
        raise Unhashable(f"{where}: a {t.layout} tensor cannot be digested")
    data = hashlib.sha256()
    if t.numel():
        data.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode() + data.digest()


def _feed(h: Any, obj: Any, where: str, seen: dict[int, bytes]) -> None:
    if isinstance(obj, torch.Tensor):
        # a tensor referenced in several places (a shared generator state) is hashed once
        if id(obj) not in seen:
            seen[id(obj)] = _tensor_record(obj, where)
        h.update(seen[id(obj)])
    elif obj is None:
        h.update(b"N")
    elif type(obj) is bool:
        h.update(b"B1" if obj else b"B0")
    elif type(obj) is int:
        text = str(obj).encode()
        h.update(b"I" + struct.pack("<Q", len(text)) + text)
    elif type(obj) is float:
        h.update(b"F" + struct.pack("<d", obj))
    elif type(obj) is complex:
        h.update(b"C" + struct.pack("<dd", obj.real, obj.imag))
    elif type(obj) is str:
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack("<Q", len(data)) + data)
    elif type(obj) is bytes:
        h.update(b"Y" + struct.pack("<Q", len(obj)) + obj)
    elif isinstance(obj, (torch.dtype, torch.device)):
        data = str(obj).encode()
        h.update(b"d" + struct.pack("<Q", len(data)) + data)
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<Q", len(obj)))
        for key, value in obj.items():
            _feed(h, key, f"{where} (a key)", seen)
            _feed(h, value, f"{where}[{key!r}]", seen)
    elif isinstance(obj, (list, tuple)):  # torch.Size is a tuple
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<Q", len(obj)))
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]", seen)
    else:
        raise Unhashable(f"{where}: a {type(obj).__qualname__} cannot be digested")


def content_digest(state: dict) -> str:
    """``"sha256:<hex>"`` of every entry of ``state`` but :data:`DIGEST_KEY` (see the module
    docstring); ``Unhashable`` names the place of a value of another type."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY}, "checkpoint", {})
    return _PREFIX + h.hexdigest()


def sealed(state: dict) -> dict:
    """``state`` with its :func:`content_digest` under :data:`DIGEST_KEY` (a new dict)."""
    return {
        **{k: v for k, v in state.items() if k != DIGEST_KEY},
        DIGEST_KEY: content_digest(state),
    }


def digest_problem(state: dict) -> str | None:
    """Why ``state``'s stored digest does not vouch for its contents, or None when it does.
    A state without :data:`DIGEST_KEY` (written before digests existed) gives None; the caller
    tells it apart with ``DIGEST_KEY in state``."""
    stored = state.get(DIGEST_KEY)
    if DIGEST_KEY not in state:
        return None
    if not isinstance(stored, str) or not stored.startswith(_PREFIX) or len(stored) != 71:
        return f"its digest entry {str(stored)[:80]!r} is not 'sha256:' and 64 hex digits"
    try:
        actual = content_digest(state)
    except Unhashable as err:
        return f"it holds a value no checkpoint holds ({err})"
    if actual != stored:
        return (
            f"its contents do not match the digest written with it (stored {stored[7:19]}..., "
            f"contents {actual[7:19]}...): the file was changed or damaged after it was written"
        )
    return None
