"""Errors that the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: an unknown name, a malformed value, missing data."""


class DataNotFoundError(UsageError):
    """A dataset's files are not under the data root."""


class TrainingDivergedError(RuntimeError):
    """A loss term became NaN or infinite."""
