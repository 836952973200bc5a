"""Refcount consistency check and repair of qcow2 images (QEMU 7.2's ``qcow2_check_refcounts``).

QEMU runs this with ``FIX_ERRORS | FIX_LEAKS`` when a dirty image (lazy refcounts, not closed
cleanly) is opened read-write: the refcounts are recomputed from the L1/L2 tables into an in-memory
refcount table, compared with the image's, and either fixed in place or -- when a referenced cluster
has refcount 0 -- a whole new refcount structure is written after the image ("Rebuilding refcount
structure").  The messages go to stderr exactly as QEMU prints them, and the rebuilt structure is
placed where QEMU places it.
"""

from __future__ import annotations

import errno
import os
import re
from functools import partial
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.driver import FIX_ERRORS, FIX_LEAKS, CheckResult
from qio.block.errors import BlockError, QemuError, report_error
from qio.block.qcow2 import layout as L
from qio.block.qcow2 import subcluster as SC
from qio.block.qcow2.bitmap import (
    BME_TABLE_ENTRY_OFFSET_MASK,
    load_bitmap_list,
    load_bitmap_table,
)
from qio.block.qcow2.cluster import write_l1_entry
from qio.block.qcow2.header import update_header
from qio.block.qcow2.overlap import _l1_changed, pre_write_overlap_check
from qio.block.qcow2.refcount import (
    _update_max_refcount_table_index,
    flush_caches,
    get_refcount,
    mark_clean,
    update_refcount,
)
from qio.block.qcow2.snapshot import fix_snapshot_table, read_snapshot_table
from qio.block.qcow2.state import (
    DISCARD_ALWAYS,
    OL_ACTIVE_L2,
    OL_INACTIVE_L2,
    Qcow2State,
    _pread,
    _stderr,
    cluster_type,
    pwrite_sync,
    size_to_clusters,
)
from qio.numbers import INT64_MAX

if TYPE_CHECKING:
    from qio.block.qcow2.state import Qcow2State

CHECK_FRAG_INFO = 0x2
_ENTRY = L.ENTRY
_NONZERO = re.compile(rb"[^\x00]")


class Imrt:
    """The in-memory refcount table: one big refcount block for the whole image, in the image's
    refcount entry format, its byte size a whole number of clusters."""

    MAX_BYTES = 1 << 30

    def __init__(self, s: Qcow2State) -> None:
        self.s = s
        self.buf = bytearray()
        self.size = 0  # entries

    def _bytes(self, entries: int) -> int:
        s = self.s
        n = -(-(entries << s.refcount_order) // 8)
        return size_to_clusters(s, n) * s.cluster_size

    def realloc(self, new_size: int) -> None:
        """``realloc_refcount_array``; ENOMEM beyond ``MAX_BYTES``, as ``g_try_realloc`` may fail (a hostile
        refcount table can point the check at an offset petabytes past the end of the file)."""
        old_b, new_b = self._bytes(self.size), self._bytes(new_size)
        if new_b > self.MAX_BYTES:
            raise BlockError(errno.ENOMEM)
        if new_b > old_b:
            self.buf += bytes(new_b - old_b)
        elif new_b < old_b:
            del self.buf[new_b:]
        self.size = new_size

    def get(self, i: int) -> int:
        return self.s.get_rc(self.buf, i)

    def next_used(self, i: int, end: int) -> int:
        """The first cluster in ``[i, end)`` with a non-zero count (``end`` if none): lets the scans
        jump over the empty stretches of a huge sparse file instead of visiting every cluster."""
        order = self.s.refcount_order
        m = _NONZERO.search(self.buf, (i << order) >> 3, -(-(end << order) // 8))
        if m is None:
            return end
        return min(end, max(i, (m.start() << 3) >> order))

    def set(self, i: int, v: int) -> None:
        self.s.set_rc(self.buf, i, v)


class Checker:
    def __init__(self, s: Qcow2State) -> None:
        self.s = s
        self.say = partial(_stderr, s)

    async def inc_refcounts(self, res: CheckResult, imrt: Imrt, offset: int, size: int) -> None:
        """``qcow2_inc_refcounts_imrt``."""
        s = self.s
        if size <= 0:
            return
        file_len = io.getlength(s.bs.file)
        if offset + size - file_len >= s.cluster_size:
            self.say(f"ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                     f"offset 0x{offset:x} size 0x{size:x}\n")
            res.corruptions += 1
            return
        cs, cb = s.cluster_size, s.cluster_bits
        start = offset & ~(cs - 1)
        last = (offset + size - 1) & ~(cs - 1)
        for cluster_offset in range(start, last + 1, cs):
            k = cluster_offset >> cb
            if k >= imrt.size:
                imrt.realloc(k + 1)
            refcount = imrt.get(k)
            if refcount == s.refcount_max:
                self.say(f"ERROR: overflow cluster offset=0x{cluster_offset:x}\n")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a "
                         "clean copy if the image cannot be opened for writing\n")
                res.corruptions += 1
                continue
            imrt.set(k, refcount + 1)

    async def fix_l2_entry_by_zero(self, res: CheckResult, l2_offset: int, table: bytearray, index: int,
                                   active: bool) -> tuple[bool, bool]:
        """(fixed, metadata overlap)."""
        s = self.s
        esize = 1 << s.l2e_shift
        if s.subclusters:  # allocated subclusters become zero
            bitmap = _ENTRY.unpack_from(table, index * esize + 8)[0]
            _ENTRY.pack_into(table, index * esize + 8, (bitmap | (bitmap << 32)) & SC.BITMAP_ALL_ZEROES)
            _ENTRY.pack_into(table, index * esize, 0)
        else:
            _ENTRY.pack_into(table, index * esize, L.OFLAG_ZERO)
        entry_offset = l2_offset + index * esize

        try:
            await pre_write_overlap_check(s, OL_ACTIVE_L2 if active else OL_INACTIVE_L2, entry_offset, esize,
                                          False)
        except BlockError:
            self.say("ERROR: Overlap check failed\n")
            res.check_errors += 1
            return False, True
        try:
            await pwrite_sync(s, entry_offset, bytes(table[index * esize: (index + 1) * esize]))
        except BlockError as e:
            self.say(f"ERROR: Failed to overwrite L2 table entry: {os.strerror(e.code)}\n")
            res.check_errors += 1
            return False, False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True, False

    async def check_l2(self, res: CheckResult, imrt: Imrt, l2_offset: int, flags: int, fix: int,
                       active: bool) -> None:
        s = self.s
        cs = s.cluster_size
        frag = bool(flags & CHECK_FRAG_INFO)
        next_contiguous = 0
        try:
            table = await _pread(s, l2_offset, s.l2_size << s.l2e_shift)
        except BlockError:
            self.say("ERROR: I/O error in check_refcounts_l2\n")
            res.check_errors += 1
            raise
        ext = s.subclusters
        for i in range(s.l2_size):
            bitmap = 0
            if ext:
                entry, bitmap = SC.pair(table, i)
                if not entry and not bitmap:
                    continue
                ctype = SC.cluster_type(entry, SC.has_data_file(s))
            else:
                entry = _ENTRY.unpack_from(table, i * 8)[0]
                if not entry:
                    continue
                ctype = cluster_type(s, entry)
            if ctype != L.CLUSTER_COMPRESSED and entry & L.L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {entry:x}\n")
                res.corruptions += 1
            if ctype == L.CLUSTER_COMPRESSED:
                if entry & L.OFLAG_COPIED:
                    self.say(f"ERROR: coffset=0x{entry & s.csize.offset_mask:x}: copied flag must never be set "
                             "for compressed clusters\n")
                    entry &= ~L.OFLAG_COPIED
                    res.corruptions += 1
                if s.data_node is not None:  # has_data_file
                    self.say(f"ERROR compressed cluster {i} with data file, entry=0x{entry:x}\n")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.say(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                             f"entry=0x{entry:x}\n")
                    res.corruptions += 1
                    continue
                coffset, csize = L.parse_compressed(entry, s.csize)
                await self.inc_refcounts(res, imrt, coffset, csize)
                if frag:  # compressed clusters count as fragmented by nature
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif ctype in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC):
                offset = entry & L.L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.say(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation "
                             "bitmap\n")
                if offset & (cs - 1):
                    res.corruptions += 1
                    no_data = not bitmap & SC.BITMAP_ALL_ALLOC if ext else bool(entry & L.OFLAG_ZERO)
                    if no_data:
                        tag = "Repairing" if fix & FIX_ERRORS else "ERROR"
                        self.say(f"{tag} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry "
                                 "corrupted.\n")
                        if fix & FIX_ERRORS:
                            fixed, overlap = await self.fix_l2_entry_by_zero(res, l2_offset, table, i, active)
                            if overlap:
                                raise BlockError(errno.EIO)
                            if fixed:
                                continue
                    else:
                        self.say(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry "
                                 "corrupted.\n")
                if frag:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                if s.data_node is None:  # data clusters in an external data file have no refcount
                    await self.inc_refcounts(res, imrt, offset, cs)
            elif ctype == L.CLUSTER_UNALLOCATED and bitmap & SC.BITMAP_ALL_ALLOC:
                res.corruptions += 1
                self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map\n")

    async def check_l1(self, res: CheckResult, imrt: Imrt, l1_offset: int, l1_size: int, flags: int, fix: int,
                       active: bool) -> None:
        s = self.s
        if not l1_size:
            return
        await self.inc_refcounts(res, imrt, l1_offset, l1_size * 8)
        try:
            raw = await _pread(s, l1_offset, l1_size * 8)
        except BlockError:
            self.say("ERROR: I/O error in check_refcounts_l1\n")
            res.check_errors += 1
            raise
        for i in range(l1_size):
            e = _ENTRY.unpack_from(raw, i * 8)[0]
            if not e:
                continue
            if e & L.L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {e:x}\n")
                res.corruptions += 1
            l2_offset = e & L.L1E_OFFSET_MASK
            await self.inc_refcounts(res, imrt, l2_offset, s.cluster_size)
            if l2_offset & (s.cluster_size - 1):
                self.say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted\n")
                res.corruptions += 1
            await self.check_l2(res, imrt, l2_offset, flags, fix, active)

    async def check_oflag_copied(self, res: CheckResult, fix: int) -> None:
        s = self.s
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        cb = s.cluster_bits
        for i in range(s.l1_size):
            l1_entry = s.l1_table[i]
            l2_offset = l1_entry & L.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = await get_refcount(s, l2_offset >> cb)
            except BlockError:
                continue
            if (refcount == 1) != bool(l1_entry & L.OFLAG_COPIED):
                res.corruptions += 1
                self.say(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                         f"l1_entry={l1_entry:x} refcount={refcount}\n")
                if repair:
                    s.l1_table[i] = l1_entry | L.OFLAG_COPIED if refcount == 1 else l1_entry & ~L.OFLAG_COPIED
                    _l1_changed(s)
                    try:
                        await write_l1_entry(s, i)
                    except BlockError:
                        res.check_errors += 1
                        raise
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            try:
                table = await _pread(s, l2_offset, s.l2_size << s.l2e_shift)
            except BlockError as e:
                self.say(f"ERROR: Could not read L2 table: {os.strerror(e.code)}\n")
                res.check_errors += 1
                raise
            dirty = 0
            for j in range(s.l2_size):
                entry = _ENTRY.unpack_from(table, j << s.l2e_shift)[0]
                if cluster_type(s, entry) not in (L.CLUSTER_NORMAL, L.CLUSTER_ZERO_ALLOC):
                    continue
                try:
                    refcount = 1 if s.data_node is not None else \
                        await get_refcount(s, (entry & L.L2E_OFFSET_MASK) >> cb)
                except BlockError:
                    continue
                if (refcount == 1) != bool(entry & L.OFLAG_COPIED):
                    res.corruptions += 1
                    self.say(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                             f"refcount={refcount}\n")
                    if repair:
                        _ENTRY.pack_into(table, j << s.l2e_shift, entry | L.OFLAG_COPIED if refcount == 1
                                         else entry & ~L.OFLAG_COPIED)
                        dirty += 1
            if dirty:

                try:
                    await pre_write_overlap_check(s, OL_ACTIVE_L2, l2_offset, s.cluster_size, False)
                except BlockError as e:
                    self.say(f"ERROR: Could not write L2 table; metadata overlap check failed: "
                             f"{os.strerror(e.code)}\n")
                    res.check_errors += 1
                    raise
                try:
                    await io.pwritev(s.bs.file, l2_offset, s.cluster_size, [memoryview(table)])
                except BlockError as e:
                    self.say(f"ERROR: Could not write L2 table: {os.strerror(e.code)}\n")
                    res.check_errors += 1
                    raise
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    async def check_refblocks(self, res: CheckResult, fix: int, imrt: Imrt, nb: list[int]) -> bool:
        """``check_refblocks``; returns whether a rebuild is needed.  ``nb`` holds the cluster count."""
        s = self.s
        rebuild = False
        cs, cb = s.cluster_size, s.cluster_bits
        for i in range(s.refcount_table_size):
            entry = s.refcount_table[i]
            offset = entry & L.REFT_OFFSET_MASK
            cluster = offset >> cb
            if entry & L.REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set\n")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (cs - 1):
                self.say(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted\n")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= nb[0]:
                res.corruptions += 1
                self.say(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image\n")
                if fix & FIX_ERRORS:
                    try:
                        if offset > INT64_MAX - cs:
                            raise BlockError(errno.EINVAL)
                        try:
                            await io.truncate(s.bs.file, offset + cs, False, "off")
                        except QemuError as e:  # error_report_err(local_err), then the resize_fail message
                            if s.bs.report is not None:
                                s.bs.report(str(e))
                            raise
                        size = io.getlength(s.bs.file)
                        new_nb = size_to_clusters(s, size)
                        imrt.realloc(new_nb)
                        nb[0] = new_nb
                        if cluster >= nb[0]:
                            raise BlockError(errno.EINVAL)
                    except (BlockError, QemuError) as e:
                        rebuild = True
                        code = e.code if isinstance(e, BlockError) else e.errno
                        self.say(f"ERROR could not resize image: {os.strerror(code)}\n")
                        continue
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    await self.inc_refcounts(res, imrt, offset, cs)
                continue
            if offset:
                await self.inc_refcounts(res, imrt, offset, cs)
                if imrt.get(cluster) != 1:
                    self.say(f"ERROR refcount block {i} refcount={imrt.get(cluster)}\n")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    async def calculate(self, res: CheckResult, fix: int, imrt: Imrt, nb: list[int]) -> bool:
        s = self.s
        if imrt.size == 0 and not imrt.buf:
            imrt.realloc(nb[0])
        await self.inc_refcounts(res, imrt, 0, s.cluster_size)
        await self.check_l1(res, imrt, s.l1_table_offset, s.l1_size, CHECK_FRAG_INFO, fix, True)
        if s.data_node is not None and s.nb_snapshots:
            self.say(f"ERROR {s.nb_snapshots} snapshots in image with data file\n")
            res.corruptions += 1
        for sn in s.snapshots:
            if sn.l1_table_offset & (s.cluster_size - 1):
                self.say(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: L1 table is not "
                         "cluster aligned; snapshot table entry corrupted\n")
                res.corruptions += 1
                continue
            if sn.l1_size > L.MAX_L1_SIZE // 8:
                self.say(f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: L1 table is too large; "
                         "snapshot table entry corrupted\n")
                res.corruptions += 1
                continue
            await self.check_l1(res, imrt, sn.l1_table_offset, sn.l1_size, 0, fix, False)
        await self.inc_refcounts(res, imrt, s.snapshots_offset, s.snapshots_size)
        await self.inc_refcounts(res, imrt, s.refcount_table_offset, s.refcount_table_size * 8)
        if s.crypto_header[1]:  # the LUKS header's clusters
            await self.inc_refcounts(res, imrt, s.crypto_header[0], s.crypto_header[1])
        await self.bitmaps_refcounts(res, imrt)
        return await self.check_refblocks(res, fix, imrt, nb)

    async def bitmaps_refcounts(self, res: CheckResult, imrt: Imrt) -> None:
        """``qcow2_check_bitmaps_refcounts``: the bitmap directory, each bitmap table and the data
        clusters it points at are references too; a broken directory or table is one corruption and
        fails the check (EINVAL), as in QEMU."""
        s = self.s
        if not s.nb_bitmaps:
            return
        await self.inc_refcounts(res, imrt, s.bitmap_directory_offset, s.bitmap_directory_size)
        try:
            bitmaps = await load_bitmap_list(s)
        except QemuError:
            res.corruptions += 1
            raise BlockError(errno.EINVAL) from None
        for bm in bitmaps:
            await self.inc_refcounts(res, imrt, bm.table_offset, bm.table_size * 8)
            try:
                entries = await load_bitmap_table(s, bm)
            except BlockError:
                res.corruptions += 1
                raise
            for entry in entries:
                if entry & BME_TABLE_ENTRY_OFFSET_MASK:
                    await self.inc_refcounts(res, imrt, entry & BME_TABLE_ENTRY_OFFSET_MASK, s.cluster_size)

    async def compare(self, res: CheckResult, fix: int, imrt: Imrt, nb: int) -> tuple[bool, int]:
        """``compare_refcounts``: (rebuild needed, highest cluster in use)."""
        s = self.s
        rebuild = False
        highest = 0
        cb = s.cluster_bits
        rbb = s.refcount_block_bits
        i = -1
        while i + 1 < nb:
            i += 1
            rti = i >> rbb
            if (rti >= s.refcount_table_size or not s.refcount_table[rti] & L.REFT_OFFSET_MASK) \
                    and not imrt.get(i):  # no refcount block and nothing counted: skip to what matters
                i = imrt.next_used(i, min((rti + 1) << rbb, nb)) - 1
                continue
            try:
                r1 = await get_refcount(s, i)
            except BlockError as e:
                self.say(f"Can't get refcount for cluster {i}: {os.strerror(e.code)}\n")
                res.check_errors += 1
                continue
            r2 = imrt.get(i)
            if r1 > 0 or r2 > 0:
                highest = i
            if r1 == r2:
                continue
            num_fixed = None
            if r1 == 0:
                rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                num_fixed = "leaks_fixed"
            elif r1 < r2 and fix & FIX_ERRORS:
                num_fixed = "corruptions_fixed"
            tag = "Repairing" if num_fixed else ("ERROR" if r1 < r2 else "Leaked")
            self.say(f"{tag} cluster {i} refcount={r1} reference={r2}\n")
            if num_fixed:

                try:
                    await update_refcount(s, i << cb, 1, abs(r1 - r2), r1 > r2, DISCARD_ALWAYS)
                    setattr(res, num_fixed, getattr(res, num_fixed) + 1)
                    continue
                except BlockError:
                    pass
            if r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        return rebuild, highest

    # -- rebuild -------------------------------------------------------------------------------------
    def alloc_imrt(self, count: int, imrt: Imrt, first_free: list[int]) -> int:
        """``alloc_clusters_imrt``: ``first_free[0]`` is updated as QEMU updates it."""
        cluster = first_free[0]
        first_gap = True
        contiguous = 0
        while cluster < imrt.size and contiguous < count:
            if not imrt.get(cluster):
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            imrt.realloc(cluster + count - contiguous)
        cluster -= contiguous
        for i in range(count):
            imrt.set(cluster + i, 1)
        return cluster << self.s.cluster_bits

    async def write_refblocks(self, imrt: Imrt, first: int, end: int, reftable: list[int]) -> bool:
        """``rebuild_refcounts_write_refblocks``: returns whether the reftable grew."""
        s = self.s
        cs = s.cluster_size
        rbb, rbs = s.refcount_block_bits, s.refcount_block_size
        first_free = [0]
        grown = False
        cluster = first
        while cluster < end:
            if not imrt.get(cluster):
                cluster = imrt.next_used(cluster, end)
                continue
            index = cluster >> rbb
            start = index << rbb
            if len(reftable) > index and reftable[index]:
                offset = reftable[index]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                offset = self.alloc_imrt(1, imrt, first_free)
                if offset // cs >= end:
                    end = offset // cs + 1
                if len(reftable) <= index:
                    entries = -(-((index + 1) * 8) // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = offset
            try:
                await pre_write_overlap_check(s, 0, offset, cs, False)
                await io.pwritev(s.bs.file, offset, cs, [memoryview(bytes(imrt.buf[index * cs: (index + 1) * cs]))])
            except BlockError as e:
                raise QemuError(f"ERROR writing refblock: {os.strerror(e.code)}", e.code) from None
            cluster = start + rbs
        return grown

    async def rebuild(self, res: CheckResult, imrt: Imrt) -> None:
        """``rebuild_refcount_structure``: a new refcount structure from the in-memory table."""
        s = self.s
        await s.rbc.empty()
        reftable: list[int] = []
        try:
            changed = await self.write_refblocks(imrt, 0, imrt.size, reftable)
            assert changed
            while True:
                length = len(reftable) * 8
                clusters = size_to_clusters(s, length)
                offset = self.alloc_imrt(clusters, imrt, [0])
                start = offset // s.cluster_size
                changed = await self.write_refblocks(imrt, start, start + clusters, reftable)
                if not changed:
                    break
            raw = bytearray(length)
            for i, e in enumerate(reftable):
                _ENTRY.pack_into(raw, i * 8, e)
            try:
                await pre_write_overlap_check(s, 0, offset, length, False)
                await io.pwritev(s.bs.file, offset, length, [memoryview(raw)])
            except BlockError as e:
                raise QemuError(f"ERROR writing reftable: {os.strerror(e.code)}", e.code) from None
            try:
                await pwrite_sync(s, L.OFF_REFCOUNT_TABLE_OFFSET,
                                      L.REFTABLE_OFFSET_AND_CLUSTERS.pack(offset, clusters))
            except BlockError as e:
                raise QemuError(f"ERROR setting reftable: {os.strerror(e.code)}", e.code) from None
        except QemuError:
            res.check_errors += 1
            raise
        import array

        s.refcount_table = array.array("Q", reftable)
        s.refcount_table_offset = offset
        s.refcount_table_size = len(reftable)
        _update_max_refcount_table_index(s)

    async def check_refcounts(self, res: CheckResult, fix: int) -> int:
        """``qcow2_check_refcounts``; returns the image end offset."""
        s = self.s
        size = io.getlength(s.bs.file)
        nb = [size_to_clusters(s, size)]
        if nb[0] > 2**31 - 1:
            res.check_errors += 1
            raise BlockError(errno.EFBIG)
        res.total_clusters = size_to_clusters(s, s.total_sectors * 512)
        imrt = Imrt(s)
        rebuild = await self.calculate(res, fix, imrt, nb)
        pre_compare = res.copy()
        rb, highest = await self.compare(res, 0, imrt, nb[0])
        rebuild = rebuild or rb
        if rebuild and fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.say("Rebuilding refcount structure\n")
            try:
                await self.rebuild(res, imrt)
            except QemuError as e:
                report_error(s.bs.warn, str(e))
                raise BlockError(e.errno) from None
            nb[0] = imrt.size
            res.corruptions = 0
            res.leaks = 0
            imrt.buf[:] = bytes(len(imrt.buf))
            await self.calculate(res, 0, imrt, nb)
            if fix & FIX_LEAKS:
                saved = res
                tmp = CheckResult()
                rb, highest = await self.compare(tmp, FIX_LEAKS, imrt, nb[0])
                if rb:
                    self.say("ERROR rebuilt refcount structure is still broken\n")
                fresh_leaks = tmp.leaks
                res = saved
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.say("ERROR need to rebuild refcount structures\n")
                res.check_errors += 1
                raise BlockError(errno.EIO)
            if res.leaks or res.corruptions:
                res.assign(pre_compare)
                rb, highest = await self.compare(res, fix, imrt, nb[0])
        await self.check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * s.cluster_size
        return res.image_end_offset


async def check(s: Qcow2State, fix: int) -> CheckResult:
    """``qcow2_co_check_locked``: the snapshot table, the refcounts, then the snapshot table's repair."""
    snap = CheckResult()
    await read_snapshot_table(s, snap, fix)
    res = CheckResult()
    await Checker(s).check_refcounts(res, fix)
    await fix_snapshot_table(s, snap, fix)
    for k in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
        setattr(res, k, getattr(res, k) + getattr(snap, k))
    if fix and res.check_errors == 0 and res.corruptions == 0:
        await mark_clean(s)
        if s.incompatible_features & L.INCOMPAT_CORRUPT:
            await flush_caches(s)
            s.incompatible_features &= ~L.INCOMPAT_CORRUPT
            await update_header(s)
    return res


async def repair_dirty(s: Qcow2State) -> None:
    """The automatic repair of ``qcow2_do_open`` for a dirty image opened read-write."""
    try:
        res = await check(s, FIX_ERRORS | FIX_LEAKS)
    except BlockError as e:
        raise QemuError(f"Could not repair dirty image: {os.strerror(e.code)}", e.code) from None
    if res.check_errors:
        raise QemuError(f"Could not repair dirty image: {os.strerror(errno.EIO)}", errno.EIO)
