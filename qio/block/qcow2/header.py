"""Header updates: ``qcow2_update_header``, the dirty bit and corruption marking."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qio.block import io
from qio.block.errors import BlockError
from qio.block.qcow2 import layout as L
from qio.block.qcow2.state import Qcow2State, _is_writable, _length, _pack_entry, _stderr, pwrite_sync

if TYPE_CHECKING:
    pass



async def signal_corruption(s: Qcow2State, fatal: bool, message: str) -> None:
    """``qcow2_signal_corruption``: report once; a fatal one marks the image corrupt."""
    fatal = fatal and _is_writable(s)
    if s.signaled_corruption and (not fatal or s.incompatible_features & L.INCOMPAT_CORRUPT):
        return
    if fatal:
        _stderr(s, f"qcow2: Marking image as corrupt: {message}; further corruption events will be "
                     "suppressed\n")
    else:
        _stderr(s, f"qcow2: Image is corrupt: {message}; further non-fatal corruption events will be "
                     "suppressed\n")
    if fatal:
        s.incompatible_features |= L.INCOMPAT_CORRUPT
        try:
            await update_header(s)
        except BlockError:
            pass
        s.broken = True
    s.signaled_corruption = True


async def mark_dirty(s: Qcow2State) -> None:
    """``qcow2_mark_dirty``: set the dirty bit on disk before the first lazy-refcount write."""
    if s.incompatible_features & L.INCOMPAT_DIRTY:
        return
    data = bytearray(8)
    _pack_entry(data, 0, s.incompatible_features | L.INCOMPAT_DIRTY)
    await pwrite_sync(s, L.OFF_INCOMPATIBLE_FEATURES, bytes(data))
    s.incompatible_features |= L.INCOMPAT_DIRTY


async def update_header(s: Qcow2State) -> None:
    """``qcow2_update_header``: rewrite the whole first cluster (header, extensions, backing name)."""
    cs = s.cluster_size
    header_length = L.HEADER_LENGTH_V3 + len(s.unknown_header_fields)
    h = L.Header(L.MAGIC, s.qcow_version, 0, 0, s.cluster_bits, _length(s),
                 s.crypt_method_header, s.l1_size, s.l1_table_offset, s.refcount_table_offset,
                 s.refcount_table_size >> (s.cluster_bits - 3), s.nb_snapshots,
                 s.snapshots_offset, s.incompatible_features, s.compatible_features,
                 s.autoclear_features, s.refcount_order, header_length, s.compression_type)
    out = bytearray(L.pack_header(h))
    if s.qcow_version >= 3:
        out += s.unknown_header_fields
    if s.image_backing_format:
        out += L.ext_record(L.EXT_BACKING_FORMAT, s.image_backing_format.encode("utf-8", "surrogateescape"))
    if s.crypto_header[0]:
        out += L.ext_record(L.EXT_CRYPTO_HEADER, L.CRYPTO_EXT.pack(*s.crypto_header))
    if s.qcow_version >= 3 and cs > 4096:
        out += L.ext_record(L.EXT_FEATURE_TABLE, L.feature_table_bytes())
    if s.nb_bitmaps > 0:
        out += L.ext_record(L.EXT_BITMAPS, L.BITMAPS_EXT.pack(s.nb_bitmaps, 0, s.bitmap_directory_size,
                                                              s.bitmap_directory_offset))
    for magic, data in s.unknown_header_ext:
        out += L.ext_record(magic, data)
    out += L.ext_record(L.EXT_END, b"")
    if s.image_backing_file:
        name = s.image_backing_file.encode("utf-8", "surrogateescape")
        _pack_entry(out, 8, len(out))
        out[16:20] = len(name).to_bytes(4, "big")
        out += name
    if len(out) > cs:
        raise BlockError(errno.ENOSPC)
    out += bytes(cs - len(out))
    await io.pwritev(s.bs.file, 0, cs, [memoryview(out)])
