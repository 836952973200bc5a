"""Open flags and the parsers of qemu-io's ``-t`` (cache), ``-d`` (discard) and ``-i`` (aio) modes."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True)
class OpenFlags:
    """What ``bdrv_open`` was asked for (``BDRV_O_*`` and the cache mode)."""

    read_only: bool = False
    #: O_DIRECT.
    nocache: bool = False
    #: cache=unsafe.
    no_flush: bool = False
    #: BlockBackend write cache disabled.
    writethrough: bool = True
    #: discard=unmap.
    unmap: bool = True
    native_aio: bool = False
    aio: str = "threads"
    force_share: bool = False
    snapshot: bool = False
    copy_on_read: bool = False
    #: BDRV_O_CHECK (qemu-img check): no dirty repair or corrupt refusal at open.
    check: bool = False
    #: BDRV_O_NO_IO (qemu-img info): encrypted images open without their key;
    #: qcow2 does not open its data file.
    no_io: bool = False

    def copy(self) -> OpenFlags:
        return replace(self)


def parse_cache_mode(mode: str, flags: OpenFlags) -> bool:
    """``bdrv_parse_cache_mode``: set nocache/no_flush/writethrough; False if unknown."""
    table = {"off": (True, False, False), "none": (True, False, False), "directsync": (True, False, True),
             "writeback": (False, False, False), "unsafe": (False, True, False),
             "writethrough": (False, False, True)}
    if mode not in table:
        return False
    flags.nocache, flags.no_flush, flags.writethrough = table[mode]
    return True


def parse_discard_mode(mode: str, flags: OpenFlags) -> bool:
    if mode in ("off", "ignore"):
        flags.unmap = False
    elif mode in ("on", "unmap"):
        flags.unmap = True
    else:
        return False
    return True


def parse_aio_mode(mode: str, flags: OpenFlags) -> bool:
    if mode not in ("threads", "native", "io_uring"):
        return False
    flags.aio = mode
    if mode == "native":
        flags.native_aio = True
    return True


#: The option letters qemu-io's command line and its ``open`` command decode alike.
OPEN_FLAG_OPTIONS = frozenset("sCnrkUtdi")


def set_open_flag(letter: str, arg: str, flags: OpenFlags) -> str | None:
    """Apply one of :data:`OPEN_FLAG_OPTIONS` to ``flags``: the error message of a bad mode argument
    (``-t``, ``-d``, ``-i``), else None."""
    if letter == "s":
        flags.snapshot = True
    elif letter == "C":
        flags.copy_on_read = True
    elif letter == "n":
        flags.nocache, flags.writethrough = True, False
    elif letter == "r":
        flags.read_only = True
    elif letter == "k":
        flags.native_aio = True
    elif letter == "U":
        flags.force_share = True
    elif letter == "t":
        return None if parse_cache_mode(arg, flags) else f"Invalid cache option: {arg}"
    elif letter == "d":
        return None if parse_discard_mode(arg, flags) else f"Invalid discard option: {arg}"
    elif letter == "i":
        return None if parse_aio_mode(arg, flags) else f"Invalid aio option: {arg}"
    return None
