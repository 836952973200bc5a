"""The ``blklogwrites`` filter driver: every write, zero write, discard and flush that reaches the node
is passed to its ``file`` child and recorded in its ``log`` child, in the dm-log-writes format.

Why: a log of the exact writes and flushes a format driver issued is what a crash-state explorer
(``qio-img crashcheck``) needs to rebuild every state a power failure could leave.  The log is
byte-identical to QEMU 7.2's for the same requests, so logs of qio and of qemu-io are interchangeable.

Log layout (little-endian; the Linux dm-log-writes format).  Sector 0 is the superblock
(``magic, version, nr_entries: u64; sectorsize: u32``, zero padded to a log sector).  Entries
follow from sector 1: one header sector (``sector, nr_sectors, flags, data_len: u64``, zero padded;
``sector``/``nr_sectors`` are in log sectors, ``data_len`` is always 0) and then, except for a
discard, ``nr_sectors`` sectors of data (zeroes for a zero write).  A flush is an entry with
``LOG_FLUSH`` and no data.  The superblock is rewritten, and the log flushed, after every flush entry
and every ``log-super-update-interval`` entries; it is never written at close, so a log that saw no
flush may claim fewer entries than it holds.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from typing import Any, ClassVar, NamedTuple

from qio.aio import AIO, run_sync
from qio.block import io
from qio.block.driver import SECTOR, BlockDriver, Child, IOVec, OpenChild
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED
from qio.qemuopts import opt_bool, opt_size, sub_options

LOG_FLUSH = 1 << 0
LOG_FUA = 1 << 1
LOG_DISCARD = 1 << 2
LOG_MARK = 1 << 3
LOG_FLAG_MASK = LOG_FLUSH | LOG_FUA | LOG_DISCARD | LOG_MARK
LOG_VERSION = 1
LOG_MAGIC = 0x6A736677736872

SUPER = struct.Struct("<QQQI")  # magic, version, nr_entries, sectorsize (28 bytes)
ENTRY = struct.Struct("<QQQQ")  # sector, nr_sectors, flags, data_len (32 bytes)
_PASSTHROUGH = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
_ALL_PERMS = _PASSTHROUGH


def sector_size_valid(size: int) -> bool:
    """A power of two that holds the superblock and an entry header, below 16 MiB."""
    return size > 0 and size & (size - 1) == 0 and size >= ENTRY.size and size < 1 << 24


def pack_super(nr_entries: int, sectorsize: int) -> bytes:
    return SUPER.pack(LOG_MAGIC, LOG_VERSION, nr_entries, sectorsize).ljust(sectorsize, b"\0")


class LogEntry(NamedTuple):
    """One entry of a dm-log-writes log, as the crash tools see it (byte offsets in the image)."""

    seq: int  # the entry's number in the log, from 0
    sector: int  # in log sectors
    nr_sectors: int
    flags: int
    #: byte offset of the entry's data in the log file (0 for flushes and discards)
    data_offset: int
    sectorsize: int
    #: byte offset of the entry's header sector in the log file
    header_offset: int = 0
    #: bytes of inline data after the header (a dm-log-writes mark's name)
    data_len: int = 0

    @property
    def offset(self) -> int:
        return self.sector * self.sectorsize

    @property
    def nbytes(self) -> int:
        return self.nr_sectors * self.sectorsize

    @property
    def kind(self) -> str:
        if self.flags & LOG_FLUSH:
            return "flush"
        if self.flags & LOG_DISCARD:
            return "discard"
        if self.flags & LOG_MARK:
            return "mark"
        return "write"


class LogError(Exception):
    """A log that cannot be read (bad magic, version, flags); the message is for the user."""


class Log(NamedTuple):
    sectorsize: int
    nr_entries: int  # as the superblock says
    entries: list[LogEntry]


def read_log(path: str, *, all_entries: bool = False) -> Log:
    """Parse a log file.  ``all_entries``: also take entries past the superblock's count, as long as
    they are well formed and fit in the file (what a log that was never flushed at the end holds), and
    accept a missing (all-zero) superblock as one for 512-byte sectors."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LogError(f"Could not open '{path}': {os.strerror(e.errno or errno.EIO)}") from None
    if len(data) < SUPER.size:
        raise LogError(f"'{path}': not a dm-log-writes log (too short)")
    magic, version, nr, ss = SUPER.unpack_from(data, 0)
    if magic == 0 and version == 0 and nr == 0 and ss == 0 and all_entries:
        # the superblock is only written at flushes: a log that never saw one has none
        magic, version, ss = LOG_MAGIC, LOG_VERSION, SECTOR
    if magic != LOG_MAGIC:
        hint = " (a log that never saw a flush has no superblock: try --all-entries)" if magic == 0 else ""
        raise LogError(f"'{path}': Invalid log superblock magic{hint}")
    if version != LOG_VERSION:
        raise LogError(f"'{path}': Unsupported log version {version}")
    if not sector_size_valid(ss):
        raise LogError(f"'{path}': Invalid log sector size {ss}")
    entries: list[LogEntry] = []
    sec = 1
    idx = 0
    while idx < nr or all_entries:
        pos = sec * ss
        if pos + ENTRY.size > len(data):
            if idx < nr:
                raise LogError(f"'{path}': log entry {idx} is past the end of the file")
            break
        sector, nsec, flags, dlen = ENTRY.unpack_from(data, pos)
        if flags & ~LOG_FLAG_MASK:
            if idx < nr:
                raise LogError(f"'{path}': Invalid flags 0x{flags:x} in log entry {idx}")
            break
        has_data = not flags & (LOG_DISCARD | LOG_FLUSH)
        end = pos + ss + (nsec * ss if has_data else 0)
        if idx >= nr and (end > len(data) or (flags == 0 and nsec == 0 and sector == 0)):
            break  # beyond the count: stop at the first entry that is not plausibly a real one
        entries.append(LogEntry(idx, sector, nsec, flags, pos + ss if has_data and nsec else 0, ss, pos,
                                min(dlen, ss - ENTRY.size)))
        sec += 1 + (0 if flags & LOG_DISCARD else nsec)
        idx += 1
    return Log(ss, nr, entries)


class BlkLogWritesDriver(BlockDriver):
    format_name = "blklogwrites"
    is_filter = True
    runtime_opts: ClassVar[frozenset[str]] = frozenset(
        {"log-append", "log-sector-size", "log-super-update-interval"})

    def __init__(self) -> None:
        super().__init__()
        self.sectorsize = SECTOR
        self.sectorbits = 9
        self.cur_log_sector = 1
        self.nr_entries = 0
        self.update_interval = 4096

    @property
    def log(self) -> BlockDriver:
        c = self.child("log")
        assert c is not None
        return c.node

    def open_children(self, options: dict[str, Any], flags: OpenFlags, open_child: OpenChild) -> None:
        """``blk_log_writes_open``: option types, the ``file`` then the ``log`` child, then the log's
        superblock when appending (with QEMU's messages, in its order)."""
        from qio.block.blkdebug_config import check_value

        append = opt_bool(options, "log-append", False)
        size_given = options.get("log-sector-size") is not None
        sector_size = opt_size(options, "log-sector-size", SECTOR)
        interval_opt = options.get("log-super-update-interval")
        interval = 4096 if interval_opt is None else int(check_value("log-super-update-interval",
                                                                      interval_opt, "number"))
        for name in ("file", "log"):
            child_opts = sub_options(options, name)
            ref = options.pop(name, None)
            if isinstance(ref, str):
                raise QemuError("Node references are not supported by qio; give the child's options instead")
            if not child_opts:
                raise QemuError(f'A block device must be specified for "{name}"')
            cflags = flags.copy()
            cflags.unmap = True  # bdrv_inherited_options: children default to discard=unmap
            self.children.append(Child(name, open_child(child_opts, cflags, False)))
        if append:
            if size_given:
                raise QemuError("log-append and log-sector-size are mutually exclusive")
            sector_size = self._scan_log()
        if not sector_size_valid(sector_size):
            raise QemuError(f"Invalid log sector size {sector_size}")
        self.sectorsize = sector_size
        self.sectorbits = sector_size.bit_length() - 1
        self.update_interval = interval
        if not interval:
            raise QemuError(f"Invalid log superblock update interval {interval}")
        # The order of concurrent requests' entries is observable in the log: run host I/O through the
        # simulated thread pool, as with blkdebug, so that it is QEMU's.
        _open_nodes.add(self)
        AIO.yield_on_io = True

    def closed(self) -> None:
        _open_nodes.discard(self)
        if not _open_nodes:
            blkdebug = sys.modules.get("qio.block.blkdebug")
            AIO.yield_on_io = bool(blkdebug is not None and blkdebug._open_nodes)

    def _scan_log(self) -> int:
        """Read the superblock of the log to append to and find its end; returns its sector size."""
        log = self.log
        if io.getlength(log) == 0:
            magic, version, nr, ss = LOG_MAGIC, LOG_VERSION, 0, SECTOR
        else:
            buf = bytearray(SUPER.size)
            try:
                run_sync(io.preadv(log, 0, len(buf), [memoryview(buf)]))
            except BlockError as e:
                raise QemuError.wrap(e, "Could not read log superblock") from None
            magic, version, nr, ss = SUPER.unpack(buf)
        if magic != LOG_MAGIC:
            raise QemuError("Invalid log superblock magic")
        if version != LOG_VERSION:
            raise QemuError(f"Unsupported log version {version}")
        self.cur_log_sector = 1
        self.nr_entries = 0
        if sector_size_valid(ss):
            self.cur_log_sector = self._find_end(ss, nr)
            self.nr_entries = nr
        return int(ss)

    def _find_end(self, ss: int, nr: int) -> int:
        """``blk_log_writes_find_cur_log_sector``: walk ``nr`` entry headers.  Headers past the end of
        the log read as zeroes (one sector each), so that stretch is counted at once instead of
        being read entry by entry (QEMU would loop for a huge bogus count)."""
        log = self.log
        length = io.getlength(log)
        bits = ss.bit_length() - 1
        sec = 1
        idx = 0
        buf = bytearray(ENTRY.size)
        while idx < nr:
            if sec << bits >= length:
                return sec + (nr - idx)
            try:
                run_sync(io.preadv(log, sec << bits, ENTRY.size, [memoryview(buf)]))
            except BlockError as e:
                raise QemuError.wrap(e, f"Failed to read log entry {idx}") from None
            _sector, nsec, flags, _dlen = ENTRY.unpack(buf)
            if flags & ~LOG_FLAG_MASK:
                raise QemuError(f"Invalid flags 0x{flags:x} in log entry {idx}")
            sec += 1
            if not flags & LOG_DISCARD:
                sec += nsec
            idx += 1
        return sec

    def refresh_limits(self) -> None:
        """Limits come from the ``file`` child only (the log is metadata); the request alignment is the
        log sector size, so that every logged request covers whole log sectors."""
        n = self.file
        self.pdiscard_alignment = max(self.pdiscard_alignment, n.pdiscard_alignment)
        if n.max_transfer and (not self.max_transfer or n.max_transfer < self.max_transfer):
            self.max_transfer = n.max_transfer
        self.request_alignment = self.sectorsize

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """The ``file`` child gets the parent's permissions (a filter); the ``log`` child is metadata:
        written whenever the node is writable, and nobody else may write or resize it."""
        nperm = perm & _PASSTHROUGH
        nshared = (shared & _PASSTHROUGH) | (_ALL_PERMS & ~_PASSTHROUGH)
        if child.name == "log":
            if not self.read_only:
                nperm |= PERM_WRITE | PERM_RESIZE
            nperm |= PERM_CONSISTENT_READ
            nshared &= ~(PERM_WRITE | PERM_RESIZE)
        return nperm, nshared

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        raise QemuError(f"Block format 'blklogwrites' used by node '{self.node_name}' "
                        "does not support reopening files")

    # -- I/O ---------------------------------------------------------------------------------------
    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        await io.preadv(self.file, offset, nbytes, qiov)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        await self._logged(offset, nbytes, qiov, 0, False, io.pwritev(self.file, offset, nbytes, qiov, flags))

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        await self._logged(offset, nbytes, None, 0, True, io.pwrite_zeroes(self.file, offset, nbytes, 0))

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        await self._logged(offset, nbytes, None, LOG_DISCARD, False, io.pdiscard(self.file, offset, nbytes))

    async def co_flush_to_disk(self) -> bool:
        await self._logged(0, 0, None, LOG_FLUSH, False, io.flush(self.file))
        return False

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """A filter without its own resize resizes its child (``bdrv_co_truncate``); nothing is logged."""
        await io.truncate(self.file, offset, exact, prealloc, flags)

    async def _logged(self, offset: int, nbytes: int, qiov: IOVec | None, entry_flags: int, zero: bool,
                      file_request: Any) -> None:
        """``blk_log_writes_co_log``: the request on ``file`` first, then its log entry whatever the
        request's result; a log error wins over the request's."""
        file_err: BlockError | None = None
        try:
            await file_request
        except BlockError as e:
            file_err = e
        await self._log_entry(offset, nbytes, qiov, entry_flags, zero)
        if file_err is not None:
            raise file_err

    async def _log_entry(self, offset: int, nbytes: int, qiov: IOVec | None, entry_flags: int,
                         zero: bool) -> None:
        """Reserve the entry's sectors first (other requests may log while this one waits for I/O),
        then write header and data, a zero write's zeroes, and the superblock when it is due."""
        ss, bits = self.sectorsize, self.sectorbits
        data_len = sum(len(b) for b in qiov) if qiov is not None else 0
        header = ENTRY.pack(offset >> bits, nbytes >> bits, entry_flags, 0).ljust(ss, b"\0")
        entry_offset = self.cur_log_sector << bits
        data_aligned = -(-data_len // ss) * ss
        zero_size = nbytes if zero else 0
        self.nr_entries += 1
        self.cur_log_sector += (data_aligned + -(-zero_size // ss) * ss) >> bits
        self.cur_log_sector += 1  # the header sector
        log = self.log
        iov: IOVec = [memoryview(bytearray(header)), *(qiov or [])]
        await io.pwritev(log, entry_offset, ss + data_len, iov, 0)
        if zero_size:
            await io.pwrite_zeroes(log, entry_offset + ss + data_aligned, zero_size, 0)
        if entry_flags & LOG_FLUSH or self.nr_entries % self.update_interval == 0:
            sb = pack_super(self.nr_entries, ss)
            await io.pwritev(log, 0, ss, [memoryview(bytearray(sb))], 0)
            await io.flush(log)


_open_nodes: set[BlkLogWritesDriver] = set()
