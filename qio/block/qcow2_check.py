"""Consistency check and repair of qcow2 refcounts (QEMU's ``qcow2_check_refcounts``), used when a
dirty image (lazy refcounts, not closed cleanly) is opened read-write."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from qio.block.errors import QemuError

if TYPE_CHECKING:
    from qio.block.qcow2 import Qcow2Driver


async def repair_dirty(drv: Qcow2Driver) -> None:
    raise QemuError("qio cannot repair a dirty qcow2 image yet; run 'qemu-img check -r all' on it",
                    errno.ENOTSUP)
