"""The generic request path every request takes on its way into a node (QEMU's ``block/io.c``).

Drivers call these functions on their children.  They enforce what QEMU's generic layer enforces
(request alignment with read-modify-write, zero-filled reads past the end, FUA emulation by a flush,
write-generation tracking for flush, zero-write fallback, discard policy) and raise the generic
blkdebug events (``pwritev``, ``pwritev_zero``, ``pwritev_done``, ``pwritev_rmw_*``,
``flush_to_os``, ``flush_to_disk``) at the points where QEMU raises them.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from qio.aio import AIO, WaitQueue, current_co
from qio.block.driver import (
    BDRV_MAX_LENGTH,
    BDRV_REQUEST_MAX_BYTES,
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_EOF,
    BLOCK_OFFSET_VALID,
    BLOCK_RAW,
    BLOCK_RECURSE,
    BLOCK_ZERO,
    REQ_FUA,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    REQ_WRITE_COMPRESSED,
    REQ_WRITE_UNCHANGED,
    REQ_ZERO_WRITE,
    SECTOR,
    BlockDriver,
    IOVec,
)
from qio.block.errors import BlockError, QemuError, assert_fail
from qio.block.events import Event
from qio.block.perms import PERM_WRITE, PERM_WRITE_UNCHANGED
from qio.numbers import INT64_MAX, INT_MAX

MAX_BOUNCE = 32768 * 512  # QEMU's MAX_BOUNCE_BUFFER: largest zero-write fallback chunk
MAX_COR_BOUNCE = 32768 * 512  # QEMU's MAX_BOUNCE_BUFFER for copy-on-read




def getlength(node: BlockDriver) -> int:
    """``bdrv_getlength``: the node's length rounded up to whole sectors."""
    n = node.getlength()
    return (n + SECTOR - 1) // SECTOR * SECTOR


# -- iovec helpers -------------------------------------------------------------------------------
def iov_slice(qiov: IOVec, start: int, length: int) -> IOVec:
    out: IOVec = []
    for buf in qiov:
        n = len(buf)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(buf[start : start + take])
        length -= take
        start = 0
        if length <= 0:
            break
    return out


def iov_memset(qiov: IOVec, start: int, length: int, value: int = 0) -> None:
    for buf in iov_slice(qiov, start, length):
        buf[:] = bytes([value]) * len(buf)


def iov_to_bytes(qiov: IOVec) -> bytes:
    return b"".join(qiov)


def iov_from_bytes(qiov: IOVec, start: int, data: bytes | memoryview) -> None:
    pos = 0
    for buf in iov_slice(qiov, start, len(data)):
        buf[:] = data[pos : pos + len(buf)]
        pos += len(buf)


def _iov_is_zero(qiov: IOVec) -> bool:
    """``qemu_iovec_is_zero``."""
    return not any(any(buf) for buf in qiov)


def _check_request(offset: int, nbytes: int) -> None:
    if offset < 0 or nbytes < 0 or offset > BDRV_MAX_LENGTH or nbytes > BDRV_MAX_LENGTH - offset:
        raise BlockError(errno.EIO)


# -- progress of a long synchronous command ------------------------------------------------------
@dataclass(slots=True, eq=False)
class Meter:
    """Bytes of a request on ``node`` that are done: the interactive shell's progress line reads it.

    A request is split into sub-requests by the node's limits (max-transfer, max-pwrite-zeroes,
    max-pdiscard); each one adds its bytes when it completes.  Only the node the command addresses
    counts, so a lower node's own pieces are not counted twice."""

    node: BlockDriver
    done: int = 0


#: The meter of the synchronous command running in this context (set by the interactive shell only).
progress_meter: ContextVar[Meter | None] = ContextVar("progress_meter", default=None)


def _metered(node: BlockDriver) -> Meter | None:
    """The meter that ``node``'s sub-requests add to, if a command on it is being watched."""
    m = progress_meter.get()
    return m if m is not None and m.node is node else None


# -- tracked requests (serialisation of overlapping read-modify-write) ------------------------------
@dataclass(slots=True, eq=False)
class Tracked:
    """An in-flight request on a node.  A read-modify-write request is *serialising*: requests that
    overlap it (its range widened to the alignment) wait for it, and it waits for them, as in QEMU."""

    node: BlockDriver
    offset: int
    end: int
    serialising: bool = False
    #: The coroutine of the request (``BdrvTrackedRequest.co``, for ``bdrv_co_get_self_request``).
    co: object = None
    #: The requests waiting for this one (``wait_queue``), made when the first one waits.
    done: WaitQueue | None = None
    waiting_for: Tracked | None = None


def _tracking(node: BlockDriver) -> bool:
    """Only nodes where requests can overlap in time and need padding (or copy-on-read
    serialisation) pay for the bookkeeping."""
    return AIO.yield_on_io and (node.request_alignment > 1 or node.copy_on_read or node.tracks_all)


def _begin(node: BlockDriver, offset: int, nbytes: int) -> Tracked:
    req = Tracked(node, offset, offset + nbytes, co=current_co())
    node.tracked.append(req)
    return req


def _end(req: Tracked) -> None:
    req.node.tracked.remove(req)
    if req.done is not None:
        req.done.restart_all()  # tracked_request_end: qemu_co_queue_restart_all


async def _wait_serialising(req: Tracked) -> None:
    """``bdrv_wait_serialising_requests``: wait while an overlapping request conflicts with ``req``."""
    while True:
        # Newest first; a request that is itself waiting is skipped: it is (or will be) waiting for us,
        # or for one that is, so waiting for it could only deadlock (bdrv_find_conflicting_request).
        for other in reversed(req.node.tracked):
            if other is req or not (other.serialising or req.serialising):
                continue
            if other.offset < req.end and req.offset < other.end and other.waiting_for is None:
                break
        else:
            return
        if other.done is None:
            other.done = WaitQueue()
        req.waiting_for = other
        try:
            await other.done.wait()
        finally:
            req.waiting_for = None


async def _make_serialising(req: Tracked, align: int) -> None:
    req.serialising = True
    req.offset -= req.offset % align
    req.end += -req.end % align
    await _wait_serialising(req)


async def serialise_to_end(node: BlockDriver) -> None:
    """file-posix's workaround for an XFS bug (``raw_do_pwrite_zeroes``, block/file-posix.c): a zero
    write that reaches past the end of the file extends its own tracked request to
    ``BDRV_MAX_LENGTH`` and makes it serialising, so it waits for the requests in flight beyond its
    start, and every later request there waits for it (fuzz qcow2-writeback-1291: the zero writes
    with which qcow2 allocates clusters at the end of the file run one after another)."""
    co = current_co()
    for req in reversed(node.tracked):
        if req.co is co and co is not None:
            req.end = BDRV_MAX_LENGTH
            await _make_serialising(req, node.request_alignment)
            return


# -- read ----------------------------------------------------------------------------------------
async def preadv(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec) -> None:
    """``bdrv_co_preadv``: read ``nbytes`` at ``offset`` of ``node`` into ``qiov``."""
    _check_request(offset, nbytes)
    _check_padded_niov(node, offset, nbytes, qiov)
    if not _tracking(node):
        await _preadv(node, offset, nbytes, qiov)
        return
    req = _begin(node, offset, nbytes)
    try:
        if not node.copy_on_read:
            await _wait_serialising(req)
        await _preadv(node, offset, nbytes, qiov, req)
    finally:
        _end(req)


IOV_MAX = 1024


def iov_niov(qiov: IOVec, nbytes: int) -> int:
    """Buffers ``qiov_slice`` keeps for the first ``nbytes`` (empty ones before the data are skipped)."""
    if nbytes <= 0:
        return 0
    n = pos = 0
    for buf in qiov:
        if pos == 0 and not len(buf):
            continue
        n += 1
        pos += len(buf)
        if pos >= nbytes:
            break
    return n


def _check_padded_niov(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec) -> None:
    """``bdrv_pad_request``: a padded request's vector (head + data + tail) holds at most IOV_MAX
    buffers (``qemu_iovec_init_extended``), else EINVAL before anything is read or written; a
    vector that is already over it fails the function's assertion."""
    align = node.request_alignment
    head, tail = offset % align, (offset + nbytes) % align
    if not (head or tail) or not nbytes:
        return
    if len(qiov) > IOV_MAX:
        assert_fail("../../util/iov.c:433: qemu_iovec_init_extended", "mid_qiov->niov <= IOV_MAX")
    if (head > 0) + iov_niov(qiov, nbytes) + (tail > 0) > IOV_MAX:
        raise BlockError(errno.EINVAL)


async def _preadv(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec, req: Tracked | None = None) -> None:
    align = node.request_alignment
    head = offset % align
    tail = (offset + nbytes) % align
    if (head == 0 and tail == 0) or (nbytes == 0):
        if nbytes == 0 and head:
            return
        await _aligned_preadv(node, offset, nbytes, qiov, align, req)
        return
    start = offset - head
    total = head + nbytes + ((align - tail) % align)
    bounce = memoryview(bytearray(total))
    # QEMU reads into head padding + the caller's own buffers + tail padding: bytes a driver leaves
    # untouched (null-co without read-zeroes) keep the caller's content.
    pos = head
    for buf in iov_slice(qiov, 0, nbytes):
        bounce[pos : pos + len(buf)] = buf
        pos += len(buf)
    await _aligned_preadv(node, start, total, [bounce], align, req)
    iov_from_bytes(qiov, 0, bounce[head : head + nbytes])


async def _aligned_preadv(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec, align: int,
                          req: Tracked | None = None) -> None:
    if node.copy_on_read and nbytes:
        # The read and the copy must be atomic against writes touching the same clusters.
        if req is not None:
            await _make_serialising(req, _info_cluster_size(node) or align)
        allocated, pnum = await is_allocated(node, offset, nbytes)
        if not allocated or pnum != nbytes:
            await _copy_on_readv(node, offset, nbytes, qiov)
            return
    total = getlength(node)
    max_bytes = -(-max(0, total - offset) // align) * align
    max_transfer = min(node.max_transfer or INT_MAX, INT_MAX) // align * align
    if nbytes <= max_bytes and nbytes <= max_transfer:
        await node.co_preadv(offset, nbytes, qiov)
        return
    # bdrv_aligned_preadv: fragments of max_transfer up to the end of the node, zeroes past it
    done = 0
    meter = _metered(node)
    while done < nbytes:
        if max_bytes:
            num = min(nbytes - done, max_bytes, max_transfer)
            await node.co_preadv(offset + done, num, iov_slice(qiov, done, num))
            max_bytes -= num
        else:
            num = nbytes - done
            iov_memset(qiov, done, num)
        done += num
        if meter is not None:
            meter.done += num


def _info_cluster_size(node: BlockDriver) -> int:
    """``bdrv_get_info``'s cluster size (a filter answers for its child), 0 where there is none."""
    info = node.get_info()
    while info is None and node.is_filter and node.primary_child() is not None:
        node = node.primary_child()  # type: ignore[assignment]
        info = node.get_info()
    return info.cluster_size if info is not None else 0


async def _copy_on_readv(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec) -> None:
    """``bdrv_co_do_copy_on_readv``: read whole clusters that this node does not have (from its backing
    chain) and write them into the node, so later reads no longer go to the backing file."""
    cs = _info_cluster_size(node)
    start = offset - offset % cs if cs else offset
    remaining = (-(-(offset + nbytes) // cs) * cs if cs else offset + nbytes) - start
    skip = offset - start
    max_transfer = min(node.max_transfer or BDRV_REQUEST_MAX_BYTES, BDRV_REQUEST_MAX_BYTES)
    zero_capable = type(node).co_pwrite_zeroes is not BlockDriver.co_pwrite_zeroes
    progress = 0
    bounce: memoryview | None = None
    while remaining:
        try:
            allocated, pnum = await is_allocated(node, start, min(remaining, max_transfer))
        except BlockError:  # treated as unallocated: the read below reports the real error
            allocated, pnum = False, min(remaining, max_transfer)
        else:
            if not allocated and pnum == 0:  # the image ends inside the last cluster
                break
        n = min(pnum - skip, nbytes - progress)
        if not allocated:
            pnum = min(pnum, MAX_COR_BOUNCE)
            n = min(pnum - skip, nbytes - progress)
            if bounce is None or len(bounce) < pnum:
                bounce = memoryview(bytearray(pnum))
            data = bounce[:pnum]
            await node.co_preadv(start, pnum, [data])
            await node.debug_event(Event.COR_WRITE)
            if zero_capable and not any(data):
                await _do_pwrite_zeroes(node, start, pnum, REQ_WRITE_UNCHANGED)
            else:  # unchanged data: no flush needed even in write-through mode
                await _driver_pwritev(node, start, pnum, [data], REQ_WRITE_UNCHANGED)
            if n > 0:
                iov_from_bytes(qiov, progress, data[skip : skip + n])
        elif n > 0:
            await node.co_preadv(offset + progress, n, iov_slice(qiov, progress, n))
        start += pnum
        remaining -= pnum
        progress += pnum - skip
        skip = 0


# -- write ---------------------------------------------------------------------------------------
async def pwritev(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec | None, flags: int = 0) -> None:
    """``bdrv_co_pwritev``; ``qiov`` is None for zero writes (``REQ_ZERO_WRITE``)."""
    _check_request(offset, nbytes)
    if flags & REQ_NO_FALLBACK and (offset | nbytes) % node.request_alignment:
        raise BlockError(errno.ENOTSUP)  # a misaligned request cannot be made efficient
    if node.read_only:
        raise BlockError(errno.EPERM)
    if flags & REQ_WRITE_COMPRESSED and not node.can_compress:
        raise BlockError(errno.ENOTSUP)
    if node.request_alignment == 1:  # nothing to pad (the common case: skip the padding machinery)
        if not _tracking(node):
            await _aligned_pwritev(node, offset, nbytes, qiov, flags)
            return
    elif qiov is not None:
        _check_padded_niov(node, offset, nbytes, qiov)
    if not _tracking(node):
        await _pwritev(node, offset, nbytes, qiov, flags, None)
        return
    req = _begin(node, offset, nbytes)
    try:
        await _pwritev(node, offset, nbytes, qiov, flags, req)
    finally:
        _end(req)


def can_pwritev_inline(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec | None, flags: int) -> bool:
    """Whether :func:`pwritev` of this request would do nothing but hand it to the driver and count it
    (no check can fail, no padding, tracking, zero detection, debug event, splitting or FUA flush),
    and the driver can do its write inline (:meth:`BlockDriver.can_write_inline`): then
    :func:`pwritev_inline` does the same steps without a coroutine per layer.  A pure test."""
    return (qiov is not None and type(node).can_write_inline is not BlockDriver.can_write_inline  # qcow2: no
            and node.request_alignment == 1 and not node.read_only
            and not node.has_debug_hooks and node.detect_zeroes == "off"
            and not flags & (REQ_ZERO_WRITE | REQ_WRITE_COMPRESSED)
            and (not flags & REQ_FUA or bool(node.supported_write_flags & REQ_FUA))
            and 0 <= offset <= BDRV_MAX_LENGTH and 0 <= nbytes <= BDRV_MAX_LENGTH - offset
            and nbytes <= INT_MAX and (not node.max_transfer or nbytes <= node.max_transfer)
            and not (AIO.yield_on_io and node.copy_on_read)
            and node.can_write_inline(offset, nbytes, qiov, flags & node.supported_write_flags))


def pwritev_inline(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
    """:func:`pwritev` of a request :func:`can_pwritev_inline` accepted: the driver's write, then the
    write generation (counted even when the write fails) and the node's growth."""
    _counted_inline(node, offset + nbytes, node.write_inline, offset, nbytes, qiov, flags & node.supported_write_flags)


def _counted_inline(node: BlockDriver, end: int, write: Callable[..., None], *args: Any) -> None:
    """A driver's inline write or zero write, then what the generic path does after it: the write
    generation (counted even when it fails) and the node's growth to ``end``."""
    try:
        write(*args)
    except BlockError:
        node.gen.write_gen += 1
        raise
    node.gen.write_gen += 1
    node.grow_to(end)


async def _pwritev(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec | None, flags: int,
                   req: Tracked | None) -> None:
    align = node.request_alignment
    head = offset % align
    tail = -(offset + nbytes) % align
    if head == 0 and tail == 0:
        if req is not None:
            await _wait_serialising(req)
        await _aligned_pwritev(node, offset, nbytes, qiov, flags)
        return
    if nbytes == 0:
        return
    if req is not None:
        await _make_serialising(req, align)
    # Read-modify-write of the partial head and tail blocks (bdrv_init_padding/bdrv_padding_rmw_read).
    zero = bool(flags & REQ_ZERO_WRITE)
    start = offset - head
    total = head + nbytes + tail
    buf_len = 2 * align if (total > align and head and tail) else align
    merge = total == buf_len
    buf = memoryview(bytearray(buf_len))
    try:
        await _padding_rmw_read(node, start, total, buf, head, tail, merge)
    except BlockError:
        pass  # bdrv_co_pwritev_part drops bdrv_padding_rmw_read's result: the write goes on with what it has
    if not zero:
        assert qiov is not None
        parts: IOVec = [buf[:head]] if head else []
        parts += qiov
        if tail:
            parts.append(buf[buf_len - tail :])
        await _aligned_pwritev(node, start, total, [p for p in parts if len(p)], flags)
        return
    # Zero writes: head block (as data), the aligned middle (as zeroes), tail block (as data).
    wflags = flags & ~REQ_ZERO_WRITE
    end = offset + nbytes
    if head or merge:
        n = buf_len if merge else align
        buf[head : min(n, head + nbytes)] = bytes(min(n, head + nbytes) - head)
        await _aligned_pwritev(node, start, n, [buf[:n]], wflags)
        if merge:
            return
        offset = start + n
    middle_end = end - (end % align if tail else 0)
    if middle_end > offset:
        await _aligned_pwritev(node, offset, middle_end - offset, None, flags)
    if tail:
        tail_buf = buf[buf_len - align :]
        tail_buf[: end - middle_end] = bytes(end - middle_end)
        await _aligned_pwritev(node, middle_end, align, [tail_buf], wflags)


async def _padding_rmw_read(node: BlockDriver, start: int, total: int, buf: memoryview, head: int, tail: int,
                            merge: bool) -> None:
    align = node.request_alignment
    hooks = node.has_debug_hooks
    if head or merge:
        n = len(buf) if merge else align
        if hooks and head:
            await node.debug_event(Event.PWRITEV_RMW_HEAD)
        if hooks and merge and tail:
            await node.debug_event(Event.PWRITEV_RMW_TAIL)
        await _aligned_preadv(node, start, n, [buf[:n]], align)
        if hooks and head:
            await node.debug_event(Event.PWRITEV_RMW_AFTER_HEAD)
        if hooks and merge and tail:
            await node.debug_event(Event.PWRITEV_RMW_AFTER_TAIL)
        if merge:
            return
    if tail:
        if hooks:
            await node.debug_event(Event.PWRITEV_RMW_TAIL)
        await _aligned_preadv(node, start + total - align, align, [buf[len(buf) - align :]], align)
        if hooks:
            await node.debug_event(Event.PWRITEV_RMW_AFTER_TAIL)


async def _aligned_pwritev(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec | None,
                           flags: int) -> None:
    err: BlockError | None = None
    if node.detect_zeroes != "off" and not flags & REQ_ZERO_WRITE and qiov is not None \
            and type(node).co_pwrite_zeroes is not BlockDriver.co_pwrite_zeroes and _iov_is_zero(qiov):
        # detect-zeroes: a buffer of zeroes becomes a zero write (unmapping with detect-zeroes=unmap)
        flags |= REQ_ZERO_WRITE | (REQ_MAY_UNMAP if node.detect_zeroes == "unmap" else 0)
    if flags & REQ_ZERO_WRITE:
        if node.has_debug_hooks:
            await node.debug_event(Event.PWRITEV_ZERO)
        try:
            await _do_pwrite_zeroes(node, offset, nbytes, flags)
        except BlockError as e:
            err = e
    elif flags & REQ_WRITE_COMPRESSED:
        try:
            assert qiov is not None
            await node.co_pwritev(offset, nbytes, qiov, flags)
        except BlockError as e:
            err = e
    else:
        if node.has_debug_hooks:
            await node.debug_event(Event.PWRITEV)
        try:
            assert qiov is not None
            await _driver_pwritev_split(node, offset, nbytes, qiov, flags)
        except BlockError as e:
            err = e
    if node.has_debug_hooks:
        await node.debug_event(Event.PWRITEV_DONE)
    node.gen.write_gen += 1
    if err is not None:
        raise err
    node.grow_to(offset + nbytes)


def _driver_pwritev_split(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec,
                          flags: int) -> Coroutine[Any, Any, None]:
    """``bdrv_aligned_pwritev``'s fragmenting: chunks of ``max_transfer`` (aligned down to the request
    alignment); an emulated FUA is kept for the last chunk only, a native one goes with every chunk.

    Like :func:`_driver_pwritev`, not a coroutine itself: it returns the one to await, so that a
    request that needs neither splitting nor a FUA flush awaits the driver directly (every frame on
    the way costs, for each request and each node)."""
    align = node.request_alignment
    mt = min(node.max_transfer or INT_MAX, INT_MAX) // align * align
    if nbytes <= mt:
        return _driver_pwritev(node, offset, nbytes, qiov, flags)
    return _driver_pwritev_chunks(node, offset, nbytes, qiov, flags, mt)


async def _driver_pwritev_chunks(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec, flags: int,
                                 mt: int) -> None:
    done = 0
    meter = _metered(node)
    while done < nbytes:
        n = min(mt, nbytes - done)
        f = flags
        if done + n < nbytes and flags & REQ_FUA and not node.supported_write_flags & REQ_FUA:
            f &= ~REQ_FUA
        await _driver_pwritev(node, offset + done, n, iov_slice(qiov, done, n), f)
        done += n
        if meter is not None:
            meter.done += n


def _driver_pwritev(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec,
                    flags: int) -> Coroutine[Any, Any, None]:
    """``bdrv_driver_pwritev``: the driver's write, then a flush when it cannot do FUA itself (returns
    the coroutine to await: without FUA that is the driver's own)."""
    if flags & REQ_FUA and not node.supported_write_flags & REQ_FUA:
        return _driver_pwritev_fua(node, offset, nbytes, qiov, flags)
    return node.co_pwritev(offset, nbytes, qiov, flags & node.supported_write_flags)


async def _driver_pwritev_fua(node: BlockDriver, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
    await node.co_pwritev(offset, nbytes, qiov, flags & node.supported_write_flags)
    await flush(node)


async def _do_pwrite_zeroes(node: BlockDriver, offset: int, nbytes: int, flags: int) -> None:
    """``bdrv_co_do_pwrite_zeroes``: aligned chunks to the driver, falling back to writing zeroes."""
    if flags & ~node.supported_zero_flags & REQ_NO_FALLBACK:
        raise BlockError(errno.ENOTSUP)  # the node cannot promise a fast zero write (e.g. qcow2 v2)
    alignment = max(node.pwrite_zeroes_alignment, node.request_alignment)
    max_zero = min(node.max_pwrite_zeroes or INT64_MAX, INT64_MAX) // alignment * alignment
    max_transfer = min(node.max_transfer or MAX_BOUNCE, MAX_BOUNCE)  # not aligned, as in QEMU
    need_flush = False
    head = offset % alignment
    tail = (offset + nbytes) % alignment
    zeros: memoryview | None = None
    meter = _metered(node)
    while nbytes > 0:
        num = nbytes
        if head:
            num = min(nbytes, max_transfer, alignment - head)
            head = (head + num) % alignment
        elif tail and num > alignment:
            num -= tail
        num = min(num, max_zero)
        try:
            await node.co_pwrite_zeroes(offset, num, flags & node.supported_zero_flags)
        except BlockError as e:
            if e.code != errno.ENOTSUP:
                raise
            if flags & REQ_NO_FALLBACK:
                raise
            write_flags = flags & ~REQ_ZERO_WRITE
            if flags & REQ_FUA and not node.supported_write_flags & REQ_FUA:
                write_flags &= ~REQ_FUA  # one flush at the end instead of one per chunk
                need_flush = True
            num = min(num, max_transfer)
            if zeros is None or len(zeros) < num:
                zeros = memoryview(bytes(num))
            await _driver_pwritev(node, offset, num, [zeros[:num]], write_flags & ~REQ_NO_FALLBACK)
        else:
            if flags & REQ_FUA and not node.supported_zero_flags & REQ_FUA:
                need_flush = True
        offset += num
        nbytes -= num
        if meter is not None:
            meter.done += num
    if need_flush:
        await flush(node)


async def pwrite_zeroes(node: BlockDriver, offset: int, nbytes: int, flags: int = 0) -> None:
    await pwritev(node, offset, nbytes, None, flags | REQ_ZERO_WRITE)


def can_pwrite_zeroes_inline(node: BlockDriver, offset: int, nbytes: int, flags: int) -> bool:
    """Whether :func:`pwrite_zeroes` of this request (``REQ_NO_FALLBACK``, no FUA) would pass the checks
    and hand one chunk to the driver (no padding, tracking, debug event, meter or splitting), and the
    driver can do it inline (:meth:`BlockDriver.can_zero_inline`): then :func:`pwrite_zeroes_inline`
    does the same steps without a coroutine per layer.  A pure test."""
    return (flags & REQ_NO_FALLBACK != 0 and not flags & (REQ_FUA | REQ_WRITE_COMPRESSED)
            and node.request_alignment == 1 and node.pwrite_zeroes_alignment <= 1
            and not node.read_only and not node.has_debug_hooks
            and not flags & ~node.supported_zero_flags & REQ_NO_FALLBACK
            and 0 <= offset <= BDRV_MAX_LENGTH and 0 < nbytes <= BDRV_MAX_LENGTH - offset
            and nbytes <= min(node.max_pwrite_zeroes or INT64_MAX, INT64_MAX)
            and not (AIO.yield_on_io and node.copy_on_read) and _metered(node) is None
            and node.can_zero_inline(offset, nbytes, flags & node.supported_zero_flags))


def pwrite_zeroes_inline(node: BlockDriver, offset: int, nbytes: int, flags: int) -> None:
    """:func:`pwrite_zeroes` of a request :func:`can_pwrite_zeroes_inline` accepted: the driver's zero
    write, then the write generation (counted even when it fails) and the node's growth."""
    _counted_inline(node, offset + nbytes, node.zero_inline, offset, nbytes, flags & node.supported_zero_flags)


# -- discard, flush, truncate, status -----------------------------------------------------------
async def pdiscard(node: BlockDriver, offset: int, nbytes: int) -> None:
    """``bdrv_co_pdiscard``: advisory; silently a no-op where unsupported or with discard=ignore."""
    _check_request(offset, nbytes)
    if node.read_only:
        raise BlockError(errno.EPERM)
    if not node.flags.unmap:
        return
    # Discard is advisory, but the driver decides what an unaligned piece means (qcow2 frees the partial
    # last cluster of an unaligned image, a file punches exactly the bytes asked for): everything is passed
    # down, cut at the alignment boundaries as bdrv_co_pdiscard cuts it.
    ralign = node.request_alignment
    align = max(ralign, node.pdiscard_alignment)
    head = offset % align
    tail = (offset + nbytes) % align
    max_pdiscard = (node.max_pdiscard or INT64_MAX) // align * align
    # A tracked request (BDRV_TRACKED_DISCARD) that waits for overlapping serialising ones, i.e. a
    # read-modify-write in progress, before it reaches the driver (bdrv_co_write_req_prepare).
    req = _begin(node, offset, nbytes) if _tracking(node) else None
    try:
        if req is not None:
            await _wait_serialising(req)
        meter = _metered(node)
        while nbytes > 0:
            num = nbytes
            if head:
                num = min(nbytes, align - head)
                if num % ralign:
                    num %= ralign
                head = (head + num) % align
            elif tail:
                if num > align:
                    num -= tail
                elif tail % ralign and tail > ralign:
                    tail %= ralign
                    num -= tail
            num = min(num, max_pdiscard)
            try:
                await node.co_pdiscard(offset, num)
            except BlockError as e:
                if e.code != errno.ENOTSUP:
                    raise
            offset += num
            nbytes -= num
            if meter is not None:
                meter.done += num
    finally:
        node.gen.write_gen += 1
        if req is not None:
            _end(req)


async def flush(node: BlockDriver) -> None:
    """``bdrv_co_flush``: write back to the OS, then to the disk if written since, then children.

    Flushes of one node are serialised: a flush waits while another is in progress on the node
    (``active_flush_req``/``flush_queue``), and the write generation it will mark clean is the one
    from before it waited."""
    if node.read_only:
        return
    st = node.gen
    current = st.write_gen
    while st.flush_active and current_co() is not None:
        await st.flush_waiters().wait()
    st.flush_active = True
    try:
        await _flush_locked(node, current)
    finally:
        st.flush_active = False
        if st.flush_queue is not None:
            st.flush_queue.next()


async def _flush_locked(node: BlockDriver, current: int) -> None:
    primary = node.primary_child()
    if node.has_co_flush:
        # blkdebug's flush is QEMU's bdrv_co_flush_to_disk; its flush events go to its own child,
        # which has no debug hooks.
        if not node.flags.no_flush and node.gen.flushed_gen != current:
            await node.co_flush()
    else:
        if primary is not None and primary.has_debug_hooks:
            await primary.debug_event(Event.FLUSH_TO_OS)
        await node.co_flush_to_os()
        if not node.flags.no_flush and node.gen.flushed_gen != current:
            if primary is not None and primary.has_debug_hooks:
                await primary.debug_event(Event.FLUSH_TO_DISK)
            if await node.co_flush_to_disk():
                current = node.gen.flushed_gen  # deferred: a later flush must still sync
    first: BlockError | None = None
    for c in node.children:
        if c.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED):
            try:
                await flush(c.node)
            except BlockError as e:
                first = first or e
    if first is not None:
        raise first
    node.gen.flushed_gen = current


async def truncate(node: BlockDriver, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
    """``bdrv_co_truncate``; failures are QemuError with QEMU's message.

    Growing a node whose backing file reaches past the old end adds ``REQ_ZERO_WRITE``: the driver must
    make the new area read as zeroes, else the backing file's bytes would show through it."""
    if offset < 0:
        raise QemuError("Image size cannot be negative", errno.EINVAL)
    if offset > BDRV_MAX_LENGTH:
        raise QemuError(f"offset({offset}) exceeds maximum({BDRV_MAX_LENGTH})", errno.EIO)
    old_size = getlength(node)
    if node.read_only:
        raise QemuError("Image is read-only", errno.EACCES)
    backing = node.child("backing")
    if offset > old_size and backing is not None and getlength(backing.node) > old_size:
        flags |= REQ_ZERO_WRITE
    await node.co_truncate(offset, exact, prealloc, flags)
    node.gen.write_gen += 1


async def block_status(node: BlockDriver, offset: int, nbytes: int) -> tuple[int, int]:
    """``bdrv_co_block_status`` of one node, clamped to its length: ``(BLOCK_* flags, pnum)``."""
    total = getlength(node)
    if offset >= total:
        return 0, 0
    status, pnum = await node.co_block_status(offset, min(nbytes, total - offset))
    return status, min(pnum, nbytes, total - offset)


async def is_allocated(node: BlockDriver, offset: int, nbytes: int) -> tuple[bool, int]:
    """``bdrv_is_allocated`` of the top layer: ``(allocated, pnum)``; pnum 0 at or past the end."""
    total = getlength(node)
    if offset >= total:
        return False, 0
    nbytes = min(nbytes, total - offset)
    status, pnum = await node.co_block_status(offset, nbytes)
    return bool(status & BLOCK_ALLOCATED), min(pnum, nbytes)


async def co_block_status(node: BlockDriver, want_zero: bool, offset: int,
                          nbytes: int) -> tuple[int, int, int, BlockDriver | None]:
    """``bdrv_co_block_status`` of one node: ``(BLOCK_* flags, pnum, host offset, file node)``.

    The one walk of the block layer: the driver answers for its own layer (``co_block_status_map``),
    a raw or filter node hands the range to its child, and this adds what QEMU's generic code adds
    (ALLOCATED, ZERO past a short backing file, the file's zeroes under preallocated metadata, EOF)."""
    total = getlength(node)
    if offset >= total:
        return BLOCK_EOF, 0, 0, None
    if not nbytes:
        return 0, 0, 0, None
    nbytes = min(nbytes, total - offset)
    ret, pnum, mapped, file = await node.co_block_status_map(want_zero, offset, nbytes)
    if ret & BLOCK_RAW:
        assert file is not None
        ret, pnum, mapped, file = await co_block_status(file, want_zero, mapped, pnum)
    else:
        if ret & (BLOCK_DATA | BLOCK_ZERO):
            ret |= BLOCK_ALLOCATED
        elif node.supports_backing and (node.backing is None or
                                        (want_zero and offset >= getlength(node.backing))):
            ret |= BLOCK_ZERO
        if want_zero and ret & BLOCK_RECURSE and ret & BLOCK_DATA and not ret & BLOCK_ZERO and \
                ret & BLOCK_OFFSET_VALID and file is not None:
            ret2, file_pnum, _, _ = await co_block_status(file, True, mapped, pnum)
            if ret2 & BLOCK_EOF and (not file_pnum or ret2 & BLOCK_ZERO):
                ret |= BLOCK_ZERO
            else:
                pnum = file_pnum
                ret |= ret2 & BLOCK_ZERO
        ret &= ~BLOCK_RECURSE
    if offset + pnum == total:
        ret |= BLOCK_EOF
    return ret, pnum, mapped, file


async def block_status_above(bs: BlockDriver, want_zero: bool, offset: int, nbytes: int) -> tuple[int, int]:
    """``bdrv_co_common_block_status_above`` down the whole backing chain: ``(BLOCK_* flags, pnum)``."""
    ret, pnum, _, _ = await co_block_status(bs, want_zero, offset, nbytes)
    if pnum == 0 or ret & BLOCK_ALLOCATED:
        return ret, pnum
    eof = offset + pnum if ret & BLOCK_EOF else None
    nbytes = pnum
    p = bs.backing
    while p is not None:
        ret, pnum, _, _ = await co_block_status(p, want_zero, offset, nbytes)
        if pnum == 0:
            pnum = nbytes
            ret = BLOCK_ZERO | BLOCK_ALLOCATED
            break
        if ret & BLOCK_ALLOCATED:
            ret &= ~BLOCK_EOF
            break
        nbytes = pnum
        p = p.backing
    if eof is not None and offset + pnum == eof:
        ret |= BLOCK_EOF
    return ret, pnum


def allocated_file_size(node: BlockDriver) -> int | None:
    """``bdrv_get_allocated_file_size``: bytes the image takes on the host; None where QEMU fails."""
    return node.get_allocated_file_size()
