"""The ``file`` protocol driver: a host file accessed with positional I/O.

Small requests are done inline with ``os.preadv``/``os.pwritev``: on a page-cache-backed file a
syscall costs a few microseconds, a thread-pool hand-off about eighty.  Requests larger than
``INLINE_MAX`` go to a thread pool so the event loop (and other requests in flight) keep running.
Image locking uses QEMU 7.2's OFD byte-range locks so qio and qemu-io exclude each other.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import mmap
import os
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from qio.aio import (
    AIO,
    COST_EXTEND,
    COST_EXTEND_PER_BYTE,
    COST_FALLOCATE,
    COST_PER_BYTE,
    COST_SYNC,
    COST_TRANSFER,
    AioContext,
    current_co,
    in_aio_request,
)
from qio.block import io
from qio.block.driver import (
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    BlockDriver,
    BlockInfo,
    IOVec,
)
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_ALL, PERM_NAMES
from qio.qemuopts import opt_bool

INLINE_MAX = 8 << 20
IOV_MAX = 1024
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_FLOCK = struct.Struct("hhqqixxxx")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        # imported on first use: only large transfers need threads, and qio's start-up should not pay
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qio-io")
    return _pool


@functools.cache
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return libc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """Linux ``fallocate(2)`` with a mode (Python's os module only has posix_fallocate); errno or 0."""
    import ctypes

    if _libc().fallocate(fd, mode, offset, length) != 0:
        return ctypes.get_errno()
    return 0


async def _checked(fut: Any) -> Any:
    try:
        return await fut
    except OSError as e:
        raise BlockError(e.errno or errno.EIO) from None


def _einval() -> None:
    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def _pread_all(fd: int, bufs: IOVec, offset: int) -> None:
    """Fill ``bufs`` from ``offset``; bytes past the end of the file read as zeroes."""
    for i in range(0, len(bufs), IOV_MAX):
        group = bufs[i : i + IOV_MAX]
        want = sum(len(b) for b in group)
        got = os.preadv(fd, group, offset)
        while got < want:
            rest = _skip(group, got)
            n = os.preadv(fd, rest, offset + got)
            if n == 0:
                for b in rest:
                    b[:] = bytes(len(b))
                break
            got += n
        offset += want


def _skip(bufs: IOVec, n: int) -> IOVec:
    out: IOVec = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def _pwrite_all(fd: int, bufs: IOVec, offset: int) -> None:
    if len(bufs) == 1:  # the common request, written the same way without the grouping
        want = len(bufs[0])
        done = os.pwritev(fd, bufs, offset)
        while done < want:
            done += os.pwritev(fd, _skip(bufs, done), offset + done)
        return
    for i in range(0, len(bufs), IOV_MAX):
        group = bufs[i : i + IOV_MAX]
        want = sum(len(b) for b in group)
        done = os.pwritev(fd, group, offset)
        while done < want:
            done += os.pwritev(fd, _skip(group, done), offset + done)
        offset += want


def _seek_status(fd: int, offset: int, nbytes: int) -> tuple[int, int]:
    """file-posix ``raw_co_block_status`` with ``want_zero``: holes are zero (SEEK_DATA/SEEK_HOLE)."""
    if fd < 0:
        return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return BLOCK_ZERO | BLOCK_OFFSET_VALID, nbytes
        return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes
    if data > offset:
        return BLOCK_ZERO | BLOCK_OFFSET_VALID, min(nbytes, data - offset)
    try:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:
        return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes
    if hole > offset:
        return BLOCK_DATA | BLOCK_OFFSET_VALID, min(nbytes, hole - offset)
    return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes


class FileDriver(BlockDriver):
    format_name = "file"
    protocol_name = "file"
    runtime_opts: ClassVar[frozenset[str]] = frozenset(
        {"filename", "aio", "aio-max-batch", "locking", "pr-manager", "drop-cache", "x-check-cache-dropped"})

    def __init__(self) -> None:
        super().__init__()
        self.fd = -1
        self.size = 0
        self.tracks_all = True
        self.use_lock = True
        self.direct = False
        self._locked_perm = 0
        self._locked_unshared = 0
        self.pdiscard_alignment = 1

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> bool:
        """``raw_parse_filename``: drop the ``file:`` (or ``host_device:``...) prefix."""
        prefix = f"{cls.protocol_name}:"
        if filename.startswith(prefix):
            options["filename"] = filename[len(prefix):]
        return False

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        filename = options.get("filename")
        if not filename:
            raise QemuError("The 'file' block driver requires a file name")
        self.filename = str(filename)
        self._check_number(options, "aio-max-batch")
        for key in ("drop-cache", "x-check-cache-dropped"):
            opt_bool(options, key, False)
        locking = options.get("locking") or "auto"
        if locking not in ("auto", "on", "off"):
            raise QemuError(f"invalid parameter value: {locking}")
        self.use_lock = locking != "off"
        aio = options.get("aio") or ("native" if flags.native_aio else flags.aio)
        if aio not in ("threads", "native", "io_uring"):
            raise QemuError(f"invalid parameter value: {aio}")
        if aio == "native" and not flags.nocache:
            raise QemuError("aio=native was specified, but it requires cache.direct=on, "
                            "which was not specified.")
        pr_manager = options.get("pr-manager")
        if pr_manager is not None:  # qio has no --object, so there is never such an object
            raise QemuError(f"No persistent reservation manager with id '{pr_manager}'")
        mode = os.O_RDONLY if flags.read_only else os.O_RDWR
        mode |= os.O_CLOEXEC
        if flags.nocache:
            mode |= os.O_DIRECT
        try:
            # O_NONBLOCK: a FIFO opened read-only would wait for a writer (qemu-io hangs there); qio
            # opens it at once and refuses it below with the message QEMU gives once it gets that far.
            self.fd = os.open(filename, mode | os.O_NONBLOCK)
            os.set_blocking(self.fd, True)
        except OSError as e:
            raise QemuError(f"Could not open '{filename}': {os.strerror(e.errno or errno.EIO)}",
                            e.errno or errno.EIO) from None
        st = os.fstat(self.fd)
        self._check_file_type(st.st_mode)
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)  # raw_getlength (EINVAL on /proc files)
        except OSError as e:
            err = e.errno or errno.EIO
            raise QemuError(f"Could not refresh total sector count: {os.strerror(err)}", err) from None
        self.read_only = flags.read_only
        self.flags = flags
        self.supported_zero_flags = REQ_MAY_UNMAP | REQ_NO_FALLBACK
        self.direct = flags.nocache
        if self.direct:
            self.request_alignment = self._probe_alignment()

    @staticmethod
    def _check_number(options: dict[str, Any], key: str) -> None:
        """A QemuOpts number (``parse_option_number``: ``qemu_strtou64`` base 0, negatives wrap)."""
        from qio.numbers import strtou64

        value = options.get(key)
        if value is None:
            return
        err = strtou64(str(value))
        if err == "range":
            raise QemuError(f"Value '{value}' is too large for parameter '{key}'")
        if err:
            raise QemuError(f"Parameter '{key}' expects a number")

    def _check_file_type(self, mode: int) -> None:
        """``raw_open_common``: the ``file`` driver takes regular files only."""
        if not stat.S_ISREG(mode):
            raise QemuError(f"'{self.format_name}' driver requires '{self.filename}' to be a regular file")

    def _probe_alignment(self) -> int:
        """``raw_probe_alignment``: the smallest O_DIRECT read of sector 0 that works; where even one
        byte works (a hole, an empty file) QEMU falls back to 4096 (MAX_BLOCKSIZE/page size)."""
        buf = mmap.mmap(-1, 65536)
        try:
            for align in (1, 512, 1024, 2048, 4096):
                try:
                    os.preadv(self.fd, [memoryview(buf)[:align]], 0)
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        continue
                return align if align != 1 else 4096
        finally:
            buf.close()
        return 4096

    # -- locking (file-posix raw_apply_lock_bytes / raw_check_lock_bytes) ---------------------
    def _lock(self, off: int, lock: bool) -> None:
        typ = fcntl.F_RDLCK if lock else fcntl.F_UNLCK
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(typ, os.SEEK_SET, off, 1, 0))

    def _conflict(self, off: int) -> bool:
        res = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, off, 1, 0))
        return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)

    def set_perm(self, perm: int, shared: int) -> None:
        self.perm, self.shared = perm, shared
        if not self.use_lock:
            return
        unshared = ~shared & PERM_ALL
        try:
            for bit in PERM_NAMES:
                self._lock(LOCK_PERM_BASE + bit.bit_length() - 1, bool(perm & bit))
                self._lock(LOCK_SHARED_BASE + bit.bit_length() - 1, bool(unshared & bit))
        except OSError as e:
            raise QemuError(f"Failed to lock byte: {os.strerror(e.errno or 0)}") from None
        hint = f"\nIs another process using the image [{self.filename}]?"
        for bit, name in PERM_NAMES.items():
            if perm & bit and self._conflict(LOCK_SHARED_BASE + bit.bit_length() - 1):
                self._restore_locks()
                raise QemuError(f'Failed to get "{name}" lock{hint}', errno.EAGAIN)
        for bit, name in PERM_NAMES.items():
            if unshared & bit and self._conflict(LOCK_PERM_BASE + bit.bit_length() - 1):
                self._restore_locks()
                raise QemuError(f'Failed to get shared "{name}" lock{hint}', errno.EAGAIN)
        self._locked_perm, self._locked_unshared = perm, unshared

    def _restore_locks(self) -> None:
        for bit in PERM_NAMES:
            self._lock(LOCK_PERM_BASE + bit.bit_length() - 1, bool(self._locked_perm & bit))
            self._lock(LOCK_SHARED_BASE + bit.bit_length() - 1, bool(self._locked_unshared & bit))
        self.perm, self.shared = self._locked_perm, ~self._locked_unshared & PERM_ALL

    def reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        if flags.read_only != self.read_only or flags.nocache != self.direct:
            mode = (os.O_RDONLY if flags.read_only else os.O_RDWR) | os.O_CLOEXEC
            if flags.nocache:
                mode |= os.O_DIRECT
            try:
                fd = os.open(self.filename, mode)
            except OSError as e:
                raise QemuError(f"Could not reopen file: {os.strerror(e.errno or errno.EIO)}") from None
            os.close(self.fd)  # drops the old descriptor's locks; set_perm takes them again
            self.fd = fd
            self._locked_perm = self._locked_unshared = 0
        super().reopen(flags, options)
        self.direct = flags.nocache
        self.request_alignment = self._probe_alignment() if self.direct else 1

    def closed(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops its OFD locks
            self.fd = -1

    # -- I/O -------------------------------------------------------------------------------
    async def co_block_status_map(self, want_zero: bool, offset: int,
                                  nbytes: int) -> tuple[int, int, int, BlockDriver | None]:
        """``raw_co_block_status``: data everywhere, or with ``want_zero`` holes read as zeroes."""
        if not want_zero:
            return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, self
        ret, pnum = _seek_status(self.fd, offset, nbytes)
        return ret, pnum, offset, self

    def get_allocated_file_size(self) -> int | None:
        """``raw_get_allocated_file_size``: the blocks the file takes (st_blocks)."""
        if self.children or self.fd < 0:
            return None
        try:
            return int(os.fstat(self.fd).st_blocks) * 512
        except OSError:
            return None

    def getlength(self) -> int:
        return self.size

    def grow_to(self, end: int) -> None:
        if end > self.size:
            self.size = end

    async def _run(self, nbytes: int, fn: Any, *args: Any, cost: float = 0) -> Any:
        """Do one host I/O: inline when small, in a real thread when large (see module docstring).

        While a blkdebug node exists, an inline transfer still waits for the simulated thread pool's
        completion (``raw_thread_pool_submit``), so requests interleave as in QEMU; ``cost`` is its
        time in the pool (a transfer's by default, see qio.aio).
        """
        AIO.yields += 1
        if nbytes > INLINE_MAX and not AIO.inline:
            fut = asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)
            if current_co() is None:
                AIO.busy += 1
                try:
                    return await _checked(fut)
                finally:
                    AIO.busy -= 1
            return await _checked(fut)
        try:
            result = fn(*args)
        except OSError as e:
            if AIO.yield_on_io:
                await AioContext.current().pool.submit(cost or COST_TRANSFER + nbytes * COST_PER_BYTE)
            raise BlockError(e.errno or errno.EIO) from None
        if AIO.yield_on_io:
            await AioContext.current().pool.submit(cost or COST_TRANSFER + nbytes * COST_PER_BYTE)
        return result

    def _direct_io(self, write: bool, qiov: IOVec, offset: int) -> None:
        """O_DIRECT needs page-aligned buffers: go through an anonymous mmap bounce buffer."""
        total = sum(len(b) for b in qiov)
        bounce = mmap.mmap(-1, max(total, 1))
        try:
            view = memoryview(bounce)[:total]
            if write:
                pos = 0
                for b in qiov:
                    view[pos : pos + len(b)] = b
                    pos += len(b)
                _pwrite_all(self.fd, [view], offset)
            else:
                _pread_all(self.fd, [view], offset)
                pos = 0
                for b in qiov:
                    b[:] = view[pos : pos + len(b)]
                    pos += len(b)
            view.release()
        finally:
            bounce.close()

    def _too_many(self, qiov: IOVec) -> bool:
        """A vector of more than IOV_MAX buffers handed to preadv/pwritev fails with EINVAL (unless
        O_DIRECT bounces a misaligned one through one buffer, as file-posix does)."""
        return len(qiov) > IOV_MAX and not (self.direct and any(len(b) % self.request_alignment for b in qiov))

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        if self._too_many(qiov):
            await self._run(nbytes, _einval)  # the syscall fails in the worker thread, after the hand-off
        elif self.direct:
            await self._run(nbytes, self._direct_io, False, qiov, offset)
        else:
            await self._run(nbytes, _pread_all, self.fd, qiov, offset)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        if self._too_many(qiov):
            await self._run(nbytes, _einval)
        elif self.direct:
            await self._run(nbytes, self._direct_io, True, qiov, offset)
        else:
            await self._run(nbytes, _pwrite_all, self.fd, qiov, offset, cost=self._write_cost(offset, nbytes))
        self.grow_to(offset + nbytes)

    def _write_cost(self, offset: int, nbytes: int) -> float:
        """The simulated pool's cost of a write: one past the end of the file (a new qcow2 cluster)
        allocates and costs several times an overwrite of cached pages; 0 is the transfer's default."""
        if not AIO.yield_on_io or offset + nbytes <= self.size:
            return 0
        return COST_EXTEND + nbytes * COST_EXTEND_PER_BYTE

    def can_write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> bool:
        """``co_pwritev`` that ``_run`` would do inline and that nothing waits for (no simulated pool)."""
        return (not AIO.yield_on_io and (nbytes <= INLINE_MAX or AIO.inline) and not self.direct
                and len(qiov) <= IOV_MAX)

    def write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        self._inline(offset + nbytes, _pwrite_all, self.fd, qiov, offset)

    def _inline(self, end: int, op: Callable[..., None], *args: Any) -> None:
        """``_run``'s inline steps for ``op(*args)``: the yield it counts, errno as a BlockError, the
        file's growth to ``end``."""
        AIO.yields += 1
        try:
            op(*args)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO) from None
        self.grow_to(end)

    def _zero(self, offset: int, nbytes: int, flags: int) -> None:
        unmap = flags & REQ_MAY_UNMAP and offset + nbytes <= self.size
        if unmap and _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes) == 0:
            return
        err = _fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, nbytes)
        if err in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
            raise BlockError(errno.ENOTSUP)
        if err:
            raise BlockError(err)

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        if AIO.yield_on_io and offset + nbytes > -(-self.size // 512) * 512:  # bs->total_sectors
            await io.serialise_to_end(self)
        await self._run(0, self._zero, offset, nbytes, flags, cost=COST_FALLOCATE)
        self.grow_to(offset + nbytes)

    def can_zero_inline(self, offset: int, nbytes: int, flags: int) -> bool:
        """``co_pwrite_zeroes`` that ``_run`` does inline and that nothing waits for (no simulated pool)."""
        return not AIO.yield_on_io and type(self).co_pwrite_zeroes is FileDriver.co_pwrite_zeroes

    def zero_inline(self, offset: int, nbytes: int, flags: int) -> None:
        self._inline(offset + nbytes, self._zero, offset, nbytes, flags)

    def _punch(self, offset: int, nbytes: int) -> None:
        err = _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
        if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise BlockError(errno.ENOTSUP)
        if err:
            raise BlockError(err)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        await self._run(0, self._punch, offset, nbytes, cost=COST_FALLOCATE)

    async def co_flush_to_disk(self) -> bool:
        if in_aio_request.get() and not AIO.yield_on_io:
            AioContext.current().defer_fdatasync(self.fd)
            return True  # deferred: the node is not clean yet
        await self._run(0, os.fdatasync, self.fd, cost=COST_SYNC)
        return False

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """``handle_aiocb_truncate`` for a regular file, with file-posix's messages."""
        AIO.yields += 1

        def fail(what: str, e: OSError) -> QemuError:
            err = e.errno or errno.EIO
            return QemuError(f"{what}: {os.strerror(err)}", err)

        current = os.fstat(self.fd).st_size
        if current > offset and prealloc != "off":
            raise QemuError("Cannot use preallocation for shrinking files", errno.ENOTSUP)
        if prealloc == "off":
            try:
                os.ftruncate(self.fd, offset)
            except OSError as e:
                raise fail("Could not resize file", e) from None
            if current == 0 and offset > 0:
                # allocate_first_block: file-posix writes zeroes to the first block of a file grown from
                # empty (it speeds up later alignment probing); failures are ignored
                try:
                    os.pwrite(self.fd, bytes(512 if offset < 4096 else 4096), 0)
                except OSError:
                    pass
        elif prealloc == "falloc":
            if offset != current:
                try:
                    os.posix_fallocate(self.fd, current, offset - current)
                except OSError as e:
                    raise fail("Could not preallocate new data", e) from None
        elif prealloc == "full":
            try:
                os.ftruncate(self.fd, offset)
            except OSError as e:
                raise fail("Could not resize file", e) from None
            zeros = bytes(65536)
            pos = current
            try:
                while pos < offset:
                    pos += os.pwrite(self.fd, zeros[: min(65536, offset - pos)], pos)
                os.fsync(self.fd)
            except OSError as e:
                os.ftruncate(self.fd, current)
                raise fail("Could not write zeros for preallocation", e) from None
        else:
            raise QemuError(f"Unsupported preallocation mode: {prealloc}", errno.ENOTSUP)
        self.size = offset
        if AIO.yield_on_io:
            await AioContext.current().pool.submit(COST_FALLOCATE)  # handle_aiocb_truncate runs in the pool

    def get_info(self) -> BlockInfo | None:
        return BlockInfo()


class HostDeviceDriver(FileDriver):
    """``host_device``: file-posix on a character or block device (``/dev/null``), chosen for such a
    path instead of ``file`` (``hdev_probe_device``)."""

    format_name = "host_device"
    protocol_name = "host_device"

    def _check_file_type(self, mode: int) -> None:
        if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
            raise QemuError(f"'{self.format_name}' driver requires '{self.filename}' to be either "
                            "a character or block device")

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """``raw_co_truncate`` on a device: it can only keep (or, inexactly, shrink below) its length."""
        if prealloc != "off":
            raise QemuError(f"Preallocation mode '{prealloc}' unsupported for this non-regular file",
                            errno.ENOTSUP)
        cur = os.lseek(self.fd, 0, os.SEEK_END)
        if offset != cur and exact:
            raise QemuError("Cannot resize device files", errno.ENOTSUP)
        if offset > cur:
            raise QemuError("Cannot grow device files", errno.EINVAL)



class HostCdromDriver(HostDeviceDriver):
    """``host_cdrom``: the same checks on Linux (qemu-iotests 226); qio has no medium handling."""

    format_name = "host_cdrom"
    protocol_name = "host_cdrom"

def is_host_device(filename: str) -> bool:
    """``find_hdev_driver``: a ``/dev/cdrom*`` name or an existing character/block device."""
    if filename.startswith("/dev/cdrom"):
        return True
    try:
        mode = os.stat(filename).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
