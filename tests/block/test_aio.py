"""The event-loop model (qio/aio.py) in isolation, no QEMU needed: how coroutines are entered and
woken (``qemu_aio_coroutine_enter``/``aio_co_wake``), the order bottom halves run in (``aio_bh_poll``),
the simulated thread pool's completion order (``thread_pool_completion_bh``), and when an AIO
request reports its completion (``blk_aio_prwv``/``blk_aio_complete``).  docs/architecture.md lists
the rules with their QEMU sources."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from qio import aio
from qio.aio import AIO, YIELD, AioContext, Co, TaskPool, WaitQueue, enter, wake


def co(coro: Coroutine[Any, Any, Any]) -> Co:
    return Co(coro, contextvars.copy_context())


@pytest.fixture
def ctx() -> Iterator[AioContext]:
    """A fresh context on its own event loop (AioContext.poll is a coroutine); the previous current
    context is restored afterwards."""
    saved = AioContext._current
    yield AioContext()
    AioContext._current = saved


def poll(ctx: AioContext, blocking: bool = True) -> bool:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(ctx.poll(blocking))
    finally:
        loop.close()


# -- coroutines ------------------------------------------------------------------------------------
def test_enter_runs_until_the_first_yield_and_again_from_there() -> None:
    log: list[str] = []

    async def body() -> int:
        log.append("a")
        await YIELD
        log.append("b")
        return 7

    c = co(body())
    enter(c)
    assert log == ["a"] and [c.waiting, c.finished] == [True, False]
    enter(c)
    assert log == ["a", "b"] and [c.waiting, c.finished] == [False, True] and c.value() == 7


def test_a_failing_coroutine_keeps_its_exception_as_its_result() -> None:
    async def body() -> None:
        raise ValueError("boom")

    c = co(body())
    enter(c)
    assert c.finished
    with pytest.raises(ValueError, match="boom"):
        c.value()


def test_wake_inside_a_coroutine_waits_until_the_waker_yields() -> None:
    log: list[str] = []

    async def sleeper() -> None:
        log.append("sleeper waits")
        await YIELD
        log.append("sleeper woken")

    s = co(sleeper())
    enter(s)

    async def waker() -> None:
        wake(s)
        log.append("waker goes on")
        await YIELD
        log.append("waker resumed")

    w = co(waker())
    enter(w)
    assert log == ["sleeper waits", "waker goes on", "sleeper woken"]
    assert not w.finished


def test_wake_outside_any_coroutine_enters_at_once() -> None:
    log: list[str] = []

    async def sleeper() -> None:
        await YIELD
        log.append("woken")

    s = co(sleeper())
    enter(s)
    wake(s)
    assert log == ["woken"] and s.finished


def test_a_second_wake_before_the_first_ran_is_ignored() -> None:
    runs: list[int] = []

    async def sleeper() -> None:
        await YIELD
        runs.append(1)
        await YIELD
        runs.append(2)

    s = co(sleeper())
    enter(s)

    async def waker() -> None:
        wake(s)
        wake(s)

    enter(co(waker()))
    assert runs == [1]  # woken once: it is waiting again after its second yield
    assert s.waiting


def test_woken_coroutines_run_depth_first() -> None:
    """A wakes B then C; B wakes D: D runs before C (QEMU's co_queue_wakeup handling)."""
    log: list[str] = []

    def sleeper(name: str, then: list[Co] | None = None) -> Co:
        async def body() -> None:
            await YIELD
            log.append(name)
            for other in then or []:
                wake(other)

        c = co(body())
        enter(c)
        return c

    d = sleeper("D")
    b = sleeper("B", [d])
    c = sleeper("C")

    async def a() -> None:
        wake(b)
        wake(c)
        log.append("A")

    enter(co(a()))
    assert log == ["A", "B", "D", "C"]


def test_wait_queue_wakes_in_fifo_order() -> None:
    q = WaitQueue()
    log: list[str] = []

    def waiter(name: str) -> Co:
        async def body() -> None:
            await q.wait()
            log.append(name)

        c = co(body())
        enter(c)
        return c

    waiters = [waiter(n) for n in "xyz"]
    assert q.next()
    assert log == ["x"]
    q.restart_all()
    assert log == ["x", "y", "z"] and all(w.finished for w in waiters)
    assert not q.next()


def test_task_pool_keeps_at_most_max_busy_parts_in_flight() -> None:
    gates = [WaitQueue() for _ in range(3)]
    peak = 0
    log: list[str] = []

    async def part(i: int, pool: TaskPool) -> None:
        nonlocal peak
        peak = max(peak, pool.busy)
        log.append(f"start {i}")
        await gates[i].wait()
        log.append(f"end {i}")

    async def request() -> None:
        pool = TaskPool(2)
        for i in range(3):
            await pool.start(part(i, pool))
        await pool.wait_all()
        log.append("done")

    main = co(request())
    enter(main)
    assert log == ["start 0", "start 1"]  # the third part waits for a free slot
    gates[1].next()
    assert log == ["start 0", "start 1", "end 1", "start 2"]
    gates[0].next()
    gates[2].next()
    assert log[-1] == "done" and main.finished
    assert peak == 2


# -- bottom halves ---------------------------------------------------------------------------------
def test_bottom_halves_run_newest_first(ctx: AioContext) -> None:
    log: list[str] = []
    for name in "abc":
        ctx.schedule(lambda n=name: log.append(n))  # type: ignore[misc]
    assert poll(ctx)
    assert log == ["c", "b", "a"]
    assert not poll(ctx, blocking=False)


def test_a_bottom_half_scheduled_by_a_bottom_half_runs_in_the_next_pass(ctx: AioContext) -> None:
    log: list[str] = []

    def first() -> None:
        log.append("first")
        ctx.schedule(lambda: log.append("later"))

    ctx.schedule(first)
    poll(ctx)
    assert log == ["first"]
    poll(ctx)
    assert log == ["first", "later"]


def test_rescheduling_a_pending_bottom_half_keeps_its_place(ctx: AioContext) -> None:
    log: list[str] = []
    a = aio.BH(lambda: log.append("a"))
    ctx.bh_schedule(a)
    ctx.schedule(lambda: log.append("b"))
    ctx.bh_schedule(a)  # already pending: stays the oldest
    poll(ctx)
    assert log == ["b", "a"]


def test_co_schedule_continues_in_scheduling_order(ctx: AioContext) -> None:
    log: list[str] = []

    def mover(name: str) -> Co:
        async def body() -> None:
            await ctx.co_schedule()
            log.append(name)

        c = co(body())
        enter(c)
        return c

    movers = [mover(n) for n in "pq"]
    assert log == []
    poll(ctx)
    assert log == ["p", "q"] and all(m.finished for m in movers)


# -- the simulated thread pool ------------------------------------------------------------------------
def submitter(ctx: AioContext, name: str, cost: float, log: list[str]) -> Co:
    async def body() -> None:
        await ctx.pool.submit(cost)
        log.append(name)

    c = co(body())
    enter(c)
    return c


def test_pool_completions_found_in_one_pass_are_entered_newest_first(ctx: AioContext) -> None:
    log: list[str] = []
    ctx.pool.opened()  # one idle worker, as after opening an image
    submitter(ctx, "A", 10, log)
    submitter(ctx, "B", 10, log)  # no idle worker left: a second thread is requested
    poll(ctx, blocking=False)  # runs new_thread_bh; nothing has finished at t=0
    assert log == [] and ctx.pool.cur_threads == 2
    for _ in range(10):  # 200 us of commands: both requests finish before the next poll
        ctx.pool.tick()
    poll(ctx)
    assert log == ["B", "A"]


def test_a_short_request_on_a_new_thread_overtakes_a_long_one(ctx: AioContext) -> None:
    log: list[str] = []
    ctx.pool.opened()
    submitter(ctx, "long", 1000, log)
    submitter(ctx, "short", 1, log)
    for _ in range(20):
        if len(log) == 2:
            break
        poll(ctx)
    assert log == ["short", "long"]


def test_pool_sleep_wakes_in_deadline_order(ctx: AioContext) -> None:
    log: list[str] = []

    def sleeper(name: str, us: float) -> Co:
        async def body() -> None:
            await ctx.pool.sleep(us)
            log.append(name)

        c = co(body())
        enter(c)
        return c

    sleepers = [sleeper("slow", 300), sleeper("fast", 100), sleeper("mid", 200)]
    for _ in range(10):
        poll(ctx)
        if all(s.finished for s in sleepers):
            break
    assert log == ["fast", "mid", "slow"]


# -- AIO requests ----------------------------------------------------------------------------------
def test_a_request_finishing_at_submission_reports_from_a_bottom_half(ctx: AioContext) -> None:
    done: list[tuple[BaseException | None, Any]] = []

    async def instant() -> int:
        return 5

    ctx.submit(instant(), lambda exc, res: done.append((exc, res)))
    assert done == [] and ctx.inflight
    poll(ctx)
    assert done == [(None, 5)] and not ctx.inflight


def test_a_request_finishing_later_reports_where_it_finishes(ctx: AioContext) -> None:
    done: list[Any] = []
    gate = WaitQueue()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    ctx.submit(slow(), lambda exc, res: done.append(res))
    assert done == []
    gate.next()  # woken outside any coroutine: entered at once, and it completes right there
    assert done == ["ok"]


def test_a_request_failure_is_its_completion_status(ctx: AioContext) -> None:
    done: list[Any] = []

    async def failing() -> None:
        raise OSError(5, "EIO")

    ctx.submit(failing(), lambda exc, res: done.append(type(exc)))
    poll(ctx)
    assert done == [OSError]


def test_order_after_holds_a_completion_back_for_an_earlier_request(ctx: AioContext) -> None:
    """Without the constraint the batch would report 2 before 1 (newest first)."""
    order: list[int] = []

    async def instant() -> None:
        return None

    ctx.submit(instant(), lambda exc, res: order.append(1))
    ctx.submit(instant(), lambda exc, res: order.append(2))
    ctx.order_after(2, 1)
    poll(ctx)
    assert order == [1, 2]


def test_without_order_after_the_newest_completion_is_reported_first(ctx: AioContext) -> None:
    order: list[int] = []

    async def instant() -> None:
        return None

    ctx.submit(instant(), lambda exc, res: order.append(1))
    ctx.submit(instant(), lambda exc, res: order.append(2))
    poll(ctx)
    assert order == [2, 1]


def test_run_sync_completes_without_an_event_loop_and_restores_the_mode() -> None:
    saved = AIO.yield_on_io, AIO.inline
    AIO.yield_on_io = True
    try:
        async def body() -> int:
            return 3

        assert aio.run_sync(body()) == 3
        assert AIO.yield_on_io and not AIO.inline
    finally:
        AIO.yield_on_io, AIO.inline = saved


def test_run_sync_keeps_what_the_request_sets_to_itself() -> None:
    """A request run by ``run_sync`` (open-time I/O, or a test calling the block layer directly) sets
    ``current_request`` in a context of its own: the caller's later events are not reported as that
    request's (a close's flush after a direct ``blk.pwritev`` showed op ``write``)."""
    async def request() -> int:
        aio.current_request.set(("write", 0, 512))
        await asyncio.sleep(0)
        assert aio.current_request.get() == ("write", 0, 512)
        return 7

    assert aio.run_sync(request()) == 7
    assert aio.current_request.get() is None
