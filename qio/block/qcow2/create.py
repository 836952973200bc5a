"""Creating qcow2 images the way QEMU 7.2's ``qcow2_co_create`` does, and the temporary overlay of
qemu-io's ``-s`` (snapshot mode, ``bdrv_append_temp_snapshot``).

QEMU writes a minimal header and a one-cluster refcount table, then opens the image with the qcow2
driver and lets the driver itself allocate the first three clusters, rewrite the full header and grow
the L1 table to the requested size.  Doing the same with qio's driver gives byte-identical images.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from qio.aio import run_sync
from qio.block.driver import BlockDriver, Child
from qio.block.errors import BlockError, QemuError, report_error
from qio.block.modes import OpenFlags
from qio.block.qcow2 import layout as L
from qio.block.qcow2.datafile import set_raw_bit, validate_create

Warn = Callable[[str], None]


PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def validate(size: int, *, cluster_size: int = 65536, version: int = 3, refcount_bits: int = 16,
             lazy_refcounts: bool = False, backing_file: str | None = None, backing_fmt: str | None = None,
             preallocation: str = "off", extended_l2: bool = False) -> None:
    """The option checks of ``qcow2_co_create`` up to the refcount width, in its order and words (the data
    file checks, ``datafile.validate_create``, and :func:`validate_compression` follow)."""
    if size % 512:
        raise QemuError("Image size must be a multiple of 512 bytes", errno.EINVAL)
    if extended_l2 and version < 3:
        raise QemuError("Extended L2 entries are only supported with compatibility level 1.1 and above (use "
                        "version=v3 or greater)", errno.EINVAL)
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise QemuError("Cluster size must be a power of two between 512 and 2048k", errno.EINVAL)
    if extended_l2 and cluster_size < 512 * 32:
        raise QemuError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                        errno.EINVAL)
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise QemuError("Backing file and preallocation can only be used at the same time if extended_l2 is on",
                        errno.EINVAL)
    if backing_fmt is not None and backing_file is None:
        raise QemuError("Backing format cannot be used without backing file", errno.EINVAL)
    if version < 3 and lazy_refcounts:
        raise QemuError("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or "
                        "greater)", errno.EINVAL)
    if refcount_bits > 64 or refcount_bits < 1 or refcount_bits & (refcount_bits - 1):
        raise QemuError("Refcount width must be a power of two and may not exceed 64 bits", errno.EINVAL)
    if version < 3 and refcount_bits != 16:
        raise QemuError("Different refcount widths than 16 bits require compatibility level 1.1 or above (use "
                        "version=v3 or greater)", errno.EINVAL)


def validate_compression(version: int, compression_type: str) -> None:
    """The compression type checks, which ``qcow2_co_create`` makes after the data file ones."""
    if compression_type != "zlib":
        if version < 3:
            raise QemuError("Non-zlib compression type is only supported with compatibility level 1.1 and above "
                            "(use version=v3 or greater)", errno.EINVAL)
        if compression_type != "zstd":
            raise QemuError("Unknown compression type", errno.EINVAL)


def create(filename: str, size: int, **kw: Any) -> None:
    """:func:`create_async` driven without an event loop turn (for open-time callers such as ``-s``)."""
    run_sync(create_async(filename, size, **kw))


async def create_async(filename: str, size: int, *, cluster_size: int = 65536, version: int = 3,
                       refcount_bits: int = 16, lazy_refcounts: bool = False, backing_file: str | None = None,
                       backing_fmt: str | None = None, preallocation: str = "off", warn: Warn | None = None,
                       extended_l2: bool = False, compression_type: str = "zlib", encrypt: Any = None,
                       data_file: str | None = None, data_file_raw: bool = False) -> None:
    """Create (or overwrite) ``filename`` as a qcow2 image of ``size`` bytes (``qcow2_co_create_opts``).

    The file is created (emptied) first and deleted again if anything fails, as QEMU does.  Errors are
    QemuErrors in QEMU's words; ``EFBIG`` means the size does not fit the format.  Awaited on a running
    loop, large writes (the L1 table of a huge image) may go to the thread pool.
    """
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        code = e.errno or errno.EIO
        raise QemuError(f"Could not create '{filename}': {os.strerror(code)}", code) from None
    try:
        try:
            validate(size, cluster_size=cluster_size, version=version, refcount_bits=refcount_bits,
                     lazy_refcounts=lazy_refcounts, backing_file=backing_file, backing_fmt=backing_fmt,
                     preallocation=preallocation, extended_l2=extended_l2)
            preallocation = validate_create(version, data_file, data_file_raw, backing_file, preallocation)
            validate_compression(version, compression_type)
            ctype = L.COMPRESSION_ZSTD if compression_type == "zstd" else L.COMPRESSION_ZLIB
            _write_minimal_image(fd, cluster_size, version, refcount_bits, lazy_refcounts,
                                 (L.INCOMPAT_EXTL2 if extended_l2 else 0) | (L.INCOMPAT_COMPRESSION if ctype else 0)
                                 | (L.INCOMPAT_DATA_FILE if data_file is not None else 0),
                                 ctype)
            if data_file_raw:
                set_raw_bit(fd)
        finally:
            os.close(fd)
        await _build(filename, size, cluster_size, backing_file, backing_fmt, preallocation, warn, encrypt,
                     data_file)
    except BaseException:
        delete_file_noerr(filename, warn)
        if data_file is not None:
            delete_file_noerr(data_file, warn)
        raise


def delete_file_noerr(filename: str, warn: Warn | None) -> None:
    """``bdrv_co_delete_file_noerr`` of a ``file`` node (``raw_co_delete_file``): what cannot be deleted
    is reported at once and the creation error follows.  A data file that is the image itself is gone
    by the time its turn comes (QEMU then says it is not a regular file)."""
    try:
        regular = stat.S_ISREG(os.stat(filename).st_mode)
    except OSError:
        regular = False
    if not regular:
        report_error(warn, f"{filename} is not a regular file: {os.strerror(errno.ENOENT)}")
        return
    try:
        os.unlink(filename)
    except OSError as e:
        report_error(warn, f"Error when deleting file {filename}: {os.strerror(e.errno or errno.EIO)}")


def _write_minimal_image(fd: int, cluster_size: int, version: int, refcount_bits: int, lazy: bool,
                         incompatible: int = 0, ctype: int = 0) -> None:
    """Header in cluster 0, a one-cluster refcount table in cluster 1 pointing at cluster 2."""
    order = refcount_bits.bit_length() - 1
    header = L.Header(L.MAGIC, version, 0, 0, cluster_size.bit_length() - 1, 0, 0, 0, 0, cluster_size, 1, 0, 0,
                      incompatible, L.COMPAT_LAZY_REFCOUNTS if lazy else 0, 0, order, L.HEADER_LENGTH_V3, ctype)
    raw = L.HEADER_V2.pack(*header[:13]) + L.HEADER_V3.pack(*header[13:18]) + bytes([ctype]) + bytes(7)
    first = bytearray(3 * cluster_size)
    first[: len(raw)] = raw
    L.ENTRY.pack_into(first, cluster_size, 2 * cluster_size)
    try:
        os.pwrite(fd, bytes(first), 0)
    except OSError as e:
        code = e.errno or errno.EIO
        raise QemuError(f"Could not write qcow2 header: {os.strerror(code)}", code) from None


def _open_new(filename: str, flags: OpenFlags, warn: Warn, data_file: str | None = None) -> BlockDriver:
    """The new image as a qcow2 node over a file node (no backing file, no options to check), opened
    here rather than through ``backend.open_node``: drivers stay below the generic layer."""
    from qio.block import registry

    file_cls, fmt_cls = registry.find("file"), registry.find("qcow2")
    assert file_cls is not None and fmt_cls is not None
    file = file_cls()
    file.flags = flags
    file.open({"filename": filename}, flags)
    node = fmt_cls()
    node.warn = warn
    node.flags = flags
    node.filename = file.filename
    node.children.append(Child("file", file))
    node.refresh_limits()
    opts: dict[str, Any] = {}
    if data_file is not None:  # qcow2_co_create opens the new image with its data file node
        def open_child(o: dict[str, Any], fl: OpenFlags, _positional: bool) -> BlockDriver:
            assert file_cls is not None
            child = file_cls()
            child.flags = fl
            child.open(o, fl)
            return child

        node.open_child = open_child
        opts["data-file.filename"] = data_file
    try:
        node.open(opts, flags)
    except BaseException:
        file.closed()
        raise
    return node


async def _build(filename: str, size: int, cluster_size: int, backing_file: str | None, backing_fmt: str | None,
                 preallocation: str, warn: Warn | None, encrypt: Any = None, data_file: str | None = None) -> None:
    """Open the minimal image with the qcow2 driver and let it make itself consistent and grow."""
    from qio.block.qcow2.driver import Qcow2Driver
    from qio.block.qcow2.header import update_header
    from qio.block.qcow2.refcount import alloc_clusters

    flags = OpenFlags()
    flags.no_flush = True
    node = _open_new(filename, flags, warn or (lambda _m: None), data_file)
    assert isinstance(node, Qcow2Driver)
    node.s.image_data_file = data_file

    async def build() -> None:
        try:
            if await alloc_clusters(node.s, 3 * cluster_size) != 0:
                raise QemuError("Huh, first cluster in empty image is already in use?")
        except BlockError as e:
            raise QemuError.wrap(e, "Could not allocate clusters for qcow2 header and refcount table") from None
        try:
            await update_header(node.s)
        except BlockError as e:
            raise QemuError.wrap(e, "Could not update qcow2 header") from None
        try:
            try:
                await node.co_truncate(size, False, preallocation)
            except BlockError as e:
                raise QemuError(str(e), e.code) from None
        except QemuError as e:
            raise QemuError(f"Could not resize image: {e}", e.errno) from None
        if backing_file is not None:
            node.s.image_backing_file = backing_file
            node.s.image_backing_format = backing_fmt
            try:
                await update_header(node.s)
            except BlockError as e:
                raise QemuError(f"Could not assign backing file '{backing_file}' with format '{backing_fmt}': {e}",
                                e.code) from None
        if encrypt is not None:  # qcow2_set_up_encryption
            from qio.block.qcow2.crypt import set_up_qcow2

            await set_up_qcow2(node, encrypt)
        await node.close()

    try:
        await build()
    except BlockError as e:
        raise QemuError.wrap(e, f"Could not create '{filename}'") from None
    finally:
        for c in node.children:
            c.node.closed()
        node.closed()
