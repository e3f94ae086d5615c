"""One exception type for bad input.

Every user-facing failure caused by input (a missing path, a corrupt image,
malformed XML/JSON, a box outside the image, an unknown class or config key, a
class-count mismatch) raises :class:`MtkdError` with a one-line message that
names the file or the config key. The CLI prints it without a traceback. So
do failures to write outputs (a full disk, a read-only folder):
:func:`writing` turns them into an MtkdError naming the path.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


class MtkdError(Exception):
    """Bad input or configuration; the message is one line naming the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(MtkdError):
    """An unknown, missing or ill-typed configuration key."""


class DataError(MtkdError):
    """A data file that is missing, corrupt or inconsistent."""


class Interrupted(MtkdError):
    """Training stopped by SIGINT/SIGTERM after saving its state.

    The message is ``"<reason>; resume with: <resume>"``; ``exit_code`` is
    128 + the signal number, as a shell reports a process ended by it.
    """

    def __init__(self, reason: str, exit_code: int, resume: str):
        super().__init__(f"{reason}; resume with: {resume}")
        self.reason, self.exit_code, self.resume = reason, exit_code, resume

    def __reduce__(self):  # pickles across processes (a benchmark's worker pool) with its three fields
        return type(self), (self.reason, self.exit_code, self.resume)


def write_error(path: Path | str, exc: BaseException) -> MtkdError:
    """The one-line MtkdError for an OSError (disk full, read-only folder, ...) while writing ``path``."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return MtkdError(f"{path}: cannot write: {reason}")


def os_error_in_chain(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or its cause/context), else ``None``.

    ``torch.save`` to a file object reports a failed write as a RuntimeError
    whose context is the OSError.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Re-raise an OSError raised in the block as :func:`write_error` for ``path``, without the chain."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None
