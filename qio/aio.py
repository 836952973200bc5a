"""Requests in flight and their completions: a deterministic model of QEMU 7.2's AioContext.

The rules, each with the QEMU source it comes from, are listed in docs/architecture.md ("The event-loop
model").  In short:

* Requests are *coroutines* in QEMU's sense (:class:`Co`): entering one runs it until it yields, right
  there (``qemu_aio_coroutine_enter``); waking one from inside another coroutine only queues it until
  the waker yields or terminates (``aio_co_wake``/``aio_co_enter``).  qio drives the Python coroutines
  itself (``coro.send``) instead of through asyncio Tasks, so this order is exact.
* Bottom halves (:class:`BH`) are a LIFO list; one event-loop pass (:meth:`AioContext.poll`) runs the
  bottom halves that were scheduled when it started, newest first (``aio_bh_poll``).
* Host I/O goes to a thread pool (:class:`ThreadPool`, ``util/thread-pool.c``).  While a blkdebug node
  exists, qio simulates the pool deterministically on a simulated clock: the syscall is done inline
  at submission, and the request waits for the pool's completion bottom half as in QEMU.  Without
  blkdebug nothing can observe the interleaving, so small host I/O simply runs on inline (much
  cheaper, see "Why small I/O is inline"); :meth:`AioContext.order_after` and the write-through group
  commit keep the few orders that remain observable.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
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
    ``busy`` counts requests running in real threads (large transfers; they complete without help).
    ``yield_on_io`` is set while a blkdebug node is in the graph: host I/O then goes through the
    simulated thread pool.
    ``inline`` is set while open-time I/O is driven without an event loop: even large host I/O then
    runs inline, since nothing could wait for a thread.
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
    I/O runs inline and a pending future (blkdebug's delayed error injection) resumes at once.  In a
    context of its own, as every request has: what a request sets (``current_request``) must not stay
    behind for the caller's later work (a close's flush would be reported as that request's)."""
    saved = AIO.yield_on_io, AIO.inline
    AIO.yield_on_io, AIO.inline = False, True
    if AioContext._current is not None:
        AioContext._current.pool.opened()
    step = contextvars.copy_context().run
    try:
        value = step(coro.send, None)
        while True:
            if isinstance(value, asyncio.Future) and not value.done():
                value.set_result(None)
            value = step(coro.send, None)
    except StopIteration as stop:
        return stop.value
    finally:
        AIO.yield_on_io, AIO.inline = saved
        coro.close()


# -- coroutines ------------------------------------------------------------------------------------
class _Yield:
    """``qemu_coroutine_yield()``: hand control back to whoever entered the coroutine.

    Not a dataclass: a stateless awaitable (one shared instance), nothing to record."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield None


YIELD = _Yield()


class Co:
    """A QEMU coroutine: a Python coroutine entered explicitly (see :func:`enter`).

    Hand-written rather than a dataclass: every request makes one, and a dataclass would build the
    wake-up list through a ``default_factory`` call per request (callgrind: ~2850 instructions to make
    and free one, ~3300 as a dataclass); its state changes only through the scheduler's functions below."""

    __slots__ = ("context", "coro", "exc", "finished", "on_finish", "result", "waiting", "wakeup")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context,
                 on_finish: Callable[[Co], None] | None = None) -> None:
        self.coro = coro
        self.context = context
        self.wakeup: list[Co] = []  # co_queue_wakeup: woken by us, run when we yield or terminate
        self.finished = False
        self.waiting = False
        self.result: Any = None
        self.exc: BaseException | None = None
        self.on_finish = on_finish

    def value(self) -> Any:
        if self.exc is not None:
            raise self.exc
        return self.result

    def cancel(self, exc: BaseException) -> None:
        """Abandon a coroutine that can never be woken (a qio bug): it fails with ``exc``."""
        if self.finished:
            return
        self.waiting = False
        self.coro.close()
        self._finish(exc, None)

    def _finish(self, exc: BaseException | None, result: Any) -> None:
        self.finished = True
        self.exc, self.result = exc, result
        if self.on_finish is not None:
            self.on_finish(self)


_running: Co | None = None


def current_co() -> Co | None:
    """The coroutine running now (``qemu_coroutine_self``); None outside qio's scheduler."""
    return _running


def enter(co: Co) -> None:
    """``qemu_aio_coroutine_enter``: run ``co`` until it yields, then the coroutines it woke (depth first)."""
    _step(co)
    if co.wakeup:
        pending: deque[Co] = deque(co.wakeup)
        co.wakeup = []
        while pending:
            to = pending.popleft()
            if to.finished:
                continue
            _step(to)
            if to.wakeup:
                pending.extendleft(reversed(to.wakeup))
                to.wakeup = []


def _step(to: Co) -> None:
    global _running
    to.waiting = False
    prev, _running = _running, to
    try:
        value = to.context.run(to.coro.send, None)
    except StopIteration as stop:
        to._finish(None, stop.value)
    except BaseException as e:  # the request's failure is its result
        to._finish(e, None)
    else:
        to.waiting = True
        if isinstance(value, asyncio.Future):
            _await_thread(to, value)
        elif isinstance(value, External):
            AioContext.current().pool.external(to, value)
    finally:
        _running = prev


def wake(co: Co) -> None:
    """``aio_co_wake``: inside a coroutine, queue ``co`` until the current one yields; else enter it."""
    if not co.waiting:
        return  # already woken (queued to run)
    if _running is not None:
        co.waiting = False
        _running.wakeup.append(co)
    else:
        enter(co)


def _await_thread(co: Co, fut: asyncio.Future[Any]) -> None:
    """The coroutine awaits a real thread (a large transfer): its completion goes through the pool."""
    fut._asyncio_future_blocking = False
    AioContext.current().pool.real(co, fut)


class External:
    """A wait for something outside qio (an NBD reply, read by the socket's reader callback) that the
    outside side ends with :meth:`complete`.

    Under the scheduler it is a real thread's completion (:meth:`ThreadPool.external`: the request
    continues from the pool's completion bottom half), signalled by a plain call: an asyncio future
    would add an event-loop pass (its done callbacks are scheduled with ``call_soon``).  Awaited
    outside the scheduler (by an asyncio task), it waits on a future instead."""

    __slots__ = ("done", "fut", "req")

    def __init__(self) -> None:
        self.done = False
        self.req: PoolReq | None = None
        self.fut: asyncio.Future[None] | None = None

    def complete(self) -> None:
        if self.done:
            return
        self.done = True
        req = self.req
        if req is not None:
            AioContext.current().pool.external_done(req)
        elif self.fut is not None and not self.fut.done():
            self.fut.set_result(None)

    def __await__(self) -> Generator[Any, None, None]:
        if self.done:
            return
        if _running is None:
            self.fut = asyncio.get_running_loop().create_future()
            yield from self.fut.__await__()
            return
        yield self


@dataclass(slots=True, eq=False)
class WaitQueue:
    """``CoQueue`` without a lock: coroutines waiting for an event, woken in FIFO order."""

    waiters: deque[Co] = field(default_factory=deque)

    async def wait(self) -> None:
        co = _running
        if co is None:
            return  # not under the scheduler (open-time or qio-img I/O): nothing can be in the way
        self.waiters.append(co)
        await YIELD

    def next(self) -> bool:
        """``qemu_co_queue_next``: wake the first waiter."""
        while self.waiters:
            co = self.waiters.popleft()
            if co.waiting:
                wake(co)
                return True
        return False

    def restart_all(self) -> None:
        while self.next():
            pass


@dataclass(slots=True, eq=False)
class TaskPool:
    """``AioTaskPool`` (``block/aio_task.c``): the parts of one request run as parallel coroutines.

    ``start`` enters the part's coroutine at once (``qemu_coroutine_enter``), so it runs until its first
    wait, and the request carries on with its next part; at most ``max_busy`` parts are in flight."""

    max_busy: int
    #: The request that made the pool: woken when a part finishes while it waits for a free slot.
    main: Co | None = field(default_factory=current_co, init=False)
    busy: int = field(default=0, init=False)
    #: The first part's failure: the request's result.
    status: Exception | None = field(default=None, init=False)
    waiting: bool = field(default=False, init=False)

    async def _wait_one(self) -> None:
        self.waiting = True
        await YIELD

    async def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self.busy >= self.max_busy:
            await self._wait_one()

        async def task() -> None:
            self.busy += 1
            try:
                await coro
            except Exception as e:
                if self.status is None:
                    self.status = e
            self.busy -= 1
            if self.waiting and self.main is not None:
                self.waiting = False
                wake(self.main)

        enter(Co(task(), contextvars.copy_context()))

    async def wait_all(self) -> None:
        while self.busy > 0:
            await self._wait_one()


# -- bottom halves -------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class BH:
    """``QEMUBH``: scheduling an already pending BH keeps its place in the list (``aio_bh_enqueue``)."""

    cb: Callable[[], Any]
    #: The request whose completion a one-shot BH reports.
    seq: int | None = None
    pending: bool = field(default=False, init=False)
    scheduled: bool = field(default=False, init=False)


# -- the thread pool -----------------------------------------------------------------------------
QUEUED, ACTIVE, DONE = 0, 1, 2
MAX_THREADS = 64  # THREAD_POOL_MAX_THREADS_DEFAULT

# The simulated clock (microseconds): typical costs on a quiet machine, which decide the races the
# way qemu-io decides them there.
COMMAND_TIME = 20  # qemu-io reading and running a command that does no I/O
#: A command that does no work before its first poll or its return (the commands flagged ``QUICK``): it
#: submits a request (``aio_read``/``aio_write``), changes blkdebug state (``break``, ``remove_break``,
#: ``resume``), or polls at once (``aio_flush``, ``wait_break``).  Measured with qemu-io 7.2 (1,000
#: ``-c`` copies against one): ``break`` ~4-8 us, a failing ``remove_break`` ~8-11 us, an ``aio_read`` of
#: 512 bytes ~11 us, with its completion report.  So several of them are done before an idle worker
#: thread has woken.  The end of the command list costs the same: ``bdrv_drain_all_begin`` quiesces
#: every node before its first poll.
QUICK_COMMAND_TIME = 5
#: An idle worker thread woken by a submission: ``WAKE_TIME`` if it went idle less than ``LONG_IDLE``
#: ago, else ``WAKE_TIME_LONG_IDLE`` (its CPU has gone idle as well).  Measured on the 2-vCPU project
#: machine with a C program (``pthread_cond_signal`` to the worker running): about 10 us after up to
#: 50 us of idleness, 17-25 us after 100 us to 10 ms (docs/fuzzing.md).
WAKE_TIME = 10
WAKE_TIME_LONG_IDLE = 25
LONG_IDLE = 100
SPAWN_TIME = 50  # a new worker thread starting up
MAIN_WAKE_TIME = 10  # the main loop woken by a completion while it blocks in ppoll (eventfd + wake-up)
COST_TRANSFER = 2  # a page-cache read or write (plus COST_PER_BYTE per byte)
COST_PER_BYTE = 1 / 30000  # measured: 64 KiB preadv from the page cache ~2 us, 1 MiB ~40 us
#: A write past the end of the file allocates blocks and pages: measured (C, ext4) 512 bytes to 4 KiB
#: ~5 us, 64 KiB ~17.5 us, 128 KiB ~31 us.  The per-byte part is set below the measured rate (13 us per
#: 64 KiB): that rate breaks fuzz record qcow2-writeback-219, which qemu-io gives in 30 of 30 runs.
COST_EXTEND = 5
COST_EXTEND_PER_BYTE = 8 / 65536
COST_FALLOCATE = 5  # zero write, discard, truncate: one fallocate, a few times a page-cache copy
COST_SYNC = 500  # fdatasync
#: qemu-io's buffer for a request (``qemu_io_alloc``: ``qemu_blockalign``, then ``memset`` with the
#: pattern), made before the request is submitted.  glibc serves a 4 KiB-aligned allocation whose padded
#: size reaches its mmap threshold (128 KiB) from fresh pages, which the ``memset`` faults in: measured
#: (C, ``posix_memalign`` + ``memset`` + ``free`` in a loop) ~0.53 us per KiB at 124 KiB to 4 MiB, and
#: qemu-io 7.2 spends as much per ``write`` of 1 MiB on ``null-co`` (535 us against 11 us for 64 KiB).
#: Smaller buffers come back from the heap warm, for about the cost of the command.
BUFFER_MMAP_MIN = 128 * 1024 - 4096 - 32
COST_FRESH_PER_BYTE = 0.53 / 1024


def buffer_cost(sizes: tuple[int, ...] | list[int]) -> float:
    """The simulated time qemu-io spends preparing the buffers of one request (``qemu_io_alloc`` per
    length): only fresh pages cost more than the command itself.  Most requests are small, so one
    comparison decides them."""
    if max(sizes, default=0) < BUFFER_MMAP_MIN:
        return 0
    return sum(n for n in sizes if n >= BUFFER_MMAP_MIN) * COST_FRESH_PER_BYTE


@dataclass(slots=True, eq=False)
class PoolReq:
    """A request in the thread pool: its cost and submission time on the simulated clock, or the
    future of the real thread that does a large transfer."""

    co: Co
    cost: float
    submit: float
    fut: asyncio.Future[Any] | None = None
    end: float = field(default=0.0, init=False)
    state: int = field(default=QUEUED, init=False)


class ThreadPool:
    """``util/thread-pool.c`` with deterministic workers on a simulated clock.

    Submission adds the request to the list the completion BH walks (newest first) and, when no worker
    is idle, asks for a new thread, which only the ``new_thread_bh`` bottom half creates.  Workers take
    queued requests in order; an idle worker needs ``WAKE_TIME`` (``WAKE_TIME_LONG_IDLE`` after a long
    wait) to start, a busy one goes straight on to the next request.  The clock advances by
    ``COMMAND_TIME`` per command (``QUICK_COMMAND_TIME`` for one flagged ``QUICK``, which does no
    work before its first poll); a poll completes what has finished by then, and if nothing can run
    it blocks: the clock jumps to the next completion.  Transfers in real threads (large requests)
    are done when their thread says so.
    """

    def __init__(self, ctx: AioContext) -> None:
        self.ctx = ctx
        self.now = 0.0
        self.elems: list[PoolReq] = []  # submission order; QEMU's list head is the newest
        self.queue: deque[PoolReq] = deque()  # request_list: waiting for a worker, FIFO
        self.running: list[PoolReq] = []  # taken by a worker, finishing at .end
        self.workers: list[float] = []  # per created thread: busy until
        self.cur_threads = 0  # created or asked for
        self.new_threads = 0
        self.completion_bh = BH(self._completion_bh)
        self.new_thread_bh = BH(self._new_thread_bh)
        #: Coroutines sleeping on the simulated clock (blkdebug's delay rules): (deadline, order, co).
        self.timers: list[tuple[float, int, Co]] = []
        self._timer_seq = 0

    def opened(self) -> None:
        """Open-time I/O (``bdrv_open`` of a format reads through the pool) leaves an idle worker, and
        the completion bottom half in the list, not scheduled: ``thread_pool_completion_bh`` schedules
        itself before each completion and cancels that after it, and the open's last poll has already
        taken the list.  A request that completes later keeps that old place, behind the one-shot
        bottom halves scheduled since (``aio_bh_enqueue``; the list is run newest first)."""
        if self.cur_threads == 0:
            self.workers.append(self.now)
            self.cur_threads = 1
        self.ctx.bh_schedule(self.completion_bh)
        self.completion_bh.scheduled = False  # qemu_bh_cancel

    def tick(self, cost: float = COMMAND_TIME) -> None:
        """A command boundary: time passes."""
        self.now += cost
        if self.queue or self.running or self.timers:
            self._complete(self.now)

    async def sleep(self, us: float) -> None:
        """``qemu_co_sleep_ns``: the calling coroutine waits ``us`` microseconds of simulated time, so
        what a delay changes (the order of completions) is the same in every run."""
        co = _running
        if co is None or us <= 0:
            return
        self._timer_seq += 1
        heapq.heappush(self.timers, (self.now + us, self._timer_seq, co))
        self.ctx.notify()
        await YIELD

    def _expire(self, t: float) -> bool:
        """Timers due by ``t`` wake their coroutines from a bottom half, in deadline order."""
        due: list[Co] = []
        while self.timers and self.timers[0][0] <= t:
            due.append(heapq.heappop(self.timers)[2])
        if not due:
            return False

        def wake_due() -> None:
            for co in due:
                if co.waiting:
                    enter(co)

        self.ctx.schedule(wake_due)
        return True

    def _new_thread_bh(self) -> None:
        for _ in range(self.new_threads):
            self.workers.append(self.now + SPAWN_TIME)
        self.new_threads = 0

    def _assign(self, limit: float) -> None:
        """Workers take the queued requests they can start by ``limit``, in order."""
        queue, workers = self.queue, self.workers
        while queue and workers:
            req = queue[0]
            best, start = 0, -1.0
            for i, busy in enumerate(workers):
                if busy >= req.submit:
                    s = busy
                else:
                    s = req.submit + (WAKE_TIME if req.submit - busy < LONG_IDLE else WAKE_TIME_LONG_IDLE)
                if start < 0 or s < start:
                    best, start = i, s
            if start > limit:
                break
            queue.popleft()
            req.end = start + req.cost
            req.state = ACTIVE
            workers[best] = req.end
            self.running.append(req)

    def _complete(self, t: float) -> bool:
        if self.timers and self._expire(t):
            self._complete(t)
            return True
        self._assign(t)
        done = [r for r in self.running if r.end <= t]
        if not done:
            return False
        for req in done:
            req.state = DONE
            self.running.remove(req)
        self.ctx.bh_schedule(self.completion_bh)
        return True

    async def submit(self, cost: float) -> None:
        """``thread_pool_submit_co``: the calling coroutine waits for the completion BH."""
        co = _running
        if co is None:
            return
        t = self.now
        self._assign(t)
        idle = sum(1 for busy in self.workers if busy <= t) - len(self.queue)
        if idle <= 0 and self.cur_threads < MAX_THREADS:  # spawn_thread
            self.cur_threads += 1
            self.new_threads += 1
            self.ctx.bh_schedule(self.new_thread_bh)
        req = PoolReq(co, cost, t)
        self.elems.append(req)
        self.queue.append(req)
        self.ctx.notify()
        await YIELD

    def real(self, co: Co, fut: asyncio.Future[Any]) -> None:
        req = PoolReq(co, 0, self.now, fut)
        self.elems.append(req)
        AIO.busy += 1

        def done(_: asyncio.Future[Any]) -> None:
            AIO.busy -= 1
            req.state = DONE
            self.ctx.bh_schedule(self.completion_bh)

        fut.add_done_callback(done)

    def external(self, co: Co, wait: External) -> None:
        """``co`` waits for an outside event (:class:`External`), like a request in a real thread."""
        req = PoolReq(co, 0, self.now)
        self.elems.append(req)
        AIO.busy += 1
        wait.req = req

    def external_done(self, req: PoolReq) -> None:
        AIO.busy -= 1
        req.state = DONE
        self.ctx.bh_schedule(self.completion_bh)

    def busy(self) -> bool:
        """Simulated work that the next polls will complete."""
        return bool(self.queue) or bool(self.running) or bool(self.timers)

    def advance(self, blocking: bool, limit: float = float("inf")) -> None:
        """Before a poll: complete what has finished by now; ``blocking`` (nothing else can run): the
        clock jumps to the next completion, and the main loop needs a moment to wake up; not beyond
        ``limit`` (the end of a ``sleep``)."""
        if self._complete(self.now) or not blocking:
            return
        wake = self.next_wake(limit)
        if wake is not None:
            self.now = max(self.now, wake)
            self._complete(self.now)

    def next_wake(self, limit: float = float("inf")) -> float | None:
        """When a blocking poll would next wake for a completion or a timer, if that is by ``limit``."""
        self._assign(limit)
        wake = min((r.end + MAIN_WAKE_TIME for r in self.running), default=float("inf"))
        if self.timers:
            wake = min(wake, self.timers[0][0])  # a timer ends ppoll's timeout: no wake-up cost
        return wake if wake <= limit and wake != float("inf") else None

    def _completion_bh(self) -> None:
        """``thread_pool_completion_bh``: enter the finished requests newest first, each until it yields."""
        elems = self.elems
        while True:
            for i in range(len(elems) - 1, -1, -1):
                if elems[i].state == DONE:
                    req = elems.pop(i)
                    break
            else:
                return
            self.ctx.bh_schedule(self.completion_bh)
            if req.co.waiting:
                enter(req.co)
            self.completion_bh.scheduled = False  # qemu_bh_cancel


@dataclass(slots=True, eq=False)
class _AioRequest:
    """One request of :meth:`AioContext.submit`: its coroutine body and completion callbacks.

    One object with bound methods rather than a set of closures: a long queue of small AIO requests
    pays for this once per request."""

    ctx: AioContext
    seq: int
    #: The request's body (None for :meth:`AioContext.submit_inline`).
    coro: Coroutine[Any, Any, Any] | None
    done: Callable[[BaseException | None, Any], None]
    #: Still inside submit().
    early: bool = field(default=True, init=False)
    exc: BaseException | None = field(default=None, init=False)
    result: Any = field(default=None, init=False)

    def deliver(self, exc: BaseException | None, result: Any) -> None:
        ctx, seq = self.ctx, self.seq
        ctx.inflight.discard(seq)
        ctx._cos.pop(seq, None)
        ctx.notify()
        self.done(exc, result)

    def deliver_result(self) -> None:
        """The one-shot bottom half of a request that finished during submission."""
        self.deliver(self.exc, self.result)

    def deliver_synced(self, err: BaseException | None) -> None:
        """After the group commit's ``fdatasync`` (``err``: its failure)."""
        self.deliver(err or self.exc, self.result)

    async def run(self) -> None:
        seq, ctx = self.seq, self.ctx
        in_aio_request.set(True)
        request_seq.set(seq)
        try:
            self.result = await self.coro  # type: ignore[misc]
        except Exception as e:
            self.exc = e
        ctx.finished_yields[seq] = AIO.yields
        fds = pending_sync.get()
        if fds:
            ctx._after_sync.append((fds, self.deliver_synced, seq))
        elif self.early:
            ctx.bh_schedule(BH(self.deliver_result, seq))
        else:
            for bh in ctx._delivered(seq):
                ctx.bh_schedule(bh)
            self.deliver(self.exc, self.result)

    def finished(self, co: Co) -> None:
        if co.exc is not None and self.seq in self.ctx.inflight:  # cancelled: a qio bug, reported by the shell
            self.deliver(co.exc, None)


class AioContext:
    """In-flight requests, the bottom-half list, the thread pool and a wake-up for pollers."""

    _current: AioContext | None = None

    def __init__(self) -> None:
        #: AIO requests whose completion has not been reported yet (QEMU's ``blk->in_flight``).
        self.inflight: set[int] = set()
        #: Listening servers (``nbd_server_start``): requests may arrive from outside at any time.
        self.external = 0
        self._cos: dict[int, Co] = {}
        #: The request of the running synchronous command, once it had to wait.
        self.sync_task: Co | None = None
        self._bh: list[BH] = []  # oldest first; QEMU's list head is the newest
        self._scheduled: list[Co] = []
        self.co_schedule_bh = BH(self._co_schedule_bh)
        self.pool = ThreadPool(self)
        self._after_sync: list[tuple[tuple[int, ...], Callable[[BaseException | None], None], int]] = []
        self._wake: asyncio.Event | None = None
        #: Bumped whenever a request makes visible progress; pollers compare it to detect a standstill.
        self.progress = 0
        #: Event-loop passes so far.
        self.polls = 0
        self._seq = 0
        self._after: dict[int, int] = {}  # request -> the earlier request it must complete after
        self._undelivered: set[int] = set()  # requests whose completion has not been reported yet
        self._held: dict[int, list[BH]] = {}
        #: AIO.yields when each recently finished request finished (its I/O after a lock's release).
        self.finished_yields: dict[int, int] = {}
        #: Real-time timers (``QEMU_CLOCK_REALTIME``): (deadline in ns of time.monotonic_ns, order, callback).
        self._timers: list[tuple[int, int, Callable[[], Any]]] = []
        self._timer_ids = itertools.count()
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

    def bh_schedule(self, bh: BH) -> None:
        """``qemu_bh_schedule``."""
        bh.scheduled = True
        if not bh.pending:
            bh.pending = True
            self._bh.append(bh)
        self.notify()

    def schedule(self, cb: Callable[[], Any], seq: int | None = None) -> None:
        """A one-shot bottom half (``seq``: the request whose completion it reports)."""
        self.bh_schedule(BH(cb, seq))

    # -- timers ------------------------------------------------------------------------------------
    def timer_add(self, delay_ns: int, cb: Callable[[], Any]) -> None:
        """``timer_mod_ns(now + delay_ns)`` on the real-time clock: ``cb`` runs in the first event-loop
        pass after the deadline, after that pass's bottom halves (``aio_poll``); the loop blocks
        until the earliest deadline when nothing else can run (``aio_compute_timeout``)."""
        heapq.heappush(self._timers, (time.monotonic_ns() + delay_ns, next(self._timer_ids), cb))
        self.notify()

    def has_timers(self) -> bool:
        return bool(self._timers)

    def timer_timeout(self) -> float | None:
        """Seconds until the earliest timer expires (0 if one has), None without timers."""
        if not self._timers:
            return None
        return max(0.0, (self._timers[0][0] - time.monotonic_ns()) / 1e9)

    def _timers_due(self) -> bool:
        return bool(self._timers) and self._timers[0][0] <= time.monotonic_ns()

    def run_timers(self) -> bool:
        """``timerlistgroup_run_timers``: the callbacks of the timers expired by now, earliest first."""
        if not self._timers_due():
            return False
        now = time.monotonic_ns()
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()
        return True

    def order_after(self, later: int, earlier: int) -> None:
        """Request ``later`` waited (in QEMU) for I/O of request ``earlier``: complete it afterwards.

        Only used without blkdebug, where host I/O is inline and the lock never made ``later`` wait."""
        self._after[later] = earlier

    async def co_schedule(self) -> None:
        """``aio_co_schedule(ctx, self)`` + yield: continue from the context's co-schedule bottom half."""
        co = _running
        if co is None:
            return
        self._scheduled.append(co)
        self.bh_schedule(self.co_schedule_bh)
        await YIELD

    def _co_schedule_bh(self) -> None:
        """``co_schedule_bh_cb``: enter the scheduled coroutines in the order they were scheduled."""
        scheduled, self._scheduled = self._scheduled, []
        for co in scheduled:
            if co.waiting:
                enter(co)

    def defer_fdatasync(self, fd: int) -> None:
        """Write-through group commit for an AIO request without blkdebug: its ``fdatasync`` joins the
        next batch.

        QEMU's concurrent write-through requests share flushes (a flush waits for the one in progress,
        then finds nothing left to do).  qio's inline AIO requests run one after another, so instead the
        request finishes at once and its completion is held back until one ``fdatasync`` per file
        covers every request of the batch; a failing sync fails all of them.
        """
        pending_sync.set((*pending_sync.get(), fd))

    def submit(self, coro: Coroutine[Any, Any, Any], done: Callable[[BaseException | None, Any], None]) -> None:
        """``blk_aio_prwv``: enter the request now; report ``done(exc, result)`` as QEMU's callback.

        A request that finished before submission returned reports through a one-shot bottom half,
        any later one calls ``done`` right where it finishes (``blk_aio_complete``)."""
        self._seq += 1
        seq = self._seq
        self._undelivered.add(seq)
        self.inflight.add(seq)
        req = _AioRequest(self, seq, coro, done)
        co = Co(req.run(), contextvars.copy_context(), req.finished)
        self._cos[seq] = co
        enter(co)
        req.early = False

    def submit_inline(self, write: Callable[[int, int, Any, int], None], offset: int, nbytes: int, iov: Any,
                      flags: int, done: Callable[[BaseException | None, Any], None]) -> None:
        """:meth:`submit` of a request that is ``write(offset, nbytes, iov, flags)`` and nothing else: a
        write that cannot wait and reads none of a request's context variables (the block layer's inline
        write path, ``BlockBackend.can_write_inline``).

        The same steps as :meth:`submit` and :meth:`_AioRequest.run` for a request that finishes during
        submission (the sequence number, in flight, the completion reported by a one-shot bottom half)
        without a coroutine, a :class:`Co` or a context copy: a long queue of small ``aio_write`` requests pays
        for those per request."""
        self._seq += 1
        seq = self._seq
        self._undelivered.add(seq)
        self.inflight.add(seq)
        req = _AioRequest(self, seq, None, done)
        try:
            write(offset, nbytes, iov, flags)
        except Exception as e:
            req.exc = e
        except BaseException as e:  # as a coroutine's: Co._finish -> _AioRequest.finished reports it now
            req.deliver(e, None)
            return
        self.finished_yields[seq] = AIO.yields
        self.bh_schedule(BH(req.deliver_result, seq))

    def adopt(self, co: Co) -> None:
        """A synchronous command's request whose wait was interrupted (Ctrl-C at the prompt) keeps
        running; it counts as in flight until it ends, so draining (close, exit) waits for it."""
        if co.finished:
            return
        self._seq += 1
        key = -self._seq

        def done(_: Co) -> None:
            self.inflight.discard(key)
            self.notify()

        self.inflight.add(key)
        co.on_finish = done

    def abandon(self, exc: BaseException) -> None:
        """Fail every AIO request still waiting (see ``Session._abandon_stuck``)."""
        for co in list(self._cos.values()):
            co.cancel(exc)

    def has_pending(self, limit: float = float("inf")) -> bool:
        """Bottom halves, expired real-time timers, or simulated pool work that the next polls will run
        (the pool's: if it finishes by the simulated time ``limit``)."""
        if any(bh.scheduled for bh in self._bh) or self._timers_due():
            return True
        pool = self.pool
        if limit == float("inf"):
            return pool.busy()
        return any(r.end <= pool.now for r in pool.running) or pool.next_wake(limit) is not None

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

    async def poll(self, blocking: bool = True, limit: float = float("inf")) -> bool:
        """One ``aio_poll``: the pool's workers run (if ``blocking``, waiting for them when nothing else
        is ready, but not beyond the simulated time ``limit``), then the bottom halves scheduled so far
        run, newest first (``aio_bh_poll``)."""
        return self.poll_now(blocking, limit)

    def poll_now(self, blocking: bool = True, limit: float = float("inf")) -> bool:
        """:meth:`poll` as a plain call (it never waits for the asyncio loop: the simulated pool's
        "waiting" moves its clock); the piped loop polls once per line."""
        self.polls += 1
        pool = self.pool
        if pool.queue or pool.running or pool.timers:
            pool.advance(blocking and not any(bh.scheduled for bh in self._bh), limit)
        if not self._bh:
            return self.run_timers() if self._timers else False
        batch, self._bh = self._bh, []
        ran = False
        for bh in self._ordered(batch):
            bh.pending = False
            if bh.scheduled:
                bh.scheduled = False
                bh.cb()
                ran = True
        if self._timers and self.run_timers():
            ran = True
        return ran

    def _ordered(self, batch: list[BH]) -> list[BH]:
        """Newest first, except that a completion ordered after another request's waits for it: to
        later in this batch, or, if that one has not completed yet, to when it does."""
        if not self._after:
            batch.reverse()
            return batch
        out: list[BH] = []

        def emit(bh: BH) -> None:
            out.append(bh)
            if bh.seq is not None:
                for follower in self._delivered(bh.seq):
                    emit(follower)

        for bh in reversed(batch):
            earlier = self._after.get(bh.seq) if bh.seq is not None else None
            if earlier is not None and earlier in self._undelivered:
                bh.pending = False
                self._held.setdefault(earlier, []).insert(0, bh)  # they queued for the lock in order
            else:
                emit(bh)
        return out

    def _delivered(self, seq: int) -> list[BH]:
        """Request ``seq`` reported its completion: the completions held back for it are due now."""
        self._undelivered.discard(seq)
        self.finished_yields.pop(seq, None)
        self._after.pop(seq, None)
        return self._held.pop(seq, [])

    async def wait(self, timeout: float | None = None, limit: float = float("inf")) -> None:
        """Let the event loop run until something happens or ``timeout`` passes."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if self.has_pending(limit):
            await asyncio.sleep(0)
            return
        if self._timers:  # the loop wakes up for the earliest timer at the latest
            until = self.timer_timeout()
            timeout = until if timeout is None or (until is not None and until < timeout) else timeout
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass


@dataclass(slots=True, eq=False)
class CoMutex:
    """``CoMutex``: uncontended lock and unlock never yield; waiters are served in FIFO order.

    ``unlock`` hands the lock to the first waiter and wakes it with ``aio_co_wake``: from inside a
    coroutine the waiter only runs once the unlocking coroutine yields or terminates
    (``qemu_co_mutex_unlock``), so the unlocking request runs on to its next I/O first.

    Without blkdebug, where host I/O is inline and the lock never makes anyone wait, it also remembers
    the last AIO request that did host I/O while holding it: in QEMU that I/O would still be running
    when the next request asks for the lock (see :mod:`qio.aio`)."""

    locked: bool = False
    waiters: deque[Co] = field(default_factory=deque)
    #: The last AIO request that did host I/O under the lock, the poll pass and ``AIO.yields`` then.
    io_holder: int | None = None
    io_poll: int = -1
    io_yields: int = 0
    yields_at_lock: int = 0

    async def lock(self) -> None:
        if not self.locked:
            self.locked = True
        else:
            co = current_co()
            assert co is not None, "CoMutex contended outside a request"
            self.waiters.append(co)
            await YIELD  # ownership is handed over by unlock()
        self._taken()

    def lock_now(self) -> bool:
        """:meth:`lock` of a free mutex without a coroutine (the same bookkeeping); False, nothing
        done, when it is taken (then ``await lock()``)."""
        if self.locked:
            return False
        self.locked = True
        self._taken()
        return True

    def _taken(self) -> None:
        if AIO.yield_on_io:
            return
        if self.io_holder is not None:
            seq = request_seq.get()
            if seq is not None and seq != self.io_holder:
                # Only if the holder finished right after its last I/O under the lock: with more I/O
                # of its own afterwards, both would be in QEMU's thread pool together.
                ctx = AioContext.current()
                if ctx.polls == self.io_poll and ctx.finished_yields.get(self.io_holder) == self.io_yields:
                    ctx.order_after(seq, self.io_holder)
        self.yields_at_lock = AIO.yields

    def unlock(self) -> None:
        if not AIO.yield_on_io and AIO.yields != self.yields_at_lock:
            seq = request_seq.get()
            if seq is not None:
                self.io_holder, self.io_poll, self.io_yields = seq, AioContext.current().polls, AIO.yields
        while self.waiters:
            co = self.waiters.popleft()
            if co.waiting:
                wake(co)
                return
        self.locked = False


@dataclass(slots=True, eq=False)
class CoQueue:
    """``CoQueue``: requests waiting for an in-flight allocation to complete."""

    queue: WaitQueue = field(default_factory=WaitQueue)

    async def wait(self, mutex: CoMutex) -> None:
        """``qemu_co_queue_wait``: queue, release the lock, yield; take the lock again when woken."""
        queue = self.queue
        co = current_co()
        if co is not None:
            queue.waiters.append(co)
        mutex.unlock()
        if co is not None:
            await YIELD
        await mutex.lock()

    def restart_all(self) -> None:
        self.queue.restart_all()
