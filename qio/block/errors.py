"""Errors of the block layer.  Every failure carries an errno, as QEMU's negative return values do."""

from __future__ import annotations

import errno
import os


class BlockError(OSError):
    """An I/O request failed with ``errno``; ``str()`` is the C ``strerror`` text."""

    def __init__(self, err: int, msg: str | None = None) -> None:
        super().__init__(err, msg if msg is not None else os.strerror(err))
        self.code = err  # the errno as a plain int (OSError.errno is Optional)

    def __str__(self) -> str:
        return str(self.strerror)


class QemuError(Exception):
    """A failure with a QEMU ``Error`` message (open, reopen, truncate); the text may hold hints."""

    def __init__(self, msg: str, err: int = errno.EINVAL) -> None:
        super().__init__(msg)
        self.errno = err
