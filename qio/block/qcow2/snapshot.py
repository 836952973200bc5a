"""The internal snapshot table (qcow2-snapshot.c): reading and validating it."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qio.block.errors import BlockError, QemuError
from qio.block.qcow2 import layout as L
from qio.block.qcow2.state import INT_MAX, Qcow2State, Snapshot, _length, _pread, _round_up, _stderr

if TYPE_CHECKING:
    pass



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
            raise QemuError(f"Failed to read snapshot table: {e}", e.code) from None

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
