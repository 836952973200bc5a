"""Copy-on-write of the untouched head and tail of newly allocated clusters (``perform_cow``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qio.block import io
from qio.block.driver import (
    IOVec,
)
from qio.block.events import Event
from qio.block.qcow2.overlap import pre_write_overlap_check
from qio.block.qcow2.state import (
    L2Meta,
    Qcow2State,
    _check_usable,
    _event,
)

if TYPE_CHECKING:
    pass


async def _perform_cow(s: Qcow2State, m: L2Meta) -> None:
    """``perform_cow``: copy the unmodified head and tail of the new clusters (lock released)."""
    start_n, end_n = m.cow_start_n, m.cow_end_n
    data_bytes = m.cow_end_off - (m.cow_start_off + start_n)
    if (start_n == 0 and end_n == 0) or m.skip_cow:
        return
    merge_reads = bool(start_n and end_n and data_bytes <= 16384)
    ok = False
    s.lock.unlock()
    try:
        if merge_reads:
            buf = bytearray(start_n + data_bytes + end_n)
            await _do_cow_read(s, m.offset + m.cow_start_off, [memoryview(buf)])
            start_buf = memoryview(buf)[:start_n]
            end_buf = memoryview(buf)[len(buf) - end_n:]
        else:
            sb, eb = bytearray(start_n), bytearray(end_n)
            await _do_cow_read(s, m.offset + m.cow_start_off, [memoryview(sb)])
            await _do_cow_read(s, m.offset + m.cow_end_off, [memoryview(eb)])
            start_buf, end_buf = memoryview(sb), memoryview(eb)
        if s.crypto is not None:  # do_perform_cow_encrypt: the copied head and tail at their new place
            from qio.block.qcow2.crypt import encrypt

            if start_n:
                encrypt(s, m.alloc_offset + m.cow_start_off, m.offset + m.cow_start_off, start_buf)
            if end_n:
                encrypt(s, m.alloc_offset + m.cow_end_off, m.offset + m.cow_end_off, end_buf)
        if m.data_qiov is not None:
            qiov: IOVec = []
            if start_n:
                qiov.append(start_buf)
            qiov += m.data_qiov
            if end_n:
                qiov.append(end_buf)
            await _event(s, Event.WRITE_AIO)
            await _do_cow_write(s, m.alloc_offset + m.cow_start_off, qiov)
        else:
            await _do_cow_write(s, m.alloc_offset + m.cow_start_off, [start_buf])
            await _do_cow_write(s, m.alloc_offset + m.cow_end_off, [end_buf])
        ok = True
    finally:
        await s.lock.lock()
        if ok:
            s.l2c.depends_on_flush = True


async def _do_cow_read(s: Qcow2State, offset: int, qiov: IOVec) -> None:
    n = sum(len(b) for b in qiov)
    if not n:
        return
    await _event(s, Event.COW_READ)
    _check_usable(s)
    await s.bs.co_preadv(offset, n, qiov)  # bs->drv->bdrv_co_preadv_part


async def _do_cow_write(s: Qcow2State, host: int, qiov: IOVec) -> None:
    n = sum(len(b) for b in qiov)
    if not n:
        return
    await pre_write_overlap_check(s, 0, host, n, True)
    await _event(s, Event.COW_WRITE)
    await io.pwritev(s.bs.file, host, n, qiov)
