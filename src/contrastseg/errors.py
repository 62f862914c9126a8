"""Exceptions raised by contrastseg. Each message names the file, field or value, and the fix."""


class ContrastSegError(Exception):
    """Base class of every error contrastseg raises on purpose."""


class ConfigError(ContrastSegError):
    """A configuration file or override is invalid."""


class DataError(ContrastSegError):
    """A data set, image or mask is missing, unreadable or inconsistent."""


class CheckpointError(ContrastSegError):
    """A checkpoint is missing, truncated or does not fit the model."""
