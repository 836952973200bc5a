"""stdout/stderr exactly as qemu-io's C stdio produces them.

qemu-io's stdout is a glibc stream: line-buffered on a terminal, otherwise fully buffered in
4096-byte blocks and flushed only at prompts, ``sigraise`` and exit; stderr is unbuffered.  When both
go to one pipe, stderr text therefore overtakes earlier stdout text.  Test suites compare that merged
stream, so qio reproduces glibc's buffer algorithm (``_IO_new_file_xsputn``) instead of using Python's
own buffering.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from qio import render, stdio

if TYPE_CHECKING:
    from qio.block.errors import Reporter

BLOCK = 4096
#: At most this many bytes of prompts are held back (:meth:`Output.prompt_held`).
HELD_MAX = 4096


def _writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view: bytes | memoryview = data
        while view:
            try:
                n = os.write(fd, view)
            except BrokenPipeError:
                return
            except InterruptedError:
                continue
            if n == len(view):  # the usual case: no view to make
                return
            view = memoryview(view)[n:]

    return write


class Output:
    """The two output streams of the process, plus QEMU's ``error_report`` prefixing.

    The result methods (:meth:`report`, :meth:`failed`, ...) print qemu-io's text; commands call them
    with the values, so :class:`qio.render_json.JsonOutput` (``--output=json``) can print the same
    results as JSON objects instead."""

    #: True for a renderer that wants :meth:`command_start`/:meth:`command_done` around each command line.
    structured = False

    def __init__(self, prgname: str, out_fd: int = 1, err_fd: int = 2) -> None:
        self.prgname = prgname
        try:
            self.line_buffered = os.isatty(out_fd)
        except OSError:
            self.line_buffered = False
        self._w_out = _writer(out_fd)
        self._w_err = _writer(err_fd)
        self._buf = bytearray()
        #: Bytes qemu-io would already have written to stdout (prompts), held back: see :mod:`qio.stdio`.
        self._held = bytearray()
        self._saved: tuple[Callable[[bytes], None], Callable[[bytes], None], bool] | None = None

    def redirect(self, out: Callable[[bytes], None], err: Callable[[bytes], None]) -> None:
        """Send both streams elsewhere (the interactive prompt prints above its input line)."""
        self.flush()
        self._saved = (self._w_out, self._w_err, self.line_buffered)
        self._w_out, self._w_err, self.line_buffered = out, err, True

    def restore(self) -> None:
        """Undo :meth:`redirect` (output after the prompt has gone goes to the real streams again)."""
        self.flush()
        if self._saved is not None:
            self._w_out, self._w_err, self.line_buffered = self._saved
            self._saved = None

    def out(self, text: str) -> None:
        """One ``printf`` to stdout."""
        data = text.encode("utf-8", "surrogateescape")
        buf = self._buf
        if self.line_buffered:
            buf += data
            if b"\n" in data:
                self.flush()
            return
        space = BLOCK - len(buf)
        if len(data) <= space:  # fits; a buffer that becomes exactly full is not flushed yet
            buf += data
            return
        buf += data[:space]
        self._write_out(bytes(buf))
        buf.clear()
        rest = data[space:]
        whole = len(rest) - len(rest) % BLOCK
        if whole:
            self._write_out(rest[:whole])
        buf += rest[whole:]

    def err(self, text: str) -> None:
        """One unbuffered write to stderr."""
        if self._held:
            self.release()
        self._w_err(text.encode("utf-8", "surrogateescape"))

    def _write_out(self, data: bytes) -> None:
        """A write to stdout: the held prompts come first (in the same write)."""
        held = self._held
        if held:
            data = bytes(held) + data
            held.clear()
        self._w_out(data)

    def release(self) -> None:
        """Write the held prompts now (see :mod:`qio.stdio`)."""
        if self._held:
            data = bytes(self._held)
            self._held.clear()
            self._w_out(data)

    def prompt(self, text: str) -> None:
        """``printf(prompt); fflush(stdout)``, as :meth:`out` then :meth:`flush` (the piped loop does
        this for every line: with nothing buffered, that is one write of the text)."""
        data = text.encode("utf-8", "surrogateescape")
        if self._buf or len(data) > BLOCK:
            self.out(text)
            self.flush()
        else:
            self._write_out(data)

    def prompt_held(self, text: str) -> None:
        """:meth:`prompt` when the next input line is already read (the piped loop): the bytes it would
        write are held back, up to :data:`HELD_MAX`, and written before anything else reaches stdout
        or stderr, before any wait and before the process ends (:mod:`qio.stdio`).  qemu-io writes them
        at once; the merged output is the same, in far fewer writes."""
        if self.line_buffered or self.structured or self._saved is not None:
            self.prompt(text)  # a terminal shows each prompt at once; redirected and JSON output as before
            return
        held = self._held
        if not held:
            stdio.set_releaser(self.release)
        if self._buf:
            self.out(text)  # what fills whole blocks is written (after the held bytes)
            held += self._buf
            self._buf.clear()
        else:
            held += text.encode("utf-8", "surrogateescape")
        if len(held) >= HELD_MAX:
            self.release()

    def flush(self) -> None:
        """``fflush(stdout)`` (held prompts, written before, are part of what it writes)."""
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._write_out(data)
        elif self._held:
            self.release()

    def discard(self) -> None:
        """Forget unflushed stdout, as a process killed by a signal does (held prompts, which qemu-io
        had written, are written: :meth:`release`)."""
        self._buf.clear()
        self.release()

    def error_report(self, msg: str) -> None:
        """QEMU's ``error_report()``: ``prgname: msg`` on stderr."""
        self.err(f"{self.prgname}: {msg}\n")

    def warn_report(self, msg: str) -> None:
        self.err(f"{self.prgname}: warning: {msg}\n")

    def reporter(self) -> Reporter:
        """The hook handed to the block layer when opening: its messages carry this program's name."""
        from qio.block.errors import Reporter

        return Reporter(self.prgname, self.err)

    # -- results: qemu-io's text here, JSON objects in qio.render_json.JsonOutput --------------------
    def report(self, command: str, op: str, ns: int, offset: int, count: int, csv: bool) -> None:
        """``print_report`` of a finished request (``wrote 512/512 bytes at offset 0`` and the stats)."""
        for line in render.report_lines(op, ns, offset, count, count, 1, csv):
            self.out(line)

    def failed(self, command: str, what: str, offset: int, count: int, code: int, message: str) -> None:
        """A failed request: ``WHAT failed: MESSAGE`` (``code`` is the positive errno)."""
        self.out(f"{what} failed: {message}\n")

    def mismatch(self, command: str, offset: int, count: int) -> None:
        """``-P`` verification of read data failed."""
        self.out(f"Pattern verification failed at offset {offset}, {count} bytes\n")

    def dump(self, command: str, buf: bytes | bytearray | memoryview, offset: int) -> None:
        """``-v``: the data read, as a hex dump."""
        self.out(render.dump_buffer(buf, offset))

    def length(self, size: int) -> None:
        """``length``: the image size."""
        self.out(render.cvtstr(size) + "\n")

    def allocation(self, offset: int, count: int, allocated: int) -> None:
        """``alloc``: how many of ``count`` bytes at ``offset`` are allocated."""
        self.out(f"{allocated}/{count} bytes allocated at offset {render.cvtstr(offset)}\n")

    def extent(self, offset: int, count: int, allocated: bool) -> None:
        """One line of ``map``."""
        state = "    allocated" if allocated else "not allocated"
        self.out(f"{render.cvtstr(count)} (0x{count:x}) bytes {state} at offset "
                 f"{render.cvtstr(offset)} (0x{offset:x})\n")

    def trace(self, line: str) -> None:
        """A trace event line (``-T``) without a trace file: stderr."""
        self.err(line)

    def command_start(self, argv: list[str]) -> None:
        """Called before a command line runs when :attr:`structured`."""

    def command_done(self, argv: list[str], ret: int) -> None:
        """Called after a command line ran when :attr:`structured` (``ret``: 0 or -errno)."""
