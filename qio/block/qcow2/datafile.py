"""External data files (``data_file``/``data_file_raw``): guest data in a separate node, metadata in
the qcow2 file.

QEMU keeps one pointer for guest data, ``s->data_file``: the image's own file child, or the external
data file child when the image has the ``data file`` incompatible bit.  qio mirrors that seam with
``Qcow2State.data_file`` (every guest-data read, write, zero write, discard pass-through and
preallocation goes there) and ``has_data_file``/``data_file_is_raw`` in ``state.py``.  This module
holds what only exists because of data files: the header extension, opening the child at open time
(``qcow2_do_open``), the fields ``info`` shows and the checks of ``qcow2_co_create``.
"""

from __future__ import annotations

import errno
from typing import Any

from qio.block.driver import BlockDriver, Child
from qio.block.errors import QemuError
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_ALL, PERM_RESIZE
from qio.block.qcow2 import layout as L
from qio.block.qcow2.state import Qcow2State, data_file_is_raw, has_data_file
from qio.qemuopts import sub_options

CHILD_NAME = "data-file"


def read_ext(s: Qcow2State, data: bytes) -> None:
    """The data file name extension: a string of ``length`` bytes, cut at its first NUL (QEMU reads
    it into a zeroed buffer one byte longer and uses it as a C string)."""
    s.image_data_file = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def ext_record(s: Qcow2State) -> bytes:
    """The header extension ``qcow2_update_header`` writes (only while the image has a data file)."""
    if has_data_file(s) and s.image_data_file is not None:
        return L.ext_record(L.EXT_DATA_FILE, s.image_data_file.encode("utf-8", "surrogateescape"))
    return b""


def _inherit(options: dict[str, Any], child: dict[str, Any], flags: OpenFlags) -> OpenFlags:
    """``bdrv_inherited_options`` for a data child of a format: read-only, cache and force-share
    options default to the parent's; discard defaults to unmap."""
    for key in ("read-only", "cache.direct", "cache.no-flush", "force-share"):
        if key in options:
            child.setdefault(key, options[key])
    cflags = flags.copy()
    cflags.unmap = True
    return cflags


def open_data_file(s: Qcow2State, options: dict[str, Any], flags: OpenFlags) -> None:
    """The data file part of ``qcow2_do_open`` (after the header extensions were read)."""
    bs = s.bs
    sub = sub_options(options, CHILD_NAME)
    ref = options.pop(CHILD_NAME, None)
    incompat = bool(s.incompatible_features & L.INCOMPAT_DATA_FILE)
    if flags.no_io:
        # qemu-img info does not open the data file (an untrusted image may name any file); the
        # image still counts as having one
        if incompat:
            s.data_node = _NoIO()
        return
    opener = bs.open_child
    node = None
    if isinstance(ref, str):
        if sub:
            raise QemuError("Cannot reference an existing block device with additional options or a new filename")
        raise QemuError(f"Cannot find device='{ref}' nor node-name='{ref}'")
    if ref is not None and not isinstance(ref, str):
        raise QemuError(f"Invalid parameter type for '{CHILD_NAME}', expected: string")
    if sub:
        assert opener is not None
        cflags = _inherit(options, sub, flags)
        node = _attach(s, opener(sub, cflags, False))
    if incompat:
        if node is None and s.image_data_file is not None:
            assert opener is not None
            # the name from the image is a plain file name: QEMU 7.2 applies no protocol prefix and no
            # json: syntax to it
            child = {"driver": "file", "filename": s.image_data_file}
            cflags = _inherit(options, child, flags)
            node = _attach(s, opener(child, cflags, False))
        if node is None:
            raise QemuError("'data-file' is required for this image", errno.EINVAL)
        s.data_node = node
        bs.children.append(Child(CHILD_NAME, node))
    else:
        if node is not None:
            _close(node)
            raise QemuError("'data-file' can only be set for images with an external data file", errno.EINVAL)
        if data_file_is_raw(s):
            raise QemuError("data-file-raw requires a data file", errno.EINVAL)


def _take_perms(node: BlockDriver, perm: int, shared: int) -> None:
    """Lock a subtree with the permissions given (``bdrv_refresh_perms`` at attach time); the final
    permissions are applied when the BlockBackend attaches."""
    if node.flags.force_share:
        shared = PERM_ALL
    for c in node.children:
        cperm, cshared = node.child_perm(c, perm, shared)
        _take_perms(c.node, cperm, cshared)
    node.set_perm(perm, shared)


def _attach(s: Qcow2State, node: BlockDriver) -> BlockDriver:
    """``bdrv_open_child`` of the data file inside ``qcow2_do_open``: the new child is attached while
    the image node has no parent yet.  Its ``file`` child then already holds the open-time locks of a
    metadata child (consistent read, plus write and resize when writable; write and resize unshared),
    and the data child asks for no permission and unshares resize (``bdrv_default_perms_for_storage``
    of a pure data child).  A data file that is the image's own file therefore fails on the shared
    resize lock, as in QEMU, and not on the write lock the final permissions would name."""
    try:
        for c in s.bs.children:
            if c.name == "file":
                fperm, fshared = s.bs.child_perm(c, 0, PERM_ALL)
                _take_perms(c.node, fperm, fshared)
        _take_perms(node, 0, PERM_ALL & ~PERM_RESIZE)
    except BaseException:
        _close(node)
        raise
    return node


def _close(node: BlockDriver) -> None:
    for c in node.children:
        _close(c.node)
    node.closed()


def close_on_failure(s: Qcow2State) -> None:
    """Release the data file node when the open fails after it was opened (``bdrv_unref_child``)."""
    node = s.data_node
    if node is None or isinstance(node, _NoIO):
        return
    s.data_node = None
    s.bs.children[:] = [c for c in s.bs.children if c.name != CHILD_NAME]
    _close(node)


def specific_info(s: Qcow2State) -> list[tuple[str, Any]]:
    """The ``data-file``/``data-file-raw`` fields of ``qcow2_get_specific_info`` (v3 only)."""
    out: list[tuple[str, Any]] = []
    if s.image_data_file is not None:
        out.append(("data-file", s.image_data_file))
    if has_data_file(s):
        out.append(("data-file-raw", data_file_is_raw(s)))
    return out


def validate_create(version: int, data_file: str | None, data_file_raw: bool, backing_file: str | None,
                    preallocation: str) -> str:
    """The data file checks of ``qcow2_co_create`` (in its order); returns the preallocation to use
    (``data_file_raw`` needs a 1:1 mapping, so ``off`` becomes ``metadata``)."""
    if data_file_raw and data_file is None:
        raise QemuError("data-file-raw requires data-file", errno.EINVAL)
    if data_file_raw and backing_file is not None:
        raise QemuError("Backing file and data-file-raw cannot be used at the same time", errno.EINVAL)
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"
    if data_file is not None and version < 3:
        raise QemuError("External data files are only supported with compatibility level 1.1 and above "
                        "(use version=v3 or greater)", errno.EINVAL)
    return preallocation


def set_raw_bit(fd: int) -> None:
    """The ``data_file_raw`` autoclear bit of the minimal header ``qcow2_co_create`` writes first."""
    import os

    os.pwrite(fd, L.ENTRY.pack(L.AUTOCLEAR_DATA_FILE_RAW), L.OFF_INCOMPATIBLE_FEATURES + 16)


class _NoIO(BlockDriver):
    """Stands for the unopened data file of an image opened without I/O (``qemu-img info``): QEMU's
    ``s->data_file == NULL``, which still makes ``has_data_file`` true.  Never used for I/O."""

    format_name = "data-file"
