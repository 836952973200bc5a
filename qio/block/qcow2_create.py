"""Creating qcow2 images the way QEMU 7.2's ``qcow2_co_create`` does, and the temporary overlay of
qemu-io's ``-s`` (snapshot mode, ``bdrv_append_temp_snapshot``).

QEMU writes a minimal header and a one-cluster refcount table, then opens the image with the qcow2
driver and lets the driver itself allocate the first three clusters, rewrite the full header and grow
the L1 table to the requested size.  Doing the same with qio's driver gives byte-identical images.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from typing import Any

from qio.block import io
from qio.block import qcow2_layout as L
from qio.block.driver import BlockDriver, Child
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags

Warn = Callable[[str], None]


def create(filename: str, size: int, *, cluster_size: int = 65536, version: int = 3, refcount_bits: int = 16,
           lazy_refcounts: bool = False, backing_file: str | None = None, backing_fmt: str | None = None,
           warn: Warn | None = None) -> None:
    """Create (or overwrite) ``filename`` as an empty qcow2 image of ``size`` bytes."""
    from qio.block.backend import _close_sync, open_node
    from qio.block.qcow2 import Qcow2Driver, _sync

    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise QemuError("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise QemuError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and (refcount_bits != 16 or lazy_refcounts):
        raise QemuError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                        "(use compat=1.1 or greater)" if refcount_bits != 16 else
                        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 "
                        "or greater)")
    order = refcount_bits.bit_length() - 1
    header = L.Header(L.MAGIC, version, 0, 0, cluster_size.bit_length() - 1, 0, 0, 0, 0, cluster_size, 1, 0, 0,
                      0, L.COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0, 0, order, L.HEADER_LENGTH_V3, 0)
    raw = L.HEADER_V2.pack(*header[:13]) + L.HEADER_V3.pack(*header[13:18]) + bytes(8)
    first = bytearray(3 * cluster_size)
    first[: len(raw)] = raw
    L.ENTRY.pack_into(first, cluster_size, 2 * cluster_size)
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.pwrite(fd, bytes(first), 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise QemuError(f"Could not create '{filename}': {os.strerror(e.errno or errno.EIO)}",
                        e.errno or errno.EIO) from None
    flags = OpenFlags()
    flags.no_flush = True
    node = open_node({"driver": "qcow2", "file.filename": filename}, flags, warn or (lambda _m: None))
    assert isinstance(node, Qcow2Driver)

    async def build() -> None:
        if await node.alloc_clusters(3 * cluster_size) != 0:
            raise QemuError("Huh, first cluster in empty image is already in use?")
        await node.update_header()
        await node.co_truncate(size, False, "off")
        if backing_file is not None:
            node.image_backing_file = backing_file
            node.image_backing_format = backing_fmt
            await node.update_header()
        await node.close()

    try:
        _sync(build())
    except BlockError as e:
        raise QemuError(f"Could not create '{filename}': {e}", e.code) from None
    finally:
        _close_sync(node)


def temp_overlay(base: BlockDriver, flags: OpenFlags, warn: Warn) -> BlockDriver:
    """``bdrv_append_temp_snapshot``: a temporary qcow2 image (deleted at once, as QEMU's
    BDRV_O_TEMPORARY does) whose backing node is ``base``."""
    from qio.block.backend import open_node
    from qio.block.qcow2 import Qcow2Driver

    size = io.getlength(base)
    tmpdir = tempfile.gettempdir()
    if tmpdir == "/tmp":
        tmpdir = "/var/tmp"
    try:
        fd, name = tempfile.mkstemp(prefix="vl.", dir=tmpdir)
    except OSError as e:
        raise QemuError(f"Could not open temporary file '{tmpdir}/vl.XXXXXX': "
                        f"{os.strerror(e.errno or errno.EIO)}") from None
    os.close(fd)
    try:
        try:
            create(name, size)
        except QemuError as e:
            raise QemuError(f"Could not create temporary overlay '{name}': {e}", e.errno) from None
        oflags = flags.copy()
        oflags.snapshot = False
        oflags.no_flush = True
        oflags.nocache = False
        opts: dict[str, Any] = {"driver": "qcow2", "file.driver": "file", "file.filename": name}
        node = open_node(opts, oflags, warn)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    assert isinstance(node, Qcow2Driver)
    node.backing = base
    node.children.append(Child("backing", base, role_primary=False))
    return node
