"""The qcow2 metadata caches (QEMU's ``Qcow2Cache``) and the coroutine lock of the qcow2 driver.

A cache holds fixed-size tables (L2 slices or refcount blocks) read from the image file.  Entries are
reference counted while a caller uses them and replaced least-recently-used, exactly as QEMU 7.2
chooses the victim, because *which* table is written back *when* is observable: every write-back
raises ``l2_update``/``refblock_update_part`` on the file child and every L2 miss raises ``l2_load``.
Two ordering rules make writes crash safe: a cache may *depend* on another one (that cache is written
and flushed first) or on a flush of the file.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.errors import BlockError
from qio.block.events import Event

if TYPE_CHECKING:
    from qio.block.qcow2 import Qcow2Driver


class CoMutex:
    """``CoMutex``: uncontended lock and unlock never yield; waiters are served in FIFO order."""

    __slots__ = ("locked", "waiters")

    def __init__(self) -> None:
        self.locked = False
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def lock(self) -> None:
        if not self.locked:
            self.locked = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        await fut  # ownership is handed over by unlock()

    def unlock(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.locked = False


class CoQueue:
    """``CoQueue``: requests waiting for an in-flight allocation to complete."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[None]] = []

    async def wait(self, mutex: CoMutex) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        mutex.unlock()
        await fut
        await mutex.lock()

    def restart_all(self) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class Qcow2Cache:
    """A table cache; callers get an entry index, use ``tables[i]``, and ``put`` it back."""

    __slots__ = ("depends", "depends_on_flush", "dirty", "drv", "is_l2", "lru", "lru_counter", "name",
                 "offsets", "ref", "size", "table_size", "tables", "where")

    def __init__(self, drv: Qcow2Driver, size: int, table_size: int, is_l2: bool) -> None:
        self.drv = drv
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

    # -- write-back ----------------------------------------------------------------------------
    async def _flush_dependency(self) -> None:
        assert self.depends is not None
        await self.depends.flush()
        self.depends = None
        self.depends_on_flush = False

    async def entry_flush(self, i: int) -> None:
        if not self.dirty[i] or not self.offsets[i]:
            return
        drv = self.drv
        if self.depends is not None:
            await self._flush_dependency()
        elif self.depends_on_flush:
            await io.flush(drv.file)
            self.depends_on_flush = False
        offset = self.offsets[i]
        await drv.pre_write_overlap_check(drv.OL_ACTIVE_L2 if self.is_l2 else drv.OL_REFCOUNT_BLOCK,
                                          offset, self.table_size, False)
        file = drv.file
        if file.has_debug_hooks:
            await file.debug_event(Event.L2_UPDATE if self.is_l2 else Event.REFBLOCK_UPDATE_PART)
        await io.pwritev(file, offset, self.table_size, [memoryview(self.tables[i])])
        self.dirty[i] = False

    async def write(self) -> None:
        """``qcow2_cache_write``: write back every dirty entry; the first error (ENOSPC preferred)."""
        result: BlockError | None = None
        for i in range(self.size):
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
        await io.flush(self.drv.file)

    async def set_dependency(self, dependency: Qcow2Cache) -> None:
        if dependency.depends is not None:
            await dependency._flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            await self._flush_dependency()
        self.depends = dependency

    def is_dirty(self) -> bool:
        return any(self.dirty[i] and self.offsets[i] for i in range(self.size))

    async def empty(self) -> None:
        await self.flush()
        for i in range(self.size):
            self.offsets[i] = 0
            self.lru[i] = 0
        self.where.clear()
        self.lru_counter = 0

    # -- lookup ----------------------------------------------------------------------------------
    async def get(self, offset: int, read: bool = True) -> int:
        """``qcow2_cache_do_get``: the index of the entry holding the table at ``offset``."""
        i = self.where.get(offset)
        if i is not None:
            self.ref[i] += 1
            return i
        drv = self.drv
        if offset % self.table_size:
            await drv.signal_corruption(True, f"Cannot get entry from {self.name} cache: Offset "
                                              f"{drv.cx(offset)} is unaligned")
            raise BlockError(errno.EIO)
        size = self.size
        i = start = (offset // self.table_size * 4) % size
        lru, ref = self.lru, self.ref
        best, best_lru = -1, -1
        while True:
            if ref[i] == 0 and (best < 0 or lru[i] < best_lru):
                best, best_lru = i, lru[i]
                if best_lru == 0:
                    break  # nothing can be older; QEMU keeps the first of equals
            i += 1
            if i == size:
                i = 0
            if i == start:
                break
        if best < 0:
            raise BlockError(errno.EBUSY, "qcow2 cache exhausted")  # QEMU aborts here
        i = best
        await self.entry_flush(i)
        old = self.offsets[i]
        if old:
            del self.where[old]
            self.offsets[i] = 0
        if read:
            file = drv.file
            if self.is_l2 and file.has_debug_hooks:
                await file.debug_event(Event.L2_LOAD)
            await io.preadv(file, offset, self.table_size, [memoryview(self.tables[i])])
        self.offsets[i] = offset
        self.where[offset] = i
        self.ref[i] += 1
        return i

    async def get_empty(self, offset: int) -> int:
        return await self.get(offset, read=False)

    def put(self, i: int) -> None:
        self.ref[i] -= 1
        if self.ref[i] == 0:
            self.lru_counter += 1
            self.lru[i] = self.lru_counter

    def mark_dirty(self, i: int) -> None:
        self.dirty[i] = True

    def is_table_offset(self, offset: int) -> int | None:
        return self.where.get(offset) if offset else None

    def discard(self, i: int) -> None:
        old = self.offsets[i]
        if old:
            self.where.pop(old, None)
        self.offsets[i] = 0
        self.lru[i] = 0
        self.dirty[i] = False
