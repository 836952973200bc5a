"""Compressed clusters: reading (zlib) and compressed writes."""

from __future__ import annotations

import errno
import zlib
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.driver import (
    IOVec,
)
from qio.block.errors import BlockError
from qio.block.events import Event
from qio.block.qcow2 import layout as L
from qio.block.qcow2 import zstd
from qio.block.qcow2.cluster import _l2_entry, get_cluster_table
from qio.block.qcow2.overlap import pre_write_overlap_check
from qio.block.qcow2.refcount import alloc_bytes
from qio.block.qcow2.state import Qcow2State, _event, _length, _pack_entry, _pread

if TYPE_CHECKING:
    pass



async def _preadv_compressed(s: Qcow2State, l2_entry: int, offset: int, nbytes: int, qiov: IOVec) -> None:
    coffset, csize = L.parse_compressed(l2_entry, s.csize)
    cs = s.cluster_size
    await _event(s, Event.READ_COMPRESSED)
    buf = await _pread(s, coffset, csize)
    if s.compression_type == L.COMPRESSION_ZSTD:
        out = zstd.decompress(bytes(buf), cs)
    else:
        try:
            out = zlib.decompressobj(-12).decompress(bytes(buf), cs)
        except zlib.error:
            raise BlockError(errno.EIO) from None
        if len(out) != cs:
            raise BlockError(errno.EIO)
    oic = offset & (cs - 1)
    io.iov_from_bytes(qiov, 0, memoryview(out)[oic: oic + nbytes])


async def _pwritev_compressed_part(s: Qcow2State, offset: int, nbytes: int, qiov: IOVec) -> None:
    cs = s.cluster_size
    if nbytes == 0:
        await io.truncate(s.bs.file, io.getlength(s.bs.file), False, "off")
        return
    if offset & (cs - 1):
        raise BlockError(errno.EINVAL)
    if nbytes & (cs - 1) and offset + nbytes != _length(s):
        raise BlockError(errno.EINVAL)
    qoff = 0
    while nbytes:
        chunk = min(nbytes, cs)
        await _pwritev_compressed_task(s, offset, chunk, io.iov_slice(qiov, qoff, chunk))
        qoff += chunk
        offset += chunk
        nbytes -= chunk


async def _pwritev_compressed_task(s: Qcow2State, offset: int, nbytes: int, qiov: IOVec) -> None:
    cs = s.cluster_size
    if s.compression_type == L.COMPRESSION_ZSTD:
        # a whole cluster in one buffer is compressed in place; else gathered and zero-padded
        src = qiov[0] if len(qiov) == 1 and nbytes == cs else io.iov_to_bytes(qiov).ljust(cs, b"\0")
        zout = zstd.compress(src, cs - 1)
        out = b"" if zout is None else zout
    else:
        buf = bytearray(cs)
        buf[:nbytes] = io.iov_to_bytes(qiov)
        comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = comp.compress(bytes(buf)) + comp.flush()
    if not out or len(out) > cs - 1:
        await s.bs.co_pwritev(offset, nbytes, qiov, 0)  # qcow2_co_pwritev_part
        return
    await s.lock.lock()
    try:
        host = await _alloc_compressed_cluster_offset(s, offset, len(out))
        await pre_write_overlap_check(s, 0, host, len(out), True)
    finally:
        s.lock.unlock()
    await _event(s, Event.WRITE_COMPRESSED)
    await io.pwritev(s.bs.file, host, len(out), [memoryview(out)])


async def _alloc_compressed_cluster_offset(s: Qcow2State, offset: int, size: int) -> int:
    c = s.l2c
    ci, l2_index = await get_cluster_table(s, offset)
    try:
        tbl = c.tables[ci]
        if _l2_entry(s, tbl, l2_index) & L.L2E_OFFSET_MASK:
            raise BlockError(errno.EIO)
        host = await alloc_bytes(s, size)
        desc = L.make_compressed(host, size, s.csize)
        await _event(s, Event.L2_UPDATE_COMPRESSED)
        c.mark_dirty(ci)
        _pack_entry(tbl, l2_index << s.l2e_shift, desc)
        if s.subclusters:
            _pack_entry(tbl, (l2_index << s.l2e_shift) + 8, 0)  # compressed clusters have no bitmap
    finally:
        c.put(ci)
    return host
