"""Requests in flight and their completions, modelled on QEMU's AIO context.

QEMU's observable rules, and how qio reproduces them:

* A request coroutine is entered *at submission*: it runs until it first waits.  qio starts request
  coroutines eagerly (:meth:`AioContext.submit`), so e.g. ``blkdebug: Suspended request`` can print
  inside the ``aio_write`` command, as in QEMU.
* A request that completes before the submitting call returns reports its completion through a bottom
  half; bottom halves run LIFO when the event loop runs.  qio queues such completions
  (:meth:`schedule`) and runs them newest-first in :meth:`poll`.
* A request that completes later calls its completion callback directly, wherever it is running: that
  is how a completion line appears *inside* ``resume``.
* A request that did host I/O while holding a driver lock (qcow2's ``s->lock``: metadata writes, host
  discards) keeps a later request that takes the same lock waiting in QEMU until that I/O completes, so
  the two complete in submission order.  qio's inline I/O never makes the second wait, so the lock
  records the dependency (:meth:`AioContext.order_after`) and :meth:`poll` runs the second's completion
  after the first's.
* Host I/O goes through a thread pool in QEMU, so a coroutine always waits there and continues in a
  later event-loop iteration.  qio does small I/O inline (far cheaper); when a blkdebug node is in the
  graph the file driver then calls :meth:`io_yield`, which parks the request until the next
  :meth:`poll` -- exactly where QEMU's thread-pool completion would resume it.  Without blkdebug
  nothing can observe the difference, so the request simply runs on.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Callable, Coroutine, Generator
from typing import Any

#: True inside a request submitted by ``aio_read``/``aio_write`` (not a synchronous command's).
in_aio_request: contextvars.ContextVar[bool] = contextvars.ContextVar("in_aio_request", default=False)
#: The request being processed, for traces: (operation, offset, bytes).
current_request: contextvars.ContextVar[tuple[str, int, int] | None] = contextvars.ContextVar(
    "current_request", default=None)
#: Submission number of the AIO request running in this context (None outside AIO requests).
request_seq: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_seq", default=None)
#: File descriptors an AIO request still needs ``fdatasync``-ed before it may report completion.
pending_sync: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar("pending_sync", default=())

Completion = Callable[[], None]


class AioStats:
    """Process-wide counters of the request path.

    ``yields`` counts the points where QEMU's coroutine would have waited for the event loop: QEMU's
    synchronous commands poll (printing pending completions) only if their request waited.
    ``busy`` counts requests running in the thread pool (they complete without help).
    ``yield_on_io`` is set while a blkdebug node is in the graph (see the module docstring).
    ``inline`` is set while open-time I/O is driven without an event loop: even large host I/O then
    runs inline, since a thread-pool future could not be waited for.
    """

    yields = 0
    busy = 0
    yield_on_io = False
    inline = False

    @staticmethod
    def printf(text: str) -> None:
        """Where drivers print to qemu-io's stdout (``blkdebug: Suspended request``); set by the shell."""


AIO = AioStats()


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run open-time I/O to completion without an event loop turn: nothing can suspend it then, host
    I/O runs inline and a pending future (blkdebug's delayed error injection) resumes at once."""
    saved = AIO.yield_on_io, AIO.inline
    AIO.yield_on_io, AIO.inline = False, True
    try:
        value = coro.send(None)
        while True:
            if isinstance(value, asyncio.Future) and not value.done():
                value.set_result(None)
            value = coro.send(None)
    except StopIteration as stop:
        return stop.value
    finally:
        AIO.yield_on_io, AIO.inline = saved
        coro.close()


class _Continue:
    """Awaitable that resumes an already-started coroutine inside a Task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        if isinstance(value, asyncio.Future):
            value._asyncio_future_blocking = True  # hand the eagerly-awaited future to the Task
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


def start(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any, asyncio.Task[Any] | None]:
    """Enter ``coro`` now.  ``(True, result, None)`` if it finished (exceptions propagate), else
    ``(False, None, task)`` with a Task that continues it on the event loop (in the current context)."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value, None
    if isinstance(first, asyncio.Future):
        # Until the Task takes it over (see _Continue), nobody is blocked on it: other requests must be
        # able to await the same future meanwhile (C futures refuse a second blocking await).
        first._asyncio_future_blocking = False
    ctx = contextvars.copy_context()
    return False, None, asyncio.get_running_loop().create_task(_tail(coro, first), context=ctx)


class AioContext:
    """In-flight requests, the bottom-half queue, parked I/O continuations and a wake-up for pollers."""

    _current: AioContext | None = None

    def __init__(self) -> None:
        self.inflight: set[asyncio.Task[Any]] = set()
        #: The request of the running synchronous command, once it had to wait.
        self.sync_task: asyncio.Task[Any] | None = None
        self._bh: list[tuple[Callable[[], Any], bool, int | None]] = []
        self._scheduled: list[asyncio.Future[None]] = []
        self._io: list[asyncio.Future[None]] = []
        self._after_sync: list[tuple[tuple[int, ...], Callable[[BaseException | None], None], int]] = []
        self._wake: asyncio.Event | None = None
        #: Bumped whenever a request makes visible progress; pollers compare it to detect a standstill.
        self.progress = 0
        #: Event-loop passes so far: host I/O done inline counts as completed once the loop has run.
        self.polls = 0
        self._seq = 0
        self._after: dict[int, int] = {}  # request -> the earlier request it must complete after
        self._undelivered: set[int] = set()  # requests whose completion has not been reported yet
        self._held: dict[int, list[tuple[Callable[[], Any], bool, int | None]]] = {}
        #: AIO.yields when each recently finished request finished (its I/O after a lock's release).
        self.finished_yields: dict[int, int] = {}
        AioContext._current = self

    @classmethod
    def current(cls) -> AioContext:
        assert cls._current is not None
        return cls._current

    def notify(self) -> None:
        """Something happened that a poller may be waiting for."""
        self.progress += 1
        if self._wake is not None:
            self._wake.set()

    def schedule(self, cb: Callable[[], Any], is_async: bool = False, seq: int | None = None) -> None:
        """Queue a bottom half (``is_async``: a coroutine function, awaited when it runs; ``seq``: the
        request whose completion it reports)."""
        self._bh.append((cb, is_async, seq))
        self.notify()

    def order_after(self, later: int, earlier: int) -> None:
        """Request ``later`` waited (in QEMU) for I/O of request ``earlier``: complete it afterwards."""
        self._after[later] = earlier

    async def co_schedule(self) -> None:
        """``aio_co_schedule(self)`` + yield: continue from the context's one co-schedule bottom half,
        which enters the scheduled coroutines in the order they were scheduled."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._scheduled:
            self.schedule(self._enter_scheduled, is_async=True)
        self._scheduled.append(fut)
        await fut

    async def _enter_scheduled(self) -> None:
        scheduled, self._scheduled = self._scheduled, []
        for fut in scheduled:
            if not fut.done():
                fut.set_result(None)
                await self.step()  # QEMU enters each coroutine right here, in turn

    async def io_yield(self) -> None:
        """Wait, like a thread-pool request, until the event loop next polls."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._io.append(fut)
        self.notify()
        await fut

    def defer_fdatasync(self, fd: int) -> None:
        """Write-through group commit for an AIO request: its ``fdatasync`` joins the next batch.

        QEMU's concurrent write-through requests share flushes (a flush waits for the one in progress,
        then finds nothing left to do).  qio's AIO requests run one after another, so instead the
        request finishes at once and its completion is held back until one ``fdatasync`` per file
        covers every request of the batch; a failing sync fails all of them.
        """
        pending_sync.set((*pending_sync.get(), fd))

    def submit(self, coro: Coroutine[Any, Any, Any], done: Callable[[BaseException | None, Any], None]) -> None:
        """Start a request now; report ``done(exc, result)`` as QEMU's blk_aio_* would."""
        early = True
        self._seq += 1
        seq = self._seq
        self._undelivered.add(seq)

        async def request() -> None:
            in_aio_request.set(True)
            request_seq.set(seq)
            exc: BaseException | None = None
            result: Any = None
            try:
                result = await coro
            except Exception as e:
                exc = e
            self.finished_yields[seq] = AIO.yields
            fds = pending_sync.get()
            if fds:
                self._after_sync.append((fds, lambda err: done(err or exc, result), seq))
            elif early:
                self.schedule(lambda: done(exc, result), seq=seq)
            else:
                self._bh.extend(self._delivered(seq))
                done(exc, result)

        ctx = contextvars.copy_context()
        finished, _, task = ctx.run(start, request())
        early = False
        if not finished:
            assert task is not None
            self.inflight.add(task)
            task.add_done_callback(self._retire)

    def _retire(self, task: asyncio.Task[Any]) -> None:
        self.inflight.discard(task)
        self.notify()

    def has_pending(self) -> bool:
        """Bottom halves or parked I/O continuations that the next poll will run."""
        return bool(self._bh) or bool(self._io)

    def flush_pending(self) -> bool:
        return bool(self._after_sync)

    def run_flushes(self) -> None:
        """Perform the batched ``fdatasync`` calls and queue the held-back completions."""
        batch, self._after_sync = self._after_sync, []
        results: dict[int, OSError | None] = {}
        for fds, _, _ in batch:
            for fd in fds:
                if fd not in results:
                    try:
                        os.fdatasync(fd)
                        results[fd] = None
                    except OSError as e:
                        results[fd] = e
        for fds, complete, seq in batch:
            err = next((results[fd] for fd in fds if results[fd] is not None), None)
            self.schedule(lambda c=complete, e=err: c(e), seq=seq)  # type: ignore[misc]

    async def poll(self) -> bool:
        """One event-loop pass: release parked I/O, run bottom halves newest first."""
        ran = False
        self.polls += 1
        if self._io:
            io, self._io = self._io, []
            for fut in reversed(io):  # QEMU's thread pool usually completes the newest request first
                if not fut.done():
                    fut.set_result(None)
            ran = True
        while self._bh:
            batch, self._bh = self._bh, []
            for cb, is_async in self._ordered(batch):
                if is_async:
                    await cb()
                else:
                    cb()
            ran = True
        return ran

    def _ordered(self, batch: list[tuple[Callable[[], Any], bool, int | None]]) -> list[tuple[Callable[[], Any], bool]]:
        """Newest first, except that a completion ordered after another request's waits for it: to
        later in this batch, or, if that one has not completed yet, to when it does."""
        out: list[tuple[Callable[[], Any], bool]] = []

        def emit(entry: tuple[Callable[[], Any], bool, int | None]) -> None:
            out.append((entry[0], entry[1]))
            if entry[2] is not None:
                for follower in self._delivered(entry[2]):
                    emit(follower)

        for entry in reversed(batch):
            earlier = self._after.get(entry[2]) if entry[2] is not None else None
            if earlier is not None and earlier in self._undelivered:
                self._held.setdefault(earlier, []).insert(0, entry)  # they queued for the lock in order
            else:
                emit(entry)
        return out

    def _delivered(self, seq: int) -> list[tuple[Callable[[], Any], bool, int | None]]:
        """Request ``seq`` reported its completion: the completions held back for it are due now."""
        self._undelivered.discard(seq)
        self.finished_yields.pop(seq, None)
        self._after.pop(seq, None)
        followers = self._held.pop(seq, [])
        if followers and not self._bh:
            self.notify()
        return followers

    async def wait(self, timeout: float | None = None) -> None:
        """Let the event loop run until something happens or ``timeout`` passes."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._bh or self._io:
            await asyncio.sleep(0)
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def step(self) -> None:
        """Let coroutines that were just made runnable (a resumed request) run until they next wait.

        A woken Task needs up to three loop iterations (its first step if it was created since the loop
        last ran, the wake-up callback, the step itself); requests only ever park on futures that qio
        resolves explicitly, so extra iterations cannot run them further than QEMU would.
        """
        for _ in range(3):
            await asyncio.sleep(0)
