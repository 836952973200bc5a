"""Format probing: which format does an image's first sector look like?

QEMU asks every format driver to score the first 512 bytes (zero-filled past the end of the file) and
picks the highest score; raw scores 1.  qio reproduces each QEMU 7.2 probe function (not only those of
the formats it implements) so that probing a foreign or damaged image, and the probed-raw sector-0
write check, decide exactly as QEMU would: a file with qcow's magic but version 0, for instance, is
no format's and probes as raw.
"""

from __future__ import annotations

import struct

_CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def _cstr(buf: bytes, start: int, size: int) -> bytes:
    """A C string in a fixed-size field (``strcmp`` stops at the first NUL; none: the field runs on)."""
    end = buf.find(b"\x00", start)
    return buf[start:end if end >= 0 else len(buf)] if start < len(buf) else b""


def _vmdk_descriptor(buf: bytes) -> bool:
    """``vmdk_probe`` for a text descriptor: comment and blank lines, then ``version=1|2|3``."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p:p + 1]
        if c == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl
            p += 1
            continue
        if c == b" ":
            while p < end and buf[p:p + 1] == b" ":
                p += 1
            if p < end and buf[p:p + 1] == b"\r":
                p += 1
            if p == end or buf[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        rest = buf[p:]
        return any(rest.startswith(f"version={v}{nl}".encode()) for v in "123" for nl in ("\n", "\r\n"))
    return False


def _scores(buf: bytes, filename: str | None) -> list[tuple[str, int]]:
    n = len(buf)

    def be32(off: int) -> int:
        return int(struct.unpack_from(">I", buf, off)[0]) if n >= off + 4 else -1

    def le32(off: int) -> int:
        return int(struct.unpack_from("<I", buf, off)[0]) if n >= off + 4 else -1

    qfi = n >= 112 and buf[:4] == b"QFI\xfb"
    out = [
        ("qcow2", 100 if qfi and be32(4) >= 2 else 0),
        ("qcow", 100 if n >= 48 and buf[:4] == b"QFI\xfb" and be32(4) == 1 else 0),
        ("qed", 100 if n >= 68 and buf[:4] == b"QED\x00" else 0),
        ("vpc", 100 if buf[:8] == b"conectix" else 0),
        ("vhdx", 100 if buf[:8] == b"vhdxfile" else 0),
        ("luks", 100 if n >= 40 and buf[:6] == b"LUKS\xba\xbe" and buf[6:8] == b"\x00\x01" else 0),
        ("vmdk", 100 if n >= 4 and (buf[:4] in (b"KDMV", b"COWD") or _vmdk_descriptor(buf)) else 0),
        ("vdi", 100 if n >= 512 and le32(0x40) == 0xBEDA107F else 0),
        ("parallels", 100 if n >= 64 and buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
         and le32(16) == 2 else 0),
        ("bochs", 100 if n >= 512 and _cstr(buf, 0, 32) == b"Bochs Virtual HD Image"
         and _cstr(buf, 32, 16) == b"Redolog" and _cstr(buf, 48, 16) == b"Growing"
         and le32(64) in (0x00020000, 0x00010000) else 0),
        ("cloop", 2 if buf[:len(_CLOOP)] == _CLOOP[:n] else 0),
        ("dmg", 2 if filename and len(filename) > 4 and filename.endswith(".dmg") else 0),
        ("raw", 1),
    ]
    return out


def probe_format(buf: bytes, filename: str | None) -> str:
    """Name of the format QEMU 7.2 would pick for an image starting with ``buf`` (``bdrv_probe_all``:
    the highest score, the first driver on a tie)."""
    best, score = "raw", 0
    for name, s in _scores(buf, filename):
        if s > score:
            best, score = name, s
    return best
