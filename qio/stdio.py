"""Prompts that the piped loop holds back, and the one call that writes them.

qemu-io writes its prompt with ``printf`` + ``fflush(stdout)`` before reading each line: one
``write(2)`` per line.  When the next line is already read, qio holds those bytes instead
(:meth:`qio.output.Output.prompt_held`) and writes them, in order, before anything else reaches fd 1
or fd 2, before it waits for anything, and before it exits or dies by ``abort``/``sigraise``, so the
merged output is byte for byte qemu-io's.  Code that writes to fd 1 or 2 itself, or is about to end
the process, calls :func:`release` first.

The lowest layer (the block layer's error paths use it), so it imports nothing of qio.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

#: The held bytes' writer, set by the Output that holds them (None: nothing was ever held).
_release: Callable[[], None] | None = None
#: Signals that end qemu-io (default action) and are commonly sent to it from outside: ``timeout``'s
#: SIGTERM, a hang-up.  While prompts are held, they are written before the process dies of them.
FATAL = (signal.SIGTERM, signal.SIGHUP)


def set_releaser(fn: Callable[[], None]) -> None:
    """The first time: also write the held prompts before dying of a :data:`FATAL` signal (only where
    the signal has its default action: an ignored or handled one stays as it is)."""
    global _release
    if _release is None:
        for sig in FATAL:
            try:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    signal.signal(sig, _fatal)
            except (OSError, ValueError):  # not the main thread (qio used as a library)
                pass
    _release = fn


def _fatal(sig: int, frame: FrameType | None) -> None:
    """Write the held prompts, then die of the signal as the default action would."""
    release()
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)


def release() -> None:
    """Write the held prompts now (before a direct write to fd 1 or 2, an abort or a signal)."""
    fn = _release
    if fn is not None:
        fn()
