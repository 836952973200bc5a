"""The driver registry: format and protocol names to driver classes, imported on first use.

Lazy imports keep ``qio -c`` start-up short: a raw image never loads the qcow2 or blkdebug code.
"""

from __future__ import annotations

import errno
import importlib

from qio.block.driver import BlockDriver
from qio.block.errors import QemuError

_MODULES = {
    "file": ("qio.block.file", "FileDriver"),
    "host_device": ("qio.block.file", "HostDeviceDriver"),
    "host_cdrom": ("qio.block.file", "HostCdromDriver"),
    "raw": ("qio.block.raw", "RawDriver"),
    "blkdebug": ("qio.block.blkdebug", "BlkdebugDriver"),
    "nbd": ("qio.block.nbd", "NbdDriver"),
}
#: Filename prefixes (``blkdebug:cfg:img``) that select a protocol driver.
PROTOCOL_PREFIXES = {"file": "file", "host_device": "host_device", "host_cdrom": "host_cdrom", "blkdebug": "blkdebug",
                     "nbd": "nbd", "nbd+tcp": "nbd", "nbd+unix": "nbd"}
FORMATS: tuple[str, ...] = ("raw",)


def register(name: str, module: str, cls: str, *, protocol_prefix: bool = False,
             is_format: bool = False) -> None:
    """Add a driver; later drivers (blkdebug, qcow2) plug in here."""
    _MODULES[name] = (module, cls)
    if protocol_prefix:
        PROTOCOL_PREFIXES[name] = name
    if is_format:
        global FORMATS
        FORMATS = (*FORMATS, name)


def protocol_of(filename: str) -> str | None:
    """``path_has_protocol``: the ``proto:`` prefix of a file name (a ':' before any '/'), or None."""
    for i, ch in enumerate(filename):
        if ch == "/":
            return None
        if ch == ":":
            return filename[:i]
    return None


#: Image creation with default options (``bdrv_create``), by format: module and function.
_CREATORS = {"qcow2": ("qio.block.qcow2.create", "create")}


def create(fmt: str, filename: str, size: int) -> None:
    """``bdrv_create(drv, filename, size)``: a new image; for the ``-s`` overlay."""
    entry = _CREATORS.get(fmt)
    if entry is None:
        raise QemuError(f"Driver '{fmt}' does not support image creation", errno.ENOTSUP)
    getattr(importlib.import_module(entry[0]), entry[1])(filename, size)


def find(name: str) -> type[BlockDriver] | None:
    entry = _MODULES.get(name)
    if entry is None:
        return None
    cls: type[BlockDriver] = getattr(importlib.import_module(entry[0]), entry[1])
    return cls
register("qcow2", "qio.block.qcow2", "Qcow2Driver", is_format=True)
register("luks", "qio.block.luks", "LuksDriver", is_format=True)
register("null-co", "qio.block.null", "NullCoDriver", protocol_prefix=True)
register("null-aio", "qio.block.null", "NullAioDriver", protocol_prefix=True)
register("blklogwrites", "qio.block.blklogwrites", "BlkLogWritesDriver")
register("compress", "qio.block.compress_filter", "CompressDriver")
