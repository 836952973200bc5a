"""Persistent dirty bitmaps of a qcow2 image opened read-write for ``qemu-img check -r``.

qio's I/O paths do not track dirty bitmaps, so a read-write open of an image with bitmaps is refused --
except for the check, whose repairs write the file directly, never through the guest write path, so
the bitmaps' contents cannot change.  QEMU still goes through its bitmap life cycle there, and its
effects are visible in the image bytes: ``qcow2_load_dirty_bitmaps`` marks every loaded bitmap in use
in the directory (in place), and ``qcow2_inactivate`` stores each consistent bitmap again on close
(new data clusters for the chunks with set bits, a new table, a new directory; the old ones freed).
This module does the same with the serialized bitmap bytes (bit ``i`` of the bitmap is bit ``i % 8``
of byte ``i // 8``, QEMU's little-endian word serialization).
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from qio.block import io
from qio.block.errors import BlockError, QemuError
from qio.block.qcow2 import layout as L
from qio.block.qcow2.header import update_header
from qio.block.qcow2.overlap import pre_write_overlap_check
from qio.block.qcow2.refcount import (
    alloc_clusters,
    flush_caches,
    free_clusters,
)
from qio.block.qcow2.state import (
    DISCARD_ALWAYS,
    DISCARD_OTHER,
    OL_BITMAP_DIRECTORY,
    Qcow2State,
    _pread,
    size_to_clusters,
)

if TYPE_CHECKING:
    from qio.block.qcow2.state import Qcow2State

_ENTRY = struct.Struct(">Q")


@dataclass(slots=True)
class LoadedBitmap:
    """A ``BdrvDirtyBitmap`` made from the image: ``bits`` is None for an inconsistent one (it was
    already in use when loaded), which is never stored again."""

    name: str
    granularity_bits: int
    enabled: bool
    bits: bytearray | None


def _granules(s: Qcow2State, granularity_bits: int) -> int:
    return -(-s.total_sectors * 512 // (1 << granularity_bits))


def _serialized_size(granules: int) -> int:
    """``bdrv_dirty_bitmap_serialization_size`` of a whole bitmap: whole 64-bit words."""
    return -(-granules // 64) * 8


async def _load_data(s: Qcow2State, bm: Bitmap) -> bytearray:
    """``load_bitmap_data``: data clusters as they are, all-ones entries as set bits."""
    cs = s.cluster_size
    granules = _granules(s, bm.granularity_bits)
    bits = bytearray(_serialized_size(granules))
    per_chunk = cs * 8
    for i, entry in enumerate(await load_bitmap_table(s, bm)):
        start = i * cs
        offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
        if offset:
            data = await _pread(s, offset, cs)
            bits[start:start + cs] = data[:max(0, min(cs, len(bits) - start))]
        elif entry & 1:
            first, last = i * per_chunk, min(granules, (i + 1) * per_chunk)
            for g in range(first, last):
                bits[g >> 3] |= 1 << (g & 7)
    return bits


def _directory(s: Qcow2State, bitmaps: list[Bitmap]) -> bytes:
    """``bitmap_list_store``'s directory bytes (no extra data, names padded to 8 bytes)."""
    out = bytearray()
    for bm in bitmaps:
        name = bm.name.encode("utf-8", "surrogateescape")
        out += L.BITMAP_DIR_ENTRY.pack(bm.table_offset, bm.table_size, bm.flags, 1, bm.granularity_bits,
                                       len(name), 0) + name
        out += bytes(-len(out) % 8)
    return bytes(out)


async def _update_header_sync(s: Qcow2State) -> None:
    await update_header(s)
    await io.flush(s.bs.file)


async def load_for_write(s: Qcow2State) -> list[LoadedBitmap]:
    """``qcow2_load_dirty_bitmaps`` on a writable image: load every bitmap, then set the in-use flag of
    those that did not have it, rewriting the directory in place
    (``update_ext_header_and_dir_in_place``)."""

    bitmaps = await load_bitmap_list(s)
    loaded: list[LoadedBitmap] = []
    needs_update = False
    for i, bm in enumerate(bitmaps):
        in_use = bool(bm.flags & L.BITMAP_FLAG_IN_USE)
        try:
            bits = None if in_use else await _load_data(s, bm)
        except BlockError as e:
            raise QemuError(f"Could not read bitmap_table table from image for bitmap '{bm.name}': {e}",
                            e.code) from None
        loaded.append(LoadedBitmap(bm.name, bm.granularity_bits, bool(bm.flags & L.BITMAP_FLAG_AUTO), bits))
        if not in_use:
            bitmaps[i] = bm._replace(flags=bm.flags | L.BITMAP_FLAG_IN_USE)
            needs_update = True
    if needs_update:
        try:
            s.autoclear_features &= ~L.AUTOCLEAR_BITMAPS
            await _update_header_sync(s)
            data = _directory(s, bitmaps)
            if len(data) != s.bitmap_directory_size:
                raise BlockError(22)
            await pre_write_overlap_check(s, OL_BITMAP_DIRECTORY, s.bitmap_directory_offset, len(data), False)
            await io.pwritev(s.bs.file, s.bitmap_directory_offset, len(data), [memoryview(data)])
            await _update_header_sync(s)
            s.autoclear_features |= L.AUTOCLEAR_BITMAPS
            await _update_header_sync(s)
        except BlockError as e:
            raise QemuError.wrap(e, "Can't update bitmap directory") from None
    loaded.reverse()  # bdrv_create_dirty_bitmap inserts at the head of the node's list
    return loaded


async def _store_bitmap(s: Qcow2State, bm: Bitmap, lb: LoadedBitmap) -> Bitmap:
    """``store_bitmap``: a data cluster for each cluster-sized chunk with a set bit, then the table."""

    assert lb.bits is not None
    cs = s.cluster_size
    size = len(lb.bits)
    tb_size = size_to_clusters(s, size)
    table = [0] * tb_size
    try:
        for c in range(tb_size):
            chunk = lb.bits[c * cs:(c + 1) * cs]
            if not any(chunk):
                continue
            off = await alloc_clusters(s, cs)
            table[c] = off
            buf = bytes(chunk) + bytes(cs - len(chunk))
            await pre_write_overlap_check(s, 0, off, cs, False)
            await io.pwritev(s.bs.file, off, cs, [memoryview(buf)])
        tb_offset = await alloc_clusters(s, tb_size * 8)
    except BlockError:
        for off in table:
            if off:
                await free_clusters(s, off, cs, DISCARD_ALWAYS)
        raise
    try:
        raw = b"".join(_ENTRY.pack(e) for e in table)
        await pre_write_overlap_check(s, 0, tb_offset, len(raw), False)
        await io.pwritev(s.bs.file, tb_offset, len(raw), [memoryview(raw)])
    except BlockError:
        for off in table:
            if off:
                await free_clusters(s, off, cs, DISCARD_ALWAYS)
        await free_clusters(s, tb_offset, tb_size * 8, DISCARD_OTHER)
        raise
    return bm._replace(table_offset=tb_offset, table_size=tb_size)


async def _free_bitmap_clusters(s: Qcow2State, bm: Bitmap) -> None:
    """``free_bitmap_clusters``: the data clusters of a table, then the table."""

    try:
        entries = await load_bitmap_table(s, bm)
    except BlockError:
        return
    for entry in entries:
        if entry & BME_TABLE_ENTRY_OFFSET_MASK:
            await free_clusters(s, entry & BME_TABLE_ENTRY_OFFSET_MASK, s.cluster_size, DISCARD_ALWAYS)
    await free_clusters(s, bm.table_offset, bm.table_size * 8, DISCARD_OTHER)


async def store(s: Qcow2State, loaded: list[LoadedBitmap]) -> None:
    """``qcow2_store_persistent_dirty_bitmaps``: store every consistent bitmap to new clusters, write a
    new directory (``update_ext_header_and_dir``) and free the old tables and directory."""

    bitmaps = await load_bitmap_list(s) if s.nb_bitmaps else []
    by_name = {bm.name: i for i, bm in enumerate(bitmaps)}
    drop: list[Bitmap] = []
    todo: dict[int, LoadedBitmap] = {}
    for lb in loaded:
        if lb.bits is None:
            continue
        i = by_name.get(lb.name)
        if i is None:
            continue  # qio never adds bitmaps
        bm = bitmaps[i]
        if not bm.flags & L.BITMAP_FLAG_IN_USE:
            raise QemuError(f"Bitmap '{lb.name}' already exists in the image")
        drop.append(bm)
        bitmaps[i] = bm._replace(table_offset=0, table_size=0, granularity_bits=lb.granularity_bits,
                                 flags=L.BITMAP_FLAG_AUTO if lb.enabled else 0)
        todo[i] = lb
    if not todo:
        return
    stored: list[int] = []
    try:
        for i, bm in enumerate(bitmaps):
            if i in todo:
                bitmaps[i] = await _store_bitmap(s, bm, todo[i])
                stored.append(i)
        data = _directory(s, bitmaps)
        new_offset = await alloc_clusters(s, len(data))
        try:
            await pre_write_overlap_check(s, 0, new_offset, len(data), False)
            await io.pwritev(s.bs.file, new_offset, len(data), [memoryview(data)])
            await flush_caches(s)
        except BlockError:
            await free_clusters(s, new_offset, len(data), DISCARD_OTHER)
            raise
        old_offset, old_size = s.bitmap_directory_offset, s.bitmap_directory_size
        s.autoclear_features |= L.AUTOCLEAR_BITMAPS
        s.bitmap_directory_offset, s.bitmap_directory_size = new_offset, len(data)
        s.nb_bitmaps = len(bitmaps)
        await _update_header_sync(s)
        if old_size:
            await free_clusters(s, old_offset, old_size, DISCARD_OTHER)
    except BlockError as e:
        for i in stored:
            await _free_bitmap_clusters(s, bitmaps[i])
        raise QemuError.wrap(e, "Failed to update bitmap extension") from None
    for bm in drop:
        await _free_bitmap_clusters(s, bm)


BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS, BME_MAX_GRANULARITY_BITS = 9, 31
BME_MAX_NAME_SIZE = 1023
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BT_DIRTY_TRACKING_BITMAP = 1


def bitmap_table_entry_ok(entry: int, cluster_size: int) -> bool:
    """``check_table_entry``: no reserved bits; a data offset is cluster aligned and excludes the
    all-ones flag."""
    if entry & BME_TABLE_ENTRY_RESERVED_MASK:
        return False
    offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
    return not offset or (not entry & 1 and not offset % cluster_size)


def _c_int(v: int) -> int:
    """The low 32 bits of ``v`` as a C ``int``."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


class Bitmap(NamedTuple):
    """One entry of the bitmap directory."""

    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str


async def load_bitmap_list(s: Qcow2State) -> list[Bitmap]:
    """``bitmap_list_load``: the bitmap directory, which must hold exactly ``nb_bitmaps`` valid
    entries; QemuError with QEMU's message otherwise."""
    size = s.bitmap_directory_size
    if size == 0:
        raise QemuError("Requested bitmap directory size is zero", errno.EINVAL)
    if size > L.MAX_BITMAP_DIRECTORY_SIZE:
        raise QemuError("Requested bitmap directory size is too big", errno.EINVAL)
    try:
        raw = bytes(await _pread(s, s.bitmap_directory_offset, size))
    except BlockError as e:
        raise QemuError(f"Failed to read bitmap directory: {os.strerror(e.code)}", e.code) from None
    esize = L.BITMAP_DIR_ENTRY.size
    out: list[Bitmap] = []
    pos = 0
    while pos < size:
        if pos + esize > size:
            raise QemuError("Broken bitmap directory", errno.EINVAL)
        if len(out) + 1 > s.nb_bitmaps:
            raise QemuError("More bitmaps found than specified in header extension", errno.EINVAL)
        tbl_off, tbl_size, flags, typ, gbits, name_size, extra = L.BITMAP_DIR_ENTRY.unpack_from(raw, pos)
        entry_size = _c_int(_c_int(esize + name_size + extra) + 7) & ~7  # QEMU's int arithmetic
        if pos + entry_size > size:
            raise QemuError("Broken bitmap directory", errno.EINVAL)
        if extra:
            raise QemuError("Bitmap extra data is not supported", errno.EINVAL)
        phys = tbl_size * s.cluster_size
        length = s.total_sectors * 512
        bad = (not tbl_size or not tbl_off or tbl_off % s.cluster_size or tbl_size > BME_MAX_TABLE_SIZE
               or not BME_MIN_GRANULARITY_BITS <= gbits <= BME_MAX_GRANULARITY_BITS or flags & BME_RESERVED_FLAGS
               or name_size > BME_MAX_NAME_SIZE or typ != BT_DIRTY_TRACKING_BITMAP or phys > BME_MAX_PHYS_SIZE
               or (not flags & L.BITMAP_FLAG_IN_USE and length > (phys * 8) << gbits))
        name = raw[pos + esize + extra: pos + esize + extra + name_size].split(b"\0", 1)[0]
        text = name.decode("utf-8", "surrogateescape")
        if bad:
            raise QemuError(f"Bitmap '{text}' doesn't satisfy the constraints", errno.EINVAL)
        out.append(Bitmap(tbl_off, tbl_size, flags, gbits, text))
        pos += entry_size
    if len(out) != s.nb_bitmaps:
        raise QemuError("Less bitmaps found than specified in header extension", errno.EINVAL)
    return out


async def load_bitmap_table(s: Qcow2State, bm: Bitmap) -> list[int]:
    """``bitmap_table_load``: the table's entries; EINVAL if any of them is invalid."""
    raw = await _pread(s, bm.table_offset, bm.table_size * 8)
    entries = [_ENTRY.unpack_from(raw, i * 8)[0] for i in range(bm.table_size)]
    if not all(bitmap_table_entry_ok(e, s.cluster_size) for e in entries):
        raise BlockError(errno.EINVAL)
    return entries


async def load_bitmaps(s: Qcow2State) -> list[Bitmap]:
    """``qcow2_load_dirty_bitmaps`` as far as it can fail: the directory, then the table of each
    bitmap not marked in use and its size against the image length (``load_bitmap_data``)."""
    bitmaps = await load_bitmap_list(s)
    for bm in bitmaps:
        if bm.flags & L.BITMAP_FLAG_IN_USE:
            continue
        try:
            await load_bitmap_table(s, bm)
        except BlockError as e:
            raise QemuError(f"Could not read bitmap_table table from image for bitmap '{bm.name}': "
                            f"{os.strerror(e.code)}", e.code) from None
        bits = -(-s.total_sectors * 512 // (1 << bm.granularity_bits))
        serialized = -(-bits // 64) * 8
        if size_to_clusters(s, serialized) != bm.table_size:
            raise QemuError(f"Could not read bitmap '{bm.name}' from image: {os.strerror(errno.EINVAL)}",
                            errno.EINVAL)
    return bitmaps
