"""A qemu-io session: the open image and the event-loop rules qemu-io follows while waiting.

Commands (:mod:`qio.commands`) act on a :class:`Session`; the shell (:mod:`qio.shell`) only turns lines
into commands.  The ``sync``/``drain``/``sleep``/``wait_for`` helpers decide *when* completions of
asynchronous requests are printed, which is part of qemu-io's observable output (see :mod:`qio.aio`).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from qio.aio import AIO, AioContext, Co, enter
from qio.block.errors import QemuError
from qio.output import Output

if TYPE_CHECKING:
    from qio.block.backend import BlockBackend
    from qio.block.driver import BlockDriver
    from qio.block.modes import OpenFlags
    from qio.nbd_server import Export, Fault


class Session:
    """The image and the event loop of one qemu-io run, and what commands change about the run."""

    def __init__(self, out: Output, prgname: str, image_opts: bool = False) -> None:
        self.out = out
        self.prgname = prgname
        self.image_opts = image_opts
        self.blk: BlockBackend | None = None
        #: Set by ``quit``: the line source stops.
        self.quit = False
        #: Reading commands from a terminal (``help`` then also lists qio's own commands).
        self.interactive = False
        self.aio = AioContext()
        #: NBD exports of the image (``nbd_server_start``); stopped before the image closes.
        self.exports: list[Export] = []
        #: Protocol fault rules for the exports (``nbd_fault``).
        self.nbd_faults: list[Fault] = []
        AIO.printf = out.out  # type: ignore[method-assign]

    def require_blk(self) -> BlockBackend:
        assert self.blk is not None
        return self.blk

    # -- waiting, with qemu-io's polling rules -----------------------------------------------------
    async def sync(self, coro: Coroutine[Any, Any, Any], always_poll: bool = False) -> Any:
        """Run a request of a synchronous command (``bdrv_co_*`` entered, then ``BDRV_POLL_WHILE``).

        A request that finished inline without blkdebug polls once if it did host I/O (QEMU's coroutine
        would have waited for the thread pool) or always, for commands built on the AIO interface such
        as ``readv``.
        """
        before = AIO.yields
        co = Co(coro, contextvars.copy_context())
        enter(co)
        if co.finished:
            if always_poll or AIO.yields != before:
                await self.aio.poll()
            if co.exc is not None:
                raise co.exc
            return co.result
        co.on_finish = lambda _: self.aio.notify()
        self.aio.sync_task = co
        try:
            await self.run_until(lambda: co.finished, "the command")
        except asyncio.CancelledError:
            self.aio.adopt(co)  # Ctrl-C at the prompt: the request runs on, drains wait for it
            raise
        finally:
            self.aio.sync_task = None
        if not co.finished:
            from qio.block.errors import BlockError

            co.cancel(BlockError(errno.EIO))
        return co.value()

    async def run_until(self, done: Callable[[], bool], what: str, deadline: float | None = None,
                        on_standstill: Callable[[], bool] | None = None, limit: float = float("inf")) -> bool:
        """Run the event loop, printing completions, until ``done()`` (``AIO_WAIT_WHILE``); False at
        ``deadline``.

        Simulated work runs to completion first, whatever the deadline (it takes no time).  When nothing
        can progress any more (every request left is parked at a blkdebug breakpoint) qemu-io would hang:
        qio asks ``on_standstill`` (True: give up) or, by default, reports the parked requests and
        resumes them.  ``limit`` bounds the simulated clock (``sleep``): pool work finishing later waits.
        """
        aio = self.aio
        while not done():
            if aio.has_pending(limit):
                await aio.poll(limit=limit)
                continue
            if aio.flush_pending():
                aio.run_flushes()
                continue
            left = None if deadline is None else deadline - time.monotonic()
            # a real thread or a timer will act; for wait_break, a client of an NBD export may
            if AIO.busy or aio.has_timers() or (aio.external and on_standstill is not None):
                if left is not None and left <= 0:
                    return False
                await aio.wait(left, limit)
                await aio.poll(limit=limit)
                continue
            # Nothing can move by itself any more.
            node = self.debug_node()
            parked = node.debug_suspended_tags() if node is not None else []
            if on_standstill is not None and on_standstill():
                return False
            if deadline is not None:
                if left is None or left <= 0:
                    return False
                marker = aio.progress
                await aio.wait(left, limit)  # sleep: parked requests simply stay parked
                if aio.progress != marker:
                    await aio.poll(limit=limit)
                continue
            if parked:
                self.report_stuck(what)
                continue
            gate = self.blk.gate if self.blk is not None else None
            if gate is not None and gate.held:  # qio's pause: release rather than wait forever
                self.out.error_report(f"{what} would wait forever: {gate.held} request(s) held by pause; "
                                      "unpausing")
                self.blk.gate = None  # type: ignore[union-attr]
                gate.release()
                continue
            if aio.inflight or aio.sync_task is not None:
                self._abandon_stuck(what)
            return done()
        return True

    def _abandon_stuck(self, what: str) -> None:
        """Requests that wait for nothing qio knows about can only be a qio bug: fail them, never hang."""
        from qio.block.errors import BlockError

        self.out.error_report(f"internal error: {what}: request(s) can make no progress; cancelling them")
        if self.aio.sync_task is not None:
            self.aio.sync_task.cancel(BlockError(errno.EIO))
        self.aio.abandon(BlockError(errno.EIO))

    def debug_node(self) -> BlockDriver | None:
        """The blkdebug node of the open image (None without an image or without blkdebug)."""
        if self.blk is None:
            return None
        from qio.block.backend import debug_node

        return debug_node(self.blk.root)

    def report_stuck(self, what: str) -> None:
        """Resume every parked request rather than hang as qemu-io does (documented in docs/)."""
        node = self.debug_node()
        if node is None:
            return
        tags = node.debug_suspended_tags()
        self.out.error_report(f"{what} would wait forever: request(s) {', '.join(repr(t) for t in tags)} "
                              "suspended at blkdebug breakpoints; resuming them")
        for tag in tags:
            node.debug_resume(tag)

    async def drain(self, what: str = "draining") -> None:
        """``bdrv_drain_all``: run until nothing is in flight, printing completions as they come."""
        await self.run_until(lambda: not self.aio.inflight, what)

    async def sleep(self, seconds: float) -> None:
        """``sleep``: at least one event-loop pass; otherwise the event loop runs for ``seconds``.

        qemu-io's ``sleep_f`` runs ``main_loop_wait`` until its timer expires: whatever finishes within
        that time completes.  The simulated clock decides this (not the machine's load, so the same
        script gives the same output every run): pool work that finishes by the end of the sleep
        completes, later work stays pending, and the clock then stands at the end of the sleep.
        Real time passes too (qio really sleeps), for real threads and a user watching.
        """
        # qemu-io's sleep polls through the glib main loop (main_loop_wait), which takes longer to get
        # to the bottom halves than the aio_poll of the other waiting commands.
        pool = self.aio.pool
        pool.tick()
        if seconds <= 0:
            await self.aio.poll()
            return
        limit = pool.now + seconds * 1e6
        await self.run_until(lambda: False, "sleep", time.monotonic() + seconds, on_standstill=lambda: False,
                             limit=limit)
        pool.now = max(pool.now, limit)

    async def settle(self) -> None:
        """Nothing to do: ``resume`` enters the request directly, which runs until it next waits."""

    async def wait_for(self, pred: Callable[[], bool], timeout: float | None) -> str:
        """``wait_break``: poll until ``pred()``.  Returns "ok", "timeout", or "standstill" (nothing left
        that could make it true)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stalled: list[bool] = []

        def standstill() -> bool:
            stalled.append(True)
            return True

        if await self.run_until(pred, "wait_break", deadline, on_standstill=standstill):
            return "ok"
        return "standstill" if stalled else "timeout"

    # -- the image -----------------------------------------------------------------------------
    def open_image(self, path: str | None, flags: OpenFlags, options: dict[str, Any]) -> bool:
        """``openfile``; True on failure (the message is already printed)."""
        if self.blk is not None:
            self.out.error_report("file open already, try 'help close'")
            return True
        from qio.block.backend import BlockBackend

        try:
            self.blk = BlockBackend.open(path, options, flags, self.out.reporter())
        except QemuError as e:
            name = f" device {path}" if path is not None else ""
            self.out.error_report(f"can't open{name}: {e}")
            return True
        return False

    async def stop_exports(self) -> None:
        """Stop the NBD exports: no new requests, those in flight finish and are answered."""
        exports, self.exports = self.exports, []
        for export in exports:
            await export.stop(self.run_until)
            self.out.out(f"NBD server on {export.address} stopped; {export.served} "
                         f"client{'s' if export.served != 1 else ''} served\n")

    async def close_image(self) -> None:
        await self.stop_exports()
        if self.blk is None:
            return
        await self.drain("closing the image")
        try:
            await self.sync(self.blk.close(self.out.error_report))
        finally:
            self.blk = None

    async def reopen(self, read_only: bool | None, cache: str | None, options: dict[str, Any]) -> None:
        from qio.block.modes import parse_cache_mode

        blk = self.require_blk()
        await self.drain()
        flags = blk.flags.copy()
        if cache is not None:
            parse_cache_mode(cache, flags)
        if "read-only" in options:
            if read_only is not None:
                raise QemuError("Cannot set both -r/-w and 'read-only'")
        elif read_only is not None:
            flags.read_only = read_only
        if ("cache.direct" in options or "cache.no-flush" in options) and cache is not None:
            raise QemuError("Cannot set both -c and the cache options")
        blk.reopen(flags, options)
