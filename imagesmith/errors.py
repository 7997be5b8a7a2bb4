"""The project's error types.

Library code raises these; only the CLI turns them into a message and an exit
code. Each carries a message and, where we know one, a hint on what to change.
"""

from __future__ import annotations

import errno

# The errnos of a write that found no room: a full disk, or a user's quota.
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class ImagesmithError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(ImagesmithError):
    """Malformed or impossible configuration, or bad usage. Exit code 2."""

    exit_code = 2


class BuildError(ImagesmithError):
    """A build step failed (a command, a class script, the archive)."""


def is_out_of_space(error: BaseException) -> bool:
    """Whether `error` is a full disk: an OSError saying so, or a command's
    failure whose output does."""
    if isinstance(error, OSError):
        return error.errno in OUT_OF_SPACE
    return isinstance(error, ImagesmithError) and "No space left on device" in error.message


class TestFailure(ImagesmithError):
    """A booted image did not give the positive signal."""
