"""What the ``main`` of both programs (``qio`` and ``qio-img``) shares: the program name, asyncio without
``ssl``, and running the top coroutine with the exit statuses of Ctrl-C and of an ``OSError`` that
nothing else caught."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Coroutine
from typing import Any

from qio.output import Output


def prgname(argv0: str, default: str) -> str:
    """``g_get_prgname()``: the basename of argv[0] (``default`` under ``python -m``)."""
    base = os.path.basename(argv0)
    return default if base in ("__main__.py", "") else base


def import_asyncio() -> None:
    """Import asyncio without its optional ``ssl`` support: qio never opens TLS connections, and
    importing ``ssl`` (OpenSSL and its enums) costs ~6 ms of CPU per start on the project machines.

    A ``None`` entry in ``sys.modules`` makes asyncio's guarded ``import ssl`` fail, so it records ssl
    as unavailable; the entry is removed again at once, so any later ``import ssl`` works as usual.
    Nothing happens if asyncio or ssl is already loaded (qio used as a library, tests).
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def run(out: Output, main: Coroutine[Any, Any, int]) -> int:
    """Run the program's top coroutine on a fresh event loop: its exit status, 130 after Ctrl-C, 1 after
    an ``OSError`` nothing else reported (its ``strerror``, after what stdout already holds)."""
    import_asyncio()
    import asyncio

    try:
        rc = asyncio.run(main)
    except KeyboardInterrupt:
        rc = 130
    except OSError as e:
        out.flush()
        out.error_report(os.strerror(e.errno or errno.EIO))
        rc = 1
    except BaseException:
        out.release()  # prompts qemu-io would have written come before Python's report (a qio bug)
        raise
    out.flush()
    return rc
