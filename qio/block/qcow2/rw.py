"""The request paths of qcow2.c: reads, writes, zero writes, discards, block status, flush, VM state."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qio.aio import AIO, TaskPool
from qio.block import io
from qio.block.driver import (
    BDRV_MAX_LENGTH,
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_RECURSE,
    BLOCK_ZERO,
    REQ_NO_FALLBACK,
    REQ_ZERO_WRITE,
    BlockDriver,
    IOVec,
)
from qio.block.errors import BlockError
from qio.block.events import Event
from qio.block.qcow2 import crypt
from qio.block.qcow2 import layout as L
from qio.block.qcow2.cluster import (
    alloc_host_offset,
    cluster_discard,
    empty_cached_entry,
    get_host_offset,
    handle_l2meta,
    link_l2_now,
    subcluster_zeroize,
)
from qio.block.qcow2.compress import _preadv_compressed
from qio.block.qcow2.overlap import overlap_no_io, pre_write_overlap_check
from qio.block.qcow2.refcount import alloc_cluster_now, alloc_clusters, get_refcount, write_caches
from qio.block.qcow2.state import (
    DISCARD_REQUEST,
    INT64_MAX,
    INT_MAX,
    L2Meta,
    Qcow2State,
    _check_usable,
    _event,
    _length,
    _round_up,
    _task_pool,
    size_to_clusters,
    vm_state_offset,
)

if TYPE_CHECKING:
    pass



async def co_pwrite_zeroes(s: Qcow2State, offset: int, nbytes: int, flags: int) -> None:
    _check_usable(s)
    cs = s.subcluster_size  # the zero-write granularity: a cluster, or a subcluster
    head = offset & (cs - 1)
    tail = _round_up(offset + nbytes, cs) - (offset + nbytes)
    if offset + nbytes == _length(s):
        tail = 0
    if head or tail:
        if not (await _is_zero(s, offset - head, head) and await _is_zero(s, offset + nbytes, tail)):
            raise BlockError(errno.ENOTSUP)
        await s.lock.lock()
        offset -= head
        nbytes = cs
        try:
            _, _, ctype = await get_host_offset(s, offset, cs)
        except BaseException:
            s.lock.unlock()
            raise
        if ctype not in (L.CLUSTER_UNALLOCATED, L.CLUSTER_ZERO_PLAIN, L.CLUSTER_ZERO_ALLOC,
                         L.CLUSTER_UNALLOCATED_ALLOC):
            s.lock.unlock()
            raise BlockError(errno.ENOTSUP)
    else:
        await s.lock.lock()
    try:
        await subcluster_zeroize(s, offset, nbytes, flags)
    finally:
        s.lock.unlock()


async def co_pdiscard(s: Qcow2State, offset: int, nbytes: int) -> None:
    _check_usable(s)
    cs = s.cluster_size
    if s.qcow_version < 3 and s.bs.backing is not None:
        raise BlockError(errno.ENOTSUP)
    if (offset | nbytes) & (cs - 1) and (offset & (cs - 1) or offset + nbytes != _length(s)):
        raise BlockError(errno.ENOTSUP)
    await s.lock.lock()
    try:
        await cluster_discard(s, offset, nbytes, DISCARD_REQUEST, False)
    finally:
        s.lock.unlock()


async def _preadv_part(s: Qcow2State, offset: int, nbytes: int, qiov: IOVec) -> None:
    """``qcow2_co_preadv_part``; with blkdebug the parts run in parallel (``_task_pool``)."""
    qoff = 0
    pool: TaskPool | None = None
    try:
        while nbytes and (pool is None or pool.status is None):
            cur = min(nbytes, INT_MAX)
            if s.crypto is not None:
                cur = min(cur, crypt.MAX_CRYPT_CLUSTERS * s.cluster_size)
            await s.lock.lock()
            try:
                cur, host, ctype = await get_host_offset(s, offset, cur)
            finally:
                s.lock.unlock()
            if ctype == L.CLUSTER_UNALLOCATED_ALLOC:
                ctype = L.CLUSTER_UNALLOCATED  # reads as an unallocated cluster
            if ctype in (L.CLUSTER_ZERO_PLAIN, L.CLUSTER_ZERO_ALLOC) or \
                    (ctype == L.CLUSTER_UNALLOCATED and s.bs.backing is None):
                io.iov_memset(qiov, qoff, cur)
            else:
                pool = pool or _task_pool(cur != nbytes)
                task = _preadv_task(s, ctype, host, offset, cur, io.iov_slice(qiov, qoff, cur))
                await (pool.start(task) if pool is not None else task)
            nbytes -= cur
            offset += cur
            qoff += cur
    finally:
        if pool is not None:
            await pool.wait_all()
    if pool is not None and pool.status is not None:
        raise pool.status


async def _preadv_task(s: Qcow2State, ctype: int, host: int, offset: int, nbytes: int, qiov: IOVec) -> None:
    if ctype == L.CLUSTER_UNALLOCATED:
        assert s.bs.backing is not None
        await _event(s, Event.READ_BACKING_AIO)
        await io.preadv(s.bs.backing, offset, nbytes, qiov)
    elif ctype == L.CLUSTER_COMPRESSED:
        await _preadv_compressed(s, host, offset, nbytes, qiov)
    elif s.crypto is not None:
        await _preadv_encrypted(s, host, offset, nbytes, qiov)
    else:
        await _event(s, Event.READ_AIO)
        await io.preadv(s.data_file, host, nbytes, qiov)


async def _preadv_encrypted(s: Qcow2State, host: int, offset: int, nbytes: int, qiov: IOVec) -> None:
    """``qcow2_co_preadv_encrypted``: read into a bounce buffer, decrypt, copy out."""
    buf = bytearray(nbytes)
    await _event(s, Event.READ_AIO)
    await io.preadv(s.data_file, host, nbytes, [memoryview(buf)])
    crypt.decrypt(s, host, offset, buf)
    io.iov_from_bytes(qiov, 0, memoryview(buf))


async def _pwritev_part(s: Qcow2State, offset: int, nbytes: int, qiov: IOVec) -> None:
    """``qcow2_co_pwritev_part``; with blkdebug the parts run in parallel (``_task_pool``)."""
    ci = _new_cluster_write(s, offset, nbytes)
    if ci >= 0:
        await _pwritev_new_cluster(s, ci, offset, nbytes, qiov)
        return
    qoff = 0
    pool: TaskPool | None = None
    try:
        while nbytes and (pool is None or pool.status is None):
            metas: list[L2Meta] = []
            cur = min(nbytes, INT_MAX)
            if s.crypto is not None:
                cur = min(cur, crypt.MAX_CRYPT_CLUSTERS * s.cluster_size - (offset & (s.cluster_size - 1)))
            await s.lock.lock()
            try:
                cur, host = await alloc_host_offset(s, offset, cur, metas)
                await pre_write_overlap_check(s, 0, host, cur, True)
            except BaseException:
                await _abort_locked(s, metas)
                raise
            s.lock.unlock()
            pool = pool or _task_pool(cur != nbytes)
            task = _pwritev_task(s, host, offset, cur, io.iov_slice(qiov, qoff, cur), metas)
            await (pool.start(task) if pool is not None else task)
            nbytes -= cur
            offset += cur
            qoff += cur
        if AIO.yield_on_io:
            await s.lock.lock()  # QEMU takes the lock once more to drop an unused l2meta
            s.lock.unlock()
    finally:
        if pool is not None:
            await pool.wait_all()
    if pool is not None and pool.status is not None:
        raise pool.status


async def _pwritev_task(s: Qcow2State, host: int, offset: int, nbytes: int, qiov: IOVec, metas: list[L2Meta]) -> None:
    """``qcow2_co_pwritev_task``: data (merged with the COW when possible), then the L2 update."""
    try:
        if s.crypto is not None:
            cbuf = bytearray(io.iov_to_bytes(qiov))
            crypt.encrypt(s, host, offset, cbuf)
            qiov = [memoryview(cbuf)]
        await _handle_alloc_space(s, metas)
        await _write_data(s, host, offset, nbytes, qiov, metas)
    except BaseException:
        await _abort_metas(s, metas)
        raise
    await s.lock.lock()
    await _link_metas(s, metas)


async def _write_data(s: Qcow2State, host: int, offset: int, nbytes: int, qiov: IOVec, metas: list[L2Meta]) -> None:
    """The guest data, unless the COW of an allocation takes it along."""
    if not _merge_cow(offset, nbytes, qiov, metas):
        if s.bs.file.has_debug_hooks:
            await _event(s, Event.WRITE_AIO)
        data = s.data_file
        if io.can_pwritev_inline(data, host, nbytes, qiov, 0):
            io.pwritev_inline(data, host, nbytes, qiov, 0)  # the same steps, no coroutine per layer
        else:
            await io.pwritev(data, host, nbytes, qiov)


async def _abort_metas(s: Qcow2State, metas: list[L2Meta]) -> None:
    await s.lock.lock()
    await _abort_locked(s, metas)


async def _abort_locked(s: Qcow2State, metas: list[L2Meta]) -> None:
    """Undo the allocations of a failed request (the lock held), then unlock."""
    try:
        await handle_l2meta(s, metas, False)
    finally:
        s.lock.unlock()


async def _link_metas(s: Qcow2State, metas: list[L2Meta]) -> None:
    """The L2 update of a written request (the lock taken), then unlock."""
    try:
        try:
            await handle_l2meta(s, metas, True)
        except BaseException:
            await handle_l2meta(s, metas, False)
            raise
    finally:
        s.lock.unlock()


def _new_cluster_write(s: Qcow2State, offset: int, nbytes: int) -> int:
    """The L2 cache entry for :func:`_pwritev_new_cluster` if it can take the request (else -1): within
    one cluster whose L2 entry is 0 in a cached slice, plain image (no encryption, subclusters, data
    file or backing file), no debug hooks (so no events and inline host I/O), the lock free and no
    allocation in flight, the zero checks of COW regions on their direct path (inside the image,
    preallocation probe done).  A pure test."""
    cs = s.cluster_size
    start = offset & ~(cs - 1)
    end = offset + nbytes
    if (not nbytes or end > start + cs or AIO.yield_on_io or s.lock.locked or s.cluster_allocs
            or s.crypto is not None or s.data_node is not None or s.bs.backing is not None
            or s.bs.file.has_debug_hooks):
        return -1
    if (offset > start or end < start + cs) and (not s.metadata_preallocation_checked or start + cs > _length(s)):
        return -1
    return empty_cached_entry(s, offset)[0]


async def _pwritev_new_cluster(s: Qcow2State, ci: int, offset: int, nbytes: int, qiov: IOVec) -> None:
    """:func:`_pwritev_part` and :func:`_pwritev_task` of a request :func:`_new_cluster_write` accepted
    (the usual allocating write), in one function: the same locks, cache lookups, allocation, checks,
    host writes and L2 update in the same order, each step without a coroutine when it needs no I/O,
    else the general step."""
    lk, c = s.lock, s.l2c
    cs = s.cluster_size
    oic = offset & (cs - 1)
    guest = offset - oic
    key = c.offsets[ci]
    lk.lock_now()
    # alloc_host_offset: handle_copied and handle_alloc look the slice up in turn
    c.put(c.hit(key))
    c.hit(key)
    try:
        alloc = alloc_cluster_now(s)
        if alloc < 0:
            alloc = await alloc_clusters(s, cs)
    except BaseException:
        c.put(ci)
        lk.unlock()
        raise
    end = oic + nbytes
    m = L2Meta(guest, alloc, 1, False, 0, oic, end, cs - end)
    metas = [m]
    s.cluster_allocs.insert(0, m)
    c.put(ci)
    host = alloc + oic
    try:
        if not _no_overlap(s, host, nbytes):
            await pre_write_overlap_check(s, 0, host, nbytes, True)
    except BaseException:
        await _abort_locked(s, metas)
        raise
    lk.unlock()
    qiov = io.iov_slice(qiov, 0, nbytes)
    try:
        data = s.bs.file
        if data.supported_zero_flags & REQ_NO_FALLBACK and (oic or end < cs):
            await _alloc_space_new_cluster(s, m, data)
        await _write_data(s, host, offset, nbytes, qiov, metas)
    except BaseException:
        await _abort_metas(s, metas)
        raise
    if lk.lock_now():
        if link_l2_now(s, m):
            lk.unlock()
            return
    else:
        await lk.lock()
    await _link_metas(s, metas)


def _no_overlap(s: Qcow2State, offset: int, nbytes: int) -> bool:
    """:func:`pre_write_overlap_check` found nothing, decided without reads (False: ask it)."""
    chk = s.overlap_check
    return not chk or not nbytes or overlap_no_io(s, chk, offset, nbytes) == 0


async def _alloc_space_new_cluster(s: Qcow2State, m: L2Meta, data: BlockDriver) -> None:
    """:func:`_handle_alloc_space` of :func:`_pwritev_new_cluster`'s allocation (supported, with COW
    regions): the zero checks of the head and tail, then the cluster's zero write."""
    if not _cow_zero_now(s, m):
        for off, n in ((m.offset, m.cow_start_n), (m.offset + m.cow_end_off, m.cow_end_n)):
            if not await _is_zero_fast(s, off, n):
                return
    start, n = m.alloc_offset, m.cow_end_off + m.cow_end_n
    if not _no_overlap(s, start, n):
        await pre_write_overlap_check(s, 0, start, n, True)
    if await _zero_alloc_space(data, start, n):
        m.skip_cow = True


def _cow_zero_now(s: Qcow2State, m: L2Meta) -> bool:
    """Both :func:`_is_zero_fast` checks of :func:`_pwritev_new_cluster`'s COW regions (in its
    cluster) without a coroutine while the cluster's L2 entry is still 0 in a cached slice and the lock
    is free: True (both zero) after the same cache lookups, under one lock and unlock for both (nothing
    can happen between the two in the general path either); False, nothing done, otherwise."""
    if (s.lock.locked or s.bs.backing is not None or not s.metadata_preallocation_checked
            or m.offset + m.cow_end_off + m.cow_end_n > _length(s)):
        return False
    ci = empty_cached_entry(s, m.offset)[0]
    if ci < 0:
        return False
    c = s.l2c
    key = c.offsets[ci]
    s.lock.lock_now()
    if m.cow_start_n:
        c.put(c.hit(key))
    if m.cow_end_n:
        c.put(c.hit(key))
    s.lock.unlock()
    return True


def _merge_cow(offset: int, nbytes: int, qiov: IOVec, metas: list[L2Meta]) -> bool:
    for m in reversed(metas):
        if (m.cow_start_n == 0 and m.cow_end_n == 0) or m.skip_cow:
            continue
        if m.cow_start() + m.cow_start_n != offset:
            continue
        if m.offset + m.cow_end_off != offset + nbytes:
            continue
        m.data_qiov = qiov
        return True
    return False


async def _handle_alloc_space(s: Qcow2State, metas: list[L2Meta]) -> None:
    """``handle_alloc_space``: zero whole new clusters instead of copying zeroes into them."""
    if not s.data_file.supported_zero_flags & REQ_NO_FALLBACK:
        return
    if s.crypto is not None:
        return
    for m in reversed(metas):
        if not m.cow_start_n and not m.cow_end_n:
            continue
        if not (await _is_zero_fast(s, m.offset + m.cow_start_off, m.cow_start_n) and
                await _is_zero_fast(s, m.offset + m.cow_end_off, m.cow_end_n)):
            continue
        start = m.alloc_offset + m.cow_start_off
        n = m.cow_end_off + m.cow_end_n - m.cow_start_off
        await pre_write_overlap_check(s, 0, start, n, True)
        await _event(s, Event.CLUSTER_ALLOC_SPACE)
        if await _zero_alloc_space(s.data_file, start, n):
            m.skip_cow = True


async def _zero_alloc_space(data: BlockDriver, start: int, n: int) -> bool:
    """The zero write of ``handle_alloc_space`` (overlap check done): False when the node cannot
    (ENOTSUP, EAGAIN), and the COW then writes the region."""
    try:
        if io.can_pwrite_zeroes_inline(data, start, n, REQ_NO_FALLBACK | REQ_ZERO_WRITE):
            io.pwrite_zeroes_inline(data, start, n, REQ_NO_FALLBACK | REQ_ZERO_WRITE)
        else:
            await io.pwrite_zeroes(data, start, n, REQ_NO_FALLBACK)
    except BlockError as e:
        if e.code not in (errno.ENOTSUP, errno.EAGAIN):
            raise
        return False
    return True


async def _own_block_status(s: Qcow2State, offset: int, nbytes: int) -> tuple[int, int, int]:
    """``qcow2_co_block_status``: (BLOCK_* flags without ALLOCATED, bytes, host offset)."""
    await s.lock.lock()
    try:
        if not s.metadata_preallocation_checked:
            try:
                s.metadata_preallocation = await _detect_metadata_preallocation(s)
            except BlockError:
                s.metadata_preallocation = False
            s.metadata_preallocation_checked = True
        n, host, ctype = await get_host_offset(s, offset, min(INT_MAX, nbytes))
    finally:
        s.lock.unlock()
    status = 0
    if ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC, L.CLUSTER_UNALLOCATED_ALLOC) and s.crypto is None:
        status |= BLOCK_OFFSET_VALID
    if ctype in (L.CLUSTER_ZERO_PLAIN, L.CLUSTER_ZERO_ALLOC):
        status |= BLOCK_ZERO
    elif ctype not in (L.CLUSTER_UNALLOCATED, L.CLUSTER_UNALLOCATED_ALLOC):
        status |= BLOCK_DATA
    if s.metadata_preallocation and status & BLOCK_DATA and status & BLOCK_OFFSET_VALID:
        status |= BLOCK_RECURSE
    return status, n, host


async def _detect_metadata_preallocation(s: Qcow2State) -> bool:
    file_length = io.getlength(s.bs.file)
    real_allocation = s.bs.file.get_allocated_file_size()
    if real_allocation is None:
        raise BlockError(errno.ENOTSUP)  # e.g. blkdebug: QEMU then reads no refcount block
    real_clusters = real_allocation // s.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = size_to_clusters(s, file_length)
    count = 0
    i = 0
    rbb, rbs = s.refcount_block_bits, s.refcount_block_size
    while i < end_cluster and count < threshold:
        rti = i >> rbb
        block_end = min(end_cluster, (rti + 1) << rbb)
        rbo = s.refcount_table[rti] & L.REFT_OFFSET_MASK if rti < s.refcount_table_size else 0
        if not rbo:
            i = block_end
            continue
        if rbo & (s.cluster_size - 1):
            await get_refcount(s, i)  # signals the corruption
        c = s.rbc
        blk = await c.get(rbo)
        tbl = c.tables[blk]
        while i < block_end and count < threshold:
            if s.get_rc(tbl, i & (rbs - 1)):
                count += 1
            i += 1
        c.put(blk)
    return count >= threshold


async def co_block_status(s: Qcow2State, offset: int, nbytes: int) -> tuple[int, int]:
    _check_usable(s)
    ret, pnum, _, _ = await io.co_block_status(s.bs, False, offset, nbytes)
    return ret, pnum


#: Cluster types that block status reports as zero in an image without a backing file.
_READS_ZERO = frozenset((L.CLUSTER_ZERO_PLAIN, L.CLUSTER_ZERO_ALLOC, L.CLUSTER_UNALLOCATED,
                         L.CLUSTER_UNALLOCATED_ALLOC))


async def _is_zero_fast(s: Qcow2State, offset: int, nbytes: int) -> bool:
    """``bdrv_co_is_zero_fast``.

    Without a backing file, once the preallocation probe has run and inside the image, this asks
    ``get_host_offset`` under the lock directly: the same steps (lock, L2 cache, corruption checks)
    that the generic block-status walk takes down to ``_own_block_status``, minus its layers (a COW
    check of every allocating write runs here twice)."""
    if not nbytes:
        return True
    if s.bs.backing is None and s.metadata_preallocation_checked and offset + nbytes <= _length(s):
        await s.lock.lock()
        try:
            n, _, ctype = await get_host_offset(s, offset, min(INT_MAX, nbytes))
        finally:
            s.lock.unlock()
        return n == nbytes and ctype in _READS_ZERO
    ret, pnum = await io.block_status_above(s.bs, False, offset, nbytes)
    return pnum == nbytes and bool(ret & BLOCK_ZERO)


async def _is_zero(s: Qcow2State, offset: int, nbytes: int) -> bool:
    """``is_zero`` of qcow2.c (with ``want_zero``, over the whole backing chain)."""
    total = _length(s)
    if offset + nbytes > total:
        nbytes = total - offset
    if nbytes <= 0:
        return True
    while True:
        ret, nr = await io.block_status_above(s.bs, True, offset, nbytes)
        offset += nr
        nbytes -= nr
        if not (ret & BLOCK_ZERO and nr and nbytes):
            break
    return bool(ret & BLOCK_ZERO) and nbytes == 0


async def co_flush_to_os(s: Qcow2State) -> None:
    _check_usable(s)
    await s.lock.lock()
    try:
        await write_caches(s)
    finally:
        s.lock.unlock()


def _vmstate_offset(s: Qcow2State, pos: int, nbytes: int) -> int:
    vmo = vm_state_offset(s)
    if INT64_MAX - pos < vmo:
        raise BlockError(errno.EIO)
    pos += vmo
    if pos > BDRV_MAX_LENGTH or nbytes > BDRV_MAX_LENGTH - pos:
        raise BlockError(errno.EIO)
    return pos


async def co_save_vmstate(s: Qcow2State, pos: int, nbytes: int, qiov: IOVec) -> None:
    _check_usable(s)
    offset = _vmstate_offset(s, pos, nbytes)
    await _event(s, Event.VMSTATE_SAVE)
    await _pwritev_part(s, offset, nbytes, qiov)


async def co_load_vmstate(s: Qcow2State, pos: int, nbytes: int, qiov: IOVec) -> None:
    _check_usable(s)
    offset = _vmstate_offset(s, pos, nbytes)
    await _event(s, Event.VMSTATE_LOAD)
    await _preadv_part(s, offset, nbytes, qiov)
