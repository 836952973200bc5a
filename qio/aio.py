"""Requests in flight and their completions, modelled on QEMU's AIO context.

A request coroutine starts *eagerly* (QEMU enters a coroutine at submission, so a request hitting a
blkdebug breakpoint prints ``Suspended request`` inside the ``aio_*`` command).  Its completion
callback is queued like a QEMU bottom half and runs only when the shell polls, newest first (QEMU's
bottom-half list is LIFO): inside synchronous I/O commands that had to wait, ``aio_flush``,
``sleep``, while waiting for input, and at exit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

Completion = Callable[[], None]


class AioStats:
    """Counts the points where QEMU's coroutine would have yielded to the event loop.

    qio's file driver does small I/O inline, so a request may finish without ever suspending.  QEMU's
    synchronous commands poll the event loop (printing pending AIO completions) only if their request
    yielded; the counter lets the shell reproduce that exactly.
    """

    yields = 0
    #: Requests currently running in the thread pool (they will complete without help).
    busy = 0


AIO = AioStats()


class _Continue:
    """Awaitable that resumes an already-started coroutine inside a Task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _tail(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Continue(coro, first)


class AioContext:
    """In-flight requests, the bottom-half queue, and a wake-up for pollers."""

    def __init__(self) -> None:
        self.inflight: set[asyncio.Task[Any]] = set()
        #: The request of the running synchronous command, once it had to wait.
        self.sync_task: asyncio.Task[Any] | None = None
        self._bh: list[Completion] = []
        self._wake: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def notify(self) -> None:
        """Something happened that a poller may be waiting for."""
        if self._wake is not None:
            self._wake.set()

    def schedule(self, cb: Completion) -> None:
        self._bh.append(cb)
        self.notify()

    def submit(self, coro: Coroutine[Any, Any, Any], done: Callable[[BaseException | None, Any], None]) \
            -> asyncio.Task[Any] | None:
        """Start ``coro`` now; queue ``done(exc, result)`` as a bottom half when it finishes."""
        try:
            first = coro.send(None)
        except StopIteration as stop:
            value = stop.value
            self.schedule(lambda: done(None, value))
            return None
        except Exception as exc:
            error = exc
            self.schedule(lambda: done(error, None))
            return None
        task = asyncio.get_running_loop().create_task(_tail(coro, first))
        self.inflight.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self.inflight.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            self.schedule(lambda: done(exc, None if exc else t.result()))

        task.add_done_callback(finished)
        return task

    def has_pending(self) -> bool:
        return bool(self._bh)

    def poll(self) -> bool:
        """Run queued completions, newest first; True if any ran."""
        ran = False
        while self._bh:
            batch, self._bh = self._bh, []
            for cb in reversed(batch):
                cb()
            ran = True
        return ran

    async def wait(self, timeout: float | None = None) -> None:
        """Let the event loop run until something is queued or ``timeout`` passes."""
        ev = self._event()
        if self._bh:
            return
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
