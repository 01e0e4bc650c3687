"""The project's own error types.

Every problem a user can cause (bad config, bad data, bad checkpoint) is raised as a subclass of
:class:`TimmfaceError` with a one-line message that names the file or key and the problem. The CLI
prints that line and exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class TimmfaceError(Exception):
    """Base class: a user-facing problem described in one line."""


class ConfigError(TimmfaceError, ValueError):
    """An unknown key, a wrong type or an impossible combination of settings."""


class DataError(TimmfaceError):
    """A dataset, record, image or verification file that cannot be used."""


class CheckpointError(TimmfaceError):
    """A checkpoint that cannot be read, or does not match the run."""


class TeacherError(TimmfaceError):
    """A teacher file whose format or architecture cannot be recognised or loaded."""


class CorruptRecordError(DataError):
    """One record or image that cannot be decoded; ``key`` names it. Loaders skip and count these."""

    def __init__(self, message: str, key: int | str | None = None) -> None:
        super().__init__(message)
        self.key = key
