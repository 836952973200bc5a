"""The qcow2 driver's typed state (``BDRVQcow2State``) and the small helpers every other module uses."""

from __future__ import annotations

import array
import errno
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qio import stdio
from qio.aio import AIO, CoMutex, CoQueue, TaskPool, current_co
from qio.block import io
from qio.block.driver import (
    BDRV_REQUEST_MAX_BYTES as BDRV_REQUEST_MAX_BYTES,
)
from qio.block.driver import (
    SECTOR,
    BlockDriver,
    IOVec,
    SnapshotInfo,
)
from qio.block.errors import BlockError, QemuError
from qio.block.events import Event
from qio.block.qcow2 import layout as L
from qio.numbers import INT64_MAX as INT64_MAX  # re-exported: the qcow2 modules take their limits from here
from qio.numbers import INT_MAX as INT_MAX

if TYPE_CHECKING:
    from qio.block.qcow2.bitmap import LoadedBitmap
    from qio.block.qcow2.cache import Qcow2Cache


DEFAULT_L2_CACHE_MAX_SIZE = 32 << 20
MIN_L2_CACHE_SIZE = 2
MIN_REFCOUNT_CACHE_SIZE = 4
MAX_WORKERS = 8
#: Deepest backing chain qio opens (each level costs Python stack frames).
MAX_BACKING_DEPTH = 64

NO_KEY = "Parameter 'encrypt.key-secret' is required for cipher"

# Discard types (enum qcow2_discard_type).
DISCARD_NEVER, DISCARD_ALWAYS, DISCARD_REQUEST, DISCARD_SNAPSHOT, DISCARD_OTHER = range(5)

# Metadata overlap check sections (QCow2MetadataOverlap), in the order QEMU checks them.
OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_INACTIVE_L2 = 1 << 7
OL_BITMAP_DIRECTORY = 1 << 8
OL_CONSTANT = OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_REFCOUNT_TABLE | OL_SNAPSHOT_TABLE | OL_BITMAP_DIRECTORY
OL_CACHED = OL_CONSTANT | OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1
OL_ALL = OL_CACHED | OL_INACTIVE_L2
OL_NAMES = {OL_MAIN_HEADER: "qcow2_header", OL_ACTIVE_L1: "active L1 table", OL_ACTIVE_L2: "active L2 table",
            OL_REFCOUNT_TABLE: "refcount table", OL_REFCOUNT_BLOCK: "refcount block",
            OL_SNAPSHOT_TABLE: "snapshot table", OL_INACTIVE_L1: "inactive L1 table",
            OL_INACTIVE_L2: "inactive L2 table", OL_BITMAP_DIRECTORY: "bitmap directory"}
OL_OPTIONS = {"main-header": OL_MAIN_HEADER, "active-l1": OL_ACTIVE_L1, "active-l2": OL_ACTIVE_L2,
              "refcount-table": OL_REFCOUNT_TABLE, "refcount-block": OL_REFCOUNT_BLOCK,
              "snapshot-table": OL_SNAPSHOT_TABLE, "inactive-l1": OL_INACTIVE_L1,
              "inactive-l2": OL_INACTIVE_L2, "bitmap-directory": OL_BITMAP_DIRECTORY}

_ENTRY = L.ENTRY
_unpack_entry = _ENTRY.unpack_from
_pack_entry = _ENTRY.pack_into


def cx(v: int) -> str:
    """C's ``%#x``/``%#" PRIx64``: ``0x1f``, but plain ``0`` for zero."""
    return f"{v:#x}" if v else "0"


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align



QCOW2_MAX_WORKERS = 8


def _task_pool(parts: bool) -> TaskPool | None:
    """A request with more than one part gets an ``AioTaskPool`` (only modelled with blkdebug, where the
    parallel parts are observable; without it host I/O is inline and the parts run in turn)."""
    if parts and AIO.yield_on_io and current_co() is not None:
        return TaskPool(QCOW2_MAX_WORKERS)
    return None

@dataclass(slots=True, frozen=True)
class RuntimeOptions:
    """``Qcow2ReopenState``: the checked runtime options, applied together by ``_commit_options``."""

    l2_entry_size: int
    l2_entries: int
    refcount_entries: int
    overlap_check: int
    lazy_refcounts: bool
    discard_passthrough: list[bool]


@dataclass(slots=True, eq=False)
class L2Meta:
    """``QCowL2Meta``: one in-flight allocation (new clusters whose L2 entries are still to be set)."""

    offset: int
    alloc_offset: int
    nb_clusters: int
    keep_old: bool
    cow_start_off: int
    cow_start_n: int
    cow_end_off: int
    cow_end_n: int
    skip_cow: bool = False
    prealloc: bool = False
    data_qiov: IOVec | None = None
    dependent: CoQueue = field(default_factory=CoQueue)

    def cow_start(self) -> int:
        return self.offset + self.cow_start_off

    def cow_end(self) -> int:
        return self.offset + self.cow_end_off + self.cow_end_n


@dataclass(slots=True)
class Snapshot(SnapshotInfo):
    """``QCowSnapshot``: one entry of the snapshot table."""

    l1_table_offset: int = 0
    l1_size: int = 0
    disk_size: int = 0
    extra_data_size: int = 0
    unknown_extra_data: bytes = b""




@dataclass(slots=True, eq=False)
class Qcow2State:
    """``BDRVQcow2State``: everything the qcow2 modules share, passed to them as ``s``.

    ``bs`` is the node (file child, backing node, flags, ``warn``); the rest is qcow2's own."""

    bs: BlockDriver
    lock: CoMutex = field(default_factory=CoMutex)
    qcow_version: int = 3
    cluster_bits: int = 16
    cluster_size: int = 1 << 16
    l2_bits: int = 13
    l2_size: int = 1 << 13
    l2_slice_size: int = 1 << 13
    #: extended L2 entries (``has_subclusters``): 16-byte L2 entries with 32 subclusters per cluster
    subclusters: bool = False
    l2e_shift: int = 3  # log2 of the L2 entry size (8 or 16 bytes)
    subcluster_bits: int = 16
    subcluster_size: int = 1 << 16
    subclusters_per_cluster: int = 1
    l1_size: int = 0
    l1_vm_state_index: int = 0
    l1_table_offset: int = 0
    l1_table: array.array[int] = field(default_factory=lambda: array.array("Q"))
    refcount_order: int = 4
    refcount_bits: int = 16
    refcount_max: int = 0xFFFF
    refcount_block_bits: int = 15
    refcount_block_size: int = 1 << 15
    get_rc: L.RefGet = field(default_factory=lambda: L.refcount_accessors(4)[0])
    set_rc: L.RefSet = field(default_factory=lambda: L.refcount_accessors(4)[1])
    refcount_table: array.array[int] = field(default_factory=lambda: array.array("Q"))
    refcount_table_offset: int = 0
    refcount_table_size: int = 0
    max_refcount_table_index: int = 0
    free_cluster_index: int = 0
    free_byte_offset: int = 0
    csize: L.CompressedLayout = field(default_factory=lambda: L.compressed_layout(16))
    total_sectors: int = 0
    crypt_method_header: int = 0
    #: the unlocked encryption context (``s->crypto``, a ``qio.crypto.block.CryptoBlock``), its header
    #: extension (offset, length) and whether IVs count host sectors (LUKS) or guest sectors (AES)
    crypto: Any = None
    crypto_header: tuple[int, int] = (0, 0)
    crypt_physical_offset: bool = False
    crypt_extra_opts: list[str] = field(default_factory=list)  # encrypt.* keys beyond format/key-secret
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    compression_type: int = 0
    unknown_header_fields: bytes = b""
    #: unknown header extensions (magic, data) in QEMU's list order (newest first)
    unknown_header_ext: list[tuple[int, bytes]] = field(default_factory=list)
    image_backing_file: str | None = None
    image_backing_format: str | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    snapshots_size: int = 0
    nb_bitmaps: int = 0
    bitmap_directory_size: int = 0
    bitmap_directory_offset: int = 0
    use_lazy_refcounts: bool = False
    discard_passthrough: list[bool] = field(default_factory=lambda: [False, True, True, True, False])
    overlap_check: int = OL_CACHED
    signaled_corruption: bool = False
    broken: bool = False  # QEMU sets bs->drv = NULL after a fatal corruption
    cluster_allocs: list[L2Meta] = field(default_factory=list)
    discards: list[list[int]] = field(default_factory=list)
    cache_discards: bool = False
    metadata_preallocation_checked: bool = False
    metadata_preallocation: bool = False
    l2_cache: Qcow2Cache | None = None
    refblock_cache: Qcow2Cache | None = None
    l2_cache_entry_size: int = 0
    opts: dict[str, Any] = field(default_factory=dict)
    _l2_offsets: set[int] | None = None
    _l2_refs: dict[int, int] | None = None
    _l2_unaligned: int = 0
    _refblock_unaligned: int = 0
    _refblock_offsets: set[int] | None = None
    _drop_bitmaps_ext: bool = False
    bitmaps_info: list[list[tuple[str, Any]]] = field(default_factory=list)
    rw_bitmaps: list[LoadedBitmap] | None = None  # only for qemu-img check -r
    #: the external data file's name from the header extension (``s->image_data_file``)
    image_data_file: str | None = None
    #: the external data file node (QEMU's ``s->data_file`` when it is not ``bs->file``)
    data_node: BlockDriver | None = None

    @property
    def data_file(self) -> BlockDriver:
        """The data child (``s->data_file``): every guest-data access of qcow2 goes to this node,
        the external data file when there is one, else the image file itself."""
        d = self.data_node
        return d if d is not None else self.bs.file

    @property
    def l2c(self) -> Qcow2Cache:
        """The L2 table cache (exists once the image is open)."""
        assert self.l2_cache is not None
        return self.l2_cache

    @property
    def rbc(self) -> Qcow2Cache:
        """The refcount block cache (exists once the image is open)."""
        assert self.refblock_cache is not None
        return self.refblock_cache

def has_data_file(s: Qcow2State) -> bool:
    """``has_data_file``: guest data lives in an external data file (not in the image file)."""
    return s.data_node is not None


def data_file_is_raw(s: Qcow2State) -> bool:
    """``data_file_is_raw``: the data file is kept a valid raw image of the guest disk."""
    return bool(s.autoclear_features & L.AUTOCLEAR_DATA_FILE_RAW)


def cluster_type(s: Qcow2State, entry: int) -> int:
    """``qcow2_get_cluster_type``: offset 0 is a valid data cluster in an external data file (guest
    cluster 0), told apart from an unallocated entry by its COPIED flag (data clusters there always
    have refcount 1)."""
    if entry & L.OFLAG_COMPRESSED:
        return L.CLUSTER_COMPRESSED
    if entry & L.OFLAG_ZERO:
        return L.CLUSTER_ZERO_ALLOC if entry & L.L2E_OFFSET_MASK else L.CLUSTER_ZERO_PLAIN
    if not entry & L.L2E_OFFSET_MASK:
        if entry & L.OFLAG_COPIED and s.data_node is not None:
            return L.CLUSTER_NORMAL
        return L.CLUSTER_UNALLOCATED
    return L.CLUSTER_NORMAL


def _stderr(s: Qcow2State, text: str) -> None:
    if callable(s.bs.warn):
        s.bs.warn(text)
    else:
        stdio.release()
        os.write(2, text.encode("utf-8", "surrogateescape"))


def size_to_clusters(s: Qcow2State, size: int) -> int:
    return (size + s.cluster_size - 1) >> s.cluster_bits


def size_to_l1(s: Qcow2State, size: int) -> int:
    shift = s.cluster_bits + s.l2_bits
    return (size + (1 << shift) - 1) >> shift


def vm_state_offset(s: Qcow2State) -> int:
    return s.l1_vm_state_index << (s.cluster_bits + s.l2_bits)


def _length(s: Qcow2State) -> int:
    return s.total_sectors * SECTOR


def _is_writable(s: Qcow2State) -> bool:
    return not s.bs.read_only


def _need_accurate_refcounts(s: Qcow2State) -> bool:
    return not s.incompatible_features & L.INCOMPAT_DIRTY


def _check_usable(s: Qcow2State) -> None:
    if s.broken:
        raise BlockError(errno.ENOMEDIUM)


async def _event(s: Qcow2State, event: Event) -> None:
    file = s.bs.file
    if file.has_debug_hooks:
        await file.debug_event(event)


async def pwrite_sync(s: Qcow2State, offset: int, data: bytes) -> None:
    """``bdrv_pwrite_sync`` on the file child."""
    await io.pwritev(s.bs.file, offset, len(data), [memoryview(data)])
    await io.flush(s.bs.file)


async def _pread(s: Qcow2State, offset: int, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    if nbytes:
        await io.preadv(s.bs.file, offset, nbytes, [memoryview(buf)])
    return buf


def _be64_array(raw: bytes | bytearray) -> array.array[int]:
    arr = array.array("Q", bytes(raw))
    if arr.itemsize != 8:
        raise RuntimeError("array('Q') is not 64 bits wide")
    import sys

    if sys.byteorder == "little":
        arr.byteswap()
    return arr


_NONZERO = re.compile(rb"[^\x00]")


def _nonzero_entries(tbl: bytearray, start: int, n: int) -> list[int]:
    """Indices (relative to ``start``) of the non-zero 8-byte entries among ``n`` from ``start``."""
    out: list[int] = []
    last = -1
    for m in _NONZERO.finditer(tbl, start * 8, (start + n) * 8):
        k = (m.start() >> 3) - start
        if k != last:
            out.append(k)
            last = k
    return out


def _validate_table(s: Qcow2State, offset: int, entries: int, entry_len: int, max_bytes: int, name: str) -> None:
    if entries > max_bytes // entry_len:
        raise QemuError(f"{name} too large", errno.EFBIG)
    if INT64_MAX - entries * entry_len < offset or offset & (s.cluster_size - 1):
        raise QemuError(f"{name} offset invalid", errno.EINVAL)
