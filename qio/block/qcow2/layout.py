"""qcow2 on-disk structures, named as the qcow2 specification names them.

Everything on disk is big-endian.  Fixed-size structures are :class:`struct.Struct` objects; the
variable ones (header extensions, snapshot entries, the feature-name table) are built from the fixed
parts.  The refcount helpers read and write one entry of a refcount block of any width from 1 to 64
bits (sub-byte widths are packed LSB first).

References:
    QEMU 7.2 ``docs/interop/qcow2.txt`` (the format specification), ``block/qcow2.h`` (masks and
    limits); the project reference ``shared/reference/qcow2.md`` sections 1.1-1.8.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

MAGIC = b"QFI\xfb"

# -- header (spec "Header") ------------------------------------------------------------------------
#: Version 2 header, bytes 0..71: magic, version, backing_file_offset, backing_file_size, cluster_bits,
#: size, crypt_method, l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters,
#: nb_snapshots, snapshots_offset.
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
#: Version 3 additions, bytes 72..103: incompatible_features, compatible_features,
#: autoclear_features, refcount_order, header_length.
HEADER_V3 = struct.Struct(">QQQII")
#: Byte 104 of a v3 header whose header_length > 104: compression_type (then 7 padding bytes).
HEADER_COMPRESSION_TYPE_OFFSET = 104
#: The header qcow2 writers of QEMU >= 5.1 produce (v3 with the compression type and padding).
HEADER_LENGTH_V3 = 112
HEADER_LENGTH_V2 = 72
MIN_HEADER_LENGTH_V3 = 104

# Field offsets that QEMU updates in place.
OFF_SIZE = 24  # u64 size
OFF_L1_SIZE = 36  # u32 l1_size + u64 l1_table_offset (12 bytes, one write)
OFF_NB_SNAPSHOTS = 60  # u32 nb_snapshots + u64 snapshots_offset
OFF_REFCOUNT_TABLE_OFFSET = 48  # u64 refcount_table_offset + u32 refcount_table_clusters
OFF_INCOMPATIBLE_FEATURES = 72

L1_SIZE_AND_OFFSET = struct.Struct(">IQ")
REFTABLE_OFFSET_AND_CLUSTERS = struct.Struct(">QI")


class Header(NamedTuple):
    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_LENGTH_V2
    compression_type: int = 0


def parse_header(buf: bytes) -> Header:
    """The header fields of ``buf`` (at least 112 bytes; v2 images get v3 defaults)."""
    v2 = HEADER_V2.unpack_from(buf, 0)
    if v2[1] != 3:
        return Header._make((*v2, 0, 0, 0, 4, HEADER_LENGTH_V2, 0))
    v3 = HEADER_V3.unpack_from(buf, HEADER_V2.size)
    ctype = buf[HEADER_COMPRESSION_TYPE_OFFSET] if v3[4] > HEADER_COMPRESSION_TYPE_OFFSET else 0
    return Header._make((*v2, *v3, ctype))


def pack_header(h: Header) -> bytes:
    """The header bytes QEMU writes: 72 for v2, 112 for v3 (compression type + 7 zero bytes)."""
    out = HEADER_V2.pack(*h[:13])
    if h.version == 2:
        return out
    return out + HEADER_V3.pack(h.incompatible_features, h.compatible_features, h.autoclear_features,
                                h.refcount_order, h.header_length) + bytes([h.compression_type]) + bytes(7)


# Crypt methods.
CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2

# -- feature bits (spec "incompatible/compatible/autoclear features") -------------------------------
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
#: The incompatible bits QEMU 7.2 knows; any other bit makes the image unusable.
INCOMPAT_MASK = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# -- header extensions (spec "Header extensions") ----------------------------------------------
EXT_HEADER = struct.Struct(">II")  # type, length; data follows, padded to a multiple of 8
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

#: One feature-name table entry: type (0 incompatible, 1 compatible, 2 autoclear), bit number, name.
FEATURE_ENTRY = struct.Struct(">BB46s")
FEAT_INCOMPATIBLE, FEAT_COMPATIBLE, FEAT_AUTOCLEAR = 0, 1, 2
#: The table QEMU 7.2 writes into v3 images with clusters larger than 4 KiB (qcow2_update_header).
FEATURE_TABLE = (
    (FEAT_INCOMPATIBLE, 0, b"dirty bit"),
    (FEAT_INCOMPATIBLE, 1, b"corrupt bit"),
    (FEAT_INCOMPATIBLE, 2, b"external data file"),
    (FEAT_INCOMPATIBLE, 3, b"compression type"),
    (FEAT_INCOMPATIBLE, 4, b"extended L2 entries"),
    (FEAT_COMPATIBLE, 0, b"lazy refcounts"),
    (FEAT_AUTOCLEAR, 0, b"bitmaps"),
    (FEAT_AUTOCLEAR, 1, b"raw external data"),
)
#: Bitmaps extension: nb_bitmaps, reserved (0), bitmap_directory_size, bitmap_directory_offset.
BITMAPS_EXT = struct.Struct(">IIQQ")
#: Full disk encryption header pointer extension: offset, length.
CRYPTO_EXT = struct.Struct(">QQ")
#: Bitmap directory entry: bitmap_table_offset, bitmap_table_size, flags, type, granularity_bits,
#: name_size, extra_data_size; then extra data, name, padding to 8.
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")
BITMAP_FLAG_IN_USE = 1 << 0
BITMAP_FLAG_AUTO = 1 << 1


def ext_record(magic: int, data: bytes) -> bytes:
    """One header extension: type, length, data padded with zeros to a multiple of 8 bytes."""
    return EXT_HEADER.pack(magic, len(data)) + data + bytes(-len(data) % 8)


def feature_table_bytes() -> bytes:
    return b"".join(FEATURE_ENTRY.pack(t, bit, name) for t, bit, name in FEATURE_TABLE)


# -- L1 / L2 entries (spec "Cluster mapping") ----------------------------------------------------
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
ENTRY = struct.Struct(">Q")  # one L1, L2 or reftable entry
L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8

# Cluster types (qcow2_get_cluster_type) and the subcluster types qcow2_get_host_offset reports.
CLUSTER_UNALLOCATED = 0
CLUSTER_ZERO_PLAIN = 1
CLUSTER_ZERO_ALLOC = 2
CLUSTER_NORMAL = 3
CLUSTER_COMPRESSED = 4
#: Subcluster type only (extended L2 entries): an unallocated subcluster of an allocated cluster.
CLUSTER_UNALLOCATED_ALLOC = 5


def cluster_is_allocated(ctype: int) -> bool:
    return ctype in (CLUSTER_COMPRESSED, CLUSTER_NORMAL, CLUSTER_ZERO_ALLOC)


# -- compressed cluster descriptor (spec "Compressed Clusters Descriptor") -------------------------
COMPRESSED_SECTOR_SIZE = 512


class CompressedLayout(NamedTuple):
    """Field split of a compressed descriptor for one cluster size: ``x = 62 - (cluster_bits - 8)``."""

    csize_shift: int  # first bit of the additional-sectors count
    csize_mask: int  # mask of the count after shifting
    offset_mask: int  # host offset bits (0 .. x-1)


def compressed_layout(cluster_bits: int) -> CompressedLayout:
    shift = 62 - (cluster_bits - 8)
    return CompressedLayout(shift, (1 << (cluster_bits - 8)) - 1, (1 << shift) - 1)


def parse_compressed(entry: int, layout: CompressedLayout) -> tuple[int, int]:
    """(host byte offset, bytes to read) of a compressed descriptor (qcow2_parse_compressed_l2_entry)."""
    offset = entry & layout.offset_mask
    nb_csectors = ((entry >> layout.csize_shift) & layout.csize_mask) + 1
    return offset, nb_csectors * COMPRESSED_SECTOR_SIZE - (offset & (COMPRESSED_SECTOR_SIZE - 1))


def make_compressed(offset: int, size: int, layout: CompressedLayout) -> int:
    """Descriptor for ``size`` compressed bytes at host ``offset`` (COPIED never set)."""
    nb_csectors = (offset + size - 1) // COMPRESSED_SECTOR_SIZE - offset // COMPRESSED_SECTOR_SIZE
    return OFLAG_COMPRESSED | (nb_csectors << layout.csize_shift) | offset


# -- refcount blocks (spec "Host cluster management") --------------------------------------------
RefGet = Callable[[bytearray, int], int]
RefSet = Callable[[bytearray, int, int], None]
_U16, _U32 = struct.Struct(">H"), struct.Struct(">I")


def refcount_accessors(order: int) -> tuple[RefGet, RefSet]:
    """Getter and setter of entry ``index`` of a refcount block for ``refcount_bits = 1 << order``."""
    if order < 3:
        bits = 1 << order
        per_byte = 8 // bits
        mask = (1 << bits) - 1

        def get_sub(block: bytearray, index: int) -> int:
            return (block[index // per_byte] >> (bits * (index % per_byte))) & mask

        def set_sub(block: bytearray, index: int, value: int) -> None:
            shift = bits * (index % per_byte)
            i = index // per_byte
            block[i] = (block[i] & ~(mask << shift) & 0xFF) | (value << shift)

        return get_sub, set_sub
    if order == 3:

        def get8(block: bytearray, index: int) -> int:
            return block[index]

        def set8(block: bytearray, index: int, value: int) -> None:
            block[index] = value

        return get8, set8
    st = {4: _U16, 5: _U32, 6: ENTRY}[order]
    width = st.size
    unpack_from, pack_into = st.unpack_from, st.pack_into

    def get_be(block: bytearray, index: int) -> int:
        return int(unpack_from(block, index * width)[0])

    def set_be(block: bytearray, index: int, value: int) -> None:
        pack_into(block, index * width, value)

    return get_be, set_be


# -- snapshot table (spec "Snapshots") ---------------------------------------------------------
#: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
#: vm_state_size, extra_data_size; then extra data, id string, name, padding to 8.
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")
#: Known extra data: vm_state_size_large, disk_size, icount.
SNAPSHOT_EXTRA = struct.Struct(">QQQ")

# -- limits (block/qcow2.h) -----------------------------------------------------------------------
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFTABLE_SIZE = 8 << 20
MAX_L1_SIZE = 32 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_CLUSTER_OFFSET = (1 << 56) - 1
MAX_BACKING_FILE_NAME = 1023
