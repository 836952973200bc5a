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
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from qio.aio import AIO, AioContext, in_aio_request
from qio.block.driver import (
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    BlockDriver,
    BlockInfo,
    IOVec,
)
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_ALL, PERM_NAMES

INLINE_MAX = 8 << 20
IOV_MAX = 1024
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_FLOCK = struct.Struct("hhqqixxxx")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
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
    for i in range(0, len(bufs), IOV_MAX):
        group = bufs[i : i + IOV_MAX]
        want = sum(len(b) for b in group)
        done = os.pwritev(fd, group, offset)
        while done < want:
            done += os.pwritev(fd, _skip(group, done), offset + done)
        offset += want


class FileDriver(BlockDriver):
    format_name = "file"
    protocol_name = "file"
    runtime_opts: ClassVar[frozenset[str]] = frozenset(
        {"filename", "aio", "aio-max-batch", "locking", "pr-manager", "drop-cache", "x-check-cache-dropped"})

    def __init__(self) -> None:
        super().__init__()
        self.fd = -1
        self.size = 0
        self.use_lock = True
        self.direct = False
        self._locked_perm = 0
        self._locked_unshared = 0
        self.pdiscard_alignment = 1

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        filename = options.get("filename")
        if not filename:
            raise QemuError("The 'file' block driver requires a file name")
        if filename.startswith("file:"):
            filename = filename[5:]
        self.filename = filename
        locking = options.get("locking", "auto")
        if locking not in ("auto", "on", "off"):
            raise QemuError(f"invalid parameter value: {locking}")
        self.use_lock = locking != "off"
        aio = options.get("aio", "native" if flags.native_aio else flags.aio)
        if aio not in ("threads", "native", "io_uring"):
            raise QemuError(f"invalid parameter value: {aio}")
        if aio == "native" and not flags.nocache:
            raise QemuError("aio=native was specified, but it requires cache.direct=on, "
                            "which was not specified.")
        mode = os.O_RDONLY if flags.read_only else os.O_RDWR
        mode |= os.O_CLOEXEC
        if flags.nocache:
            mode |= os.O_DIRECT
        try:
            self.fd = os.open(filename, mode)
        except OSError as e:
            raise QemuError(f"Could not open '{filename}': {os.strerror(e.errno or errno.EIO)}",
                            e.errno or errno.EIO) from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            self.fd = -1
            raise QemuError(f"Could not open '{filename}': Is a directory", errno.EISDIR)
        self.size = st.st_size
        self.read_only = flags.read_only
        self.flags = flags
        self.supported_zero_flags = REQ_MAY_UNMAP | REQ_NO_FALLBACK
        self.direct = flags.nocache
        if self.direct:
            self.request_alignment = self._probe_alignment()

    def _probe_alignment(self) -> int:
        buf = mmap.mmap(-1, 65536)
        try:
            for align in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
                try:
                    os.preadv(self.fd, [memoryview(buf)[:align]], 0)
                    return align
                except OSError:
                    continue
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
    def getlength(self) -> int:
        return self.size

    def grow_to(self, end: int) -> None:
        if end > self.size:
            self.size = end

    async def _run(self, nbytes: int, fn: Any, *args: Any) -> Any:
        """Do one host I/O: inline when small, in the thread pool when large (see module docstring)."""
        AIO.yields += 1
        try:
            if nbytes <= INLINE_MAX or AIO.inline:
                result = fn(*args)
            else:
                AIO.busy += 1
                try:
                    return await asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)
                finally:
                    AIO.busy -= 1
        except OSError as e:
            raise BlockError(e.errno or errno.EIO) from None
        if AIO.yield_on_io:
            await AioContext.current().io_yield()
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

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        if self.direct:
            await self._run(nbytes, self._direct_io, False, qiov, offset)
        else:
            await self._run(nbytes, _pread_all, self.fd, qiov, offset)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        if self.direct:
            await self._run(nbytes, self._direct_io, True, qiov, offset)
        else:
            await self._run(nbytes, _pwrite_all, self.fd, qiov, offset)
        self.grow_to(offset + nbytes)

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
        await self._run(0, self._zero, offset, nbytes, flags)
        self.grow_to(offset + nbytes)

    def _punch(self, offset: int, nbytes: int) -> None:
        err = _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
        if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise BlockError(errno.ENOTSUP)
        if err:
            raise BlockError(err)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        await self._run(0, self._punch, offset, nbytes)

    async def co_flush_to_disk(self) -> bool:
        if in_aio_request.get() and not AIO.yield_on_io:
            AioContext.current().defer_fdatasync(self.fd)
            return True  # deferred: the node is not clean yet
        await self._run(0, os.fdatasync, self.fd)
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

    def get_info(self) -> BlockInfo | None:
        return BlockInfo()
