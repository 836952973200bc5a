"""Extended L2 entries (incompatible feature bit 4): 16-byte L2 entries whose second word holds two
32-bit bitmaps, "allocated" (bits 0..31) and "reads as zeroes" (bits 32..63), one bit per subcluster
(1/32 of a cluster).

The cluster mapping code (:mod:`qio.block.qcow2.cluster`) loads the L2 slices and calls the functions
here when ``s.subclusters`` is set; everything that knows about the bitmaps lives in this module:
subcluster types (``qcow2_get_subcluster_type``), contiguous-range counting
(``count_contiguous_subclusters``), the COW bounds of a new allocation (the subcluster half of
``calculate_l2_meta``), the bitmap update after a write (``qcow2_alloc_cluster_link_l2``) and the
discard/zero entry rewrites (``discard_in_l2_slice``, ``zero_in_l2_slice``, ``zero_l2_subclusters``).

References: QEMU 7.2 ``block/qcow2.h`` (``QCOW_OFLAG_SUB_*``, ``qcow2_get_subcluster_type``),
``block/qcow2-cluster.c``; ``docs/interop/qcow2.txt`` "Extended L2 Entries".
"""

from __future__ import annotations

import errno
import struct

from qio.block.driver import REQ_MAY_UNMAP
from qio.block.errors import BlockError, QemuError
from qio.block.qcow2 import layout as L
from qio.block.qcow2.header import signal_corruption
from qio.block.qcow2.state import DISCARD_REQUEST, Qcow2State, _round_up, cx

SUBCLUSTERS_PER_CLUSTER = 32
BITMAP_ALL_ALLOC = 0xFFFFFFFF
BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32
#: Subcluster type of a bitmap that contradicts itself or its entry (QCOW2_SUBCLUSTER_INVALID).
SUBCLUSTER_INVALID = -1

_PAIR = struct.Struct(">QQ")
_unpack_pair = _PAIR.unpack_from
_pack_pair = _PAIR.pack_into


def init_subclusters(s: Qcow2State) -> None:
    """The subcluster geometry ``qcow2_do_open`` sets for an image with extended L2 entries."""
    s.subclusters = True
    s.l2e_shift = 4
    s.subclusters_per_cluster = SUBCLUSTERS_PER_CLUSTER
    s.subcluster_size = s.cluster_size // SUBCLUSTERS_PER_CLUSTER
    s.subcluster_bits = s.subcluster_size.bit_length() - 1
    if s.subcluster_size < 1 << L.MIN_CLUSTER_BITS:
        raise QemuError(f"Unsupported subcluster size: {s.subcluster_size}", errno.EINVAL)


def alloc_range(first: int, end: int) -> int:
    """``QCOW_OFLAG_SUB_ALLOC_RANGE(first, end)``: allocation bits ``first`` .. ``end - 1``."""
    return (1 << end) - (1 << first)


def ctz32(x: int) -> int:
    x &= 0xFFFFFFFF
    return (x & -x).bit_length() - 1 if x else 32


def clz32(x: int) -> int:
    return 32 - (x & 0xFFFFFFFF).bit_length()


def pair(tbl: bytearray, index: int) -> tuple[int, int]:
    """(L2 entry, bitmap) of slot ``index`` of an extended L2 slice."""
    e, b = _unpack_pair(tbl, index << 4)
    return int(e), int(b)


def set_pair(tbl: bytearray, index: int, entry: int, bitmap: int) -> None:
    _pack_pair(tbl, index << 4, entry, bitmap)


def set_bitmap(tbl: bytearray, index: int, bitmap: int) -> None:
    L.ENTRY.pack_into(tbl, (index << 4) + 8, bitmap)


def has_data_file(s: Qcow2State) -> bool:
    """Host offset 0 is a valid data offset in an external data file (told apart by COPIED)."""
    return bool(s.incompatible_features & L.INCOMPAT_DATA_FILE)


def cluster_type(entry: int, data_file: bool = False) -> int:
    """``qcow2_get_cluster_type`` with subclusters: the zero flag (bit 0) means nothing."""
    if entry & L.OFLAG_COMPRESSED:
        return L.CLUSTER_COMPRESSED
    if entry & L.L2E_OFFSET_MASK or (data_file and entry & L.OFLAG_COPIED):
        return L.CLUSTER_NORMAL
    return L.CLUSTER_UNALLOCATED


def subcluster_type(entry: int, bitmap: int, sc: int, data_file: bool = False) -> int:
    """``qcow2_get_subcluster_type``: an ``L.CLUSTER_*`` code (``L.CLUSTER_UNALLOCATED_ALLOC`` for an
    unallocated subcluster of an allocated cluster) or :data:`SUBCLUSTER_INVALID`."""
    ctype = cluster_type(entry, data_file)
    if ctype == L.CLUSTER_COMPRESSED:
        return L.CLUSTER_COMPRESSED
    if ctype == L.CLUSTER_NORMAL:
        if (bitmap >> 32) & bitmap:
            return SUBCLUSTER_INVALID
        if bitmap & (1 << (sc + 32)):
            return L.CLUSTER_ZERO_ALLOC
        if bitmap & (1 << sc):
            return L.CLUSTER_NORMAL
        return L.CLUSTER_UNALLOCATED_ALLOC
    if bitmap & BITMAP_ALL_ALLOC:
        return SUBCLUSTER_INVALID
    if bitmap & (1 << (sc + 32)):
        return L.CLUSTER_ZERO_PLAIN
    return L.CLUSTER_UNALLOCATED


def range_type(entry: int, bitmap: int, sc_from: int, data_file: bool = False) -> tuple[int, int]:
    """``qcow2_get_subcluster_range_type``: (subclusters of one type from ``sc_from``, the type);
    the count is -1 for an invalid entry."""
    t = subcluster_type(entry, bitmap, sc_from, data_file)
    if t == SUBCLUSTER_INVALID:
        return -1, t
    if t == L.CLUSTER_COMPRESSED:
        return SUBCLUSTERS_PER_CLUSTER - sc_from, t
    low = (1 << sc_from) - 1
    if t == L.CLUSTER_NORMAL:
        return ctz32(~(bitmap | low)) - sc_from, t
    if t in (L.CLUSTER_ZERO_PLAIN, L.CLUSTER_ZERO_ALLOC):
        return ctz32(~((bitmap >> 32) | low)) - sc_from, t
    return ctz32(((bitmap >> 32) | bitmap) & ~low) - sc_from, t


def count_contiguous(s: Qcow2State, tbl: bytearray, l2_index: int, nb_clusters: int,
                     sc_index: int) -> tuple[int, int]:
    """``count_contiguous_subclusters``: (subclusters of the first one's type, and contiguous on the
    host if allocated; -1 if an invalid entry was met, slot index of the last entry looked at)."""
    count = 0
    expected_type = L.CLUSTER_NORMAL
    expected_offset = 0
    check_offset = False
    cs = s.cluster_size
    df = has_data_file(s)
    for i in range(nb_clusters):
        first_sc = sc_index if i == 0 else 0
        entry, bitmap = pair(tbl, l2_index + i)
        n, t = range_type(entry, bitmap, first_sc, df)
        if n < 0:
            return -1, l2_index + i
        if i == 0:
            if t == L.CLUSTER_COMPRESSED:
                return n, l2_index
            expected_type = t
            expected_offset = entry & L.L2E_OFFSET_MASK
            check_offset = t in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC, L.CLUSTER_UNALLOCATED_ALLOC)
        elif t != expected_type:
            break
        elif check_offset:
            expected_offset += cs
            if expected_offset != entry & L.L2E_OFFSET_MASK:
                break
        count += n
        if first_sc + n < SUBCLUSTERS_PER_CLUSTER:
            break
    return count, l2_index


async def host_offset_in_slice(s: Qcow2State, tbl: bytearray, l2_index: int, offset: int, needed: int,
                               l2_offset: int) -> tuple[int, int, int]:
    """The extended-L2 half of ``qcow2_get_host_offset`` once the slice is loaded: (bytes of one
    subcluster type from ``offset``, host offset or compressed entry, type)."""
    cs = s.cluster_size
    oic = offset & (cs - 1)
    sc_index = (offset >> s.subcluster_bits) & (SUBCLUSTERS_PER_CLUSTER - 1)
    entry, bitmap = pair(tbl, l2_index)
    df = has_data_file(s)
    t = subcluster_type(entry, bitmap, sc_index, df)
    host = 0
    if t == L.CLUSTER_COMPRESSED:
        if df:
            await signal_corruption(s, True, f"Compressed cluster entry found in image with external data file "
                                               f"(L2 offset: {cx(l2_offset)}, L2 index: {cx(l2_index)})")
            raise BlockError(errno.EIO)
        host = entry
    elif t in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC, L.CLUSTER_UNALLOCATED_ALLOC):
        hc = entry & L.L2E_OFFSET_MASK
        host = hc + oic
        if hc & (cs - 1):
            await signal_corruption(s, True, f"Cluster allocation offset {cx(hc)} unaligned (L2 offset: "
                                               f"{cx(l2_offset)}, L2 index: {cx(l2_index)})")
            raise BlockError(errno.EIO)
        if df and host != offset:
            await signal_corruption(s, True, f"External data file host cluster offset {cx(hc)} does not match "
                                               f"guest cluster offset: {cx(offset - oic)}, L2 index: {cx(l2_index)})")
            raise BlockError(errno.EIO)
    nb_clusters = (needed + cs - 1) >> s.cluster_bits
    sc, at = count_contiguous(s, tbl, l2_index, nb_clusters, sc_index)
    if sc < 0:
        await signal_corruption(s, True, f"Invalid cluster entry found  (L2 offset: {cx(l2_offset)}, "
                                           f"L2 index: {cx(at)})")
        raise BlockError(errno.EIO)
    available = (sc + sc_index) << s.subcluster_bits
    return min(available, needed) - oic, host, t


async def cow_bounds(s: Qcow2State, tbl: bytearray, l2_index: int, guest_offset: int, nbytes: int,
                     keep_old: bool) -> tuple[int, int] | None:
    """The subcluster half of ``calculate_l2_meta``: (cow_start_from, cow_end_to) in bytes from the
    first cluster's start, or None when an in-place write needs neither COW nor an L2 update."""
    cb, scb, cs = s.cluster_bits, s.subcluster_bits, s.cluster_size
    scmask = SUBCLUSTERS_PER_CLUSTER - 1
    cow_start_to = guest_offset & (cs - 1)
    cow_end_from = cow_start_to + nbytes
    nb_clusters = (cow_end_from + cs - 1) >> cb
    skip = keep_old
    df = has_data_file(s)
    for i in range(nb_clusters):
        entry, bitmap = pair(tbl, l2_index + i)
        if skip:
            first = (max(cow_start_to, i << cb) >> scb) & scmask
            last = ((min(cow_end_from, (i + 1) << cb) - 1) >> scb) & scmask
            n, t = range_type(entry, bitmap, first, df)
            if t != L.CLUSTER_NORMAL or first + n <= last:
                skip = False
        else:
            t = subcluster_type(entry, bitmap, 0, df)
        if t == SUBCLUSTER_INVALID:
            l2_offset = s.l1_table[guest_offset >> (s.l2_bits + cb)] & L.L1E_OFFSET_MASK
            await signal_corruption(s, True, f"Invalid cluster entry found (L2 offset: {cx(l2_offset)}, "
                                               f"L2 index: {cx(l2_index + i)})")
            raise BlockError(errno.EIO)
    if skip:
        return None
    allocated = (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC, L.CLUSTER_UNALLOCATED_ALLOC)
    entry, bitmap = pair(tbl, l2_index)
    sc = (guest_offset >> scb) & scmask
    t = subcluster_type(entry, bitmap, sc, df)
    if not keep_old:
        if t == L.CLUSTER_COMPRESSED:
            start_from = 0
        elif t in allocated:
            start_from = min(sc, ctz32(bitmap & BITMAP_ALL_ALLOC)) << scb
        else:
            start_from = sc << scb
    else:
        start_from = cow_start_to if t == L.CLUSTER_NORMAL else sc << scb
    entry, bitmap = pair(tbl, l2_index + nb_clusters - 1)
    sc = ((guest_offset + nbytes - 1) >> scb) & scmask
    t = subcluster_type(entry, bitmap, sc, df)
    if not keep_old:
        if t == L.CLUSTER_COMPRESSED:
            end_to = _round_up(cow_end_from, cs)
        elif t in allocated:
            end_to = _round_up(cow_end_from, cs) - (min(scmask - sc, clz32(bitmap & BITMAP_ALL_ALLOC)) << scb)
        else:
            end_to = _round_up(cow_end_from, s.subcluster_size)
    else:
        end_to = cow_end_from if t == L.CLUSTER_NORMAL else _round_up(cow_end_from, s.subcluster_size)
    return start_from, end_to


def mark_written(s: Qcow2State, tbl: bytearray, l2_index: int, i: int, written_from: int, written_to: int) -> None:
    """Cluster ``i`` of an allocation: its subclusters within [written_from, written_to) (bytes from
    the allocation's first cluster) become allocated and lose their zero bits."""
    cb, scb = s.cluster_bits, s.subcluster_bits
    scmask = SUBCLUSTERS_PER_CLUSTER - 1
    lo = max(written_from, i << cb)
    hi = min(written_to, (i + 1) << cb)
    first = (lo >> scb) & scmask
    last = ((hi - 1) >> scb) & scmask
    _, bitmap = pair(tbl, l2_index + i)
    bits = alloc_range(first, last + 1)
    set_bitmap(tbl, l2_index + i, (bitmap | bits) & ~(bits << 32))


async def discard_entries(s: Qcow2State, ci: int, tbl: bytearray, l2_index: int, nb: int, dtype: int,
                          full_discard: bool) -> None:
    """``discard_in_l2_slice`` for extended entries: discarded clusters read as zeroes (entry 0, all
    zero bits) unless ``full_discard`` (everything 0: the backing file shows through)."""
    from qio.block.qcow2.refcount import free_any_cluster

    c = s.l2c
    backing = s.bs.backing is not None
    df = has_data_file(s)
    for i in range(nb):
        old_e, old_b = pair(tbl, l2_index + i)
        new_e, new_b = old_e, old_b
        if full_discard:
            new_e = new_b = 0
        elif backing or L.cluster_is_allocated(cluster_type(old_e, df)):
            new_e, new_b = 0, BITMAP_ALL_ZEROES
        if old_e == new_e and old_b == new_b:
            continue
        c.mark_dirty(ci)
        set_pair(tbl, l2_index + i, new_e, new_b)
        await free_any_cluster(s, old_e, dtype)


async def zero_entries(s: Qcow2State, ci: int, tbl: bytearray, l2_index: int, nb: int, flags: int) -> None:
    """``zero_in_l2_slice`` for extended entries: all zero bits set (and the cluster unmapped when
    it is compressed or the request may unmap)."""
    from qio.block.qcow2.refcount import free_any_cluster

    c = s.l2c
    df = has_data_file(s)
    for i in range(nb):
        old_e, old_b = pair(tbl, l2_index + i)
        ctype = cluster_type(old_e, df)
        unmap = ctype == L.CLUSTER_COMPRESSED or bool(flags & REQ_MAY_UNMAP and L.cluster_is_allocated(ctype))
        new_e = 0 if unmap else old_e
        if old_e == new_e and old_b == BITMAP_ALL_ZEROES:
            continue
        c.mark_dirty(ci)
        set_pair(tbl, l2_index + i, new_e, BITMAP_ALL_ZEROES)
        if unmap:
            await free_any_cluster(s, old_e, DISCARD_REQUEST)


def zero_subclusters(s: Qcow2State, ci: int, tbl: bytearray, l2_index: int, offset: int, nb_sc: int) -> None:
    """``zero_l2_subclusters`` (part of one cluster): the subclusters read as zeroes; a compressed
    cluster cannot be zeroed in part (ENOTSUP, the caller falls back to writing zeroes)."""
    entry, bitmap = pair(tbl, l2_index)
    if cluster_type(entry, has_data_file(s)) == L.CLUSTER_COMPRESSED:
        raise BlockError(errno.ENOTSUP)
    sc = (offset >> s.subcluster_bits) & (SUBCLUSTERS_PER_CLUSTER - 1)
    bits = alloc_range(sc, sc + nb_sc)
    new = (bitmap | (bits << 32)) & ~bits
    if new != bitmap:
        set_bitmap(tbl, l2_index, new)
        s.l2c.mark_dirty(ci)
