"""Opening an image (``qcow2_open``/``qcow2_do_open``): header validation, extensions, backing file."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from qio.aio import run_sync
from qio.block.driver import (
    BDRV_MAX_LENGTH,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    SECTOR,
)
from qio.block.errors import BlockError, QemuError, report_error
from qio.block.events import Event
from qio.block.modes import OpenFlags
from qio.block.qcow2 import crypt, datafile
from qio.block.qcow2 import layout as L
from qio.block.qcow2.header import update_header
from qio.block.qcow2.options import _update_options
from qio.block.qcow2.refcount import _update_max_refcount_table_index, mark_clean
from qio.block.qcow2.snapshot import _read_snapshots
from qio.block.qcow2.state import (
    INT_MAX,
    Qcow2State,
    _be64_array,
    _event,
    _is_writable,
    _length,
    _pread,
    _stderr,
    _validate_table,
    size_to_l1,
)

if TYPE_CHECKING:
    pass





def qcow2_open(s: Qcow2State, options: dict[str, Any], flags: OpenFlags) -> None:
    """``qcow2_open``; the generic layer opens the backing file afterwards (``backend.open_backing``)."""
    s.bs.flags = flags
    s.bs.read_only = flags.read_only
    try:
        try:
            run_sync(_do_open(s, options, flags))
        except BlockError as e:
            raise QemuError(str(e), e.code) from None
    except BaseException:
        datafile.close_on_failure(s)
        raise
    s.bs.supported_zero_flags = (REQ_MAY_UNMAP | REQ_NO_FALLBACK) if s.qcow_version >= 3 else 0
    s.bs.supported_write_flags = 0
    s.bs.request_alignment = crypt.SECTOR_ALIGN if s.crypto is not None else 1
    s.bs.pwrite_zeroes_alignment = s.subcluster_size
    s.bs.pdiscard_alignment = s.cluster_size  # qcow2_refresh_limits overrides the child's


async def _do_open(s: Qcow2State, options: dict[str, Any], flags: OpenFlags) -> None:
    """``qcow2_do_open``."""
    try:
        buf = await _pread(s, 0, L.HEADER_LENGTH_V3)
    except BlockError as e:
        raise QemuError.wrap(e, "Could not read qcow2 header") from None
    h = L.parse_header(bytes(buf))
    if h.magic != L.MAGIC:
        raise QemuError("Image is not in qcow2 format", errno.EINVAL)
    if h.version < 2 or h.version > 3:
        raise QemuError(f"Unsupported qcow2 version {h.version}", errno.ENOTSUP)
    s.qcow_version = h.version
    if h.cluster_bits < L.MIN_CLUSTER_BITS or h.cluster_bits > L.MAX_CLUSTER_BITS:
        raise QemuError(f"Unsupported cluster size: 2^{h.cluster_bits}", errno.EINVAL)
    cb = s.cluster_bits = h.cluster_bits
    cs = s.cluster_size = 1 << cb
    s.subcluster_bits, s.subcluster_size = cb, cs  # one subcluster per cluster unless extended L2
    if h.version == 3 and h.header_length < L.MIN_HEADER_LENGTH_V3:
        raise QemuError("qcow2 header too short", errno.EINVAL)
    if h.header_length > cs:
        raise QemuError("qcow2 header exceeds cluster size", errno.EINVAL)
    if h.header_length > L.HEADER_LENGTH_V3:
        try:
            s.unknown_header_fields = bytes(await _pread(s, L.HEADER_LENGTH_V3,
                                                                 h.header_length - L.HEADER_LENGTH_V3))
        except BlockError as e:
            raise QemuError.wrap(e, "Could not read unknown qcow2 header fields") from None
    if h.backing_file_offset > cs:
        raise QemuError("Invalid backing file offset", errno.EINVAL)
    ext_end = h.backing_file_offset or cs
    s.incompatible_features = h.incompatible_features
    s.compatible_features = h.compatible_features
    s.autoclear_features = h.autoclear_features
    s.compression_type = h.compression_type if h.header_length > L.HEADER_COMPRESSION_TYPE_OFFSET else 0
    _validate_compression_type(s)
    if s.incompatible_features & ~L.INCOMPAT_MASK:
        table: bytes = b""
        try:
            table = await _read_extensions(s, h.header_length, ext_end, want_feature_table=True)
        except QemuError:
            pass
        raise QemuError(_unsupported_features(table, s.incompatible_features & ~L.INCOMPAT_MASK),
                        errno.ENOTSUP)
    if s.incompatible_features & L.INCOMPAT_CORRUPT and not flags.read_only and not flags.check:
        raise QemuError("qcow2: Image is corrupt; cannot be opened read/write", errno.EACCES)
    if s.incompatible_features & L.INCOMPAT_EXTL2:
        from qio.block.qcow2.subcluster import init_subclusters

        init_subclusters(s)
    if h.refcount_order > 6:
        raise QemuError("Reference count entry width too large; may not exceed 64 bits", errno.EINVAL)
    s.refcount_order = h.refcount_order
    s.refcount_bits = 1 << h.refcount_order
    s.refcount_max = (1 << s.refcount_bits) - 1
    s.get_rc, s.set_rc = L.refcount_accessors(h.refcount_order)
    s.crypt_method_header = h.crypt_method
    if h.crypt_method and h.crypt_method not in (L.CRYPT_AES, L.CRYPT_LUKS):
        raise QemuError(f"Unsupported encryption method {h.crypt_method}", errno.EINVAL)
    s.l2_bits = cb - s.l2e_shift
    s.l2_size = 1 << s.l2_bits
    s.refcount_block_bits = cb - (h.refcount_order - 3)
    s.refcount_block_size = 1 << s.refcount_block_bits
    s.total_sectors = h.size // SECTOR
    s.csize = L.compressed_layout(cb)
    s.refcount_table_offset = h.refcount_table_offset
    s.refcount_table_size = h.refcount_table_clusters << (cb - 3)
    if h.refcount_table_clusters == 0 and not flags.check:  # qemu-img check may rebuild it
        raise QemuError("Image does not contain a reference count table", errno.EINVAL)
    _validate_table(s, h.refcount_table_offset, h.refcount_table_clusters, cs, L.MAX_REFTABLE_SIZE,
                         "Reference count table")
    if not flags.check:  # qemu-img check reads (and may repair) the snapshot table itself
        _validate_table(s, h.snapshots_offset, h.nb_snapshots, L.SNAPSHOT_HEADER.size,
                             L.SNAPSHOT_HEADER.size * L.MAX_SNAPSHOTS, "Snapshot table")
    _validate_table(s, h.l1_table_offset, h.l1_size, 8, L.MAX_L1_SIZE, "Active L1 table")
    s.l1_size = h.l1_size
    s.l1_table_offset = h.l1_table_offset
    l1_vm_state_index = size_to_l1(s, h.size)
    if l1_vm_state_index > INT_MAX:
        raise QemuError("Image is too big", errno.EFBIG)
    s.l1_vm_state_index = l1_vm_state_index
    if s.l1_size < s.l1_vm_state_index:
        raise QemuError("L1 table is too small", errno.EINVAL)
    if _length(s) > BDRV_MAX_LENGTH:
        raise QemuError("Could not refresh total sector count: File too large", errno.EFBIG)
    if s.l1_size:
        try:
            raw = await _pread(s, s.l1_table_offset, s.l1_size * 8)
        except BlockError as e:
            raise QemuError.wrap(e, "Could not read L1 table") from None
        s.l1_table = _be64_array(raw)
    _update_options(s, options, flags, initial=True)
    crypt.check_format_option(s, s.opts)
    await _refcount_init(s)
    await _read_extensions(s, h.header_length, ext_end, want_feature_table=False)
    datafile.open_data_file(s, options, flags)
    crypt.open_without_extension(s, flags)
    if h.backing_file_offset:
        n = h.backing_file_size
        if n > min(L.MAX_BACKING_FILE_NAME, cs - h.backing_file_offset):
            raise QemuError("Backing file name too long", errno.EINVAL)
        try:
            name = await _pread(s, h.backing_file_offset, n)
        except BlockError as e:
            raise QemuError.wrap(e, "Could not read backing file name") from None
        s.image_backing_file = bytes(name).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if not flags.check:
        s.snapshots_offset = h.snapshots_offset
        s.nb_snapshots = h.nb_snapshots
        await _read_snapshots(s)
    header_changed = bool(s.autoclear_features & ~L.AUTOCLEAR_MASK) or s._drop_bitmaps_ext
    header_changed = header_changed and _is_writable(s)
    if header_changed:
        s.autoclear_features &= L.AUTOCLEAR_MASK
    if s.autoclear_features & L.AUTOCLEAR_BITMAPS and s.nb_bitmaps:
        s.bitmaps_info = await _read_bitmap_directory(s)
    if s.autoclear_features & L.AUTOCLEAR_BITMAPS and s.nb_bitmaps and _is_writable(s):
        if not flags.check:
            raise QemuError("qio does not support writing qcow2 images with persistent dirty bitmaps "
                            "(autoclear feature bit 0); open it read-only", errno.ENOTSUP)
        from qio.block.qcow2.bitmap import load_for_write

        s.rw_bitmaps = await load_for_write(s)  # qemu-img check -r: writes bypass the bitmaps
        header_changed = False
    if header_changed:
        if s._drop_bitmaps_ext:
            s.nb_bitmaps = 0
        try:
            await update_header(s)
        except BlockError as e:
            raise QemuError.wrap(e, "Could not update qcow2 header") from None
    if _is_writable(s) and s.incompatible_features & L.INCOMPAT_DIRTY and not flags.check:
        from qio.block.qcow2.check import repair_dirty

        await repair_dirty(s)


async def _read_bitmap_directory(s: Qcow2State) -> list[list[tuple[str, Any]]]:
    """The persistent bitmaps, loaded and validated as ``qcow2_load_dirty_bitmaps`` does (an
    invalid directory or table fails the open), as ``info`` lists them (flags, name, granularity)."""
    from qio.block.qcow2.bitmap import load_bitmaps

    out: list[list[tuple[str, Any]]] = []
    for bm in await load_bitmaps(s):
        names = [n for bit, n in ((L.BITMAP_FLAG_IN_USE, "in-use"), (L.BITMAP_FLAG_AUTO, "auto"))
                 if bm.flags & bit]
        out.append([("flags", names), ("name", bm.name), ("granularity", 1 << bm.granularity_bits)])
    return out


def _validate_compression_type(s: Qcow2State) -> None:
    ctype = s.compression_type
    if ctype not in (L.COMPRESSION_ZLIB, L.COMPRESSION_ZSTD):
        raise QemuError(f"qcow2: unknown compression type: {ctype}", errno.ENOTSUP)
    if ctype == L.COMPRESSION_ZLIB:
        if s.incompatible_features & L.INCOMPAT_COMPRESSION:
            raise QemuError("qcow2: Compression type incompatible feature bit must not be set",
                            errno.EINVAL)
    else:
        if not s.incompatible_features & L.INCOMPAT_COMPRESSION:
            raise QemuError("qcow2: Compression type incompatible feature bit must be set", errno.EINVAL)


def _unsupported_features(table: bytes, mask: int) -> str:
    names = []
    for pos in range(0, len(table) - L.FEATURE_ENTRY.size + 1, L.FEATURE_ENTRY.size):
        typ, bit, name = L.FEATURE_ENTRY.unpack_from(table, pos)
        if not name[:1] or name[0] == 0:
            break
        if typ == L.FEAT_INCOMPATIBLE and bit < 64 and mask & (1 << bit):
            names.append(name.split(b"\0", 1)[0].decode("latin-1"))
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


async def _read_extensions(s: Qcow2State, start: int, end: int, want_feature_table: bool) -> bytes:
    """``qcow2_read_extensions``; returns the feature table when asked for it."""
    s._drop_bitmaps_ext = False
    offset = start
    table = b""
    while offset < end:
        try:
            raw = await _pread(s, offset, 8)
        except BlockError as e:
            raise QemuError(f"qcow2_read_extension: ERROR: pread fail from offset {offset}: {e}",
                            e.code) from None
        magic, length = L.EXT_HEADER.unpack(bytes(raw))
        offset += 8
        if offset > end or length > end - offset:
            raise QemuError("Header extension too large", errno.EINVAL)
        if magic == L.EXT_END:
            return table
        data = bytes(await _pread(s, offset, length))
        if want_feature_table:
            if magic == L.EXT_FEATURE_TABLE:
                table = data
        elif magic == L.EXT_BACKING_FORMAT:
            if length >= 16:
                raise QemuError(f"ERROR: ext_backing_format: len={length} too large (>=16)", errno.EINVAL)
            s.image_backing_format = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif magic == L.EXT_FEATURE_TABLE:
            pass
        elif magic == L.EXT_CRYPTO_HEADER:
            if s.crypt_method_header != L.CRYPT_LUKS:
                raise QemuError("CRYPTO header extension only expected with LUKS encryption method",
                                errno.EINVAL)
            if length != L.CRYPTO_EXT.size:
                raise QemuError(f"CRYPTO header extension size {length}, but expected size "
                                f"{L.CRYPTO_EXT.size}", errno.EINVAL)
            crypto_offset = L.CRYPTO_EXT.unpack(data)[0]
            if crypto_offset % s.cluster_size:
                raise QemuError(f"Encryption header offset '{crypto_offset}' is not a multiple of cluster "
                                f"size '{s.cluster_size}'", errno.EINVAL)
            await crypt.open_luks_header(s, data)
        elif magic == L.EXT_BITMAPS:
            _read_bitmaps_ext(s, data, length)
        elif magic == L.EXT_DATA_FILE:
            datafile.read_ext(s, data)
        else:
            s.unknown_header_ext.insert(0, (magic, data))
        offset += (length + 7) & ~7
    return table


def _read_bitmaps_ext(s: Qcow2State, data: bytes, length: int) -> None:
    if length != L.BITMAPS_EXT.size:
        raise QemuError("bitmaps_ext: Invalid extension length", errno.EINVAL)
    if not s.autoclear_features & L.AUTOCLEAR_BITMAPS:
        if s.qcow_version < 3:
            report_error(s.bs.warn, "This qcow2 v2 image contains bitmaps, but they may have been "
                         "modified by a program without persistent bitmap support; so now they must all be "
                         "considered inconsistent", warning=True)
        else:
            report_error(s.bs.warn, "a program lacking bitmap support modified this file, so all "
                         "bitmaps are now considered inconsistent", warning=True)
        _stderr(s, "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.")
        s._drop_bitmaps_ext = True
        return
    nb, reserved, dir_size, dir_offset = L.BITMAPS_EXT.unpack(data)
    if reserved:
        raise QemuError("bitmaps_ext: Reserved field is not zero", errno.EINVAL)
    if nb > L.MAX_BITMAPS:
        raise QemuError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of "
                        f"{L.MAX_BITMAPS}", errno.EINVAL)
    if nb == 0:
        raise QemuError("found bitmaps extension with zero bitmaps", errno.EINVAL)
    if dir_offset & (s.cluster_size - 1):
        raise QemuError("bitmaps_ext: invalid bitmap directory offset", errno.EINVAL)
    if dir_size > L.MAX_BITMAP_DIRECTORY_SIZE:
        raise QemuError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported size "
                        f"({L.MAX_BITMAP_DIRECTORY_SIZE})", errno.EINVAL)
    s.nb_bitmaps = nb
    s.bitmap_directory_offset = dir_offset
    s.bitmap_directory_size = dir_size


async def _refcount_init(s: Qcow2State) -> None:
    """``qcow2_refcount_init``: load the refcount table."""
    n = s.refcount_table_size
    if n:
        await _event(s, Event.REFTABLE_LOAD)
        try:
            raw = await _pread(s, s.refcount_table_offset, n * 8)
        except BlockError as e:
            raise QemuError.wrap(e, "Could not initialize refcount handling") from None
        s.refcount_table = _be64_array(raw)
    _update_max_refcount_table_index(s)


async def qcow2_close(s: Qcow2State) -> None:
    """``qcow2_inactivate``: write back both caches (errors are reported), then mark clean."""
    if s.broken or s.l2_cache is None:
        return
    report = s.bs.report or (lambda msg: report_error(s.bs.warn, msg))
    ok = True
    if s.rw_bitmaps is not None:
        from qio.block.qcow2.bitmap import store

        loaded, s.rw_bitmaps = s.rw_bitmaps, None
        try:
            await store(s, loaded)
        except QemuError as e:
            ok = False
            report(f"Lost persistent bitmaps during inactivation of node '{s.bs.node_name}': {e}")
    try:
        await s.l2c.flush()
    except BlockError as e:
        ok = False
        report(f"Failed to flush the L2 table cache: {e}")
    try:
        await s.rbc.flush()
    except BlockError as e:
        ok = False
        report(f"Failed to flush the refcount block cache: {e}")
    if ok and not s.bs.read_only:
        try:
            await mark_clean(s)
        except BlockError:
            pass
