"""Metadata overlap checks (``qcow2_check_metadata_overlap``) before writes to the image file."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qio.block.errors import BlockError, QemuError
from qio.block.qcow2 import layout as L
from qio.block.qcow2.header import signal_corruption
from qio.block.qcow2.state import (
    OL_ACTIVE_L1,
    OL_ACTIVE_L2,
    OL_BITMAP_DIRECTORY,
    OL_INACTIVE_L1,
    OL_INACTIVE_L2,
    OL_MAIN_HEADER,
    OL_NAMES,
    OL_REFCOUNT_BLOCK,
    OL_REFCOUNT_TABLE,
    OL_SNAPSHOT_TABLE,
    Qcow2State,
    _pread,
    _round_up,
    _unpack_entry,
    _validate_table,
    has_data_file,
)

if TYPE_CHECKING:
    pass



def _l2_offset_set(s: Qcow2State) -> set[int]:
    if s._l2_offsets is None:
        refs: dict[int, int] = {}
        for e in s.l1_table:
            off = e & L.L1E_OFFSET_MASK
            if off:
                refs[off] = refs.get(off, 0) + 1
        s._l2_refs = refs
        s._l2_offsets = set(refs)
        s._l2_unaligned = sum(1 for o in refs if o & (s.cluster_size - 1))
    return s._l2_offsets


def _refblock_offset_set(s: Qcow2State) -> set[int]:
    if s._refblock_offsets is None:
        s._refblock_offsets = {e & L.REFT_OFFSET_MASK
                                  for e in s.refcount_table[:s.max_refcount_table_index + 1]
                                  if e & L.REFT_OFFSET_MASK}
        s._refblock_unaligned = sum(1 for o in s._refblock_offsets if o & (s.cluster_size - 1))
    return s._refblock_offsets


def _l1_changed(s: Qcow2State) -> None:
    s._l2_offsets = None
    s._l2_refs = None


def _set_l1(s: Qcow2State, i: int, value: int) -> None:
    """Change one L1 entry, keeping the overlap-check set of L2 offsets up to date."""
    old = s.l1_table[i] & L.L1E_OFFSET_MASK
    s.l1_table[i] = value
    new = value & L.L1E_OFFSET_MASK
    if old == new or s._l2_offsets is None:
        return
    refs = s._l2_refs
    if refs is None:
        _l1_changed(s)
        return
    cmask = s.cluster_size - 1
    if old:
        refs[old] -= 1
        if not refs[old]:
            del refs[old]
            s._l2_offsets.discard(old)
            s._l2_unaligned -= bool(old & cmask)
    if new:
        refs[new] = refs.get(new, 0) + 1
        if new not in s._l2_offsets:
            s._l2_offsets.add(new)
            s._l2_unaligned += bool(new & cmask)


def _reftable_changed(s: Qcow2State) -> None:
    s._refblock_offsets = None


async def check_metadata_overlap(s: Qcow2State, ign: int, offset: int, size: int) -> int:
    """``qcow2_check_metadata_overlap``: the first metadata section the range touches, or 0."""
    chk = s.overlap_check & ~ign
    if not size or not chk:
        return 0
    ret = overlap_no_io(s, chk, offset, size)
    if ret >= 0:
        return ret
    cs = s.cluster_size
    size = _round_up((offset & (cs - 1)) + size, cs)
    offset &= ~(cs - 1)
    end = offset + size
    for sn in s.snapshots:
        try:
            _validate_table(s, sn.l1_table_offset, sn.l1_size, 8, L.MAX_L1_SIZE, "")
        except QemuError as e:
            raise BlockError(e.errno) from None  # EFBIG for a size, EINVAL for an offset
        raw = await _pread(s, sn.l1_table_offset, sn.l1_size * 8)
        for j in range(sn.l1_size):
            l2 = _unpack_entry(raw, j * 8)[0] & L.L1E_OFFSET_MASK
            if l2 and offset < l2 + cs and l2 < end:
                return OL_INACTIVE_L2
    return _bitmap_overlap(s, chk, offset, end)


def overlap_no_io(s: Qcow2State, chk: int, offset: int, size: int) -> int:
    """:func:`check_metadata_overlap` (``size`` and ``chk`` not 0) up to the inactive L2 tables, which
    need reads: -1 when ``chk`` asks for them and nothing before them overlaps.  The write path asks
    this without a coroutine."""
    cs = s.cluster_size
    if chk & OL_MAIN_HEADER and offset < cs:
        return OL_MAIN_HEADER
    size = ((offset & (cs - 1)) + size + cs - 1) & ~(cs - 1)  # _round_up to the cluster size
    offset &= ~(cs - 1)
    end = offset + size
    # the range tests are written out (offset < start + size and start < end): this runs before
    # every data write, and a closure per call costs more than the tests
    if chk & OL_ACTIVE_L1 and s.l1_size > 0 and offset < s.l1_table_offset + s.l1_size * 8 and \
            s.l1_table_offset < end:
        return OL_ACTIVE_L1
    if chk & OL_REFCOUNT_TABLE and s.refcount_table_size > 0 and \
            offset < s.refcount_table_offset + s.refcount_table_size * 8 and s.refcount_table_offset < end:
        return OL_REFCOUNT_TABLE
    if chk & OL_SNAPSHOT_TABLE and s.snapshots_size > 0 and \
            offset < s.snapshots_offset + s.snapshots_size and s.snapshots_offset < end:
        return OL_SNAPSHOT_TABLE
    if chk & OL_INACTIVE_L1:
        for sn in s.snapshots:
            if sn.l1_size > 0 and offset < sn.l1_table_offset + sn.l1_size * 8 and sn.l1_table_offset < end:
                return OL_INACTIVE_L1
    nclusters = size >> s.cluster_bits
    if chk & OL_ACTIVE_L2:
        sets = s._l2_offsets
        if nclusters == 1 and sets is not None and not s._l2_unaligned:  # _set_overlaps' usual case
            if offset in sets:
                return OL_ACTIVE_L2
        elif _set_overlaps(s, _l2_offset_set(s), s._l2_unaligned, offset, nclusters):
            return OL_ACTIVE_L2
    if chk & OL_REFCOUNT_BLOCK:
        sets = s._refblock_offsets
        if nclusters == 1 and sets is not None and not s._refblock_unaligned:
            if offset in sets:
                return OL_REFCOUNT_BLOCK
        elif _set_overlaps(s, _refblock_offset_set(s), s._refblock_unaligned, offset, nclusters):
            return OL_REFCOUNT_BLOCK
    if chk & OL_INACTIVE_L2:
        return -1
    if chk & OL_BITMAP_DIRECTORY and s.autoclear_features & L.AUTOCLEAR_BITMAPS:
        return _bitmap_overlap(s, chk, offset, end)
    return 0


def _bitmap_overlap(s: Qcow2State, chk: int, offset: int, end: int) -> int:
    # No size guard here in QEMU: ranges_overlap() of an empty directory at offset 0 (the bitmaps
    # bit set without a bitmaps extension) covers every offset.
    last = (s.bitmap_directory_offset + s.bitmap_directory_size - 1) & 0xFFFFFFFFFFFFFFFF
    if chk & OL_BITMAP_DIRECTORY and s.autoclear_features & L.AUTOCLEAR_BITMAPS and \
            not (last < offset or end - 1 < s.bitmap_directory_offset):
        return OL_BITMAP_DIRECTORY
    return 0


def _set_overlaps(s: Qcow2State, offsets: set[int], unaligned: int, start: int, nclusters: int) -> bool:
    """Does a table offset of ``offsets`` fall in the cluster-aligned range?  (Unaligned table
    offsets, of which there are ``unaligned``, are found as QEMU finds them: by range overlap.)"""
    if nclusters == 1 and not unaligned:  # the usual data write: a set lookup is the whole test
        return start in offsets
    if not offsets:
        return False
    cs = s.cluster_size
    if nclusters <= len(offsets):
        for k in range(nclusters):
            if start + k * cs in offsets:
                return True
        if not unaligned:
            return False
    end = start + nclusters * cs
    return any(start < o + cs and o < end for o in offsets)


async def pre_write_overlap_check(s: Qcow2State, ign: int, offset: int, size: int, data_file: bool) -> None:
    if data_file and has_data_file(s):
        return  # a write to the external data file cannot hit the metadata
    ret = await check_metadata_overlap(s, ign, offset, size)
    if ret:
        bit = ret & -ret
        await signal_corruption(s, True, f"Preventing invalid write on metadata (overlaps with "
                                           f"{OL_NAMES[bit]})")
        raise BlockError(errno.EIO)
