"""Reading config YAML safely: UTF-8 only, bounded in size, nesting depth and alias expansion.

``yaml.safe_load`` runs no code, but it still reads whatever bytes it is given: a UTF-16 or
binary file ends in a ``UnicodeDecodeError``, a value nested 20,000 lists deep in a
``RecursionError``, and a few lines of aliases ("billion laughs") expand to 9^9 values that
whatever reads them next (validation, error messages, ``config show``) walks one by one. Here
each of these is a :class:`~contrastseg.errors.ConfigError` of one line that names the file
and where in it, raised before anything is expanded:

- the file must be at most :data:`MAX_BYTES` bytes and UTF-8 (a UTF-8 byte order mark is
  allowed); a UTF-16/UTF-32 byte order mark, a NUL byte or an invalid UTF-8 sequence is named
  with its byte offset;
- collections may nest at most :data:`MAX_DEPTH` levels (a config needs 4);
- the document, with every alias expanded, may hold at most :data:`MAX_NODES` values (a full
  resolved config holds about 300); aliases themselves are allowed, so ``&crop [512, 1024]``
  and ``*crop`` still work;
- a key given twice in one mapping is refused (YAML would keep the last one silently).
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from contrastseg.errors import ConfigError, one_line

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_NODES", "load_yaml_text", "read_yaml_file"]

#: Largest config file read, in bytes.
MAX_BYTES = 1 << 20
#: Deepest nesting of lists and mappings.
MAX_DEPTH = 64
#: Most values in a document with its aliases expanded.
MAX_NODES = 100_000

_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


class _Limit(Exception):
    """A limit of this module was hit while composing (turned into ConfigError)."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` whose composer counts nesting depth, refuses duplicate keys, and whose
    document is measured (aliases expanded) before anything is constructed."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Limit(
                    f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise _Limit(f"key {key.value!r} is given twice in one mapping", key.start_mark)
                seen.add(key.value)
        return node

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: Node) -> None:
    """Refuse a document whose values, every alias expanded, exceed MAX_NODES. Sizes are
    memoised per node (an alias is the very node it names), so this costs one visit per
    distinct node however large the expansion; depth and alias cycles are bounded by the
    composer (an alias can only name a node that is already complete)."""
    sizes: dict[int, int] = {}

    def size(node: Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        total = 1
        if isinstance(node, SequenceNode):
            children: list[Node] = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise _Limit(
                    f"more than {MAX_NODES} values once its aliases are expanded (an alias bomb?)",
                    node.start_mark,
                )
        sizes[id(node)] = total
        return total

    size(root)


def _where(mark: yaml.Mark | None) -> str:
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "


def load_yaml_text(text: str, source: str) -> Any:
    """Parse ``text`` (already decoded) with the limits above; errors name ``source``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Limit as err:
        raise ConfigError(f"{source}: {_where(err.mark)}{err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        what = one_line(" ".join(p for p in (err.context, err.problem) if p))
        raise ConfigError(f"{source}: {_where(mark)}not valid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {one_line(err)}") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source}: a value YAML cannot convert: {one_line(err)}") from None
    except RecursionError:  # not expected within MAX_DEPTH; kept as one line all the same
        raise ConfigError(f"{source}: nested too deeply to read") from None


def read_yaml_file(path: Path) -> Any:
    """The YAML document of the file ``path``, read as UTF-8 with the limits above."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_BYTES} bytes, too large for a config file (is it one?)"
        )
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise ConfigError(
                f"{path}: {name} text (byte order mark at byte offset 0); save it as UTF-8"
            )
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ConfigError(
            f"{path}: a NUL byte at byte offset {nul}: UTF-16/UTF-32 text or a binary file, "
            "not a UTF-8 YAML config"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + (3 if raw.startswith(codecs.BOM_UTF8) else 0)
        raise ConfigError(
            f"{path}: not UTF-8 (byte 0x{raw[offset]:02x} at byte offset {offset}); save it as "
            "UTF-8"
        ) from None
    return load_yaml_text(text, str(path))
