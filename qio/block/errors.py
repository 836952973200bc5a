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


def assert_fail(where: str, expr: str) -> None:
    """A failed ``assert()`` in QEMU: glibc prints ``progname: file:line: function: Assertion `expr'
    failed.`` and aborts; unflushed stdout is lost, as with qemu-io."""
    import signal
    import sys

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qemu-io"
    os.write(2, f"{'qio' if prog == '__main__.py' else prog}: {where}: Assertion `{expr}' failed.\n".encode())
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.abort()
