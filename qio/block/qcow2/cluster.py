"""Cluster mapping (qcow2-cluster.c): L1/L2 lookup, allocation, copy-on-write, discard, zeroing."""

from __future__ import annotations

import array
import errno
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.driver import (
    REQ_MAY_UNMAP,
)
from qio.block.errors import BlockError
from qio.block.events import Event
from qio.block.qcow2 import layout as L
from qio.block.qcow2 import subcluster as SC
from qio.block.qcow2.cow import _perform_cow
from qio.block.qcow2.header import mark_dirty, signal_corruption
from qio.block.qcow2.overlap import _l1_changed, _set_l1, pre_write_overlap_check
from qio.block.qcow2.refcount import (
    _process_discards,
    _set_dependency,
    alloc_clusters,
    alloc_clusters_at,
    free_any_cluster,
    free_clusters,
)
from qio.block.qcow2.state import (
    BDRV_REQUEST_MAX_BYTES,
    DISCARD_ALWAYS,
    DISCARD_NEVER,
    DISCARD_OTHER,
    DISCARD_REQUEST,
    INT_MAX,
    OL_ACTIVE_L1,
    L2Meta,
    Qcow2State,
    _event,
    _length,
    _need_accurate_refcounts,
    _nonzero_entries,
    _pack_entry,
    _round_up,
    _unpack_entry,
    cluster_type,
    cx,
    data_file_is_raw,
    has_data_file,
    pwrite_sync,
    size_to_clusters,
)

if TYPE_CHECKING:
    pass



def _l2_entry(s: Qcow2State, tbl: bytearray, i: int) -> int:
    return int(_unpack_entry(tbl, i << s.l2e_shift)[0])


async def get_host_offset(s: Qcow2State, offset: int, nbytes: int) -> tuple[int, int, int]:
    """``qcow2_get_host_offset``: (bytes of the same type from ``offset``, host offset or the
    compressed L2 entry, cluster type)."""
    cb, cs = s.cluster_bits, s.cluster_size
    oic = offset & (cs - 1)
    needed = nbytes + oic
    slice_index = (offset >> cb) & (s.l2_slice_size - 1)
    available = (s.l2_slice_size - slice_index) << cb
    needed = min(needed, available)
    l1_index = offset >> (s.l2_bits + cb)
    if l1_index >= s.l1_size:
        return min(available, needed) - oic, 0, L.CLUSTER_UNALLOCATED
    l2_offset = s.l1_table[l1_index] & L.L1E_OFFSET_MASK
    if not l2_offset:
        return min(available, needed) - oic, 0, L.CLUSTER_UNALLOCATED
    if l2_offset & (cs - 1):
        await signal_corruption(s, True, f"L2 table offset {cx(l2_offset)} unaligned (L1 index: "
                                           f"{cx(l1_index)})")
        raise BlockError(errno.EIO)
    c = s.l2c
    key = l2_offset + ((((offset >> cb) & (s.l2_size - 1)) - slice_index) << s.l2e_shift)  # l2_load: hit, else get
    ci = c.hit(key)
    if ci < 0:
        ci = await c.get(key)
    try:
        tbl = c.tables[ci]
        if s.subclusters:
            return await SC.host_offset_in_slice(s, tbl, slice_index, offset, needed, l2_offset)
        entry: int = _unpack_entry(tbl, slice_index << s.l2e_shift)[0]  # _l2_entry
        ctype = cluster_type(s, entry)
        host = 0
        if s.qcow_version < 3 and ctype in (L.CLUSTER_ZERO_PLAIN, L.CLUSTER_ZERO_ALLOC):
            await signal_corruption(s, True, f"Zero cluster entry found in pre-v3 image (L2 offset: "
                                               f"{cx(l2_offset)}, L2 index: {cx(slice_index)})")
            raise BlockError(errno.EIO)
        if ctype == L.CLUSTER_COMPRESSED:
            if has_data_file(s):
                await signal_corruption(s, True, f"Compressed cluster entry found in image with external data file "
                                                   f"(L2 offset: {cx(l2_offset)}, L2 index: {cx(slice_index)})")
                raise BlockError(errno.EIO)
            host = entry
        elif ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC):
            hc = entry & L.L2E_OFFSET_MASK
            host = hc + oic
            if hc & (cs - 1):
                await signal_corruption(s, True, f"Cluster allocation offset {cx(hc)} unaligned (L2 offset: "
                                                   f"{cx(l2_offset)}, L2 index: {cx(slice_index)})")
                raise BlockError(errno.EIO)
            if has_data_file(s) and host != offset:
                await signal_corruption(s, True, f"External data file host cluster offset {cx(hc)} does not match "
                                                   f"guest cluster offset: {cx(offset - oic)}, L2 index: "
                                                   f"{cx(slice_index)})")
                raise BlockError(errno.EIO)
        nb_clusters = (needed + cs - 1) >> cb
        # within one cluster (a COW region's zero check) the count is 1 whatever the type
        count = 1 if nb_clusters <= 1 else _count_contiguous(s, tbl, slice_index, nb_clusters, ctype, entry)
    finally:
        c.put(ci)
    available = count << cb
    return min(available, needed) - oic, host, ctype


def _count_contiguous(s: Qcow2State, tbl: bytearray, index: int, nb_clusters: int, ctype: int, first: int) -> int:
    """``count_contiguous_subclusters`` without subclusters: clusters of one type (and, for
    allocated ones, contiguous host offsets)."""
    if ctype == L.CLUSTER_COMPRESSED:
        return 1
    end = index + nb_clusters
    if ctype == L.CLUSTER_UNALLOCATED:
        # fast path over a run of all-zero entries, then entry by entry
        chunk = tbl[(index + 1) * 8: end * 8]
        k = index + 1 + (len(chunk) - len(chunk.lstrip(b"\0"))) // 8
        while k < end and cluster_type(s, _l2_entry(s, tbl, k)) == L.CLUSTER_UNALLOCATED:
            k += 1
        return k - index
    check_offset = ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC)
    expected = first & L.L2E_OFFSET_MASK
    cs = s.cluster_size
    count = 1
    for k in range(index + 1, end):
        e = _l2_entry(s, tbl, k)
        if cluster_type(s, e) != ctype:
            break
        if check_offset:
            expected += cs
            if expected != e & L.L2E_OFFSET_MASK:
                break
        count += 1
    return count


async def write_l1_entry(s: Qcow2State, l1_index: int) -> None:
    """``qcow2_write_l1_entry``: write the entry (or the aligned group of entries around it)."""
    bufsize = max(8, min(s.bs.file.request_alignment, s.cluster_size))
    n = bufsize // 8
    first = l1_index - l1_index % n
    buf = bytearray(bufsize)
    for i in range(min(n, s.l1_size - first)):
        _pack_entry(buf, i * 8, s.l1_table[first + i])
    await pre_write_overlap_check(s, OL_ACTIVE_L1, s.l1_table_offset + 8 * first, bufsize, False)
    await _event(s, Event.L1_UPDATE)
    await pwrite_sync(s, s.l1_table_offset + 8 * first, bytes(buf))


async def _l2_allocate(s: Qcow2State, l1_index: int) -> None:
    """``l2_allocate``: a new L2 table (zeroed, or a copy of the shared one) hooked into the L1."""
    old_l2_offset = s.l1_table[l1_index]
    c = s.l2c
    cs = s.cluster_size
    l2_offset = -1
    slice_i: int | None = None
    try:
        l2_offset = await alloc_clusters(s, cs)
        if l2_offset == 0:
            await signal_corruption(s, True, "Preventing invalid allocation of L2 table at offset 0")
            raise BlockError(errno.EIO)
        await s.rbc.flush()
        slice_size2 = s.l2_slice_size << s.l2e_shift
        for sl in range(cs // slice_size2):
            slice_i = await c.get_empty(l2_offset + sl * slice_size2)
            if not old_l2_offset & L.L1E_OFFSET_MASK:
                c.tables[slice_i][:] = bytes(slice_size2)
            else:
                await _event(s, Event.L2_ALLOC_COW_READ)
                old = await c.get((old_l2_offset & L.L1E_OFFSET_MASK) + sl * slice_size2)
                c.tables[slice_i][:] = c.tables[old]
                c.put(old)
            await _event(s, Event.L2_ALLOC_WRITE)
            c.mark_dirty(slice_i)
            c.put(slice_i)
            slice_i = None
        await c.flush()
        _set_l1(s, l1_index, l2_offset | L.OFLAG_COPIED)
        await write_l1_entry(s, l1_index)
    except BlockError:
        if slice_i is not None:
            c.put(slice_i)
        _set_l1(s, l1_index, old_l2_offset)
        if l2_offset > 0:
            await free_clusters(s, l2_offset, cs, DISCARD_ALWAYS)
        raise


async def get_cluster_table(s: Qcow2State, offset: int) -> tuple[int, int]:
    """``get_cluster_table``: (L2 cache entry, index in the slice), allocating the L2 table (and
    growing the L1 table) when needed."""
    cb, cs = s.cluster_bits, s.cluster_size
    l1_index = offset >> (s.l2_bits + cb)
    if l1_index >= s.l1_size:
        await grow_l1_table(s, l1_index + 1, False)
    l2_offset = s.l1_table[l1_index] & L.L1E_OFFSET_MASK
    if l2_offset & (cs - 1):
        await signal_corruption(s, True, f"L2 table offset {cx(l2_offset)} unaligned (L1 index: {cx(l1_index)})")
        raise BlockError(errno.EIO)
    if not s.l1_table[l1_index] & L.OFLAG_COPIED:
        await _l2_allocate(s, l1_index)
        if l2_offset:
            await free_clusters(s, l2_offset, cs, DISCARD_OTHER)
        l2_offset = s.l1_table[l1_index] & L.L1E_OFFSET_MASK
    c = s.l2c
    index = (offset >> cb) & (s.l2_slice_size - 1)
    key = l2_offset + ((((offset >> cb) & (s.l2_size - 1)) - index) << s.l2e_shift)  # l2_load: hit, else get
    ci = c.hit(key)
    if ci < 0:
        ci = await c.get(key)
    return ci, index


async def grow_l1_table(s: Qcow2State, min_size: int, exact_size: bool) -> None:
    """``qcow2_grow_l1_table``."""
    if min_size <= s.l1_size:
        return
    if min_size > INT_MAX // 8:
        raise BlockError(errno.EFBIG)
    if exact_size:
        new_size = min_size
    else:
        new_size = s.l1_size or 1
        while min_size > new_size:
            new_size = -(-(new_size * 3) // 2)
    if new_size > L.MAX_L1_SIZE // 8:
        raise BlockError(errno.EFBIG)
    new_size2 = 8 * new_size
    new_table = array.array("Q", bytes(new_size2))
    new_table[: s.l1_size] = s.l1_table[: s.l1_size]
    await _event(s, Event.L1_GROW_ALLOC_TABLE)
    new_offset = await alloc_clusters(s, new_size2)
    try:
        await s.rbc.flush()
        await pre_write_overlap_check(s, 0, new_offset, new_size2, False)
        await _event(s, Event.L1_GROW_WRITE_TABLE)
        raw = bytearray(new_size2)
        for i in range(s.l1_size):
            _pack_entry(raw, i * 8, new_table[i])
        await pwrite_sync(s, new_offset, bytes(raw))
        await _event(s, Event.L1_GROW_ACTIVATE_TABLE)
        await pwrite_sync(s, L.OFF_L1_SIZE, L.L1_SIZE_AND_OFFSET.pack(new_size, new_offset))
    except BlockError:
        await free_clusters(s, new_offset, new_size2, DISCARD_OTHER)
        raise
    old_offset, old_size = s.l1_table_offset, s.l1_size
    s.l1_table_offset = new_offset
    s.l1_table = new_table  # same L2 offsets: the overlap-check set stays valid
    s.l1_size = new_size
    await free_clusters(s, old_offset, old_size * 8, DISCARD_OTHER)


def _needs_new_alloc(s: Qcow2State, entry: int) -> bool:
    ctype = cluster_type(s, entry)
    if ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC):
        return not entry & L.OFLAG_COPIED
    return True


def _count_single_write_clusters(s: Qcow2State, nb: int, tbl: bytearray, index: int, new_alloc: bool) -> int:
    expected = _l2_entry(s, tbl, index) & L.L2E_OFFSET_MASK
    cs = s.cluster_size
    i = 0
    while i < nb:
        e = _l2_entry(s, tbl, index + i)
        if _needs_new_alloc(s, e) != new_alloc:
            break
        if not new_alloc:
            if expected != e & L.L2E_OFFSET_MASK:
                break
            expected += cs
        i += 1
    return i


async def _calculate_l2_meta(s: Qcow2State, host_cluster_offset: int, guest_offset: int, nbytes: int,
                             tbl: bytearray, metas: list[L2Meta], keep_old: bool) -> None:
    """``calculate_l2_meta``: record the allocation and its COW regions."""
    cs, cb = s.cluster_size, s.cluster_bits
    l2_index = (guest_offset >> cb) & (s.l2_slice_size - 1)
    cow_start_to = guest_offset & (cs - 1)
    cow_end_from = cow_start_to + nbytes
    nb_clusters = (cow_end_from + cs - 1) >> cb
    if s.subclusters:
        bounds = await SC.cow_bounds(s, tbl, l2_index, guest_offset, nbytes, keep_old)
        if bounds is None:
            return
        cow_start_from, cow_end_to = bounds
    elif not keep_old:
        cow_start_from = 0
        cow_end_to = _round_up(cow_end_from, cs)
    else:
        # a write into allocated, COPIED clusters needs no metadata update (no subclusters)
        if all(cluster_type(s, _l2_entry(s, tbl, l2_index + i)) == L.CLUSTER_NORMAL for i in range(nb_clusters)):
            return
        first_type = cluster_type(s, _l2_entry(s, tbl, l2_index))
        last_type = cluster_type(s, _l2_entry(s, tbl, l2_index + nb_clusters - 1))
        cow_start_from = cow_start_to if first_type == L.CLUSTER_NORMAL else 0
        cow_end_to = cow_end_from if last_type == L.CLUSTER_NORMAL else _round_up(cow_end_from, cs)
    m = L2Meta(guest_offset & ~(cs - 1), host_cluster_offset, nb_clusters, keep_old,
               cow_start_from, cow_start_to - cow_start_from, cow_end_from, cow_end_to - cow_end_from)
    metas.append(m)
    s.cluster_allocs.insert(0, m)


async def _handle_dependencies(s: Qcow2State, guest_offset: int, cur_bytes: int, have_meta: bool) -> int | None:
    """``handle_dependencies``: how many bytes can be handled before the next in-flight allocation;
    None if this request had to wait (the caller starts over)."""
    cs = s.cluster_size
    nbytes = cur_bytes
    for old in list(s.cluster_allocs):
        start = guest_offset
        end = start + nbytes
        old_start = old.cow_start() & ~(cs - 1)
        old_end = _round_up(old.cow_end(), cs)
        if end <= old_start or start >= old_end:
            continue
        if old.keep_old and (end <= old.cow_start() or start >= old.cow_end()):
            continue
        nbytes = old_start - start if start < old_start else 0
        if nbytes == 0 and have_meta:
            return 0
        if nbytes == 0:
            await old.dependent.wait(s.lock)
            return None
    return nbytes


def _clamp_clusters(s: Qcow2State, guest_offset: int, nbytes: int) -> tuple[int, int]:
    """The opening both allocation handlers share: (offset in the first cluster, clusters of the range
    within one L2 slice and one request's limit)."""
    cb = s.cluster_bits
    oic = guest_offset & (s.cluster_size - 1)
    l2_index = (guest_offset >> cb) & (s.l2_slice_size - 1)
    return oic, min((oic + nbytes + s.cluster_size - 1) >> cb, s.l2_slice_size - l2_index,
                    BDRV_REQUEST_MAX_BYTES >> cb)


async def _handle_copied(s: Qcow2State, guest_offset: int, host_offset: int | None, nbytes: int,
                         metas: list[L2Meta]) -> tuple[int, int | None, int]:
    """``handle_copied``: (1 if in-place clusters were found else 0, host offset, bytes)."""
    cs = s.cluster_size
    oic, nb_clusters = _clamp_clusters(s, guest_offset, nbytes)
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, guest_offset)
    ret = 0
    cluster_offset = 0
    try:
        tbl = c.tables[ci]
        entry: int = _unpack_entry(tbl, l2_index << s.l2e_shift)[0]  # _l2_entry
        cluster_offset = entry & L.L2E_OFFSET_MASK
        if not _needs_new_alloc(s, entry):
            if cluster_offset & (cs - 1):
                kind = "Preallocated zero" if entry & L.OFLAG_ZERO else "Data"
                await signal_corruption(s, True, f"{kind} cluster offset {cx(cluster_offset)} unaligned "
                                                   f"(guest offset: {cx(guest_offset)})")
                raise BlockError(errno.EIO)
            if host_offset is not None and cluster_offset != host_offset:
                return 0, host_offset, 0
            keep = _count_single_write_clusters(s, nb_clusters, tbl, l2_index, False)
            nbytes = min(nbytes, keep * cs - oic)
            await _calculate_l2_meta(s, cluster_offset, guest_offset, nbytes, tbl, metas, True)
            ret = 1
    finally:
        c.put(ci)
    if ret:
        host_offset = cluster_offset + oic
    return ret, host_offset, nbytes


async def _handle_alloc(s: Qcow2State, guest_offset: int, host_offset: int | None, nbytes: int,
                        metas: list[L2Meta]) -> tuple[int, int | None, int]:
    """``handle_alloc``: allocate new clusters for the start of the range."""
    cs, cb = s.cluster_size, s.cluster_bits
    oic, nb_clusters = _clamp_clusters(s, guest_offset, nbytes)
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, guest_offset)
    try:
        tbl = c.tables[ci]
        nb_clusters = _count_single_write_clusters(s, nb_clusters, tbl, l2_index, True)
        assert nb_clusters > 0
        if has_data_file(s):  # do_alloc_cluster_offset: the data file maps guest offsets 1:1
            alloc = guest_offset & ~(cs - 1)
        elif host_offset is None:
            alloc = await alloc_clusters(s, nb_clusters * cs)
        else:
            alloc = host_offset & ~(cs - 1)
            nb_clusters = await alloc_clusters_at(s, alloc, nb_clusters)
            if nb_clusters == 0:
                return 0, host_offset, 0
        requested = nbytes + oic
        avail = nb_clusters << cb
        nb_bytes = min(requested, avail)
        host_offset = alloc + oic
        nbytes = min(nbytes, nb_bytes - oic)
        await _calculate_l2_meta(s, alloc, guest_offset, nbytes, tbl, metas, False)
        return 1, host_offset, nbytes
    finally:
        c.put(ci)


async def alloc_host_offset(s: Qcow2State, offset: int, nbytes: int, metas: list[L2Meta]) -> tuple[int, int]:
    """``qcow2_alloc_host_offset`` (called with the lock held): (bytes, host offset) of the
    contiguous host area for the start of the request; new allocations are added to ``metas``."""
    while True:
        start = offset
        remaining = nbytes
        cluster_offset: int | None = None
        host_offset: int | None = None
        cur = 0
        metas.clear()
        restart = False
        while True:
            if host_offset is None and cluster_offset is not None:
                host_offset = cluster_offset
            start += cur
            remaining -= cur
            if cluster_offset is not None:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            dep = await _handle_dependencies(s, start, cur, bool(metas))
            if dep is None:
                restart = True
                break
            cur = dep
            if cur == 0:
                break
            ret, cluster_offset, cur = await _handle_copied(s, start, cluster_offset, cur, metas)
            if ret:
                continue
            if cur == 0:
                break
            ret, cluster_offset, cur = await _handle_alloc(s, start, cluster_offset, cur, metas)
            if ret:
                continue
            break
        if restart:
            continue
        assert host_offset is not None
        return nbytes - remaining, host_offset


async def alloc_cluster_link_l2(s: Qcow2State, m: L2Meta) -> None:
    """``qcow2_alloc_cluster_link_l2``: COW, then point the L2 entries at the new clusters."""
    await _perform_cow(s, m)
    if s.use_lazy_refcounts:
        try:
            await mark_dirty(s)
        except BlockError:
            pass
    if _need_accurate_refcounts(s):
        await _set_dependency(s.l2c, s.rbc)
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, m.offset)
    c.mark_dirty(ci)
    tbl = c.tables[ci]
    old_clusters = []
    cs = s.cluster_size
    for i in range(m.nb_clusters):
        off = m.alloc_offset + i * cs
        old = _l2_entry(s, tbl, l2_index + i)
        if old:
            old_clusters.append(old)
        _pack_entry(tbl, (l2_index + i) << s.l2e_shift, off | L.OFLAG_COPIED)
        if s.subclusters and not m.prealloc:
            SC.mark_written(s, tbl, l2_index, i, m.cow_start_off, m.cow_end_off + m.cow_end_n)
    c.put(ci)
    if not m.keep_old:
        for old in old_clusters:
            await free_any_cluster(s, old, DISCARD_NEVER)


def empty_cached_entry(s: Qcow2State, offset: int) -> tuple[int, int]:
    """(L2 cache entry, index) of the slice that maps ``offset`` when :func:`get_cluster_table` would
    just find it in the cache (a COPIED, aligned L2 table inside the L1 table, no subclusters), without
    taking it, and the cluster's L2 entry there is still 0 (unallocated); (-1, 0) otherwise.  A pure
    test: the entry condition of the one-cluster write path's steps."""
    cb = s.cluster_bits
    l1_index = offset >> (s.l2_bits + cb)
    if l1_index >= s.l1_size or s.subclusters:
        return -1, 0
    l1e = s.l1_table[l1_index]
    l2_offset = l1e & L.L1E_OFFSET_MASK
    if not l1e & L.OFLAG_COPIED or not l2_offset or l2_offset & (s.cluster_size - 1):
        return -1, 0
    index = (offset >> cb) & (s.l2_slice_size - 1)
    ci = s.l2c.where.get(l2_offset + ((((offset >> cb) & (s.l2_size - 1)) - index) << 3))
    if ci is None or _unpack_entry(s.l2c.tables[ci], index << 3)[0]:
        return -1, 0
    return ci, index


def link_l2_now(s: Qcow2State, m: L2Meta) -> bool:
    """:func:`handle_l2meta` (linking) of one new cluster without a coroutine when it needs no I/O:
    no COW left to do, no lazy refcounts, the cache dependency set without a flush, the slice cached
    and the old entry 0.  False, nothing done, otherwise."""
    if ((m.cow_start_n or m.cow_end_n) and not m.skip_cow) or s.use_lazy_refcounts or m.nb_clusters != 1:
        return False
    l2c, rbc = s.l2c, s.rbc
    accurate = _need_accurate_refcounts(s)
    if accurate and (rbc.depends is not None or l2c.depends not in (None, rbc)):
        return False
    ci, index = empty_cached_entry(s, m.offset)
    if ci < 0:
        return False
    tbl = l2c.tables[ci]
    if accurate:
        l2c.depends = rbc  # _set_dependency
    l2c.hit(l2c.offsets[ci])
    l2c.mark_dirty(ci)
    _pack_entry(tbl, index << 3, m.alloc_offset | L.OFLAG_COPIED)
    l2c.put(ci)
    if m in s.cluster_allocs:
        s.cluster_allocs.remove(m)
    m.dependent.restart_all()
    return True


async def alloc_cluster_abort(s: Qcow2State, m: L2Meta) -> None:
    if not m.keep_old and not has_data_file(s):
        await free_clusters(s, m.alloc_offset, m.nb_clusters << s.cluster_bits, DISCARD_NEVER)


async def handle_l2meta(s: Qcow2State, metas: list[L2Meta], link: bool) -> None:
    """``qcow2_handle_l2meta`` (lock held): link (or abort) the allocations, newest first."""
    while metas:
        m = metas[-1]
        if link:
            await alloc_cluster_link_l2(s, m)
        else:
            await alloc_cluster_abort(s, m)
        if m in s.cluster_allocs:
            s.cluster_allocs.remove(m)
        m.dependent.restart_all()
        metas.pop()


async def cluster_discard(s: Qcow2State, offset: int, nbytes: int, dtype: int, full_discard: bool) -> None:
    """``qcow2_cluster_discard`` (lock held)."""
    nb = size_to_clusters(s, nbytes)
    s.cache_discards = True
    ok = False
    try:
        while nb > 0:
            cleared = await _discard_in_l2_slice(s, offset, nb, dtype, full_discard)
            nb -= cleared
            offset += cleared * s.cluster_size
        ok = True
    finally:
        s.cache_discards = False
        await _process_discards(s, ok)


async def _discard_in_l2_slice(s: Qcow2State, offset: int, nb: int, dtype: int, full_discard: bool) -> int:
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, offset)
    nb = min(nb, s.l2_slice_size - l2_index)
    tbl = c.tables[ci]
    if s.subclusters:
        try:
            await SC.discard_entries(s, ci, tbl, l2_index, nb, dtype, full_discard)
        finally:
            c.put(ci)
        return nb
    # entries that are 0 stay 0 unless a backing file needs them to read as zeroes
    indices = range(nb) if s.bs.backing is not None and not full_discard else \
        _nonzero_entries(tbl, l2_index, nb)
    try:
        for i in indices:
            old = _l2_entry(s, tbl, l2_index + i)
            new = old
            if full_discard:
                new = 0
            elif s.bs.backing is not None or L.cluster_is_allocated(cluster_type(s, old)):
                new = L.OFLAG_ZERO if s.qcow_version >= 3 else 0
            if old == new:
                continue
            c.mark_dirty(ci)
            _pack_entry(tbl, (l2_index + i) * 8, new)
            await free_any_cluster(s, old, dtype)
    finally:
        c.put(ci)
    return nb


async def _zero_in_l2_slice(s: Qcow2State, offset: int, nb: int, flags: int) -> int:
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, offset)
    nb = min(nb, s.l2_slice_size - l2_index)
    tbl = c.tables[ci]
    if s.subclusters:
        try:
            await SC.zero_entries(s, ci, tbl, l2_index, nb, flags)
        finally:
            c.put(ci)
        return nb
    try:
        for i in range(nb):
            old = _l2_entry(s, tbl, l2_index + i)
            ctype = cluster_type(s, old)
            unmap = ctype == L.CLUSTER_COMPRESSED or bool(flags & REQ_MAY_UNMAP and L.cluster_is_allocated(ctype))
            new = (0 if unmap else old) | L.OFLAG_ZERO
            if old == new:
                continue
            c.mark_dirty(ci)
            _pack_entry(tbl, (l2_index + i) * 8, new)
            if unmap:
                await free_any_cluster(s, old, DISCARD_REQUEST)
    finally:
        c.put(ci)
    return nb


async def _zero_l2_subclusters(s: Qcow2State, offset: int, nbytes: int) -> None:
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, offset)
    try:
        SC.zero_subclusters(s, ci, c.tables[ci], l2_index, offset, -(-nbytes // s.subcluster_size))
    finally:
        c.put(ci)


async def subcluster_zeroize(s: Qcow2State, offset: int, nbytes: int, flags: int) -> None:
    """``qcow2_subcluster_zeroize`` (lock held); a partial head or tail cluster only exists with
    subclusters."""
    cs = s.cluster_size
    if data_file_is_raw(s):  # the raw data file must read as zeroes too
        await io.pwrite_zeroes(s.data_file, offset, nbytes, flags)
    end = offset + nbytes
    if s.qcow_version < 3:
        if s.bs.backing is None:
            await cluster_discard(s, offset, nbytes, DISCARD_REQUEST, False)
            return
        raise BlockError(errno.ENOTSUP)
    head = min(end, _round_up(offset, cs)) - offset
    offset += head
    tail = 0 if end >= _length(s) else end - max(offset, end & ~(cs - 1))
    end -= tail
    s.cache_discards = True
    ok = False
    try:
        if head:
            await _zero_l2_subclusters(s, offset - head, head)
        nb = size_to_clusters(s, end - offset)
        while nb > 0:
            cleared = await _zero_in_l2_slice(s, offset, nb, flags)
            nb -= cleared
            offset += cleared * cs
        if tail:
            await _zero_l2_subclusters(s, end, tail)
        ok = True
    finally:
        s.cache_discards = False
        await _process_discards(s, ok)


async def _shrink_l1_table(s: Qcow2State, exact_size: int) -> None:
    """``qcow2_shrink_l1_table``: clear the L1 entries beyond the new size (l1_size is kept)."""
    if exact_size >= s.l1_size:
        return
    try:
        await _event(s, Event.L1_SHRINK_WRITE_TABLE)
        await io.pwrite_zeroes(s.bs.file, s.l1_table_offset + exact_size * 8,
                               (s.l1_size - exact_size) * 8, 0)
        await io.flush(s.bs.file)
    except BlockError:
        for i in range(exact_size, s.l1_size):
            s.l1_table[i] = 0
        _l1_changed(s)
        raise
    await _event(s, Event.L1_SHRINK_FREE_L2_CLUSTERS)
    for i in range(s.l1_size - 1, exact_size - 1, -1):
        l2 = s.l1_table[i] & L.L1E_OFFSET_MASK
        if not l2:
            continue
        await free_clusters(s, l2, s.cluster_size, DISCARD_ALWAYS)
        _set_l1(s, i, 0)
