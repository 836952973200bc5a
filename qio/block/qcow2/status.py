"""Block status over a node graph (to move to the generic layer)."""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.driver import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockDriver,
)

if TYPE_CHECKING:
    pass



BLOCK_RECURSE = 0x40
BLOCK_EOF = 0x20


def _has_protocol(name: str) -> bool:
    for ch in name:
        if ch == "/":
            return False
        if ch == ":":
            return True
    return False


def allocated_file_size(node: BlockDriver) -> int | None:
    """``bdrv_get_allocated_file_size``; None where QEMU fails (-ENOTSUP).

    Only the file protocol knows its size; any other protocol driver (blkdebug, even though it
    filters) has no size, and a format node sums its children except the backing file.
    """
    if node.protocol_name is not None:
        fd = getattr(node, "fd", -1)
        if node.children or not isinstance(fd, int) or fd < 0:
            return None
        try:
            return int(os.fstat(fd).st_blocks) * 512
        except OSError:
            return None
    total = 0
    for c in node.children:
        if c.name == "backing":
            continue
        size = allocated_file_size(c.node)
        if size is None:
            return None
        total += size
    return total


def _file_status(node: BlockDriver, offset: int, nbytes: int) -> tuple[int, int]:
    """file-posix ``raw_co_block_status`` with ``want_zero``: holes are zero (SEEK_DATA/SEEK_HOLE)."""
    fd = getattr(node, "fd", -1)
    if not isinstance(fd, int) or fd < 0:
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


async def _status(node: BlockDriver, offset: int, nbytes: int, want_zero: bool) -> tuple[int, int]:
    """``bdrv_co_block_status`` of one node: (BLOCK_* flags, bytes)."""
    from qio.block.qcow2.driver import Qcow2Driver
    from qio.block.qcow2.rw import _own_block_status

    total = io.getlength(node)
    if offset >= total:
        return BLOCK_EOF, 0
    if not nbytes:
        return 0, 0
    nbytes = min(nbytes, total - offset)
    if isinstance(node, Qcow2Driver):
        ret, pnum, host = await _own_block_status(node.s, offset, nbytes)
        if ret & (BLOCK_DATA | BLOCK_ZERO):
            ret |= BLOCK_ALLOCATED
        elif node.backing is None or (want_zero and offset >= io.getlength(node.backing)):
            ret |= BLOCK_ZERO
        if want_zero and ret & BLOCK_RECURSE and ret & BLOCK_DATA and not ret & BLOCK_ZERO and \
                ret & BLOCK_OFFSET_VALID:
            ret2, file_pnum = await _status(node.file, host, pnum, True)
            if ret2 & BLOCK_EOF and (not file_pnum or ret2 & BLOCK_ZERO):
                ret |= BLOCK_ZERO
            else:
                pnum = file_pnum
                ret |= ret2 & BLOCK_ZERO
        ret &= ~BLOCK_RECURSE
    elif not want_zero:
        ret, pnum = BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID, nbytes
    elif node.children:
        child = node.primary_child()
        shift = getattr(node, "offset", 0) if node.is_format else 0
        if child is None:
            ret, pnum = BLOCK_DATA | BLOCK_ALLOCATED, nbytes
        else:
            ret, pnum = await _status(child, offset + (shift if isinstance(shift, int) else 0), nbytes, True)
            ret &= ~BLOCK_EOF
    else:
        ret, pnum = _file_status(node, offset, nbytes)
        ret |= BLOCK_ALLOCATED
    if offset + pnum == total:
        ret |= BLOCK_EOF
    return ret, pnum


async def _status_above(bs: BlockDriver, offset: int, nbytes: int, want_zero: bool) -> tuple[int, int]:
    """``bdrv_co_common_block_status_above`` down the whole backing chain."""
    from qio.block.qcow2.driver import Qcow2Driver

    ret, pnum = await _status(bs, offset, nbytes, want_zero)
    if pnum == 0 or ret & BLOCK_ALLOCATED:
        return ret, pnum
    eof = offset + pnum if ret & BLOCK_EOF else None
    nbytes = pnum
    p = bs.backing if isinstance(bs, Qcow2Driver) else None
    while p is not None:
        ret, pnum = await _status(p, offset, nbytes, want_zero)
        if pnum == 0:
            pnum = nbytes
            ret = BLOCK_ZERO | BLOCK_ALLOCATED
            break
        if ret & BLOCK_ALLOCATED:
            ret &= ~BLOCK_EOF
            break
        nbytes = pnum
        p = p.backing if isinstance(p, Qcow2Driver) else None
    if eof is not None and offset + pnum == eof:
        ret |= BLOCK_EOF
    return ret, pnum
