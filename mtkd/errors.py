"""One exception type for bad input.

Every user-facing failure caused by input (a missing path, a corrupt image,
malformed XML/JSON, a box outside the image, an unknown class or config key, a
class-count mismatch) raises :class:`MtkdError` with a one-line message that
names the file or the config key. The CLI prints it without a traceback.
"""
from __future__ import annotations


class MtkdError(Exception):
    """Bad input or configuration; the message is one line naming the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(MtkdError):
    """An unknown, missing or ill-typed configuration key."""


class DataError(MtkdError):
    """A data file that is missing, corrupt or inconsistent."""
