"""The ``luks`` format driver (QEMU's ``block/crypto.c``): a LUKS1 header and key material, then the
encrypted payload; the guest sees the decrypted payload."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, ClassVar

from qio.aio import run_sync
from qio.block import io
from qio.block.driver import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    REQ_FUA,
    BlockDriver,
    BlockInfo,
    Child,
    IOVec,
)
from qio.block.errors import BlockError, QemuError
from qio.block.events import Event
from qio.block.modes import OpenFlags
from qio.numbers import INT64_MAX

if TYPE_CHECKING:
    from qio.crypto.block import CryptoBlock

#: ``BLOCK_CRYPTO_MAX_IO_SIZE``: requests go through a bounce buffer of at most this size.
MAX_IO_SIZE = 1024 * 1024


class LuksDriver(BlockDriver):
    format_name = "luks"
    is_format = True
    runtime_opts: ClassVar[frozenset[str]] = frozenset({"key-secret"})
    reopen_opts = runtime_opts

    def __init__(self) -> None:
        super().__init__()
        self.crypto: CryptoBlock | None = None

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        """``block_crypto_open_generic``: open and unlock the header through the file child."""
        from qio.crypto.luks import luks_open

        self.flags = flags
        self.read_only = flags.read_only
        file = self.file
        self.supported_write_flags = REQ_FUA & file.supported_write_flags

        async def read(off: int, n: int) -> bytes:
            buf = bytearray(n)
            try:
                if n:
                    await io.preadv(file, off, n, [memoryview(buf)])
            except BlockError as e:
                raise QemuError.wrap(e, "Could not read encryption header") from None
            return bytes(buf)

        secret = options.get("key-secret")
        self.crypto = run_sync(luks_open(read, None if secret is None else str(secret), "",
                                         bool(getattr(flags, "no_io", False))))
        self.request_alignment = self.crypto.sector_size
        if self.crypto.payload_offset > io.getlength(file):  # bdrv_open_driver's refresh_total_sectors
            raise QemuError("Could not refresh total sector count: Input/output error", errno.EIO)

    def _block(self) -> CryptoBlock:
        assert self.crypto is not None
        return self.crypto

    def refresh_limits(self) -> None:
        super().refresh_limits()
        if self.crypto is not None:
            self.request_alignment = self.crypto.sector_size  # no sub-sector I/O

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        return None  # nothing needs checking

    def getlength(self) -> int:
        """``block_crypto_getlength``: the file minus the header (EIO if the payload starts past the end)."""
        n = io.getlength(self.file)
        off = self._block().payload_offset
        if off > n:
            raise BlockError(errno.EIO)
        return n - off

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        from qio.block.qcow2.driver import Qcow2Driver

        return Qcow2Driver.child_perm(self, child, perm, shared)  # type: ignore[arg-type]

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        """``block_crypto_co_preadv``: read and decrypt in bounce-buffer sized parts."""
        blk = self._block()
        file = self.file
        done = 0
        while done < nbytes:
            cur = min(nbytes - done, MAX_IO_SIZE)
            buf = bytearray(cur)
            if file.has_debug_hooks:
                await file.debug_event(Event.READ_AIO)
            await io.preadv(file, blk.payload_offset + offset + done, cur, [memoryview(buf)])
            try:
                blk.decrypt(offset + done, buf)
            except QemuError:
                raise BlockError(errno.EIO) from None
            io.iov_from_bytes(qiov, done, memoryview(buf))
            done += cur

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        """``block_crypto_co_pwritev``: encrypt into a bounce buffer, then write."""
        blk = self._block()
        file = self.file
        done = 0
        while done < nbytes:
            cur = min(nbytes - done, MAX_IO_SIZE)
            buf = bytearray(io.iov_to_bytes(io.iov_slice(qiov, done, cur)))
            try:
                blk.encrypt(offset + done, buf)
            except QemuError:
                raise BlockError(errno.EIO) from None
            if file.has_debug_hooks:
                await file.debug_event(Event.WRITE_AIO)
            await io.pwritev(file, blk.payload_offset + offset + done, cur, [memoryview(buf)], flags & REQ_FUA)
            done += cur

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        return None  # no bdrv_co_pdiscard: QEMU's generic layer succeeds without doing anything

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """``block_crypto_co_truncate``: the file's new size is the payload's plus the header."""
        off = self._block().payload_offset
        if off > INT64_MAX - offset:
            raise QemuError("The requested file size is too large", errno.EFBIG)
        await io.truncate(self.file, offset + off, exact, prealloc, 0)

    async def co_block_status_map(self, want_zero: bool, offset: int,
                                  nbytes: int) -> tuple[int, int, int, BlockDriver | None]:
        """No ``bdrv_co_block_status``: everything is allocated data of this node."""
        return BLOCK_DATA | BLOCK_ALLOCATED, nbytes, 0, None

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        return BLOCK_DATA | BLOCK_ALLOCATED, nbytes

    def get_info(self) -> BlockInfo | None:
        """``block_crypto_get_info_luks``: the file's cluster size."""
        info = self.file.get_info()
        return None if info is None else BlockInfo(info.cluster_size, 0)

    def get_specific_info(self) -> list[tuple[str, Any]] | None:
        return list(self._block().info_fields)
