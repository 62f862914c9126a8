"""Argument checks shared by the modules that take plain Python arguments."""

from __future__ import annotations

from contrastseg.errors import ConfigError

__all__ = ["check_int"]


def check_int(name: str, value, minimum: int) -> None:
    """A ConfigError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid; allowed values: integers >= {minimum}")
