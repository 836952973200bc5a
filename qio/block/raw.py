"""The ``raw`` format driver: the guest sees the protocol node's bytes, optionally a window of them.

Raises ``read_aio``/``write_aio`` on its file child as QEMU's raw format does.  When the format was
probed rather than given, writes that would make sector 0 look like another format fail with EPERM,
so a guest cannot turn a raw image into, say, a qcow2 header pointing at host files.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from qio.block import io
from qio.block.driver import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    REQ_FUA,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    BlockDriver,
    BlockInfo,
    Child,
    IOVec,
)
from qio.block.errors import BlockError, QemuError
from qio.block.events import Event
from qio.block.modes import OpenFlags
from qio.block.probe import probe_format
from qio.numbers import INT64_MAX
from qio.qemuopts import opt_size

PROBE_BUF = 512


class RawDriver(BlockDriver):
    format_name = "raw"
    is_format = True
    runtime_opts: ClassVar[frozenset[str]] = frozenset({"offset", "size"})
    reopen_opts = runtime_opts

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0
        self.size: int | None = None
        self.opts: dict[str, Any] = {}

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        self.flags = flags
        self.read_only = flags.read_only
        file = self.file
        self.opts = {k: options[k] for k in self.runtime_opts if k in options}
        self.offset, self.size = self._read_options(self.opts)
        self.supported_write_flags = (REQ_FUA | REQ_MAY_UNMAP | REQ_NO_FALLBACK) & file.supported_write_flags
        self.supported_zero_flags = (REQ_FUA | REQ_MAY_UNMAP | REQ_NO_FALLBACK) & file.supported_zero_flags
        self.request_alignment = 512 if self.probed else 1

    def _read_options(self, options: dict[str, Any]) -> tuple[int, int | None]:
        """``raw_read_options`` + the checks of ``raw_apply_options``: (offset, size or None)."""
        real = io.getlength(self.file)
        offset = opt_size(options, "offset", 0)
        size = None if options.get("size") is None else opt_size(options, "size", 0)
        if offset > real:
            raise QemuError(f"Offset ({offset}) cannot be greater than size of the containing file ({real})")
        if size is not None:
            if real - offset < size:
                raise QemuError(f"The sum of offset ({offset}) and size ({size}) has to be "
                                f"smaller or equal to the  actual size of the containing file ({real})")
            if size % 512:
                raise QemuError("Specified size is not multiple of 512")
        return offset, size

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        self._read_options({**self.opts, **options})

    def reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        """``raw_reopen_prepare``/``commit``: new offset and size (explicit ones are kept)."""
        opts = {**self.opts, **options}
        self.offset, self.size = self._read_options(opts)
        self.opts = opts
        super().reopen(flags, options)

    def getlength(self) -> int:
        if self.size is not None:
            return self.size
        return max(0, io.getlength(self.file) - self.offset)

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        return perm, shared

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        file = self.file
        if file.has_debug_hooks:
            await file.debug_event(Event.READ_AIO)
        await io.preadv(file, offset + self.offset, nbytes, qiov)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        if self.probed and offset < PROBE_BUF and nbytes:
            head = bytes(io.iov_to_bytes(io.iov_slice(qiov, 0, PROBE_BUF)))
            if probe_format(head, None) != "raw":  # bdrv_probe_all(buf, 512, NULL)
                raise BlockError(errno.EPERM)
        file = self.file
        if file.has_debug_hooks:
            await file.debug_event(Event.WRITE_AIO)
        await io.pwritev(file, offset + self.offset, nbytes, qiov, flags)

    def can_write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> bool:
        if self.probed and offset < PROBE_BUF and nbytes:
            return False
        file = self.file
        return not file.has_debug_hooks and io.can_pwritev_inline(file, offset + self.offset, nbytes, qiov, flags)

    def write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        io.pwritev_inline(self.file, offset + self.offset, nbytes, qiov, flags)

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        await io.pwrite_zeroes(self.file, offset + self.offset, nbytes, flags)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        await io.pdiscard(self.file, offset + self.offset, nbytes)

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """``raw_co_truncate``: only an explicit ``size`` fixes the length; an ``offset`` moves the end."""
        if self.size is not None:
            raise QemuError("Cannot resize fixed-size raw disks", errno.ENOTSUP)
        if INT64_MAX - offset < self.offset:
            raise QemuError("Disk size too large for the chosen offset", errno.EINVAL)
        await io.truncate(self.file, offset + self.offset, exact, prealloc, flags)

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        # BDRV_BLOCK_RAW: the answer is the protocol's (a raw image is allocated wherever it has bytes,
        # except where a protocol such as nbd reports a hole that does not read as zeroes).
        status, pnum = await io.block_status(self.file, offset + self.offset, nbytes)
        if pnum and not status & (BLOCK_DATA | BLOCK_ZERO):
            return BLOCK_OFFSET_VALID, pnum
        return BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID, pnum

    def get_info(self) -> BlockInfo | None:
        # raw_get_info asks the protocol (nbd has no info: qemu-io's ``info`` then fails silently).
        node = self.file
        info = node.get_info()
        while info is None and node.is_filter and node.children:
            node = node.children[0].node
            info = node.get_info()
        return info
