"""The ``compress`` filter driver (QEMU 7.2 block/filter-compress.c): every data write that reaches the
node goes to its ``file`` child as a compressed write (``REQ_WRITE_COMPRESSED``).

Why: it lets a plain ``write`` (or any writer that knows nothing of ``-c``) produce compressed clusters,
e.g. ``--image-opts driver=compress,file.driver=qcow2,file.file.filename=img``.  Its request alignment is
the child's cluster size, so partial-cluster writes become read-modify-write of whole clusters in the
generic layer, as in QEMU.  Zero writes and discards pass through unchanged.

The ``file`` child is opened by the generic layer like a format's (the command line's file name, or
``file.*`` options); when that child cannot take compressed writes (a ``file`` or ``raw`` node) the open
fails with QEMU's "Compression is not supported for underlying format: NAME".
"""

from __future__ import annotations

import errno
import json
from typing import Any

from qio.block import io
from qio.block.driver import REQ_FUA, REQ_WRITE_COMPRESSED, BlockDriver, BlockInfo, IOVec
from qio.block.errors import QemuError
from qio.block.modes import OpenFlags


def _plain_options(node: BlockDriver) -> dict[str, Any] | None:
    """The options of a node chain opened from nothing but drivers and a file name (what QEMU's
    ``full_open_options`` holds then), or None for anything else (qio then keeps the plain name)."""
    opts = {k: v for k, v in node.open_options.items() if k not in ("driver", "node-name")}
    if node.format_name == "qcow2":  # only its encryption secret is a strong option (qcow2_strong_runtime_opts)
        opts = {k: v for k, v in opts.items() if k.startswith("encrypt.")}
    out: dict[str, Any] = {"driver": node.format_name}
    if node.children:
        if opts or len(node.children) != 1 or node.children[0].name != "file":
            return None
        sub = _plain_options(node.children[0].node)
        if sub is None:
            return None
        out["file"] = sub
        return out
    if node.format_name != "file" or not isinstance(opts.get("filename"), str):
        return None  # file-posix's json: form holds only its file name
    out["filename"] = opts["filename"]
    return out


class CompressDriver(BlockDriver):
    format_name = "compress"
    is_filter = True
    #: Opened like a format (bdrv_open_inherit opens the ``file`` child of every non-protocol driver).
    is_format = True

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        """``compress_open``: the child must be a driver that can write compressed clusters."""
        child = self.file
        if not child.can_compress:
            raise QemuError("Compression is not supported for underlying format: "
                            f"{child.format_name or '(no format)'}", errno.ENOTSUP)
        self.supported_write_flags = child.supported_write_flags & REQ_FUA
        self.supported_zero_flags = child.supported_zero_flags
        self.refresh_limits()
        tree = _plain_options(child)
        if tree is not None:  # bdrv_refresh_filename: the filter has no strong options, so a json: name
            self.filename = "json:" + json.dumps({"driver": "compress", "file": tree})

    def get_info(self) -> BlockInfo | None:
        """``bdrv_get_info`` of a filter is its child's."""
        return self.file.get_info()

    def refresh_limits(self) -> None:
        """``compress_refresh_limits``: whole clusters of the child are the unit of every request."""
        super().refresh_limits()
        info = self.file.get_info() if self.children else None
        if info is not None and info.cluster_size:
            self.request_alignment = info.cluster_size

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        """QEMU's compress filter has no ``bdrv_reopen_prepare``: reopening it fails."""
        raise QemuError(f"Block format 'compress' used by node '{self.node_name}' "
                        "does not support reopening files")

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        await io.preadv(self.file, offset, nbytes, qiov)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        await io.pwritev(self.file, offset, nbytes, qiov, flags | REQ_WRITE_COMPRESSED)

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        await io.pwrite_zeroes(self.file, offset, nbytes, flags)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        await io.pdiscard(self.file, offset, nbytes)

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        return await io.block_status(self.file, offset, nbytes)  # the default of filters: BDRV_BLOCK_RAW

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        """A filter without its own resize resizes its child (``bdrv_co_truncate``)."""
        await io.truncate(self.file, offset, exact, prealloc, flags)
