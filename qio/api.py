"""qio as a library: an asyncio API over the same session and block backend the shell's commands use.

``async with qio.open("blkdebug::t.raw", fmt="raw") as img: await img.write(0, b"x" * 512)``.
Requests go through :class:`qio.session.Session` and :class:`qio.block.backend.BlockBackend` exactly as
qemu-io's commands do, so an image written here holds the bytes the shell would leave.  Nothing waits
forever: a wait that nothing could ever end (a request parked at a breakpoint nobody resumes, a
breakpoint no request can reach) raises instead.  Reference and tutorial: docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from qio import ops
from qio.aio import AIO, AioContext, Co, current_co, enter
from qio.block.driver import BDRV_REQUEST_MAX_BYTES
from qio.block.errors import BlockError, QemuError
from qio.block.perms import PERM_RESIZE, PERM_WRITE
from qio.output import Output
from qio.session import Session

if TYPE_CHECKING:
    from qio.block.backend import BlockBackend
    from qio.block.driver import BlockDriver

__all__ = [
    "Breakpoint",
    "BreakpointError",
    "BreakpointTimeout",
    "EventStream",
    "Extent",
    "Image",
    "ImageClosedError",
    "ImageInfo",
    "OpenError",
    "QioError",
    "ReadOnlyError",
    "Request",
    "RequestTimeout",
    "StandstillError",
    "SyncImage",
    "TraceEvent",
    "open",
    "open_sync",
]

PREALLOC_MODES = ops.PREALLOC_MODES


# -- errors ------------------------------------------------------------------------------------------
class QioError(OSError):
    """A failed API call: ``errno`` and QEMU's message (``strerror``), as qemu-io would print it."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(err, message if message is not None else os.strerror(err))

    def __str__(self) -> str:
        return str(self.strerror)


class OpenError(QioError):
    """The image could not be opened (``can't open device ...: ...``)."""


class ImageClosedError(QioError):
    """A call on an image that is closed (or was never opened)."""


class ReadOnlyError(QioError):
    """A write, discard or truncate on an image opened read-only (``Block node is read-only``)."""


class BreakpointError(QioError):
    """A breakpoint that cannot be set, waited for, resumed or removed."""


class BreakpointTimeout(BreakpointError, TimeoutError):
    """``Breakpoint.hit(timeout=...)`` ran out of time while a request could still reach it."""


class RequestTimeout(QioError, TimeoutError):
    """``await request.wait(timeout=...)`` ran out of time while the request could still finish."""


class StandstillError(QioError):
    """A wait that can never end: every request it waits for is parked at a blkdebug breakpoint.

    qemu-io would hang here; resume the requests (``Breakpoint.resume``) and await again."""


def _error(exc: BaseException) -> BaseException:
    """The block layer's failure as the API's :class:`QioError` (other exceptions are qio bugs)."""
    if isinstance(exc, QioError):
        return exc
    if isinstance(exc, BlockError):
        return QioError(exc.code, str(exc))
    if isinstance(exc, QemuError):
        return QioError(exc.errno, str(exc))
    return exc


# -- results -----------------------------------------------------------------------------------------
#: A run of bytes with one allocation status (a line of qemu-io's ``map``): ``offset``, ``length``,
#: ``allocated``.
Extent = ops.Extent


class ImageInfo(NamedTuple):
    """What qemu-io's ``info`` prints: format and protocol names, cluster size, vm state offset, and
    the format-specific information as ``(name, value)`` pairs."""

    format: str
    protocol: str | None
    cluster_size: int | None
    vm_state_offset: int | None
    specific: list[tuple[str, Any]]


# -- requests ----------------------------------------------------------------------------------------
class Request:
    """An asynchronous request (``aio_read``/``aio_write``); await it for its result.

    ``state`` is ``"running"``, ``"suspended"`` (parked at a blkdebug breakpoint, ``tag`` says which),
    ``"done"`` or ``"failed"``.  Awaiting runs the event loop until the request ends; if it never can
    (parked, nothing will resume it) :class:`StandstillError` is raised and the request stays parked."""

    def __init__(self, image: Image, kind: str, offset: int, length: int) -> None:
        self.image = image
        self.kind = kind
        self.offset = offset
        self.length = length
        self.done = False
        self._exc: BaseException | None = None
        self._result: Any = None
        self._co: Co | None = None

    @property
    def tag(self) -> str | None:
        """The breakpoint tag the request is parked under, or None."""
        node = self.image._debug_node()
        if node is None or self._co is None or self.done:
            return None
        for tag, parker in getattr(node, "suspended", []):
            if parker.co is self._co:
                return str(tag)
        return None

    @property
    def state(self) -> str:
        """``"running"``, ``"suspended"`` (parked at a breakpoint), ``"done"`` or ``"failed"``."""
        if self.done:
            return "failed" if self._exc is not None else "done"
        return "suspended" if self.tag is not None else "running"

    def __repr__(self) -> str:
        return f"<Request {self.kind} offset={self.offset} length={self.length} {self.state}>"

    def _finish(self, exc: BaseException | None, result: Any) -> None:
        self.done = True
        self._exc = exc
        self._result = result

    async def wait(self, timeout: float | None = None) -> Any:
        """The request's result (bytes for a read, None otherwise); raises its :class:`QioError`, or
        :class:`RequestTimeout` after ``timeout`` seconds (the request goes on)."""
        if not self.done:
            await self.image._run_until(lambda: self.done, f"{self.kind} request at offset {self.offset}", timeout)
        if self._exc is not None:
            raise _error(self._exc)
        return self._result

    def __await__(self) -> Generator[Any, None, Any]:
        return self.wait().__await__()


# -- breakpoints -------------------------------------------------------------------------------------
class Breakpoint:
    """A one-shot blkdebug breakpoint (qemu-io's ``break EVENT TAG``): the next request raising
    ``event`` parks under ``tag`` until :meth:`resume`."""

    def __init__(self, image: Image, event: str, tag: str) -> None:
        self.image = image
        self.event = event
        self.tag = tag
        self.removed = False

    def _check(self) -> BlockDriver:
        if self.removed:
            raise BreakpointError(errno.ENOENT, f"breakpoint '{self.tag}' was removed")
        node = self.image._debug_node()
        if node is None:  # the image was closed
            raise ImageClosedError(errno.EBADF, "image is closed")
        return node

    async def hit(self, timeout: float | None = None) -> Request | None:
        """Wait until a request is parked under the tag; that request (None if the API did not submit
        it).  Raises :class:`BreakpointError` at once when no request can ever reach the breakpoint and
        :class:`BreakpointTimeout` after ``timeout`` seconds."""
        self._check()
        img = self.image
        img._enter()
        outcome = await ops.wait_break(img.session, self.tag, timeout)
        if outcome == "ok":
            for req in img._requests:
                if req.tag == self.tag:
                    return req
            return None
        if outcome == "timeout":
            raise BreakpointTimeout(errno.ETIMEDOUT,
                                    f"timed out after {timeout:g} s waiting for request '{self.tag}'")
        raise BreakpointError(errno.ENOENT, f"no request can reach a breakpoint tagged '{self.tag}'")

    def resume(self) -> None:
        """qemu-io's ``resume TAG``: the parked request continues at once, until it next waits."""
        self._check()
        self.image._enter()
        ret = ops.resume(self.image.session, self.tag)
        if ret < 0:
            raise BreakpointError(-ret, f"Could not resume request: {os.strerror(-ret)}")

    def remove(self) -> None:
        """qemu-io's ``remove_break TAG``: delete the breakpoint and resume what is parked under it."""
        self._check()
        self.image._enter()
        ret = ops.remove_breakpoint(self.image.session, self.tag)
        self.removed = True
        if ret < 0:
            raise BreakpointError(-ret, f"Could not remove breakpoint {self.tag}: {os.strerror(-ret)}")

    def __repr__(self) -> str:
        return f"<Breakpoint {self.event} {self.tag!r}{' removed' if self.removed else ''}>"


# -- the trace as events ----------------------------------------------------------------------------
class TraceEvent(NamedTuple):
    """One line of qio's trace (``-T``): the trace event's name and its text.  For ``blkdebug_event``
    the fields are parsed too: the blkdebug ``event`` (``write_aio``), the request that raised it
    (``op`` ``"write"``/``"read"``/..., ``offset``, ``length``; None at open/close) and the state."""

    name: str
    text: str
    event: str | None = None
    op: str | None = None
    offset: int | None = None
    length: int | None = None
    state: int | None = None


def _trace_event(line: str) -> TraceEvent:
    name, _, text = line.rstrip("\n").partition(" ")
    if name != "blkdebug_event":
        return TraceEvent(name, text)
    words = text.split()
    # "write_aio request write offset 0 bytes 8192 state 1" or "none request (no request: open/close) state 1"
    state = int(words[-1]) if words[-2:-1] == ["state"] and words[-1].isascii() and words[-1].isdigit() else None
    if len(words) >= 7 and words[1] == "request" and words[3] == "offset" and words[5] == "bytes":
        return TraceEvent(name, text, words[0], words[2], int(words[4]), int(words[6]), state)
    return TraceEvent(name, text, words[0] if words else None, state=state)


class EventStream:
    """``async for ev in img.events():`` the trace events of the image as they fire.

    Events are recorded from the moment the stream is made, whatever call runs the requests; the
    iteration yields the recorded ones, then runs the event loop for more, and ends when nothing could
    ever fire another (it never hangs).  :meth:`close` (or leaving ``with``) stops the recording."""

    def __init__(self, image: Image, pattern: str) -> None:
        from collections import deque

        from qio import trace

        self.image = image
        self._buf: deque[str] = deque()
        self._saved = (list(trace._sink), set(trace.enabled))
        warnings: list[str] = []
        trace.enable(pattern, warnings.append)
        if warnings:
            raise QioError(errno.ENOENT, warnings[0])
        trace.set_sink(self._buf.append)
        self.closed = False

    def pending(self) -> list[TraceEvent]:
        """The events recorded so far and not yet taken, without waiting."""
        out = [_trace_event(line) for line in self._buf]
        self._buf.clear()
        return out

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TraceEvent:
        if not self._buf and not self.closed and not self.image.closed:
            self.image._enter()
            await self.image.session.run_until(lambda: bool(self._buf), "events", on_standstill=lambda: True)
        if not self._buf:
            raise StopAsyncIteration
        return _trace_event(self._buf.popleft())

    def close(self) -> None:
        """Stop recording and restore the trace settings from before the stream; idempotent."""
        from qio import trace

        if not self.closed:
            self.closed = True
            trace._sink[:] = self._saved[0]
            trace.enabled.clear()
            trace.enabled.update(self._saved[1])

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# -- the image ---------------------------------------------------------------------------------------
def _options(options: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``--image-opts`` text or a (nested or dotted) dict to the flat options the block layer takes."""
    from qio.qemuopts import flatten, parse_qemuopts, qemuopts_value

    if options is None:
        return {}
    if isinstance(options, str):
        warnings: list[str] = []
        return dict(parse_qemuopts(options, warnings.append))
    return {k: qemuopts_value(k, v) for k, v in flatten(dict(options)).items()}


class Image:
    """An open image: the session and block backend of one qemu-io run, driven by method calls.

    Messages the block layer prints (``blkdebug: Suspended request 'A'``, warnings) are collected in
    :attr:`log` rather than written to the process's stdout/stderr."""

    def __init__(self, session: Session, out: Output) -> None:
        self.session = session
        self._out = out
        #: Every line the block layer printed, in order (stdout and stderr together).
        self.log: list[str] = []
        self._requests: list[Request] = []

    # -- plumbing ------------------------------------------------------------------------------------
    def _enter(self) -> BlockBackend:
        """The backend; makes this image's event-loop state current (several images may be open)."""
        blk = self.session.blk
        if blk is None:
            raise ImageClosedError(errno.EBADF, "image is closed")
        AioContext._current = self.session.aio
        AIO.printf = self._out.out  # type: ignore[method-assign]
        return blk

    def _debug_node(self) -> BlockDriver | None:
        return self.session.debug_node()

    async def _run_until(self, done: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Run the event loop until ``done()``; :class:`StandstillError` if it can never become true,
        :class:`RequestTimeout` if it did not within ``timeout`` seconds."""
        self._enter()
        stalled: list[bool] = []

        def standstill() -> bool:
            stalled.append(True)
            return True

        deadline = None if timeout is None else time.monotonic() + timeout
        if await self.session.run_until(done, what, deadline, on_standstill=standstill) and done():
            return
        if not stalled and not done():
            raise RequestTimeout(errno.ETIMEDOUT, f"{what}: timed out after {timeout:g} s")
        node = self._debug_node()
        tags = node.debug_suspended_tags() if node is not None else []
        parked = ", ".join(repr(t) for t in tags) or "none"
        raise StandstillError(errno.EDEADLK, f"{what} can never finish: request(s) {parked} suspended at "
                                             "blkdebug breakpoints; resume them first")

    async def _sync(self, coro: Coroutine[Any, Any, Any], always_poll: bool = False, what: str = "request") -> Any:
        """Run a request as the shell's synchronous commands do (:meth:`Session.sync`: entered at once,
        one poll if it did host I/O), but a request that can never finish raises
        :class:`StandstillError` and stays in flight (closing drains it) instead of being resumed.
        This is the ``sync`` the API hands to :mod:`qio.ops`."""
        aio = self.session.aio
        before = AIO.yields
        co = Co(coro, contextvars.copy_context())
        enter(co)
        if co.finished:
            if always_poll or AIO.yields != before:
                await aio.poll()
        else:
            co.on_finish = lambda _: aio.notify()
            aio.sync_task = co
            try:
                await self._run_until(lambda: co.finished, what)
            except BaseException:
                aio.adopt(co)
                raise
            finally:
                aio.sync_task = None
        if co.exc is not None:
            raise _error(co.exc) from None
        return co.result

    def _need(self, perm: int) -> BlockBackend:
        """The permissions a command takes before running (``write`` WRITE, ``truncate`` RESIZE too)."""
        blk = self._enter()
        if perm & ~blk.perm:
            try:
                blk.set_perm(blk.perm | perm)
            except QemuError as e:
                cls = ReadOnlyError if e.errno == errno.EPERM else QioError
                raise cls(e.errno, str(e)) from None
        return blk

    def _submit(self, kind: str, offset: int, length: int, coro: Coroutine[Any, Any, Any],
                result: Callable[[], Any] | None = None) -> Request:
        req = Request(self, kind, offset, length)

        async def run() -> Any:
            req._co = current_co()
            await coro
            return result() if result is not None else None

        def done(exc: BaseException | None, value: Any) -> None:
            req._finish(exc, value)
            self._requests.remove(req)

        self._requests.append(req)
        ops.submit(self.session, run(), done)
        return req

    @staticmethod
    def _limit(length: int) -> None:
        if length > BDRV_REQUEST_MAX_BYTES:
            raise QioError(errno.EINVAL, f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {length}")

    # -- asynchronous requests -----------------------------------------------------------------------
    def submit_read(self, offset: int, length: int) -> Request:
        """Start a read (qemu-io's ``aio_read``); the request's result is the bytes read."""
        self._limit(length)
        blk = self._enter()
        buf = ops.read_buffer(length)
        return self._submit("read", offset, length, ops.read_request(blk, offset, length, [buf]), buf.tobytes)

    def submit_write(self, offset: int, data: bytes | bytearray | memoryview | int, *, fua: bool = False,
                     zero: bool = False, unmap: bool = False, compressed: bool = False) -> Request:
        """Start a write (qemu-io's ``aio_write``).  With ``zero=True`` ``data`` may be the length (an
        int) of the zeroes to write (``-z``); ``unmap`` lets zeroed clusters be deallocated (``-u``);
        ``compressed`` writes compressed clusters (``write -c``)."""
        blk, length, iov, flags = self._write(data, fua, zero, unmap, compressed)
        return self._submit("write", offset, length, ops.write_request(blk, offset, length, iov, flags, zero,
                                                                       compressed))

    def _write(self, data: bytes | bytearray | memoryview | int, fua: bool, zero: bool, unmap: bool,
               compressed: bool) -> tuple[BlockBackend, int, list[memoryview] | None, int]:
        """Checks of a write (qemu-io's, :func:`qio.ops.write_conflict`): backend, length, vector, flags."""
        if isinstance(data, int):
            if not zero:
                raise QioError(errno.EINVAL, "data must be bytes unless zero=True")
            length, iov = data, None
        else:
            view = memoryview(data)
            length = view.nbytes
            # bytes are immutable: the request may keep them; anything else is copied first
            iov = [view if isinstance(data, bytes) else memoryview(bytes(view))]
        flags = ops.write_flags(fua, unmap)
        conflict = ops.write_conflict(flags, zero, compressed, False)
        if conflict is not None:
            raise QioError(errno.EINVAL, conflict)
        self._limit(length)
        return self._need(PERM_WRITE), length, iov, flags

    def submit_discard(self, offset: int, length: int) -> Request:
        """Start a discard (qio's ``aio_discard``)."""
        self._limit(length)
        blk = self._need(PERM_WRITE)
        return self._submit("discard", offset, length, ops.discard_request(blk, offset, length))

    # -- requests awaited at once --------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        """``read offset length``: the bytes (EIO outside the image, as in qemu-io)."""
        self._limit(length)
        blk = self._enter()
        buf = await ops.read(partial(self._sync, what=f"read at offset {offset}"), blk, offset, length)
        return buf.tobytes()

    async def write(self, offset: int, data: bytes | bytearray | memoryview | int, *, fua: bool = False,
                    zero: bool = False, unmap: bool = False, compressed: bool = False) -> None:
        """``write [-f] [-z [-u]] [-c] offset length``, with ``data`` as the bytes written."""
        blk, length, iov, flags = self._write(data, fua, zero, unmap, compressed)
        await ops.write(partial(self._sync, what=f"write at offset {offset}"), blk, offset, length, iov, flags,
                        zero, compressed)

    async def discard(self, offset: int, length: int) -> None:
        """``discard offset length``."""
        self._limit(length)
        blk = self._need(PERM_WRITE)
        await ops.discard(partial(self._sync, what=f"discard at offset {offset}"), blk, offset, length)

    async def flush(self) -> None:
        """``flush``: the image's data and metadata reach stable storage."""
        blk = self._enter()
        await ops.flush(partial(self._sync, what="flush"), blk)

    async def drain(self) -> None:
        """``aio_flush``: wait for every request in flight (:class:`StandstillError` if one never can)."""
        self._enter()
        await self._run_until(lambda: not self.session.aio.inflight, "aio_flush")

    async def truncate(self, length: int, prealloc: str = "off") -> None:
        """``truncate [-m prealloc] length``."""
        if prealloc not in PREALLOC_MODES:
            raise QioError(errno.EINVAL, f"Invalid preallocation mode '{prealloc}'")
        blk = self._need(PERM_WRITE | PERM_RESIZE)
        await ops.truncate(partial(self._sync, what="truncate"), blk, length, prealloc)

    async def length(self) -> int:
        """``length``: the image size in bytes."""
        try:
            return ops.length(self._enter())
        except BlockError as e:
            raise _error(e) from None

    async def block_status(self, offset: int, length: int) -> Extent:
        """The allocation status of the first run of bytes at ``offset`` (``bdrv_is_allocated``); its
        length is 0 at the end of the image."""
        if offset < 0 or length < 0:  # qemu-io's alloc refuses them while parsing; the block layer asserts
            raise QioError(errno.EINVAL, f"offset and length must not be negative, given {offset} {length}")
        allocated, n = await self._is_allocated(offset, length)
        return Extent(offset, n, allocated)

    async def _is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        return await ops.is_allocated(partial(self._sync, what="block_status"), self._enter(), offset, length)

    async def map(self) -> list[Extent]:
        """qemu-io's ``map``: the whole image as runs of allocated / not allocated bytes."""
        size = await self.length()
        try:
            return [ext async for ext in ops.extents(partial(self._sync, what="map"), self._enter(), size)]
        except ops.UnexpectedEnd:
            raise QioError(errno.EIO, "Unexpected end of image") from None

    async def info(self) -> ImageInfo:
        """qemu-io's ``info``, as values (ENOTSUP when the format has no information, as there)."""
        try:
            info = ops.info(self._enter())
        except BlockError as e:
            raise QioError(e.code) from None
        binfo = info.info
        return ImageInfo(info.format, info.protocol, binfo.cluster_size if binfo is not None else None,
                         binfo.vm_state_offset if binfo is not None else None, info.specific)

    # -- breakpoints ---------------------------------------------------------------------------------
    def breakpoint(self, event: str, tag: str, *, offset: int | None = None, length: int = 1,
                   iotype: str | None = None, nth: int = 1) -> Breakpoint:
        """``break EVENT TAG`` (with ``offset``/``iotype``/``nth``: qio's ``break -o -i -n``)."""
        self._enter()
        if self._debug_node() is None:
            raise BreakpointError(errno.ENOTSUP, "Could not set breakpoint: no blkdebug node below the image")
        predicate = None
        if offset is not None or iotype is not None or nth != 1:
            from qio.block.blkdebug_config import IOTYPES

            if iotype is not None and iotype not in IOTYPES[:5]:  # as the shell's break -i
                raise BreakpointError(errno.EINVAL, f"unknown iotype '{iotype}' (one of {', '.join(IOTYPES[:5])})")
            predicate = (-1 if offset is None else offset, length, iotype, nth)
        ret = ops.set_breakpoint(self.session, event, tag, predicate)
        if ret < 0:
            raise BreakpointError(-ret, f"Could not set breakpoint: {os.strerror(-ret)}")
        return Breakpoint(self, event, tag)

    # -- rules at run time (qio's prompt commands inject, delay, corrupt, set_state, bad_blocks) -----------
    def _blkdebug(self) -> Any:
        self._enter()
        node = ops.blkdebug(self.session)
        if node is None:
            raise QioError(errno.ENOTSUP, "no blkdebug node below the image")
        return node

    def add_rule(self, kind: str, **keys: Any) -> int:
        """Add a blkdebug rule as a configuration section ``[KIND]`` with ``keys`` would (docs/blkdebug.md):
        ``img.add_rule("inject-error", event="write_aio", errno=28, once=True)``.  Returns its id."""
        node = self._blkdebug()
        if kind not in ops.RULE_KINDS:
            raise QioError(errno.EINVAL, f"There is no option group '{kind}'")

        def text(v: Any) -> str:
            return ("on" if v else "off") if isinstance(v, bool) else str(v)

        try:
            rule = ops.add_rule(node, kind, [f"{k}={text(v)}" for k, v in keys.items()])
        except QemuError as e:
            raise QioError(errno.EINVAL, str(e)) from None
        rule_id: int = rule.id
        return rule_id

    def remove_rule(self, rule_id: int) -> None:
        """Delete a rule or breakpoint by the id :meth:`add_rule` returned or :meth:`rules` shows."""
        if not ops.remove_rule(self._blkdebug(), rule_id):
            raise QioError(errno.ENOENT, f"no rule #{rule_id}")

    def rules(self) -> list[str]:
        """The ``rules`` command's lines: every rule and breakpoint with its id, conditions, counters."""
        return ops.rules(self._blkdebug())

    def resume(self, tag: str) -> None:
        """``resume TAG``, for requests parked by a breakpoint set some other way (a config file)."""
        self._enter()
        ret = ops.resume(self.session, tag)
        if ret < 0:
            raise BreakpointError(-ret, f"Could not resume request: {os.strerror(-ret)}")

    def events(self, pattern: str = "blkdebug_event") -> EventStream:
        """Record trace events matching ``pattern`` (``-T PATTERN``: ``blkdebug_event``, ``blkdebug_*``)."""
        self._enter()
        return EventStream(self, pattern)

    # -- closing -------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after :meth:`close` (every request method then raises :class:`ImageClosedError`)."""
        return self.session.blk is None

    @property
    def requests(self) -> list[Request]:
        """The requests submitted through this image that have not ended yet, oldest first (what a
        test that timed out was waiting for)."""
        return list(self._requests)

    async def close(self) -> None:
        """Drain and close (parked requests are resumed first, as the shell does); idempotent."""
        if self.session.blk is None:
            return
        self._enter()
        try:
            await self.session.close_image()
        except BlockError as e:
            raise _error(e) from None
        finally:
            self._out.flush()

    async def __aenter__(self) -> Image:
        return self

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _flags(read_only: bool, cache: str | None, snapshot: bool, force_share: bool) -> Any:
    from qio.block.modes import OpenFlags, parse_cache_mode

    flags = OpenFlags()
    flags.read_only = read_only
    flags.snapshot = snapshot
    flags.force_share = force_share
    if cache is not None and not parse_cache_mode(cache, flags):
        raise QioError(errno.EINVAL, f"Invalid cache option: {cache}")
    return flags


async def _open(filename: str | None, fmt: str | None, options: Mapping[str, Any] | str | None,
                read_only: bool, cache: str | None, snapshot: bool, force_share: bool) -> Image:
    from qio.block.backend import BlockBackend

    opts = _options(options)
    if fmt is not None:
        if isinstance(options, str):
            raise QioError(errno.EINVAL, "--image-opts and -f are mutually exclusive")
        opts["driver"] = fmt
    if force_share:
        opts["force-share"] = "on"
    flags = _flags(read_only, cache, snapshot, force_share)
    log: list[str] = []
    out = Output("qio")
    out.redirect(lambda b: log.append(b.decode("utf-8", "surrogateescape")),
                 lambda b: log.append(b.decode("utf-8", "surrogateescape")))
    session = Session(out, "qio", image_opts=filename is None)
    img = Image(session, out)
    img.log = log
    try:
        session.blk = BlockBackend.open(filename, opts, flags, out.reporter())
    except QemuError as e:
        name = f" device {filename}" if filename is not None else ""
        raise OpenError(e.errno, f"can't open{name}: {e}") from None
    return img


class _Opening:
    """What :func:`open` returns: await it for the :class:`Image`, or use it with ``async with``."""

    def __init__(self, coro: Callable[[], Coroutine[Any, Any, Image]]) -> None:
        self._coro = coro
        self._img: Image | None = None

    def __await__(self) -> Generator[Any, None, Image]:
        return self._coro().__await__()

    async def __aenter__(self) -> Image:
        self._img = await self._coro()
        return self._img

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._img is not None:
            await self._img.close()


def open(filename: str | None = None, fmt: str | None = None, options: Mapping[str, Any] | str | None = None,
         read_only: bool = False, cache: str | None = None, *, snapshot: bool = False,
         force_share: bool = False) -> _Opening:
    """Open an image as ``qemu-io [-f FMT] [-r] [-t CACHE] [-s] [-U] FILENAME`` does.

    ``filename`` takes every form the shell accepts (``blkdebug:CFG:IMG``, ``json:{...}``, protocol
    prefixes); ``options`` adds block options (a nested or dotted dict, or ``--image-opts`` text, then
    without ``filename``).  Raises :class:`OpenError` with QEMU's message."""
    return _Opening(lambda: _open(filename, fmt, options, read_only, cache, snapshot, force_share))


# -- the synchronous facade -------------------------------------------------------------------------
class SyncImage:
    """:class:`Image` for scripts and notebooks: every call runs the event loop until it is done.

    Requests from :meth:`submit_read`/:meth:`submit_write` finish through :meth:`wait`.  Not for use
    inside a running event loop (use the asynchronous API there)."""

    def __init__(self, runner: asyncio.Runner, image: Image) -> None:
        self._runner = runner
        self._runner_closed = False
        self.image = image

    def _run(self, aw: Awaitable[Any]) -> Any:
        if self._runner_closed:
            if isinstance(aw, Coroutine):
                aw.close()  # never started: no "never awaited" warning
            raise ImageClosedError(errno.EBADF, "image is closed")

        async def call() -> Any:
            return await aw

        return self._runner.run(call())

    @property
    def log(self) -> list[str]:
        """:attr:`Image.log`: the lines the block layer printed."""
        return self.image.log

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = self._run(self.image.read(offset, length))
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview | int, *, fua: bool = False,
              zero: bool = False, unmap: bool = False, compressed: bool = False) -> None:
        self._run(self.image.write(offset, data, fua=fua, zero=zero, unmap=unmap, compressed=compressed))

    def discard(self, offset: int, length: int) -> None:
        self._run(self.image.discard(offset, length))

    def flush(self) -> None:
        self._run(self.image.flush())

    def drain(self) -> None:
        self._run(self.image.drain())

    def truncate(self, length: int, prealloc: str = "off") -> None:
        self._run(self.image.truncate(length, prealloc))

    def length(self) -> int:
        n: int = self._run(self.image.length())
        return n

    def block_status(self, offset: int, length: int) -> Extent:
        ext: Extent = self._run(self.image.block_status(offset, length))
        return ext

    def map(self) -> list[Extent]:
        extents: list[Extent] = self._run(self.image.map())
        return extents

    def info(self) -> ImageInfo:
        info: ImageInfo = self._run(self.image.info())
        return info

    def submit_read(self, offset: int, length: int) -> Request:
        return self.image.submit_read(offset, length)

    def submit_write(self, offset: int, data: bytes | bytearray | memoryview | int, *, fua: bool = False,
                     zero: bool = False, unmap: bool = False, compressed: bool = False) -> Request:
        return self.image.submit_write(offset, data, fua=fua, zero=zero, unmap=unmap, compressed=compressed)

    def wait(self, request: Request) -> Any:
        """The request's result, running the event loop until it ends."""
        return self._run(request.wait())

    def breakpoint(self, event: str, tag: str, **kw: Any) -> Breakpoint:
        return self.image.breakpoint(event, tag, **kw)

    def hit(self, bp: Breakpoint, timeout: float | None = None) -> Request | None:
        """``await bp.hit(timeout)``."""
        return self._run(bp.hit(timeout))  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._runner_closed:  # idempotent, as Image.close
            return
        try:
            self._run(self.image.close())
        finally:
            self._runner.close()
            self._runner_closed = True

    def __enter__(self) -> SyncImage:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_sync(filename: str | None = None, fmt: str | None = None,
              options: Mapping[str, Any] | str | None = None, read_only: bool = False, cache: str | None = None,
              *, snapshot: bool = False, force_share: bool = False) -> SyncImage:
    """:func:`open` for code without an event loop: ``with qio.open_sync("t.raw", "raw") as img:``."""
    runner = asyncio.Runner()
    try:
        img = runner.run(_open(filename, fmt, options, read_only, cache, snapshot, force_share))
    except BaseException:
        runner.close()
        raise
    return SyncImage(runner, img)
