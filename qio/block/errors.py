"""Errors of the block layer.  Every failure carries an errno, as QEMU's negative return values do."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from qio import stdio


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

    @classmethod
    def wrap(cls, e: BlockError, what: str | None = None) -> QemuError:
        """``error_setg_errno(errp, -ret, "WHAT")``: a failed request as an Error, ``WHAT: strerror``
        (the bare ``strerror`` without ``what``), keeping its errno."""
        return cls(f"{what}: {e}" if what is not None else str(e), e.code)


@dataclass(slots=True, eq=False)
class Reporter:
    """Where a node's messages go: the front end that opened the image passes one down, so QEMU's
    ``error_report``/``warn_report`` lines carry that program's name (``qio:``, ``qio-img:``, or
    whatever argv[0] says, as qemu-io and qemu-img print their own) rather than a fixed prefix.
    Calling it writes raw text (QEMU's ``error_printf``/``fprintf(stderr)``)."""

    prgname: str
    write: Callable[[str], None]

    def __call__(self, text: str) -> None:
        self.write(text)

    def error(self, msg: str) -> None:
        self.write(f"{self.prgname}: {msg}\n")

    def warning(self, msg: str) -> None:
        self.write(f"{self.prgname}: warning: {msg}\n")


def report_error(hook: Callable[[str], None] | None, msg: str, warning: bool = False) -> None:
    """``error_report``/``warn_report`` through a node's hook; a plain callable (tests, internal
    opens) gets the bare message."""
    if isinstance(hook, Reporter):
        (hook.warning if warning else hook.error)(msg)
    elif hook is not None:
        hook(f"{'warning: ' if warning else ''}{msg}\n")


def assert_fail(where: str, expr: str) -> None:
    """A failed ``assert()`` in QEMU: glibc prints ``progname: file:line: function: Assertion `expr'
    failed.`` and aborts; unflushed stdout is lost, as with qemu-io."""
    import signal
    import sys

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qemu-io"
    stdio.release()
    os.write(2, f"{'qio' if prog == '__main__.py' else prog}: {where}: Assertion `{expr}' failed.\n".encode())
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.abort()


def abort_error(func: str, src: str, msg: str) -> NoReturn:
    """An ``Error`` set through ``&error_abort`` (a driver parsing its options with
    ``qemu_opts_absorb_qdict(..., &error_abort)``): QEMU reports where and what, then aborts; unflushed
    stdout is lost, as with qemu-io."""
    import signal
    import sys

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "qemu-io"
    prog = "qio" if prog == "__main__.py" else prog
    stdio.release()
    os.write(2, f"Unexpected error in {func}() at ../../{src}:\n{prog}: {msg}\n".encode())
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.abort()
