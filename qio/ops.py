"""The request-issuing operations: one code path for the shell's commands and the public API.

Each function here issues what one qemu-io command issues (the request, its buffer, its flags, the
order of qemu-io's checks) and returns values or raises the block layer's errors
(:class:`~qio.block.errors.BlockError`, :class:`~qio.block.errors.QemuError`).  Neither parsing nor
rendering happens here: :mod:`qio.commands` parse qemu-io's words and print qemu-io's text,
:mod:`qio.api` takes Python arguments and raises :class:`qio.api.QioError`; both call these functions.

Waiting is the caller's: a synchronous request goes through ``sync(coro, always_poll)``, which is
:meth:`qio.session.Session.sync` for the shell (a standstill resumes the parked requests, as qio's
shell documents) and the API's own wait (a standstill raises).  Asynchronous requests go through
:meth:`qio.aio.AioContext.submit` with the caller's completion callback.

Layer: above the session, below the commands and the API (pyproject.toml ``[tool.importlinter]``).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple

from qio.block.driver import REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK, REQ_WRITE_COMPRESSED, REQ_ZERO_WRITE
from qio.block.errors import BlockError

if TYPE_CHECKING:
    from qio.block.backend import BlockBackend
    from qio.block.blkdebug import BlkdebugDriver
    from qio.block.driver import BlockDriver, BlockInfo
    from qio.session import Session

#: How a caller waits for a synchronous request: ``await sync(coro, always_poll)``, its result.
Sync = Callable[[Coroutine[Any, Any, Any], bool], Awaitable[Any]]
Done = Callable[[BaseException | None, Any], None]
IOVec = list[memoryview]

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
#: The blkdebug rule kinds that can be added at run time (the prompt's ``inject``, ``delay``, ...).
RULE_KINDS = ("inject-error", "set-state", "delay", "corrupt", "bad-blocks")


# -- reads ---------------------------------------------------------------------------------------------
def read_buffer(count: int) -> memoryview:
    """A read buffer as qemu-io allocates it: pre-filled with 0xab (bytes a failed read leaves show)."""
    return memoryview(bytearray(b"\xab") * max(count, 0))


def split_iov(buf: memoryview, sizes: list[int] | tuple[int, ...]) -> IOVec:
    """``buf`` cut into the vector of ``readv``/``aio_read`` (one element per length)."""
    out = []
    pos = 0
    for n in sizes:
        out.append(buf[pos : pos + n])
        pos += n
    return out


def read_request(blk: BlockBackend, offset: int, count: int, iov: IOVec, vmstate: bool = False
                 ) -> Coroutine[Any, Any, None]:
    """``read`` (``-b``: from the VM state area) into ``iov``."""
    if vmstate:
        return blk.load_vmstate(offset, count, iov)
    return blk.preadv(offset, count, iov)


async def read(sync: Sync, blk: BlockBackend, offset: int, count: int, sizes: tuple[int, ...] | None = None,
               vmstate: bool = False, always_poll: bool = False) -> memoryview:
    """``read``/``readv``: the bytes read, in a fresh buffer (split by ``sizes`` as ``readv`` does)."""
    buf = read_buffer(count)
    iov = [buf] if sizes is None else split_iov(buf, sizes)
    await sync(read_request(blk, offset, count, iov, vmstate), always_poll)
    return buf


def submit(session: Session, coro: Coroutine[Any, Any, Any], done: Done) -> None:
    """Any request, asynchronously (``blk_aio_*``): entered now, ``done(exc, result)`` on completion."""
    session.aio.submit(coro, done)


def submit_read(session: Session, blk: BlockBackend, offset: int, count: int, sizes: tuple[int, ...] | None,
                done: Done) -> memoryview:
    """``aio_read``: submit; the buffer the data lands in (valid once ``done`` reported success)."""
    buf = read_buffer(count)
    session.aio.submit(blk.preadv(offset, count, [buf] if sizes is None else split_iov(buf, sizes)), done)
    return buf


# -- writes --------------------------------------------------------------------------------------------
def write_flags(fua: bool = False, unmap: bool = False, no_fallback: bool = False) -> int:
    """The request flags of ``write -f``/``-u``/``-n``."""
    return (REQ_FUA if fua else 0) | (REQ_NO_FALLBACK if no_fallback else 0) | (REQ_MAY_UNMAP if unmap else 0)


def write_conflict(flags: int, zero: bool, compressed: bool, vmstate: bool) -> str | None:
    """qemu-io's message for options of ``write`` that exclude each other (first in its order), or None."""
    if vmstate and zero:
        return "-b and -z cannot be specified at the same time"
    if flags & REQ_FUA and (vmstate or compressed):
        return "-f and -b or -c cannot be specified at the same time"
    if flags & REQ_NO_FALLBACK and not zero:
        return "-n requires -z to be specified"
    if flags & REQ_MAY_UNMAP and not zero:
        return "-u requires -z to be specified"
    return None


def write_request(blk: BlockBackend, offset: int, count: int, iov: IOVec | None, flags: int = 0,
                  zero: bool = False, compressed: bool = False, vmstate: bool = False
                  ) -> Coroutine[Any, Any, None]:
    """The request of ``write`` with qemu-io's precedence: ``-b``, then ``-z``, then ``-c``, then a plain
    write (``iov`` is None for ``-z``)."""
    if vmstate:
        assert iov is not None
        return blk.save_vmstate(offset, count, iov)
    if zero:
        return blk.pwritev(offset, count, None, flags | REQ_ZERO_WRITE)
    return blk.pwritev(offset, count, iov, REQ_WRITE_COMPRESSED if compressed else flags)


async def write(sync: Sync, blk: BlockBackend, offset: int, count: int, iov: IOVec | None, flags: int = 0,
                zero: bool = False, compressed: bool = False, vmstate: bool = False,
                always_poll: bool = False) -> None:
    """``write``/``writev``, waited for."""
    await sync(write_request(blk, offset, count, iov, flags, zero, compressed, vmstate), always_poll)


def submit_write(session: Session, blk: BlockBackend, offset: int, count: int, iov: IOVec | None, flags: int,
                 zero: bool, done: Done) -> None:
    """``aio_write`` (``-z``: ``iov`` None): submit and return; ``done(exc, result)`` on completion."""
    if zero:
        session.aio.submit(blk.pwritev(offset, count, None, flags | REQ_ZERO_WRITE), done)
    elif iov is not None and blk.can_write_inline(offset, count, iov, flags):  # the same request, fewer steps
        session.aio.submit_inline(blk.write_inline, offset, count, iov, flags, done)
    else:
        session.aio.submit(blk.pwritev(offset, count, iov, flags), done)


# -- discard, flush, truncate, length ------------------------------------------------------------------
def discard_request(blk: BlockBackend, offset: int, count: int) -> Coroutine[Any, Any, None]:
    return blk.pdiscard(offset, count)


async def discard(sync: Sync, blk: BlockBackend, offset: int, count: int) -> None:
    await sync(discard_request(blk, offset, count), False)


def submit_discard(session: Session, blk: BlockBackend, offset: int, count: int, done: Done) -> None:
    """``aio_discard`` (qio's): submit and return."""
    session.aio.submit(discard_request(blk, offset, count), done)


async def flush(sync: Sync, blk: BlockBackend) -> None:
    await sync(blk.flush(), False)


async def truncate(sync: Sync, blk: BlockBackend, length: int, prealloc: str = "off") -> None:
    """``truncate [-m PREALLOC] LENGTH`` (``prealloc`` one of :data:`PREALLOC_MODES`)."""
    await sync(blk.truncate(length, prealloc), False)


def length(blk: BlockBackend) -> int:
    """``length``: the image size in bytes."""
    return blk.getlength()


# -- block status ------------------------------------------------------------------------------------
async def is_allocated(sync: Sync, blk: BlockBackend, offset: int, count: int) -> tuple[bool, int]:
    """``bdrv_is_allocated``: the status of the first run of bytes at ``offset`` and its length (0 at
    the end of the image)."""
    status: tuple[bool, int] = await sync(blk.is_allocated(offset, count), False)
    return status


async def allocated_bytes(sync: Sync, blk: BlockBackend, offset: int, count: int) -> tuple[int, int]:
    """``alloc``: allocated bytes among ``count`` at ``offset``, and the count (cut at the image end)."""
    remaining, total = count, 0
    while remaining:
        allocated, n = await is_allocated(sync, blk, offset, remaining)
        offset += n
        remaining -= n
        if allocated:
            total += n
        if n == 0:
            count -= remaining
            remaining = 0
    return total, count


class Extent(NamedTuple):
    """A run of bytes with one allocation status (a line of qemu-io's ``map``)."""

    offset: int
    length: int
    allocated: bool


class UnexpectedEnd(Exception):
    """``map`` found no status for bytes before the image's end (``Unexpected end of image``)."""


async def extents(sync: Sync, blk: BlockBackend, size: int) -> AsyncIterator[Extent]:
    """qemu-io's ``map`` walk over ``size`` bytes: runs of equal allocation status, merged as it merges
    them.  Raises :class:`UnexpectedEnd`, or the ``BlockError`` of a failed status query."""
    offset, remaining = 0, size
    while remaining:
        first, n = await is_allocated(sync, blk, offset, remaining)
        pnum = n
        while remaining - pnum > 0 and n:
            more, n = await is_allocated(sync, blk, offset + pnum, remaining - pnum)
            if more != first or not n:
                break
            pnum += n
        if not pnum:
            raise UnexpectedEnd
        yield Extent(offset, pnum, first)
        offset += pnum
        remaining -= pnum


# -- info ------------------------------------------------------------------------------------------------
class Info(NamedTuple):
    format: str
    protocol: str | None
    info: BlockInfo | None
    specific: list[tuple[str, Any]]


def info(blk: BlockBackend) -> Info:
    """``info``: the root's names, ``bdrv_get_info`` (through filters) and the format-specific items.
    Raises ``BlockError(ENOMEDIUM)`` for a node without a driver, as qemu-io's command fails."""
    root = blk.root
    if not root.has_driver():
        raise BlockError(errno.ENOMEDIUM)
    node = root
    binfo = node.get_info()
    while binfo is None and node.is_filter and node.children:
        node = node.children[0].node
        if not node.has_driver():
            raise BlockError(errno.ENOMEDIUM)
        binfo = node.get_info()
    return Info(root.format_name, root.protocol_name or None, binfo, list(root.get_specific_info() or []))


# -- breakpoints and rules ---------------------------------------------------------------------------------
def debug_node(session: Session) -> BlockDriver | None:
    return session.debug_node()


def set_breakpoint(session: Session, event: str, tag: str,
                   predicate: tuple[int, int, str | None, int] | None = None) -> int:
    """``break EVENT TAG`` (``predicate``: qio's ``-o OFFSET,LEN -i IOTYPE -n NTH``): 0 or -errno."""
    node = session.debug_node()
    if predicate is not None:
        from qio.block.blkdebug import BlkdebugDriver

        if not isinstance(node, BlkdebugDriver):
            return -errno.ENOTSUP
        return int(node.debug_break_if(event, tag, *predicate))
    return node.debug_breakpoint(event, tag) if node is not None else -errno.ENOTSUP


def resume(session: Session, tag: str) -> int:
    """``resume TAG``: the parked request goes on at once, until it next waits; 0 or -errno."""
    node = session.debug_node()
    return node.debug_resume(tag) if node is not None else -errno.ENOTSUP


def remove_breakpoint(session: Session, tag: str) -> int:
    """``remove_break TAG``: delete it and resume what is parked under it; 0 or -errno."""
    node = session.debug_node()
    return node.debug_remove_breakpoint(tag) if node is not None else -errno.ENOTSUP


async def wait_break(session: Session, tag: str, timeout: float | None) -> str:
    """``wait_break``: ``"ok"`` once a request is parked under ``tag``; ``"timeout"`` when a request
    could still get there; ``"unreachable"`` when none can; ``"no-node"`` without blkdebug."""
    node = session.debug_node()
    if node is None:
        return "no-node"
    outcome = await session.wait_for(lambda: node.debug_is_suspended(tag), timeout)
    if outcome == "ok":
        return "ok"
    if outcome == "timeout" and node.debug_can_suspend(tag, bool(session.aio.inflight)):
        return "timeout"
    return "unreachable"


def blkdebug(session: Session) -> BlkdebugDriver | None:
    """The blkdebug node the rule operations edit (None: there is none)."""
    from qio.block.blkdebug import BlkdebugDriver

    node = session.debug_node()
    return node if isinstance(node, BlkdebugDriver) else None


def add_rule(node: BlkdebugDriver, kind: str, words: list[str]) -> Any:
    """A rule as a configuration section ``[KIND]`` with ``KEY=VALUE`` words would add; the rule (its
    ``id``, ``describe()``).  Raises ``QemuError`` with the configuration parser's message."""
    from qio.block.blkdebug_config import make_rule, parse_words

    return node.add_rule(make_rule(kind, parse_words(kind, words)))


def rules(node: BlkdebugDriver) -> list[str]:
    """Every rule and breakpoint, one line each, with its id, conditions and counters."""
    lines: list[str] = node.rule_lines(breakpoints=True)
    return lines


def remove_rule(node: BlkdebugDriver, rule_id: int) -> bool:
    """Delete a rule (or breakpoint) by id; False if there is none."""
    return bool(node.remove_rule(rule_id))
