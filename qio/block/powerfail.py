"""A volatile disk write cache below the format driver, and what a power failure leaves of it.

Why: a format driver is crash safe only if every state a power failure can leave opens cleanly.  A
real disk (or the host page cache) may lose any write that was not followed by a completed flush,
keep an arbitrary subset of them, or tear a write at sector granularity; data made durable by a
completed flush, and FUA writes, always survive, and no byte ever holds a value nobody wrote.

Model.  Arming a graph (``arm``) wraps the write paths of its host-file protocol nodes (the image
file, a blklogwrites log, an external data file; not read-only backing files).  Each write, zero
write, discard and truncate records an undo/redo entry: the bytes before and after it and the file
size before it.  A completed flush (``fdatasync``) drops the entries that existed when it was issued:
they are durable.  ``fail`` then rebuilds each file as the disk would hold it after losing power:
every recorded entry is undone (newest first), which gives the state of the last completed flush, and
the surviving entries are redone in their original order:

- ``all``: none survives (except FUA writes);
- ``random``: each entry survives or not, decided by a ``random.Random`` seeded with SEED;
- ``torn``: each sector (512 bytes) of each entry survives or not, so writes can be torn.

Recording costs a read of the old bytes per write, so it only runs once armed (the ``powerfail -a``
command arms the image and every image opened later in the session).
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable
from typing import Any, NamedTuple

from qio.block.driver import REQ_FUA, SECTOR, BlockDriver, IOVec
from qio.block.errors import BlockError

#: Set by ``powerfail -a``: every image the session opens from now on is armed (see BlockBackend.open).
session_armed = False
MODES = ("all", "random", "torn")


class Entry(NamedTuple):
    """One recorded change of a host file since its last completed flush."""

    kind: str  # write, zero, discard, truncate
    offset: int  # truncate: the new size
    old: bytes  # bytes at offset before the change (short at the end of the file)
    new: bytes  # bytes at offset after it (truncate: empty)
    size_before: int
    durable: bool  # a FUA write: on stable storage when it completed


class Outcome(NamedTuple):
    """What the failure did to one file: entries that were in the cache, kept whole, lost, torn."""

    filename: str
    entries: int
    kept: int
    lost: int
    torn: int
    #: one line per recorded change: what it was and what became of it (``powerfail -v``)
    details: tuple[str, ...] = ()


class VolatileCache:
    """The recorder attached to one protocol node (``node.volatile``)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.entries: list[Entry] = []

    def _size(self) -> int:
        return os.fstat(self.node.fd).st_size

    def _read(self, offset: int, nbytes: int) -> bytes:
        size = self._size()
        if offset >= size or nbytes <= 0:
            return b""
        return os.pread(self.node.fd, min(nbytes, size - offset), offset)

    def install(self) -> None:
        """Wrap the node's write paths with instance attributes (the class stays untouched)."""
        node = self.node
        pwritev, zeroes, discard = node.co_pwritev, node.co_pwrite_zeroes, node.co_pdiscard
        truncate, flush = node.co_truncate, node.co_flush_to_disk

        async def co_pwritev(offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
            size, old = self._size(), self._read(offset, nbytes)
            try:
                await pwritev(offset, nbytes, qiov, flags)
            finally:  # a failed write may still have changed bytes: record what is there
                new = b"".join(qiov)[:nbytes]
                self.entries.append(Entry("write", offset, old, new, size, bool(flags & REQ_FUA)))

        async def co_pwrite_zeroes(offset: int, nbytes: int, flags: int) -> None:
            await self._zeroing("zero", offset, nbytes, zeroes(offset, nbytes, flags), bool(flags & REQ_FUA))

        async def co_pdiscard(offset: int, nbytes: int) -> None:
            await self._zeroing("discard", offset, nbytes, discard(offset, nbytes), False)

        async def co_truncate(offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
            size = self._size()
            old = self._read(offset, size - offset)
            await truncate(offset, exact, prealloc, flags)
            self.entries.append(Entry("truncate", self._size(), old, b"", size, False))

        async def co_flush_to_disk() -> bool:
            issued = len(self.entries)  # the sync covers what was written before it was issued
            deferred: bool = await flush()
            del self.entries[:issued]
            return deferred

        node.co_pwritev, node.co_pwrite_zeroes, node.co_pdiscard = co_pwritev, co_pwrite_zeroes, co_pdiscard
        node.co_truncate, node.co_flush_to_disk = co_truncate, co_flush_to_disk
        # the inline write path (io.pwritev_inline) would pass the recording by
        node.can_write_inline = lambda offset, nbytes, qiov, flags: False

    async def _zeroing(self, kind: str, offset: int, nbytes: int, request: Awaitable[None], fua: bool) -> None:
        size, old = self._size(), self._read(offset, nbytes)
        try:
            await request
        except BlockError:
            raise  # the driver refused (ENOTSUP): nothing changed
        end = offset + nbytes if kind == "zero" else min(offset + nbytes, size)
        self.entries.append(Entry(kind, offset, old, bytes(max(0, end - offset)), size, fua))

    def fail(self, mode: str, rng: random.Random) -> Outcome:
        """Rebuild the file as a power failure in ``mode`` leaves it; returns what happened."""
        fd = self.node.fd
        entries = self.entries
        for e in reversed(entries):  # back to the last completed flush
            if e.kind == "truncate":
                os.ftruncate(fd, e.size_before)
                _pwrite(fd, e.old, e.offset)
            else:
                _pwrite(fd, e.old, e.offset)
                if self._size() > e.size_before:
                    os.ftruncate(fd, e.size_before)
        kept = lost = torn = 0
        details: list[str] = []
        for e in entries:
            what = (f"truncate to {e.offset}" if e.kind == "truncate"
                    else f"{e.kind} offset {e.offset} length {len(e.new)}")
            if e.durable or (mode == "random" and rng.random() < 0.5):
                _redo(fd, e)
                kept += 1
                fate = "kept (FUA)" if e.durable else "kept"
            elif mode == "torn" and e.kind != "truncate" and e.new:
                pieces = _sectors(e.offset, len(e.new))
                alive = [p for p in pieces if rng.random() < 0.5]
                for start, end in alive:
                    _pwrite(fd, e.new[start - e.offset:end - e.offset], start)
                if len(alive) == len(pieces):
                    kept += 1
                    fate = "kept"
                elif alive:
                    torn += 1
                    fate = f"torn: {len(alive)} of {len(pieces)} sectors kept"
                else:
                    lost += 1
                    fate = "lost"
            elif mode == "torn" and e.kind == "truncate" and rng.random() < 0.5:
                _redo(fd, e)
                kept += 1
                fate = "kept"
            else:
                lost += 1
                fate = "lost"
            details.append(f"{what}: {fate}")
        self.entries = []
        return Outcome(self.node.filename, len(entries), kept, lost, torn, tuple(details))


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _redo(fd: int, e: Entry) -> None:
    if e.kind == "truncate":
        os.ftruncate(fd, e.offset)
    else:
        _pwrite(fd, e.new, e.offset)


def _sectors(offset: int, nbytes: int) -> list[tuple[int, int]]:
    """The byte range cut at 512-byte sector boundaries of the file."""
    out = []
    pos, end = offset, offset + nbytes
    while pos < end:
        nxt = min(end, (pos // SECTOR + 1) * SECTOR)
        out.append((pos, nxt))
        pos = nxt
    return out


def host_nodes(root: BlockDriver) -> list[Any]:
    """The writable host-file nodes of a graph, in graph order (the seeded choices depend on it)."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(node: BlockDriver) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if getattr(node, "fd", -1) >= 0 and node.protocol_name == "file" and not node.read_only:
            out.append(node)
        for c in node.children:
            walk(c.node)

    walk(root)
    return out


def arm(root: BlockDriver) -> int:
    """Start recording on every writable host file of the graph; returns how many are armed."""
    n = 0
    for node in host_nodes(root):
        if getattr(node, "volatile", None) is None:
            cache = VolatileCache(node)
            cache.install()
            node.volatile = cache
        n += 1
    return n


def armed(root: BlockDriver) -> bool:
    return any(getattr(n, "volatile", None) is not None for n in host_nodes(root))


def fail(root: BlockDriver, mode: str, seed: int) -> list[Outcome]:
    """Apply a power failure to every armed file of the graph (the caller then drops the graph
    without flushing or writing back caches)."""
    rng = random.Random(seed)
    out = []
    for node in host_nodes(root):
        cache: VolatileCache | None = getattr(node, "volatile", None)
        if cache is not None:
            out.append(cache.fail(mode, rng))
    return out


def drop(root: BlockDriver) -> None:
    """Release the graph's files without flushing or writing back anything (the process died)."""
    for c in root.children:
        drop(c.node)
    root.closed()
