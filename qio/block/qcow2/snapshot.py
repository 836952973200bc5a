"""The internal snapshot table (qcow2-snapshot.c): reading and validating it."""

from __future__ import annotations

import errno
import os
import struct

from qio.block import io
from qio.block.driver import FIX_ERRORS, CheckResult
from qio.block.errors import BlockError, QemuError, report_error
from qio.block.qcow2 import layout as L
from qio.block.qcow2.overlap import pre_write_overlap_check
from qio.block.qcow2.refcount import (
    alloc_clusters,
    free_clusters,
)
from qio.block.qcow2.state import (
    DISCARD_ALWAYS,
    DISCARD_SNAPSHOT,
    INT_MAX,
    Qcow2State,
    Snapshot,
    _length,
    _pread,
    _round_up,
    _stderr,
    _validate_table,
    pwrite_sync,
)


async def _read_snapshots(s: Qcow2State, repair: bool = False) -> tuple[int, int]:
    """``qcow2_do_read_snapshots``.  With ``repair`` (``check -r all``) an entry with too much extra
    data is cut to the maximum and the entries that make the table too big are dropped, with QEMU's
    messages; returns (entries dropped, entries whose extra data was cut)."""
    s.snapshots = []
    s.snapshots_size = 0
    if not s.nb_snapshots:
        return 0, 0
    offset = s.snapshots_offset
    table_length = 0
    hsize, esize = L.SNAPSHOT_HEADER.size, L.SNAPSHOT_EXTRA.size
    reduced = dropped = 0

    async def read(off: int, n: int) -> bytes:
        try:
            return bytes(await _pread(s, off, n))
        except BlockError as e:
            raise QemuError.wrap(e, "Failed to read snapshot table") from None

    for i in range(s.nb_snapshots):
        pre_offset = offset
        table_length = _round_up(table_length, 8)
        offset = _round_up(offset, 8)
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = L.SNAPSHOT_HEADER.unpack(await read(offset, hsize))
        offset += hsize
        sn = Snapshot()
        sn.l1_table_offset, sn.l1_size, sn.vm_state_size = l1_off, l1_size, vm_state
        sn.date_sec, sn.date_nsec, sn.vm_clock_nsec = date_sec, date_nsec, vm_clock
        sn.extra_data_size = extra_size
        truncate_extra = False
        if extra_size > L.MAX_SNAPSHOT_EXTRA_DATA:
            if not repair:
                raise QemuError(f"Too much extra metadata in snapshot table entry {i}\nYou can force-remove "
                                "this extra metadata with qemu-img check -r all", errno.EFBIG)
            _stderr(s, f"Discarding too much extra metadata in snapshot table entry {i} ({extra_size} > "
                         f"{L.MAX_SNAPSHOT_EXTRA_DATA})\n")
            dropped += 1
            truncate_extra = True
        known = min(esize, extra_size)
        extra = await read(offset, known) + bytes(esize - known)
        offset += known
        vm_large, disk_size, icount = L.SNAPSHOT_EXTRA.unpack(extra)
        if extra_size >= 8:
            sn.vm_state_size = vm_large
        sn.disk_size = disk_size if extra_size >= 16 else _length(s)
        sn.icount = icount if extra_size >= 24 else (1 << 64) - 1
        if extra_size > esize:
            extra_end = offset + extra_size - esize
            if truncate_extra:
                sn.extra_data_size = L.MAX_SNAPSHOT_EXTRA_DATA
            sn.unknown_extra_data = await read(offset, sn.extra_data_size - esize)
            offset = extra_end
        ident = await read(offset, id_size)
        offset += id_size
        name = await read(offset, name_size)
        offset += name_size
        sn.id_str = ident.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        sn.name = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        table_length += hsize + sn.extra_data_size + id_size + name_size
        if table_length > L.MAX_SNAPSHOTS_SIZE or offset - s.snapshots_offset > INT_MAX:
            if not repair:
                raise QemuError(f"Snapshot table is too big\nYou can force-remove all {s.nb_snapshots - i} "
                                "overhanging snapshots with qemu-img check -r all", errno.EFBIG)
            _stderr(s, f"Discarding {s.nb_snapshots - i} overhanging snapshots (snapshot table is too "
                         "big)\n")
            reduced += s.nb_snapshots - i
            s.nb_snapshots = i
            offset = pre_offset
            break
        s.snapshots.append(sn)
    s.snapshots_size = offset - s.snapshots_offset
    return reduced, dropped


async def read_snapshot_table(s: Qcow2State, res: CheckResult, fix: int) -> None:
    """``qcow2_check_read_snapshot_table``: the open in check mode skipped the snapshot table, so read
    it here from the header's pointer -- with ``-r all`` dropping what cannot be kept -- and count
    v3 entries without the 16 bytes of mandatory extra data as corruptions."""
    try:
        raw = await _pread(s, L.OFF_NB_SNAPSHOTS, 12)
    except BlockError as e:
        res.check_errors += 1
        _stderr(s, f"ERROR failed to read the snapshot table pointer from the image header: "
                    f"{os.strerror(e.code)}\n")
        raise
    nb, offset = struct.unpack(">IQ", bytes(raw))
    s.snapshots_offset, s.nb_snapshots = offset, nb
    reduced = dropped = 0
    if nb > L.MAX_SNAPSHOTS and fix & FIX_ERRORS:
        _stderr(s, f"Discarding {nb - L.MAX_SNAPSHOTS} overhanging snapshots\n")
        reduced += nb - L.MAX_SNAPSHOTS
        s.nb_snapshots = nb = L.MAX_SNAPSHOTS
    try:
        _validate_table(s, offset, nb, L.SNAPSHOT_HEADER.size, L.SNAPSHOT_HEADER.size * L.MAX_SNAPSHOTS,
                            "snapshot table")
    except QemuError as e:
        res.check_errors += 1
        report_error(s.bs.warn, f"ERROR {e}")
        if nb > L.MAX_SNAPSHOTS:
            _stderr(s, f"You can force-remove all {nb - L.MAX_SNAPSHOTS} overhanging snapshots with qemu-img "
                        "check -r all\n")
        s.snapshots_offset = s.nb_snapshots = 0
        raise BlockError(e.errno) from None
    try:
        r, dropped = await _read_snapshots(s, bool(fix & FIX_ERRORS))
    except QemuError as e:
        res.check_errors += 1
        report_error(s.bs.warn, f"ERROR failed to read the snapshot table: {e}")
        s.snapshots_offset = s.nb_snapshots = 0
        raise BlockError(e.errno) from None
    reduced += r
    res.corruptions += reduced + dropped
    if reduced:
        try:
            await pwrite_sync(s, L.OFF_NB_SNAPSHOTS, struct.pack(">I", s.nb_snapshots))
        except BlockError as e:
            res.check_errors += 1
            _stderr(s, f"ERROR failed to update the snapshot count in the image header: {os.strerror(e.code)}\n")
            raise
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if s.qcow_version >= 3:
        for i, sn in enumerate(s.snapshots):
            if sn.extra_data_size < 16:
                res.corruptions += 1
                _stderr(s, f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} snapshot table entry {i} is "
                            "incomplete\n")


async def write_snapshots(s: Qcow2State) -> None:
    """``qcow2_write_snapshots``: the whole snapshot table to newly allocated clusters, every entry
    with at least the 24 bytes of known extra data, then the header pointer; the old table is freed."""

    hsize, esize = L.SNAPSHOT_HEADER.size, L.SNAPSHOT_EXTRA.size
    pieces: list[tuple[int, bytes]] = []  # (offset in the table, bytes): the padding is never written
    size = 0
    for sn in s.snapshots:
        ident = sn.id_str.encode("utf-8", "surrogateescape")
        name = sn.name.encode("utf-8", "surrogateescape")
        size = _round_up8(size)
        vm_state = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        pieces.append((size, L.SNAPSHOT_HEADER.pack(sn.l1_table_offset, sn.l1_size, len(ident), len(name),
                                                    sn.date_sec, sn.date_nsec, sn.vm_clock_nsec, vm_state,
                                                    max(esize, sn.extra_data_size))))
        size += hsize
        pieces.append((size, L.SNAPSHOT_EXTRA.pack(sn.vm_state_size, sn.disk_size, sn.icount)
                       + sn.unknown_extra_data))
        size += max(esize, sn.extra_data_size)
        pieces.append((size, ident + name))
        size += len(ident) + len(name)
        if size > L.MAX_SNAPSHOTS_SIZE:
            raise BlockError(errno.EFBIG)
    new_offset = await alloc_clusters(s, size)
    try:
        await io.flush(s.bs)
        await pre_write_overlap_check(s, 0, new_offset, size, False)
        for off, data in pieces:
            if data:
                await io.pwritev(s.bs.file, new_offset + off, len(data), [memoryview(data)])
        await io.flush(s.bs)
        await pwrite_sync(s, L.OFF_NB_SNAPSHOTS, struct.pack(">IQ", len(s.snapshots), new_offset))
    except BlockError:
        if new_offset > 0:
            await free_clusters(s, new_offset, size, DISCARD_ALWAYS)
        raise
    await free_clusters(s, s.snapshots_offset, s.snapshots_size, DISCARD_SNAPSHOT)
    s.snapshots_offset, s.snapshots_size = new_offset, size


def _round_up8(n: int) -> int:
    return (n + 7) & ~7


async def fix_snapshot_table(s: Qcow2State, res: CheckResult, fix: int) -> None:
    """``qcow2_check_fix_snapshot_table``: with ``-r all`` rewrite a table found corrupt."""
    if res.corruptions and fix & FIX_ERRORS:
        try:
            await write_snapshots(s)
        except BlockError as e:
            res.check_errors += 1
            _stderr(s, f"ERROR failed to update snapshot table: {os.strerror(e.code)}\n")
            raise
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0
