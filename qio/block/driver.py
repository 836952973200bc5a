"""The ``BlockDriver`` interface: one node of the block graph.

As in QEMU, a node is a driver instance with children: a format node reads and writes through its
``file`` child and may have a ``backing`` child; a filter (blkdebug) has exactly one child.  Drivers
implement the ``co_*`` methods for their own node only; the generic request path in
:mod:`qio.block.io` (alignment, EOF handling, FUA emulation, flush ordering, the generic blkdebug
events) wraps every call, so drivers call ``io.preadv(self.file, ...)`` on their children rather
than the child's methods directly.

Everything is a coroutine because a blkdebug node below may suspend the request at any event.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from qio.block.errors import BlockError
from qio.block.modes import OpenFlags
from qio.block.perms import (  # noqa: F401  (re-exported for drivers)
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_NAMES,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
)

if TYPE_CHECKING:
    from qio.block.events import Event

# Request flags (BDRV_REQ_*).
REQ_ZERO_WRITE = 0x02
REQ_MAY_UNMAP = 0x04
REQ_FUA = 0x10
REQ_WRITE_COMPRESSED = 0x20
REQ_WRITE_UNCHANGED = 0x40
REQ_NO_FALLBACK = 0x100

# Block status bits (BDRV_BLOCK_*).
BLOCK_DATA = 0x01
BLOCK_ZERO = 0x02
BLOCK_OFFSET_VALID = 0x04
BLOCK_ALLOCATED = 0x10
BLOCK_RAW = 0x08  # from a driver: the child named as file answers for the range (raw, filters)
BLOCK_EOF = 0x20
BLOCK_RECURSE = 0x40  # from a driver: data whose zeroes the file knows better (preallocated metadata)

SECTOR = 512
BDRV_REQUEST_MAX_BYTES = 0x7FFFFE00
BDRV_MAX_LENGTH = 2**63 - 2**30  # QEMU: QEMU_ALIGN_DOWN(INT64_MAX, BDRV_MAX_ALIGNMENT = 1 GiB)

IOVec = list[memoryview]
#: How a filter opens a protocol child (the generic layer passes it in, so no driver imports it):
#: ``open_child(options, flags, positional)``.
OpenChild = Callable[[dict[str, Any], OpenFlags, bool], "BlockDriver"]


class BlockInfo(NamedTuple):
    cluster_size: int = 0
    vm_state_offset: int = 0


@dataclass(slots=True, eq=False)
class Child:
    """An edge of the graph with the permissions the parent holds on the child."""

    name: str
    node: BlockDriver
    role_primary: bool = True
    perm: int = field(default=0, init=False)
    shared: int = field(default=PERM_ALL, init=False)


@dataclass(slots=True, eq=False)
class NodeState:
    """Per-node bookkeeping that the generic layer (not the driver) owns."""

    write_gen: int = 0
    flushed_gen: int = 0
    #: ``active_flush_req``.
    flush_active: bool = False
    #: The qio.aio.WaitQueue of flushes waiting for the active one, made on demand.
    flush_queue: Any = None

    def flush_waiters(self) -> Any:
        if self.flush_queue is None:
            from qio.aio import WaitQueue

            self.flush_queue = WaitQueue()
        return self.flush_queue


FIX_LEAKS = 1
FIX_ERRORS = 2


@dataclass(slots=True)
class CheckResult:
    """``BdrvCheckResult``, with the block fragmentation info (``bfi``) that ``qemu-img check`` prints."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def copy(self) -> CheckResult:
        return replace(self)

    def assign(self, other: CheckResult) -> None:
        """Take every count of ``other`` (the caller holds this object)."""
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))


@dataclass(slots=True)
class SnapshotInfo:
    """``QEMUSnapshotInfo``: what ``bdrv_snapshot_list`` tells about one internal snapshot."""

    id_str: str = ""
    name: str = ""
    vm_state_size: int = 0
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    icount: int = (1 << 64) - 1


class BlockDriver:
    """Base class of every driver; instances are nodes."""

    format_name: ClassVar[str] = ""
    protocol_name: ClassVar[str | None] = None
    is_filter: ClassVar[bool] = False
    is_format: ClassVar[bool] = False
    #: A format with a backing file (``supports_backing``): unallocated ranges come from ``backing``.
    supports_backing: ClassVar[bool] = False
    #: Options this driver consumes (besides ``driver``/``node-name``); others are an error.
    runtime_opts: ClassVar[frozenset[str]] = frozenset()
    #: Options ``reopen -o`` may change on this node (its ``bdrv_reopen_prepare`` consumes them); any
    #: other option must keep the value it was opened with.
    reopen_opts: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``co_pwritev`` accepts REQ_WRITE_COMPRESSED (qcow2 does).
    can_compress: ClassVar[bool] = False
    #: Set by the open code: raw text to stderr (warnings, qcow2 corruption messages).
    warn: Callable[[str], None] | None = None
    #: Set by the open code for a format node: opens a further protocol-level child while the driver
    #: opens (qcow2's data file), as ``bdrv_open_child`` does; drivers never import the backend.
    open_child: OpenChild | None = None
    #: Set by ``BlockBackend.close``: QEMU's ``error_report`` for errors while closing.
    report: Callable[[str], None] | None = None

    def __init__(self) -> None:
        self.filename = ""
        self.children: list[Child] = []
        self.flags = OpenFlags()
        self.read_only = False
        #: ``-C``: reads copy what comes from the backing chain into this node (top node only).
        self.copy_on_read = False
        self.node_name = ""
        #: The node's own options as opened (``bs->options``): what an unchangeable option is compared to.
        self.open_options: dict[str, Any] = {}
        self.probed = False
        self.request_alignment = 1
        self.max_transfer = 0
        self.pdiscard_alignment = 1
        self.tracked: list[Any] = []  # in-flight requests (qio.block.io.Tracked)
        #: file-posix tracks every request: a zero write past the end of the file serialises
        #: (``raw_do_pwrite_zeroes``; see qio.block.io.serialise_to_end).
        self.tracks_all = False
        self.max_pdiscard = 0
        self.pwrite_zeroes_alignment = 0
        self.max_pwrite_zeroes = 0
        self.supported_write_flags = 0
        self.supported_zero_flags = 0
        #: ``detect-zeroes`` (off, on, unmap): the generic write path turns buffers of zeroes into zero writes.
        self.detect_zeroes = "off"
        self.gen = NodeState()
        self.perm = 0
        self.shared = PERM_ALL
        #: The backing node (``bs->backing``) of a format with a backing file, opened by the generic layer.
        self.backing: BlockDriver | None = None

    # -- graph -------------------------------------------------------------------------------
    def child(self, name: str) -> Child | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    @property
    def file(self) -> BlockDriver:
        # child("file") or child("image"), written out: every request of a format node passes here
        children = self.children
        for c in children:
            if c.name == "file":
                return c.node
        for c in children:
            if c.name == "image":
                return c.node
        raise AssertionError(f"{self.format_name} has no file child")

    def primary_child(self) -> BlockDriver | None:
        for c in self.children:
            if c.role_primary:
                return c.node
        return None

    def refresh_limits(self) -> None:
        """``bdrv_refresh_limits``: inherit transfer limits from data children (then drivers override)."""
        for c in self.children:
            if c.role_primary:
                n = c.node
                self.pdiscard_alignment = max(self.pdiscard_alignment, n.pdiscard_alignment)
                if n.max_transfer and (not self.max_transfer or n.max_transfer < self.max_transfer):
                    self.max_transfer = n.max_transfer

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """Permissions to take on ``child`` given the parent's; filters pass them through."""
        return perm, shared

    # -- life cycle --------------------------------------------------------------------------
    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> bool:
        """``bdrv_parse_filename`` of a file name given as such (not an option): raise QemuError for a
        malformed one; True when the driver consumed it (``filename`` is then no option of the node)."""
        return False

    def open_children(self, options: dict[str, Any], flags: OpenFlags, open_child: OpenChild) -> None:
        """Protocol-level filters (blkdebug) open their own child here, with ``open_child``, before ``open``."""

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        """Open the node from its (already flattened, child-free) option dict."""

    def set_perm(self, perm: int, shared: int) -> None:
        """Apply permissions (protocol nodes lock the image here); raise QemuError on conflict."""

    async def close(self) -> None:
        """Write back caches; called before children are closed."""

    def closed(self) -> None:
        """Release OS resources after the node and its children are done."""

    def has_driver(self) -> bool:
        """False once QEMU would have set ``bs->drv = NULL`` (a qcow2 image marked corrupt)."""
        return True

    def is_inserted(self) -> bool:
        """``bdrv_is_inserted``: false once this node or a child lost its driver; every BlockBackend
        request then fails with ENOMEDIUM."""
        return self.has_driver() and all(c.node.is_inserted() for c in self.children)

    # -- I/O (implemented by drivers) --------------------------------------------------------
    def getlength(self) -> int:
        """Length in bytes; the generic layer rounds it up to whole sectors."""
        return self.file.getlength() if self.children else 0

    def grow_to(self, end: int) -> None:
        """A write reached ``end``; nodes whose length follows their writes extend here."""

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        raise BlockError(errno.ENOTSUP)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        raise BlockError(errno.ENOTSUP)

    def can_write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> bool:
        """Whether :meth:`write_inline` would do this write as ``co_pwritev`` does it, never waiting
        (see :func:`qio.block.io.can_pwritev_inline`); a pure test, most drivers cannot."""
        return False

    def write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        """``co_pwritev`` without a coroutine, for a request :meth:`can_write_inline` accepted."""
        raise AssertionError(f"{self.format_name} cannot write inline")

    def can_zero_inline(self, offset: int, nbytes: int, flags: int) -> bool:
        """Whether :meth:`zero_inline` would do this zero write as ``co_pwrite_zeroes`` does it, never
        waiting (see :func:`qio.block.io.can_pwrite_zeroes_inline`); a pure test, most drivers cannot."""
        return False

    def zero_inline(self, offset: int, nbytes: int, flags: int) -> None:
        """``co_pwrite_zeroes`` without a coroutine, for a request :meth:`can_zero_inline` accepted."""
        raise AssertionError(f"{self.format_name} cannot zero inline")

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        raise BlockError(errno.ENOTSUP)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        raise BlockError(errno.ENOTSUP)

    async def co_flush_to_os(self) -> None:
        return None

    async def co_flush_to_disk(self) -> bool:
        """Write back to stable storage; True if the sync was deferred to a group commit."""
        return False

    #: A driver with its own whole-node flush (blkdebug) replaces the generic flush steps.
    has_co_flush: ClassVar[bool] = False

    async def co_flush(self) -> None:
        return None

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """Resize; ``flags`` may hold ``REQ_ZERO_WRITE`` (the new area must read as zeroes)."""
        raise BlockError(errno.ENOTSUP, "Image format driver does not support resize")

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        """``(BLOCK_* flags, pnum)`` for the extent starting at ``offset``."""
        return BLOCK_DATA | BLOCK_ALLOCATED, nbytes

    async def co_block_status_map(self, want_zero: bool, offset: int,
                                  nbytes: int) -> tuple[int, int, int, BlockDriver | None]:
        """The driver's ``bdrv_co_block_status``: ``(BLOCK_* flags, pnum, host offset, file node)`` of
        its own layer; ``qio.block.io.co_block_status`` adds the generic flags and walks on from it.
        By default a node with a child hands the range to it (``BLOCK_RAW``, at the node's offset)."""
        if not want_zero:
            return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, self
        if self.children:
            child = self.primary_child()
            if child is None:
                return BLOCK_DATA | BLOCK_ALLOCATED, nbytes, 0, None
            shift = getattr(self, "offset", 0) if self.is_format else 0
            return BLOCK_RAW, nbytes, offset + (shift if isinstance(shift, int) else 0), child
        return BLOCK_DATA | BLOCK_OFFSET_VALID, nbytes, offset, self

    def get_allocated_file_size(self) -> int | None:
        """``bdrv_get_allocated_file_size``; None where QEMU fails (-ENOTSUP).

        A protocol driver knows its own size or has none (blkdebug, even though it filters); a format
        node sums its children except the backing file."""
        if self.protocol_name is not None:
            return None
        total = 0
        for c in self.children:
            if c.name == "backing":
                continue
            size = c.node.get_allocated_file_size()
            if size is None:
                return None
            total += size
        return total

    # -- what qemu-img asks a format (its own names stay private) -----------------------------
    def backing_file_info(self) -> tuple[str | None, str | None]:
        """``bs->backing_file`` and ``bs->backing_format`` as the image header names them."""
        return None, None

    def is_dirty(self) -> bool:
        """``BlockDriverInfo.is_dirty``: the image was not closed cleanly."""
        return False

    def snapshot_list(self) -> list[SnapshotInfo]:
        """``bdrv_snapshot_list``: the internal snapshots (ENOTSUP, i.e. none, by default)."""
        return []

    async def co_check(self, fix: int) -> CheckResult:
        """``bdrv_co_check``: consistency check and repair (``fix``: FIX_LEAKS | FIX_ERRORS)."""
        raise BlockError(errno.ENOTSUP)

    def get_info(self) -> BlockInfo | None:
        return None

    def get_specific_info(self) -> list[tuple[str, Any]] | None:
        return None

    # -- blkdebug hooks (a blkdebug node overrides these) -------------------------------------
    async def debug_event(self, event: Event) -> None:
        """Raise ``event`` on this node; awaitable because blkdebug may suspend the caller."""
        return None

    def debug_breakpoint(self, event: str, tag: str) -> int:
        return -errno.ENOTSUP

    def debug_remove_breakpoint(self, tag: str) -> int:
        return -errno.ENOTSUP

    def debug_resume(self, tag: str) -> int:
        return -errno.ENOTSUP

    def debug_is_suspended(self, tag: str) -> bool:
        return False

    def debug_can_suspend(self, tag: str, inflight: bool) -> bool:
        """Could a request still be suspended under ``tag`` (armed breakpoint or parked request)?"""
        return False

    def debug_suspended_tags(self) -> list[str]:
        return []

    # -- VM state (qcow2 stores it after the guest data; others forward to their primary child) --
    async def co_load_vmstate(self, pos: int, nbytes: int, qiov: IOVec) -> None:
        child = self.primary_child()
        if child is None:
            raise BlockError(errno.ENOTSUP)
        await child.co_load_vmstate(pos, nbytes, qiov)

    async def co_save_vmstate(self, pos: int, nbytes: int, qiov: IOVec) -> None:
        child = self.primary_child()
        if child is None:
            raise BlockError(errno.ENOTSUP)
        await child.co_save_vmstate(pos, nbytes, qiov)

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        """Validate new ``reopen_opts`` values without changing anything (the prepare step's errors)."""

    def reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        """Apply new flags (read-only, cache) and ``reopen_opts`` values in place."""
        self.flags = flags
        self.read_only = flags.read_only

    has_debug_hooks: ClassVar[bool] = False
