"""The qcow2 driver table (``BlockDriver bdrv_qcow2``): each method is a short call into the modules.

The node holds its state in ``self.s`` (``BDRVQcow2State``); the modules take that state as ``s``,
the way QEMU's qcow2 functions take ``BDRVQcow2State *s``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qio.block.driver import (
    BLOCK_OFFSET_VALID,
    REQ_WRITE_COMPRESSED,
    BlockDriver,
    BlockInfo,
    CheckResult,
    Child,
    IOVec,
    SnapshotInfo,
)
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED
from qio.block.qcow2 import datafile, resize, rw
from qio.block.qcow2 import layout as L
from qio.block.qcow2 import open as qopen
from qio.block.qcow2 import options as qoptions
from qio.block.qcow2.compress import _pwritev_compressed_part
from qio.block.qcow2.crypt import CRYPT_OPTS, specific_info, take_extra_crypt_opts
from qio.block.qcow2.rw import _preadv_part, _pwritev_part
from qio.block.qcow2.state import OL_OPTIONS, Qcow2State, _check_usable, _length, vm_state_offset


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    is_format = True
    can_compress = True
    supports_backing = True
    runtime_opts: ClassVar[frozenset[str]] = frozenset(
        {"lazy-refcounts", "pass-discard-request", "pass-discard-snapshot", "pass-discard-other",
         "overlap-check", "overlap-check.template", "cache-size", "l2-cache-size", "l2-cache-entry-size",
         "refcount-cache-size", "cache-clean-interval"} | {f"overlap-check.{k}" for k in OL_OPTIONS}
        | CRYPT_OPTS)
    reopen_opts = runtime_opts

    def __init__(self) -> None:
        super().__init__()
        self.s = Qcow2State(self)

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        self.s.crypt_extra_opts = take_extra_crypt_opts(options)
        qopen.qcow2_open(self.s, options, flags)

    async def close(self) -> None:
        await qopen.qcow2_close(self.s)

    def has_driver(self) -> bool:
        return not self.s.broken

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        qoptions.check_reopen(self.s, flags, options)

    def reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        qoptions.reopen(self.s, flags, options)

    # -- requests (no extra call level on the read and write paths) ---------------------------
    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        s = self.s
        _check_usable(s)
        await _preadv_part(s, offset, nbytes, qiov)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        s = self.s
        _check_usable(s)
        if flags & REQ_WRITE_COMPRESSED:
            await _pwritev_compressed_part(s, offset, nbytes, qiov)
        else:
            await _pwritev_part(s, offset, nbytes, qiov)

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        await rw.co_pwrite_zeroes(self.s, offset, nbytes, flags)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        await rw.co_pdiscard(self.s, offset, nbytes)

    async def co_flush_to_os(self) -> None:
        await rw.co_flush_to_os(self.s)

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        await resize.co_truncate(self.s, offset, exact, prealloc, flags)

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        return await rw.co_block_status(self.s, offset, nbytes)

    async def co_block_status_map(self, want_zero: bool, offset: int,
                                  nbytes: int) -> tuple[int, int, int, BlockDriver | None]:
        status, pnum, host = await rw._own_block_status(self.s, offset, nbytes)
        return status, pnum, host, (self.s.data_file if status & BLOCK_OFFSET_VALID else None)

    async def co_save_vmstate(self, pos: int, nbytes: int, qiov: IOVec) -> None:
        await rw.co_save_vmstate(self.s, pos, nbytes, qiov)

    async def co_load_vmstate(self, pos: int, nbytes: int, qiov: IOVec) -> None:
        await rw.co_load_vmstate(self.s, pos, nbytes, qiov)

    # -- what qemu-img asks ---------------------------------------------------------------------
    async def co_check(self, fix: int) -> CheckResult:
        from qio.block.qcow2.check import check

        return await check(self.s, fix)

    def backing_file_info(self) -> tuple[str | None, str | None]:
        return self.s.image_backing_file, self.s.image_backing_format

    def is_dirty(self) -> bool:
        return bool(self.s.incompatible_features & L.INCOMPAT_DIRTY)

    def snapshot_list(self) -> list[SnapshotInfo]:
        return list(self.s.snapshots)

    # -- node properties ----------------------------------------------------------------------
    def getlength(self) -> int:
        return _length(self.s)

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """``bdrv_default_perms``: a storage child (file) or a COW child (backing)."""
        if child.name == "backing":
            nshared = (PERM_WRITE | PERM_RESIZE) if shared & PERM_WRITE else 0
            return perm & PERM_CONSISTENT_READ, nshared | PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
        nperm = perm & (PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE)
        nshared = shared & (PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE)
        if child.name == datafile.CHILD_NAME:
            # a pure data child (BDRV_CHILD_DATA): the parent's permissions, resize never shared
            nshared &= ~PERM_RESIZE
            if nperm & PERM_WRITE_UNCHANGED:
                nperm |= PERM_WRITE
            if nperm & PERM_WRITE:
                nperm |= PERM_RESIZE
            return nperm, nshared
        if not self.read_only:
            nperm |= PERM_WRITE | PERM_RESIZE
        nperm |= PERM_CONSISTENT_READ
        nshared &= ~(PERM_WRITE | PERM_RESIZE)
        if nperm & PERM_WRITE_UNCHANGED:
            nperm |= PERM_WRITE
        if nperm & PERM_WRITE:
            nperm |= PERM_RESIZE
        return nperm, nshared

    def refresh_limits(self) -> None:
        super().refresh_limits()
        s = self.s
        if s.l2_cache is not None:
            self.pwrite_zeroes_alignment = s.subcluster_size
            self.pdiscard_alignment = s.cluster_size  # qcow2_refresh_limits overrides the child's
            if s.crypto is not None:
                self.request_alignment = s.crypto.sector_size

    def get_info(self) -> BlockInfo | None:
        return BlockInfo(self.s.cluster_size, vm_state_offset(self.s))

    def get_specific_info(self) -> list[tuple[str, Any]] | None:
        """``qcow2_get_specific_info`` in QEMU's (QDict hash) key order."""
        s = self.s
        ctype = L.COMPRESSION_NAMES.get(s.compression_type, str(s.compression_type))
        if s.qcow_version == 2:
            v2: list[tuple[str, Any]] = [("compat", "0.10"), ("compression-type", "zlib"),
                                         ("refcount-bits", s.refcount_bits)]
            enc2 = specific_info(s)
            return v2 if enc2 is None else [*v2, ("encrypt", enc2)]
        info: list[tuple[str, Any]] = [
            ("compat", "1.1"), ("compression-type", ctype),
            ("lazy-refcounts", bool(s.compatible_features & L.COMPAT_LAZY_REFCOUNTS))]
        if s.bitmaps_info:
            info.append(("bitmaps", s.bitmaps_info))
        info.append(("refcount-bits", s.refcount_bits))
        info += datafile.specific_info(s)
        enc = specific_info(s)
        if enc is not None:
            info.append(("encrypt", enc))
        info += [
                 ("corrupt", bool(s.incompatible_features & L.INCOMPAT_CORRUPT)),
                 ("extended-l2", bool(s.incompatible_features & L.INCOMPAT_EXTL2))]
        return info



