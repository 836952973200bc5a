"""``qcow2_co_truncate``: growing with preallocation, and shrinking."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.driver import (
    REQ_ZERO_WRITE,
    SECTOR,
)
from qio.block.errors import BlockError, QemuError, report_error
from qio.block.qcow2 import layout as L
from qio.block.qcow2.cluster import (
    _shrink_l1_table,
    alloc_cluster_link_l2,
    alloc_host_offset,
    cluster_discard,
    grow_l1_table,
    handle_l2meta,
    subcluster_zeroize,
)
from qio.block.qcow2.options import _recreate_caches
from qio.block.qcow2.refcount import (
    _get_last_cluster,
    _shrink_reftable,
    alloc_clusters_at,
    free_clusters,
    refcount_area,
    write_caches,
)
from qio.block.qcow2.rw import _pwritev_part
from qio.block.qcow2.state import (
    DISCARD_ALWAYS,
    DISCARD_OTHER,
    INT_MAX,
    L2Meta,
    Qcow2State,
    _check_usable,
    _length,
    _pack_entry,
    _round_up,
    data_file_is_raw,
    has_data_file,
    pwrite_sync,
    size_to_l1,
)

if TYPE_CHECKING:
    pass



async def co_truncate(s: Qcow2State, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
    """``qcow2_co_truncate``.  With ``REQ_ZERO_WRITE`` (a backing file reaches into the new area) the
    new clusters become zero clusters and a partial old last cluster gets explicit zeroes."""
    _check_usable(s)
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise QemuError(f"Unsupported preallocation mode '{prealloc}'", errno.ENOTSUP)
    if offset % SECTOR:
        raise QemuError(f"The new size must be a multiple of {SECTOR}", errno.EINVAL)
    await s.lock.lock()
    try:
        if s.nb_snapshots and s.qcow_version < 3:
            raise QemuError("Can't resize a v2 image which has snapshots", errno.ENOTSUP)
        old_length = _length(s)
        new_l1_size = size_to_l1(s, offset)
        if offset < old_length:
            if prealloc != "off":
                raise QemuError("Preallocation can't be used for shrinking an image", errno.EINVAL)
            await _shrink(s, offset, old_length, new_l1_size)
        else:
            try:
                await grow_l1_table(s, new_l1_size, True)
            except BlockError as e:
                raise QemuError.wrap(e, "Failed to grow the L1 table") from None
            if data_file_is_raw(s) and prealloc == "off":
                prealloc = "metadata"  # the raw data file stays mapped 1:1
        if prealloc == "off" and has_data_file(s):
            await io.truncate(s.data_file, offset, exact, prealloc)
        elif prealloc == "metadata" or (prealloc != "off" and has_data_file(s)):
            await _preallocate(s, old_length, offset, prealloc)
        elif prealloc != "off":
            flags = await _preallocate_data(s, old_length, offset, prealloc, flags)
        if flags & REQ_ZERO_WRITE and offset > old_length:
            await _zero_new_area(s, old_length, offset)
        if prealloc != "off":
            try:
                await write_caches(s)
            except BlockError as e:
                raise QemuError.wrap(e, "Failed to flush the preallocated area to disk") from None
        s.total_sectors = offset // SECTOR
        data = bytearray(8)
        _pack_entry(data, 0, offset)
        try:
            await pwrite_sync(s, L.OFF_SIZE, bytes(data))
        except BlockError as e:
            raise QemuError.wrap(e, "Failed to update the image size") from None
        s.l1_vm_state_index = new_l1_size
        await _recreate_caches(s)
    finally:
        s.lock.unlock()


async def _zero_new_area(s: Qcow2State, old_length: int, offset: int) -> None:
    """The ``BDRV_REQ_ZERO_WRITE`` tail of ``qcow2_co_truncate`` (lock held): zero clusters from the
    first cluster boundary on, explicit zeroes (a normal write, lock dropped) before it."""
    zero_start = _round_up(old_length, s.subcluster_size)
    if offset > zero_start:
        try:
            await subcluster_zeroize(s, zero_start, offset - zero_start, 0)
        except BlockError as e:
            raise QemuError.wrap(e, "Failed to zero out new clusters") from None
    if zero_start > old_length:
        n = min(zero_start, offset) - old_length
        s.lock.unlock()
        try:
            await _pwritev_part(s, old_length, n, [memoryview(bytearray(n))])
        except BlockError as e:
            raise QemuError.wrap(e, "Failed to zero out the new area") from None
        finally:
            await s.lock.lock()


async def _preallocate_data(s: Qcow2State, old_length: int, offset: int, mode: str, flags: int) -> int:
    """The ``falloc``/``full`` case of ``qcow2_co_truncate`` (lock held): reserve refcount room for
    the new data clusters and their L2 tables after the image, allocate the data clusters in one
    run, extend the file with the protocol's preallocation, then link them into the L2 tables.
    Returns ``flags`` without ``REQ_ZERO_WRITE`` when the protocol already zeroed the area."""
    cs, cb = s.cluster_size, s.cluster_bits
    old_file_size = io.getlength(s.bs.file)
    try:
        old_file_size = (await _get_last_cluster(s, old_file_size) + 1) * cs
    except BlockError:
        old_file_size = _round_up(old_file_size, cs)
    nb_data = (_round_up(offset, cs) - (old_length & ~(cs - 1))) >> cb
    nb_l2 = -(-nb_data // (cs >> s.l2e_shift)) + 1
    try:
        start = await refcount_area(s, old_file_size, nb_data + nb_l2, True, 0, 0)
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to resize refcount structures") from None
    try:
        await alloc_clusters_at(s, start, nb_data)
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to allocate data clusters") from None
    new_file_size = start + nb_data * cs
    done = False
    if flags & REQ_ZERO_WRITE:
        try:
            await io.truncate(s.bs.file, new_file_size, False, mode, REQ_ZERO_WRITE)
        except QemuError:
            pass
        else:
            flags &= ~REQ_ZERO_WRITE
            done = True  # then subclusters are marked allocated: they read zeroes, not backing data
    if not done:
        try:
            await io.truncate(s.bs.file, new_file_size, False, mode)
        except QemuError as e:
            await free_clusters(s, start, nb_data * cs, DISCARD_OTHER)
            raise QemuError(f"Failed to resize underlying file: {e}", e.errno) from None
    host, guest = start, old_length
    while nb_data:
        n = min(nb_data, s.l2_slice_size - ((guest >> cb) & (s.l2_slice_size - 1)))
        cow_start = guest & (cs - 1)
        guest -= cow_start
        m = L2Meta(guest, host, n, False, 0, cow_start, n << cb, 0)
        m.prealloc = not done  # subclusters_need_allocation
        try:
            await alloc_cluster_link_l2(s, m)
        except BlockError as e:
            await free_clusters(s, host, nb_data * cs, DISCARD_OTHER)
            raise QemuError.wrap(e, "Failed to update L2 tables") from None
        guest += n * cs
        host += n * cs
        nb_data -= n
    return flags


async def _shrink(s: Qcow2State, offset: int, old_length: int, new_l1_size: int) -> None:
    """The shrinking part of ``qcow2_co_truncate``."""
    cs = s.cluster_size
    start = _round_up(offset, cs)
    try:
        await cluster_discard(s, start, old_length - start, DISCARD_ALWAYS, True)
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to discard cropped clusters") from None
    try:
        await _shrink_l1_table(s, new_l1_size)
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to reduce the number of L2 tables") from None
    try:
        await _shrink_reftable(s)
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to discard unused refblocks") from None
    old_file_size = io.getlength(s.bs.file)
    try:
        last_cluster = await _get_last_cluster(s, old_file_size)
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to find the last cluster") from None
    if (last_cluster + 1) * cs < old_file_size:
        try:
            await io.truncate(s.bs.file, (last_cluster + 1) * cs, False, "off")
        except QemuError as e:
            report_error(s.bs.warn, f"Failed to truncate the tail of the image: {e}", warning=True)


async def _preallocate(s: Qcow2State, offset: int, new_length: int, mode: str) -> None:
    """``preallocate_co``: allocate and link clusters (no data), then extend the file to cover them."""
    cs = s.cluster_size
    host = 0
    cur = 0
    while offset < new_length:
        nbytes = min(new_length - offset, INT_MAX // cs * cs)
        metas: list[L2Meta] = []
        try:
            try:
                cur, host = await alloc_host_offset(s, offset, nbytes, metas)
            except BlockError as e:
                raise QemuError.wrap(e, "Allocating clusters failed") from None
            for m in metas:
                m.prealloc = True
            try:
                await handle_l2meta(s, metas, True)
            except BlockError as e:
                raise QemuError.wrap(e, "Mapping clusters failed") from None
        finally:
            await handle_l2meta(s, metas, False)
        offset += cur
    file_length = io.getlength(s.data_file)
    if host + cur > file_length:
        await io.truncate(s.data_file, host + cur, False, "off" if mode == "metadata" else mode)
