"""Open flags and the parsers of qemu-io's ``-t`` (cache), ``-d`` (discard) and ``-i`` (aio) modes."""

from __future__ import annotations


class OpenFlags:
    """What ``bdrv_open`` was asked for (``BDRV_O_*`` and the cache mode)."""

    __slots__ = ("aio", "check", "copy_on_read", "force_share", "native_aio", "no_flush", "nocache",
                 "read_only", "snapshot", "unmap", "writethrough")

    def __init__(self) -> None:
        self.read_only = False
        self.nocache = False  # O_DIRECT
        self.no_flush = False  # cache=unsafe
        self.writethrough = True  # BlockBackend write cache disabled
        self.unmap = True  # discard=unmap
        self.native_aio = False
        self.aio = "threads"
        self.force_share = False
        self.snapshot = False
        self.copy_on_read = False
        self.check = False  # BDRV_O_CHECK (qemu-img check): no dirty repair or corrupt refusal at open

    def copy(self) -> OpenFlags:
        new = OpenFlags()
        for name in self.__slots__:
            setattr(new, name, getattr(self, name))
        return new



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
