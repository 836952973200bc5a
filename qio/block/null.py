"""The ``null-co`` and ``null-aio`` protocol drivers: a device of any size that stores nothing.

QEMU's ``block/null.c``.  Writes are dropped; reads leave the caller's buffer as it was (qemu-io's
0xab fill shows through) unless ``read-zeroes=on``; block status says "not allocated" (or "zero"
with ``read-zeroes``).  ``latency-ns`` delays every read, write and flush on a real-time timer of the
event loop, which is how a qemu-io user makes a slow device on purpose: the delay comes from the
:class:`qio.aio.AioContext` model, so completions interleave with other requests as in QEMU.

``null-co`` is a coroutine driver: without latency a request completes inline.  ``null-aio`` uses
the callback interface: even without latency a request waits for a one-shot bottom half
(``null_bh_cb``), so a synchronous command on it polls the event loop.
"""

from __future__ import annotations

import errno
import os
from typing import Any, ClassVar

from qio.aio import YIELD, AioContext, current_co, wake
from qio.block import io
from qio.block.driver import (
    BDRV_MAX_LENGTH,
    BLOCK_ALLOCATED,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    REQ_FUA,
    SECTOR,
    BlockDriver,
    IOVec,
)
from qio.block.errors import QemuError, abort_error
from qio.block.modes import OpenFlags
from qio.qemuopts import opt_bool

INT64 = 2**63
U64 = 2**64


def _opt_size(options: dict[str, Any], key: str, default: int) -> int:
    """``qemu_opts_absorb_qdict(..., &error_abort)`` of a size: a bad value aborts qemu-io."""
    from qio.numbers import qemu_strtosz

    v = options.get(key)
    if v is None:
        return default
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    err, val, _ = qemu_strtosz(str(v))
    if err == -errno.ERANGE:
        abort_error("parse_option_size", "util/qemu-option.c:140",
                    f"Value '{v}' is out of range for parameter '{key}'")
    if err:
        abort_error("parse_option_size", "util/qemu-option.c:145",
                    f"Parameter '{key}' expects a non-negative number below 2^64")
    return val


def _opt_number(options: dict[str, Any], key: str) -> int:
    from qio.numbers import strtou64, strtou64_value

    v = options.get(key)
    if v is None:
        return 0
    text = str(v)
    err = strtou64(text)
    if err == "range":
        abort_error("parse_option_number", "util/qemu-option.c:99",
                    f"Value '{text}' is too large for parameter '{key}'")
    if err:
        abort_error("parse_option_number", "util/qemu-option.c:104", f"Parameter '{key}' expects a number")
    return strtou64_value(text)


def _opt_bool(options: dict[str, Any], key: str) -> bool:
    """:func:`qio.qemuopts.opt_bool`, whose error null's ``&error_abort`` turns into an abort."""
    try:
        return opt_bool(options, key, False)
    except QemuError as e:
        abort_error("qapi_bool_parse", "qapi/qapi-util.c:104", str(e))


class NullCoDriver(BlockDriver):
    """``null-co``: requests are coroutines that sleep ``latency-ns`` (``qemu_co_sleep_ns``)."""

    format_name = "null-co"
    protocol_name = "null-co"
    runtime_opts: ClassVar[frozenset[str]] = frozenset({"size", "latency-ns", "read-zeroes"})

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.latency_ns = 0
        self.read_zeroes = False

    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> bool:
        """Only the bare ``null-co://`` names this driver; it carries no options."""
        if filename != f"{cls.format_name}://":
            raise QemuError(f"The only allowed filename for this driver is '{cls.format_name}://'")
        return True

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        self.flags = flags
        self.read_only = flags.read_only
        # qemu_opts_absorb_qdict parses every option (aborting on a bad one) before any is used
        size = _opt_size(options, "size", 1 << 30)
        latency = _opt_number(options, "latency-ns")
        self.read_zeroes = _opt_bool(options, "read-zeroes")
        self.latency_ns = latency - U64 if latency >= INT64 else latency  # int64_t latency_ns
        self.supported_write_flags = REQ_FUA
        self.filename = f"{self.format_name}://"
        if self.latency_ns < 0:
            raise QemuError("latency-ns is invalid")
        self.length = self._total_length(size - U64 if size >= INT64 else size)

    @staticmethod
    def _total_length(length: int) -> int:
        """``refresh_total_sectors`` at open (the length is fixed afterwards): a negative length is an
        error returned through an ``int``, so only its low 32 bits count (-2^63 becomes success with
        length 0)."""
        if length < 0:
            ret = (length + 2**31) % 2**32 - 2**31
            if ret < 0:
                raise QemuError(f"Could not refresh total sector count: {os.strerror(-ret)}", -ret)
            return 0
        sectors = -(-length // SECTOR)
        if sectors * SECTOR > BDRV_MAX_LENGTH:
            raise QemuError("Could not refresh total sector count: File too large", errno.EFBIG)
        return sectors * SECTOR

    def getlength(self) -> int:
        return self.length

    async def _complete(self) -> None:
        """``null_co_common``: sleep on the event loop's real-time clock if there is a latency."""
        if self.latency_ns:
            await _sleep_ns(self.latency_ns)

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        if self.read_zeroes:
            io.iov_memset(qiov, 0, nbytes)
        await self._complete()

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        await self._complete()

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        """No ``bdrv_co_pdiscard``: the generic layer reports success without doing anything."""

    async def co_flush_to_disk(self) -> bool:
        await self._complete()
        return False

    async def co_block_status_map(self, want_zero: bool, offset: int,
                                  nbytes: int) -> tuple[int, int, int, BlockDriver | None]:
        """``null_co_block_status`` in the block-status walk (qio-img map; zero tests under want_zero)."""
        if not want_zero:
            return await super().co_block_status_map(want_zero, offset, nbytes)
        ret, pnum = await self.co_block_status(offset, nbytes)
        return ret, pnum, offset, self

    def get_allocated_file_size(self) -> int | None:
        return 0  # null_allocated_file_size

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        if self.read_zeroes:
            return BLOCK_OFFSET_VALID | BLOCK_ZERO | BLOCK_ALLOCATED, nbytes
        return BLOCK_OFFSET_VALID, nbytes


class NullAioDriver(NullCoDriver):
    """``null-aio``: the callback interface; completion comes from a bottom half or a timer."""

    format_name = "null-aio"
    protocol_name = "null-aio"

    async def _complete(self) -> None:
        """``null_aio_common`` + ``bdrv_co_io_em_complete``: the request waits for its callback."""
        co = current_co()
        if co is None:  # open-time I/O without an event loop: nothing can wait
            return
        ctx = AioContext.current()
        from qio.aio import AIO

        AIO.yields += 1
        if self.latency_ns:
            ctx.timer_add(self.latency_ns, lambda: wake(co))
        else:
            ctx.schedule(lambda: wake(co))
        await YIELD


async def _sleep_ns(ns: int) -> None:
    """``qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, ns)``: the coroutine is woken by a timer."""
    co = current_co()
    if co is None:
        return
    from qio.aio import AIO

    AIO.yields += 1
    AioContext.current().timer_add(ns, lambda: wake(co))
    await YIELD
