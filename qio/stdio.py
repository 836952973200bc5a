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

from collections.abc import Callable

#: The held bytes' writer, set by the Output that holds them (None: nothing was ever held).
_release: Callable[[], None] | None = None


def set_releaser(fn: Callable[[], None]) -> None:
    global _release
    _release = fn


def release() -> None:
    """Write the held prompts now (before a direct write to fd 1 or 2, an abort or a signal)."""
    fn = _release
    if fn is not None:
        fn()
