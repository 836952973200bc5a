"""Piped input: qemu-io's ``fgets`` line reading, with the prompt printed (not echoed) per line."""

from __future__ import annotations

import asyncio
import os
import stat
from collections import deque
from typing import TYPE_CHECKING

from qio.aio import AIO

if TYPE_CHECKING:
    from qio.aio import AioContext
    from qio.shell import Shell

MAXLINE = 1024  # fgets(line, 1024, stdin): at most 1023 bytes a call


class LineReader:
    """``fgets`` semantics over a file descriptor: lines longer than 1023 bytes come in pieces."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buf = bytearray()
        #: Complete lines already split off ``buf``, without their newline: a script's lines are split
        #: a buffer at a time instead of one search and copy each.
        self.ready: deque[bytearray] = deque()
        self.eof = False
        try:
            self.pollable = not stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self.pollable = False

    def _take(self) -> bytes | None:
        nl = self.buf.find(b"\n", 0, MAXLINE - 1)
        if nl >= 0:
            line = bytes(self.buf[: nl + 1])
            del self.buf[: nl + 1]
            return line
        if len(self.buf) >= MAXLINE - 1:
            line = bytes(self.buf[: MAXLINE - 1])
            del self.buf[: MAXLINE - 1]
            return line
        if self.eof and self.buf:
            line = bytes(self.buf)
            self.buf.clear()
            return line
        return None

    def _next(self) -> bytes | bytearray | None:
        """The next ``fgets`` piece without its newline, if one is complete."""
        ready = self.ready
        if ready:
            return ready.popleft()
        buf = self.buf
        last = buf.rfind(b"\n")
        if last >= 0:
            lines = buf[:last].split(b"\n")
            if max(map(len, lines)) < MAXLINE - 1:  # each line is one fgets: split them all now
                del buf[: last + 1]
                ready.extend(lines)
                return ready.popleft()
        line = self._take()
        if line is not None and line.endswith(b"\n"):
            line = line[:-1]
        return line

    async def readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self.fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(self.fd)

    def fill(self) -> None:
        data = os.read(self.fd, 65536)
        if data:
            self.buf += data
        else:
            self.eof = True

    def ready_line(self) -> str | None:
        """The next line if it is already read (no read, no wait), else None."""
        line = self._next()
        if line is None:
            return None
        nul = line.find(b"\0")
        if nul >= 0:
            line = line[:nul]
        return line.decode("utf-8", "surrogateescape")

    async def fetchline(self, aio: AioContext) -> str | None:
        """Next line without its newline (cut at a NUL, as C strings are), or None at EOF."""
        while True:
            line = self.ready_line()
            if line is not None:
                return line
            if self.eof:
                return None
            if aio.flush_pending():
                # About to wait for input: qemu-io's event loop would finish the write-through
                # requests' flushes now, so their completions print before the next command.
                aio.run_flushes()
                await aio.poll()
            # While requests can still progress, keep the event loop (and their completions) going.
            if self.pollable and (AIO.busy or aio.inflight or aio.external or aio.has_pending()):
                waiter = asyncio.ensure_future(self.readable())
                while not waiter.done():
                    await aio.poll()
                    other = asyncio.ensure_future(aio.wait())
                    await asyncio.wait({waiter, other}, return_when=asyncio.FIRST_COMPLETED)
                    other.cancel()
                await aio.poll()
            self.fill()


async def pipe_loop(sh: Shell, fd: int = 0) -> None:
    """qemu-io's command loop on a non-terminal stdin (``fd``): prompt, poll, read, execute."""
    reader = LineReader(fd)
    prompt = f"{sh.prgname}> "
    aio = sh.session.aio
    out = sh.out
    session = sh.session
    while not session.quit:
        # Taking a line already read (no I/O) before the prompt: if there is one, qio holds the prompt
        # back (qio.stdio) instead of writing it, since nothing waits before the next output.
        line = reader.ready_line()
        if line is None:
            out.prompt(prompt)  # writes the held prompts too: reading may wait
            aio.poll_now(blocking=False)  # stdin is readable: ppoll does not wait
            line = await reader.fetchline(aio)
            if line is None:
                break
        else:
            out.prompt_held(prompt)
            aio.poll_now(blocking=False)
        if sh.execute_now(line) is None:  # the commonest request lines run as plain calls
            out.release()  # any other command may wait (sleep, drain, a thread, the network) or exit
            await sh.execute(line)
