"""The qcow2 metadata caches (QEMU's ``Qcow2Cache``) .

A cache holds fixed-size tables (L2 slices or refcount blocks) read from the image file.  Entries are
reference counted while a caller uses them and replaced least-recently-used, exactly as QEMU 7.2
chooses the victim, because *which* table is written back *when* is observable: every write-back
raises ``l2_update``/``refblock_update_part`` on the file child and every L2 miss raises ``l2_load``.
Two ordering rules make writes crash safe: a cache may *depend* on another one (that cache is written
and flushed first) or on a flush of the file.
"""

from __future__ import annotations

import bisect
import errno
import heapq
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.errors import BlockError
from qio.block.events import Event
from qio.block.qcow2.header import signal_corruption
from qio.block.qcow2.overlap import pre_write_overlap_check
from qio.block.qcow2.state import OL_ACTIVE_L2, OL_REFCOUNT_BLOCK, Qcow2State, cx

if TYPE_CHECKING:
    from qio.block.qcow2.state import Qcow2State


class Qcow2Cache:
    """A table cache; callers get an entry index, use ``tables[i]``, and ``put`` it back.

    Not a dataclass: all its state is derived from the size (the per-entry arrays, the LRU structures),
    none of it is given by the caller, and only its methods change it."""

    __slots__ = (
        "depends",
        "depends_on_flush",
        "dirty",
        "dirty_set",
        "heap",
        "is_l2",
        "lru",
        "lru_counter",
        "name",
        "offsets",
        "ref",
        "s",
        "size",
        "table_size",
        "tables",
        "where",
        "zero_lru",
    )

    def __init__(self, s: Qcow2State, size: int, table_size: int, is_l2: bool) -> None:
        self.s = s
        self.size = size
        self.table_size = table_size
        self.is_l2 = is_l2
        self.name = "L2 table" if is_l2 else "refcount block"
        self.tables = [bytearray(table_size) for _ in range(size)]
        self.offsets = [0] * size
        self.lru = [0] * size
        self.ref = [0] * size
        self.dirty = [False] * size
        #: offset -> entry index, for the entries with a non-zero offset
        self.where: dict[int, int] = {}
        self.lru_counter = 0
        self.depends: Qcow2Cache | None = None
        self.depends_on_flush = False
        #: indices of dirty entries (QEMU scans all entries in index order; sorted() gives that order)
        self.dirty_set: set[int] = set()
        # Victim choice as QEMU's linear scan, without the scan: the unused entries whose LRU counter is
        # 0 (sorted), and a heap of (counter, index) of the others (stale items are skipped lazily).
        self.zero_lru: list[int] = list(range(size))
        self.heap: list[tuple[int, int]] = []

    # -- write-back ----------------------------------------------------------------------------
    async def _flush_dependency(self) -> None:
        assert self.depends is not None
        await self.depends.flush()
        self.depends = None
        self.depends_on_flush = False

    async def entry_flush(self, i: int) -> None:
        if not self.dirty[i] or not self.offsets[i]:
            return
        s = self.s
        if self.depends is not None:
            await self._flush_dependency()
        elif self.depends_on_flush:
            await io.flush(s.bs.file)
            self.depends_on_flush = False
        offset = self.offsets[i]
        await pre_write_overlap_check(s, OL_ACTIVE_L2 if self.is_l2 else OL_REFCOUNT_BLOCK,
                                          offset, self.table_size, False)
        file = s.bs.file
        if file.has_debug_hooks:
            await file.debug_event(Event.L2_UPDATE if self.is_l2 else Event.REFBLOCK_UPDATE_PART)
        await io.pwritev(file, offset, self.table_size, [memoryview(self.tables[i])])
        self.dirty[i] = False
        self.dirty_set.discard(i)

    async def write(self) -> None:
        """``qcow2_cache_write``: write back every dirty entry; the first error (ENOSPC preferred)."""
        result: BlockError | None = None
        for i in sorted(self.dirty_set):
            if not self.dirty[i]:
                continue
            try:
                await self.entry_flush(i)
            except BlockError as e:
                if result is None or result.code != errno.ENOSPC:
                    result = e
        if result is not None:
            raise result

    async def flush(self) -> None:
        """``qcow2_cache_flush``: write back, then flush the file."""
        await self.write()
        await io.flush(self.s.bs.file)

    async def set_dependency(self, dependency: Qcow2Cache) -> None:
        if dependency.depends is not None:
            await dependency._flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            await self._flush_dependency()
        self.depends = dependency

    async def empty(self) -> None:
        await self.flush()
        for i in range(self.size):
            self.offsets[i] = 0
            self.lru[i] = 0
        self.where.clear()
        self.lru_counter = 0
        self.zero_lru = [i for i in range(self.size) if self.ref[i] == 0]
        self.heap = []

    def _victim(self, start: int) -> int:
        """QEMU's choice: the least recently used unreferenced entry; among never-used ones (LRU
        counter 0, the only counter that repeats) the first at or after ``start``, cyclically."""
        zero = self.zero_lru
        if zero:
            k = bisect.bisect_left(zero, start)
            return zero[k] if k < len(zero) else zero[0]
        heap, ref, lru = self.heap, self.ref, self.lru
        while heap:
            counter, i = heap[0]
            if ref[i] == 0 and lru[i] == counter:
                return i
            heapq.heappop(heap)
        return -1

    def _taken(self, i: int) -> None:
        """Entry ``i`` gets a reference."""
        if self.ref[i] == 0 and self.lru[i] == 0:
            k = bisect.bisect_left(self.zero_lru, i)
            if k < len(self.zero_lru) and self.zero_lru[k] == i:
                del self.zero_lru[k]
        self.ref[i] += 1

    # -- lookup ----------------------------------------------------------------------------------
    def hit(self, offset: int) -> int:
        """:meth:`get` when the table is cached (the entry, with a reference taken), without a
        coroutine; -1 when it is not (then ``await get``)."""
        i = self.where.get(offset)
        if i is None:
            return -1
        ref = self.ref
        if ref[i] or self.lru[i]:
            ref[i] += 1  # _taken of an entry that is not in zero_lru
        else:
            self._taken(i)
        return i

    async def get(self, offset: int, read: bool = True) -> int:
        """``qcow2_cache_do_get``: the index of the entry holding the table at ``offset``."""
        i = self.where.get(offset)
        if i is not None:
            self._taken(i)
            return i
        s = self.s
        if offset % self.table_size:
            await signal_corruption(s, True, f"Cannot get entry from {self.name} cache: Offset "
                                              f"{cx(offset)} is unaligned")
            raise BlockError(errno.EIO)
        i = self._victim((offset // self.table_size * 4) % self.size)
        if i < 0:
            raise BlockError(errno.EBUSY, "qcow2 cache exhausted")  # QEMU aborts here
        await self.entry_flush(i)
        old = self.offsets[i]
        if old:
            del self.where[old]
            self.offsets[i] = 0
        if read:
            file = s.bs.file
            if self.is_l2 and file.has_debug_hooks:
                await file.debug_event(Event.L2_LOAD)
            await io.preadv(file, offset, self.table_size, [memoryview(self.tables[i])])
        self.offsets[i] = offset
        self.where[offset] = i
        self._taken(i)
        return i

    async def get_empty(self, offset: int) -> int:
        return await self.get(offset, read=False)

    def put(self, i: int) -> None:
        self.ref[i] -= 1
        if self.ref[i] == 0:
            self.lru_counter += 1
            self.lru[i] = self.lru_counter
            heapq.heappush(self.heap, (self.lru_counter, i))

    def mark_dirty(self, i: int) -> None:
        self.dirty[i] = True
        self.dirty_set.add(i)

    def is_table_offset(self, offset: int) -> int | None:
        return self.where.get(offset) if offset else None

    def discard(self, i: int) -> None:
        old = self.offsets[i]
        if old:
            self.where.pop(old, None)
        self.offsets[i] = 0
        self.dirty[i] = False
        self.dirty_set.discard(i)
        if self.lru[i] or self.ref[i]:
            self.lru[i] = 0
            if self.ref[i] == 0:
                bisect.insort(self.zero_lru, i)
