"""Exceptions raised by contrastseg. Each message names the file, field or value, and the fix."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) made one space: a message line."""
    return " ".join(str(text).split())


class ContrastSegError(Exception):
    """Base class of every error contrastseg raises on purpose."""


class ConfigError(ContrastSegError):
    """A configuration file or override is invalid."""


class DataError(ContrastSegError):
    """A data set, image or mask is missing, unreadable or inconsistent."""


class OutputError(ContrastSegError):
    """An output path cannot be written: a folder where a file goes, a file where a folder goes,
    or a path under a file."""


class CheckpointError(ContrastSegError):
    """A checkpoint is missing, truncated or does not fit the model."""


class TrainingError(ContrastSegError):
    """Training cannot go on (e.g. repeated non-finite losses); a checkpoint was written."""


class TrainingInterrupted(ContrastSegError):
    """SIGTERM or SIGINT arrived; a checkpoint was written and ``--resume`` continues."""

    def __init__(self, signum: int, iteration: int, path) -> None:
        import signal

        self.signum = signum
        self.iteration = iteration
        self.path = path
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped at iteration {iteration} after writing {path}; "
            "run the same command with --resume to continue"
        )
