"""Refcounts (qcow2-refcount.c): lookup, allocation, updates, discards, cache write-back."""

from __future__ import annotations

import array
import errno
import os
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.errors import BlockError
from qio.block.events import Event
from qio.block.qcow2 import layout as L
from qio.block.qcow2.cache import Qcow2Cache
from qio.block.qcow2.header import signal_corruption, update_header
from qio.block.qcow2.overlap import _reftable_changed
from qio.block.qcow2.state import (
    DISCARD_NEVER,
    DISCARD_OTHER,
    INT64_MAX,
    Qcow2State,
    _event,
    _need_accurate_refcounts,
    _pack_entry,
    _round_up,
    _stderr,
    cluster_type,
    cx,
    pwrite_sync,
    size_to_clusters,
)

if TYPE_CHECKING:
    pass



def _update_max_refcount_table_index(s: Qcow2State) -> None:
    i = s.refcount_table_size - 1
    t = s.refcount_table
    while i > 0 and not t[i] & L.REFT_OFFSET_MASK:
        i -= 1
    s.max_refcount_table_index = max(i, 0)
    _reftable_changed(s)


async def get_refcount(s: Qcow2State, cluster_index: int) -> int:
    """``qcow2_get_refcount``."""
    rti = cluster_index >> s.refcount_block_bits
    if rti >= s.refcount_table_size:
        return 0
    rbo = s.refcount_table[rti] & L.REFT_OFFSET_MASK
    if not rbo:
        return 0
    if rbo & (s.cluster_size - 1):
        await signal_corruption(s, True, f"Refblock offset {cx(rbo)} unaligned (reftable index: {cx(rti)})")
        raise BlockError(errno.EIO)
    c = s.rbc
    i = c.hit(rbo)
    if i < 0:
        i = await c.get(rbo)
    value = s.get_rc(c.tables[i], cluster_index & (s.refcount_block_size - 1))
    c.put(i)
    return value


async def _load_refcount_block(s: Qcow2State, offset: int) -> int:
    await _event(s, Event.REFBLOCK_LOAD)
    c = s.rbc
    i = c.hit(offset)
    return i if i >= 0 else await c.get(offset)


async def _alloc_clusters_noref(s: Qcow2State, size: int, max_offset: int) -> int:
    """``alloc_clusters_noref``: the first run of free clusters from ``free_cluster_index`` on.

    QEMU reads one refcount at a time (a cache lookup each); this walks a refcount block per
    lookup, which leaves the cache in the same state."""
    if s.cache_discards:
        await _process_discards(s, True)
    nb = size_to_clusters(s, size)
    rbb = s.refcount_block_bits
    rbs = s.refcount_block_size
    get_rc = s.get_rc
    run = 0
    while run < nb:
        idx = s.free_cluster_index
        rti = idx >> rbb
        if rti >= s.refcount_table_size:
            s.free_cluster_index += nb - run
            break
        rbo = s.refcount_table[rti] & L.REFT_OFFSET_MASK
        block_end = (rti + 1) << rbb
        if not rbo:
            take = min(nb - run, block_end - idx)
            s.free_cluster_index += take
            run += take
            continue
        if rbo & (s.cluster_size - 1):
            s.free_cluster_index = idx + 1
            await signal_corruption(s, True, f"Refblock offset {cx(rbo)} unaligned (reftable index: "
                                               f"{cx(rti)})")
            raise BlockError(errno.EIO)
        c = s.rbc
        try:
            i = c.hit(rbo)
            if i < 0:
                i = await c.get(rbo)
        except BlockError:
            s.free_cluster_index = idx + 1
            raise
        tbl = c.tables[i]
        j = idx
        while j < block_end and run < nb:
            if get_rc(tbl, j & (rbs - 1)):
                run = 0
            else:
                run += 1
            j += 1
        c.put(i)
        s.free_cluster_index = j
    if s.free_cluster_index > 0 and s.free_cluster_index - 1 > (max_offset >> s.cluster_bits):
        raise BlockError(errno.EFBIG)
    return (s.free_cluster_index - nb) << s.cluster_bits


def alloc_cluster_now(s: Qcow2State) -> int:
    """:func:`alloc_clusters` of one cluster without a coroutine when it needs no I/O and no event
    (the free cluster and its refcount in a cached block, no pending discards, no debug hooks):
    the same cache lookups, refcount and free index; -1, nothing done, otherwise."""
    if s.cache_discards or s.discards or s.bs.file.has_debug_hooks:
        return -1
    rbb = s.refcount_block_bits
    idx = s.free_cluster_index
    rti = idx >> rbb
    if rti >= s.refcount_table_size:
        return -1
    rbo = s.refcount_table[rti] & L.REFT_OFFSET_MASK
    if not rbo or rbo & (s.cluster_size - 1):
        return -1
    c = s.rbc
    i = c.where.get(rbo)
    if i is None:
        return -1
    tbl = c.tables[i]
    get_rc = s.get_rc
    mask = s.refcount_block_size - 1
    end = (rti + 1) << rbb
    j = idx
    while j < end and get_rc(tbl, j & mask):
        j += 1
    cb = s.cluster_bits
    if j == end or j > L.MAX_CLUSTER_OFFSET >> cb:
        return -1  # the next block, or EFBIG: the general path
    c.put(c.hit(rbo))  # _alloc_clusters_noref's lookup
    s.free_cluster_index = j + 1
    offset = j << cb
    c.hit(rbo)  # update_refcount: _alloc_refcount_block finds the same block
    c.mark_dirty(i)
    if s.free_byte_offset and offset == s.free_byte_offset & ~(s.cluster_size - 1):
        s.free_byte_offset = 0  # update_refcount's deviation from QEMU (see there)
    s.set_rc(tbl, j & mask, 1)
    c.put(i)
    return offset


async def alloc_clusters(s: Qcow2State, size: int) -> int:
    """``qcow2_alloc_clusters``."""
    await _event(s, Event.CLUSTER_ALLOC)
    while True:
        offset = await _alloc_clusters_noref(s, size, L.MAX_CLUSTER_OFFSET)
        try:
            await update_refcount(s, offset, size, 1, False, DISCARD_NEVER)
        except BlockError as e:
            if e.code == errno.EAGAIN:
                continue
            raise
        return offset


async def alloc_clusters_at(s: Qcow2State, offset: int, nb_clusters: int) -> int:
    """``qcow2_alloc_clusters_at``: how many of the clusters at ``offset`` could be allocated."""
    if nb_clusters == 0:
        return 0
    while True:
        ci = offset >> s.cluster_bits
        i = 0
        while i < nb_clusters:
            if await get_refcount(s, ci + i):
                break
            i += 1
        try:
            await update_refcount(s, offset, i << s.cluster_bits, 1, False, DISCARD_NEVER)
        except BlockError as e:
            if e.code == errno.EAGAIN:
                continue
            raise
        return i


async def alloc_bytes(s: Qcow2State, size: int) -> int:
    """``qcow2_alloc_bytes``: space for a compressed cluster, packed after the previous one."""
    await _event(s, Event.CLUSTER_ALLOC_BYTES)
    cs = s.cluster_size
    offset = s.free_byte_offset
    if offset and await get_refcount(s, offset >> s.cluster_bits) == s.refcount_max:
        offset = 0
    free_in_cluster = cs - (offset & (cs - 1))
    while True:
        if not offset or free_in_cluster < size:
            new_cluster = await _alloc_clusters_noref(s, cs, min(s.csize.offset_mask,
                                                                   L.MAX_CLUSTER_OFFSET))
            if new_cluster == 0:
                await signal_corruption(s, True, "Preventing invalid allocation of compressed cluster at "
                                                   "offset 0")
                raise BlockError(errno.EIO)
            if not offset or _round_up(offset, cs) != new_cluster:
                offset = new_cluster
                free_in_cluster = cs
            else:
                free_in_cluster += cs
        try:
            await update_refcount(s, offset, size, 1, False, DISCARD_NEVER)
        except BlockError as e:
            offset = 0
            if e.code == errno.EAGAIN:
                continue
            raise
        break
    await _set_dependency(s.l2c, s.rbc)
    s.free_byte_offset = offset + size
    if not s.free_byte_offset & (cs - 1):
        s.free_byte_offset = 0
    return offset


async def _set_dependency(c: Qcow2Cache, dependency: Qcow2Cache) -> None:
    """``qcow2_cache_set_dependency`` where QEMU ignores its result (a failed flush of the old
    dependency leaves the dependency unset)."""
    try:
        await c.set_dependency(dependency)
    except BlockError:
        pass


async def free_clusters(s: Qcow2State, offset: int, size: int, dtype: int) -> None:
    """``qcow2_free_clusters``: errors are reported, not returned (the clusters leak)."""
    await _event(s, Event.CLUSTER_FREE)
    try:
        await update_refcount(s, offset, size, 1, True, dtype)
    except BlockError as e:
        _stderr(s, f"qcow2_free_clusters failed: {os.strerror(e.code)}\n")


async def free_any_cluster(s: Qcow2State, l2_entry: int, dtype: int) -> None:
    """``qcow2_free_any_cluster``; with a data file only a discard passes through to it."""
    ctype = cluster_type(s, l2_entry)
    if s.data_node is not None:  # has_data_file
        if s.discard_passthrough[dtype] and ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC):
            try:
                await io.pdiscard(s.data_file, l2_entry & L.L2E_OFFSET_MASK, s.cluster_size)
            except BlockError:
                pass  # bdrv_pdiscard's result is ignored
        return
    if ctype == L.CLUSTER_COMPRESSED:
        coffset, csize = L.parse_compressed(l2_entry, s.csize)
        await free_clusters(s, coffset, csize, dtype)
    elif ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC):
        off = l2_entry & L.L2E_OFFSET_MASK
        if off & (s.cluster_size - 1):
            await signal_corruption(s, False, f"Cannot free unaligned cluster {off:#x}")
        else:
            await free_clusters(s, off, s.cluster_size, dtype)


async def update_refcount(s: Qcow2State, offset: int, length: int, addend: int, decrease: bool, dtype: int) -> None:
    """``update_refcount``: add or subtract ``addend`` for every cluster of the range.

    Raises BlockError(EAGAIN) when a new refcount block was placed where the caller may have
    wanted its clusters; the caller restarts its search."""
    if length < 0:
        raise BlockError(errno.EINVAL)
    if length == 0:
        return
    rbc = s.rbc
    if decrease:
        await _set_dependency(rbc, s.l2c)
    cb = s.cluster_bits
    cs = s.cluster_size
    start = offset & ~(cs - 1)
    last = (offset + length - 1) & ~(cs - 1)
    cluster_offset = start
    block: int | None = None
    old_table_index = -1
    error: BlockError | None = None
    rbb, rbs = s.refcount_block_bits, s.refcount_block_size
    try:
        while cluster_offset <= last:
            cluster_index = cluster_offset >> cb
            table_index = cluster_index >> rbb
            if table_index != old_table_index:
                if block is not None:
                    rbc.put(block)
                    block = None
                try:
                    block, again = await _alloc_refcount_block(s, cluster_index)
                except BlockError as e:
                    # an EAGAIN from the nested update_refcount of a new refcount block: restart
                    # from this range too, as QEMU does for every -EAGAIN of alloc_refcount_block
                    again = e.code == errno.EAGAIN
                    if not again:
                        raise
                if again:
                    if s.free_cluster_index > (start >> cb):
                        s.free_cluster_index = start >> cb
                    raise BlockError(errno.EAGAIN)
            old_table_index = table_index
            assert block is not None
            rbc.mark_dirty(block)
            tbl = rbc.tables[block]
            bi = cluster_index & (rbs - 1)
            refcount = s.get_rc(tbl, bi)
            if decrease:
                if refcount < addend:
                    raise BlockError(errno.EINVAL)
                refcount -= addend
            else:
                if refcount + addend > s.refcount_max:
                    raise BlockError(errno.EINVAL)
                if refcount == 0 and s.free_byte_offset and \
                        cluster_offset == s.free_byte_offset & ~(cs - 1):
                    # Deviation from QEMU 7.2, which keeps packing compressed data into the
                    # cluster of free_byte_offset even after that cluster was freed and
                    # reallocated (for data or metadata) and so overwrites it.  qcow2_alloc_bytes
                    # sets free_byte_offset again after its own update.
                    s.free_byte_offset = 0
                refcount += addend
            if refcount == 0 and cluster_index < s.free_cluster_index:
                s.free_cluster_index = cluster_index
            s.set_rc(tbl, bi, refcount)
            if refcount == 0:
                t = rbc.is_table_offset(offset)  # sic: QEMU looks up the start of the range
                if t is not None:
                    rbc.put(block)
                    block = None
                    old_table_index = -1
                    rbc.discard(t)
                t = s.l2c.is_table_offset(offset)
                if t is not None:
                    s.l2c.discard(t)
                if s.discard_passthrough[dtype]:
                    _update_refcount_discard(s, cluster_offset, cs)
            cluster_offset += cs
    except BlockError as e:
        error = e
    if not s.cache_discards:
        await _process_discards(s, error is None)
    if block is not None:
        rbc.put(block)
    if error is not None:
        try:
            await update_refcount(s, offset, cluster_offset - offset, addend, not decrease, DISCARD_NEVER)
        except BlockError:
            pass
        raise error


async def _alloc_refcount_block(s: Qcow2State, cluster_index: int) -> tuple[int | None, bool]:
    """``alloc_refcount_block``: (cache entry of the block, whether the caller must restart)."""
    await _event(s, Event.REFBLOCK_ALLOC)
    rti = (cluster_index >> s.refcount_block_bits) & 0xFFFFFFFF  # QEMU's unsigned int index
    cs, cb = s.cluster_size, s.cluster_bits
    if rti < s.refcount_table_size:
        rbo = s.refcount_table[rti] & L.REFT_OFFSET_MASK
        if rbo:
            if rbo & (cs - 1):
                await signal_corruption(s, True, f"Refblock offset {cx(rbo)} unaligned (reftable index: "
                                                   f"{cx(rti)})")
                raise BlockError(errno.EIO)
            return await _load_refcount_block(s, rbo), False
    await s.l2c.flush()
    new_block = await _alloc_clusters_noref(s, cs, INT64_MAX)
    if new_block == 0:
        await signal_corruption(s, True, "Preventing invalid allocation of refcount block at offset 0")
        raise BlockError(errno.EIO)
    rbc = s.rbc
    block: int | None = None
    try:
        same = (new_block >> (cb + s.refcount_block_bits)) == \
            (cluster_index >> s.refcount_block_bits)
        if same:
            block = await rbc.get_empty(new_block)
            tbl = rbc.tables[block]
            tbl[:] = bytes(cs)
            s.set_rc(tbl, (new_block >> cb) & (s.refcount_block_size - 1), 1)
        else:
            await update_refcount(s, new_block, cs, 1, False, DISCARD_NEVER)
            await rbc.flush()
            block = await rbc.get_empty(new_block)
            rbc.tables[block][:] = bytes(cs)
        await _event(s, Event.REFBLOCK_ALLOC_WRITE)
        rbc.mark_dirty(block)
        await rbc.flush()
        if rti < s.refcount_table_size:
            await _event(s, Event.REFBLOCK_ALLOC_HOOKUP)
            data = bytearray(8)
            _pack_entry(data, 0, new_block)
            await pwrite_sync(s, s.refcount_table_offset + rti * 8, bytes(data))
            s.refcount_table[rti] = new_block
            s.max_refcount_table_index = max(s.max_refcount_table_index, rti)
            if s._refblock_offsets is not None and new_block not in s._refblock_offsets:
                s._refblock_offsets.add(new_block)
                s._refblock_unaligned += bool(new_block & (cs - 1))
            return block, True
        rbc.put(block)
        block = None
    except BaseException:
        if block is not None:
            rbc.put(block)
        raise
    await _event(s, Event.REFTABLE_GROW)
    blocks_used = -(-max(cluster_index + 1, (new_block >> cb) + 1) // s.refcount_block_size)
    meta_offset = blocks_used * s.refcount_block_size * cs
    await refcount_area(s, meta_offset, 0, False, rti, new_block)
    return await _load_refcount_block(s, new_block), True


def refcount_metadata_size(s: Qcow2State, clusters: int, generous: bool) -> tuple[int, int]:
    """``qcow2_refcount_metadata_size``: (bytes of refcount metadata, number of refcount blocks)."""
    cs = s.cluster_size
    per_table_cluster = cs // 8
    per_block = cs * 8 // s.refcount_bits
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
        if n == last:
            break
    return (blocks + table) * cs, blocks


async def refcount_area(s: Qcow2State, start_offset: int, additional_clusters: int, exact_size: bool,
                        new_refblock_index: int, new_refblock_offset: int) -> int:
    """``qcow2_refcount_area``: a new, self-describing refcount table (and blocks) at ``start_offset``."""
    cs = s.cluster_size
    rbs = s.refcount_block_size
    _, total = refcount_metadata_size(s, start_offset // cs + additional_clusters, not exact_size)
    if total > L.MAX_REFTABLE_SIZE:
        raise BlockError(errno.EFBIG)
    area_index = (start_offset // cs) // rbs
    table_size = total if exact_size else total + -(-total // 2)
    table_size = _round_up(table_size, cs // 8)
    table_clusters = table_size * 8 // cs
    if table_size > L.MAX_REFTABLE_SIZE:
        raise BlockError(errno.EFBIG)
    new_table = array.array("Q", bytes(table_size * 8))
    keep = min(s.max_refcount_table_index + 1, table_size, len(s.refcount_table))
    new_table[:keep] = s.refcount_table[:keep]
    if new_refblock_offset:
        new_table[new_refblock_index] = new_refblock_offset
    additional = sum(1 for i in range(area_index, total) if not new_table[i])
    table_offset = start_offset + additional * cs
    end_offset = table_offset + table_clusters * cs
    rbc = s.rbc
    block_offset = start_offset
    for i in range(area_index, total):
        if new_table[i]:
            blk = await rbc.get(new_table[i])
        else:
            blk = await rbc.get_empty(block_offset)
            rbc.tables[blk][:] = bytes(cs)
            rbc.mark_dirty(blk)
            new_table[i] = block_offset
            block_offset += cs
        first = i * rbs * cs
        if first < end_offset:
            j = (start_offset - first) // cs if first < start_offset else 0
            end_index = min((end_offset - first) // cs, rbs)
            tbl = rbc.tables[blk]
            for k in range(j, end_index):
                s.set_rc(tbl, k, 1)
            rbc.mark_dirty(blk)
        rbc.put(blk)
    await _event(s, Event.REFBLOCK_ALLOC_WRITE_BLOCKS)
    await rbc.flush()
    raw = bytearray(table_size * 8)
    for i in range(total):
        _pack_entry(raw, i * 8, new_table[i])
    await _event(s, Event.REFBLOCK_ALLOC_WRITE_TABLE)
    await pwrite_sync(s, table_offset, bytes(raw))
    await _event(s, Event.REFBLOCK_ALLOC_SWITCH_TABLE)
    await pwrite_sync(s, L.OFF_REFCOUNT_TABLE_OFFSET,
                           L.REFTABLE_OFFSET_AND_CLUSTERS.pack(table_offset, table_clusters))
    old_offset, old_size = s.refcount_table_offset, s.refcount_table_size
    s.refcount_table = new_table
    s.refcount_table_size = table_size
    s.refcount_table_offset = table_offset
    _update_max_refcount_table_index(s)
    await free_clusters(s, old_offset, old_size * 8, DISCARD_OTHER)
    return end_offset


def _update_refcount_discard(s: Qcow2State, offset: int, length: int) -> None:
    """Queue a discard of a freed range, merged with adjacent queued ranges."""
    d: list[int] | None = None
    for cand in s.discards:
        new_start = min(offset, cand[0])
        new_end = max(offset + length, cand[0] + cand[1])
        if new_end - new_start <= length + cand[1]:
            cand[0], cand[1] = new_start, new_end - new_start
            d = cand
            break
    if d is None:
        d = [offset, length]
        s.discards.append(d)
    for p in list(s.discards):
        if p is d or p[0] > d[0] + d[1] or d[0] > p[0] + p[1]:
            continue
        s.discards.remove(p)
        d[0] = min(d[0], p[0])
        d[1] += p[1]


async def _process_discards(s: Qcow2State, ok: bool) -> None:
    discards, s.discards = s.discards, []
    if not ok:
        return
    for off, n in discards:
        try:
            await io.pdiscard(s.bs.file, off, n)
        except BlockError:
            pass


async def write_caches(s: Qcow2State) -> None:
    """``qcow2_write_caches``: L2 tables, then (unless lazy and dirty) refcount blocks."""
    await s.l2c.write()
    if _need_accurate_refcounts(s):
        await s.rbc.write()


async def flush_caches(s: Qcow2State) -> None:
    await write_caches(s)
    await io.flush(s.bs.file)


async def mark_clean(s: Qcow2State) -> None:
    if s.incompatible_features & L.INCOMPAT_DIRTY:
        s.incompatible_features &= ~L.INCOMPAT_DIRTY
        await flush_caches(s)
        await update_header(s)


async def _shrink_reftable(s: Qcow2State) -> None:
    """``qcow2_shrink_reftable``: drop refcount blocks that describe no cluster but themselves."""
    rbc = s.rbc
    cb = s.cluster_bits
    tmp = [0] * s.refcount_table_size
    for i in range(s.refcount_table_size):
        rbo = s.refcount_table[i] & L.REFT_OFFSET_MASK
        if not rbo:
            continue
        blk = await rbc.get(rbo)
        tbl = rbc.tables[blk]
        if i == (rbo >> cb) >> s.refcount_block_bits:
            bi = (rbo >> cb) & (s.refcount_block_size - 1)
            rc = s.get_rc(tbl, bi)
            s.set_rc(tbl, bi, 0)
            unused = not any(tbl)
            s.set_rc(tbl, bi, rc)
        else:
            unused = not any(tbl)
        rbc.put(blk)
        tmp[i] = 0 if unused else s.refcount_table[i]
    raw = bytearray(s.refcount_table_size * 8)
    for i, e in enumerate(tmp):
        _pack_entry(raw, i * 8, e)
    error: BlockError | None = None
    try:
        await pwrite_sync(s, s.refcount_table_offset, bytes(raw))
    except BlockError as e:
        error = e
    for i in range(s.refcount_table_size):
        if s.refcount_table[i] and not tmp[i]:
            if error is None:
                try:
                    await _discard_refcount_block(s, s.refcount_table[i] & L.REFT_OFFSET_MASK)
                except BlockError as e:
                    error = e
            s.refcount_table[i] = 0
    _reftable_changed(s)
    if not s.cache_discards:
        await _process_discards(s, error is None)
    if error is not None:
        raise error


async def _discard_refcount_block(s: Qcow2State, offset: int) -> None:
    cb = s.cluster_bits
    cluster_index = offset >> cb
    bi = cluster_index & (s.refcount_block_size - 1)
    rti = cluster_index >> s.refcount_block_bits
    rbo = s.refcount_table[rti] & L.REFT_OFFSET_MASK if rti < s.refcount_table_size else 0
    if not rbo:
        await signal_corruption(s, True, f"Refblock at {cx(offset)} is not covered by the refcount structures")
        raise BlockError(errno.EIO)
    rbc = s.rbc
    blk = await rbc.get(rbo)
    tbl = rbc.tables[blk]
    rc = s.get_rc(tbl, bi)
    if rc != 1:
        await signal_corruption(s, True, f"Invalid refcount: refblock offset {cx(rbo)}, reftable index {rti}, "
                                           f"block offset {cx(offset)}, refcount {cx(rc)}")
        rbc.put(blk)
        raise BlockError(errno.EINVAL)
    s.set_rc(tbl, bi, 0)
    rbc.mark_dirty(blk)
    rbc.put(blk)
    if cluster_index < s.free_cluster_index:
        s.free_cluster_index = cluster_index
    t = rbc.is_table_offset(offset)
    if t is not None:
        rbc.discard(t)
    _update_refcount_discard(s, offset, s.cluster_size)


async def _get_last_cluster(s: Qcow2State, size: int) -> int:
    for i in range(size_to_clusters(s, size) - 1, -1, -1):
        try:
            rc = await get_refcount(s, i)
        except BlockError as e:
            _stderr(s, f"Can't get refcount for cluster {i}: {os.strerror(e.code)}\n")
            raise
        if rc > 0:
            return i
    await signal_corruption(s, True, "There are no references in the refcount table.")
    raise BlockError(errno.EIO)
