"""The shell: one execution path for every line source.

``execute`` performs qemu-io's generic checks (unknown command, no image, argument count, extra
permissions), parses the words into a typed command and runs it on the :class:`~qio.session.Session`,
which holds the image and the event-loop rules.
"""

from __future__ import annotations

import errno

from qio.aio import COMMAND_TIME, QUICK_COMMAND_TIME
from qio.block.errors import QemuError
from qio.commands.spec import GLOBAL, NOFILE_OK, QUICK, STDERR, CommandSpec, Invocation, ParseFailure
from qio.commands.table import build_table
from qio.output import Output
from qio.session import Session


def split_words(line: str) -> list[str]:
    """qemu-io's split of a command line at spaces, runs of spaces making no empty words (single-spaced
    lines, the common request lines, skip the filter)."""
    words = line.split(" ")
    if "" in words:
        words = [w for w in words if w]
    return words


class Shell:
    """Line dispatch over a session; remembers the last failure for the exit status."""

    def __init__(self, out: Output, prgname: str, image_opts: bool = False) -> None:
        self.out = out
        self.prgname = prgname
        self.image_opts = image_opts
        self.table = build_table()
        self.session = Session(out, prgname, image_opts)
        self.last_error = 0
        if out.structured:
            self.execute = self._execute_structured  # type: ignore[method-assign]
            self.execute_now = lambda line: None  # type: ignore[method-assign]  # command_start/done per line

    async def execute(self, line: str) -> int:
        """Run one command line; remember failures for the exit status."""
        words = split_words(line)
        if not words:
            return 0
        spec = self.table.find(words[0])
        self._tick(spec)
        ret = await self._dispatch(words, spec)
        if ret < 0:
            self.last_error = ret
        return ret

    async def _execute_structured(self, line: str) -> int:
        """:meth:`execute` for a renderer that marks each command line (``--output=json``); chosen once in
        ``__init__``, so qemu-io's text mode pays nothing per line for it."""
        words = split_words(line)
        if not words:
            return 0
        spec = self.table.find(words[0])
        self._tick(spec)
        self.out.command_start(words)
        ret = await self._dispatch(words, spec)
        self.out.command_done(words, ret)
        if ret < 0:
            self.last_error = ret
        return ret

    def execute_now(self, line: str) -> int | None:
        """:meth:`execute` of a line whose command has a fast parser (``CommandSpec.fast``) that accepts
        it, as a plain call (the piped loop's per-request path); None, with nothing done, for any other
        line: :meth:`execute` runs it."""
        words = split_words(line)
        if not words:
            return None
        spec = self.table.find(words[0])
        if spec is None or spec.fast is None or spec.run_now is None:
            return None
        cmd = spec.fast(words)  # a pure function of the words: deciding first changes nothing
        if cmd is None:
            return None
        self._tick(spec)
        ret = self._check(spec, words)
        if ret is None:
            ret = spec.run_now(self.session, cmd)
        if ret < 0:
            self.last_error = ret
        return ret

    def _tick(self, spec: CommandSpec | None) -> None:
        """A command boundary on the simulated clock: commands flagged QUICK take a shorter step
        (docs/architecture.md, rule 8)."""
        self.session.aio.pool.tick(QUICK_COMMAND_TIME if spec is not None and spec.flags & QUICK else COMMAND_TIME)

    def _check(self, spec: CommandSpec, words: list[str]) -> int | None:
        """qemu-io's checks before a command runs (image, argument count, permissions): their failure,
        after the message, or None."""
        out = self.out
        blk = self.session.blk
        if not spec.flags & (GLOBAL | NOFILE_OK) and blk is None:
            out.err("no file open, try 'help open'\n")
            return -errno.EINVAL
        argc = len(words) - 1
        if argc < spec.argmin or (spec.argmax != -1 and argc > spec.argmax):
            if spec.argmax == -1:
                out.err(f"bad argument count {argc} to {words[0]}, expected at least {spec.argmin} arguments\n")
            elif spec.argmin == spec.argmax:
                out.err(f"bad argument count {argc} to {words[0]}, expected {spec.argmin} arguments\n")
            else:
                out.err(f"bad argument count {argc} to {words[0]}, expected between {spec.argmin} and "
                        f"{spec.argmax} arguments\n")
            return -errno.EINVAL
        if spec.perm and blk is not None and spec.perm & ~blk.perm:
            try:
                blk.set_perm(blk.perm | spec.perm)
            except QemuError as e:
                out.error_report(str(e))
                return -e.errno
        return None

    async def _dispatch(self, words: list[str], spec: CommandSpec | None) -> int:
        if spec is None:
            self.out.err(f'command "{words[0]}" not found\n')
            return -errno.EINVAL
        ret = self._check(spec, words)
        if ret is not None:
            return ret
        fast = spec.fast
        if fast is not None and spec.run_now is not None:
            cmd = fast(words)  # the commonest lines: no Invocation, no getopt, no coroutine
            if cmd is not None:
                return spec.run_now(self.session, cmd)
        cmd = None
        if spec.parse is not None:
            inv = Invocation(spec, words, self.prgname, self.table, self.image_opts)
            try:
                cmd = spec.parse(inv)
            except ParseFailure as f:
                self._messages(f.messages)
                return f.ret
            if inv.messages:
                self._messages(inv.messages)
        return await spec.run(self.session, cmd)

    def _messages(self, messages: list[tuple[int, str]]) -> None:
        for stream, text in messages:
            (self.out.err if stream == STDERR else self.out.out)(text)
