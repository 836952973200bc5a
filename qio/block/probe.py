"""Format probing: which format does an image's first sector look like?

QEMU asks every format driver to score the first bytes and picks the highest.  qio knows the magic
of QEMU's image formats (not only those it implements) so that probing a foreign image, and the
probed-raw sector-0 write check, decide exactly as QEMU would.
"""

from __future__ import annotations

import struct


def probe_format(buf: bytes, filename: str) -> str:
    """Name of the format QEMU 7.2 would pick for an image starting with ``buf``."""
    if len(buf) >= 8 and buf[:4] == b"QFI\xfb":
        version = struct.unpack(">I", buf[4:8])[0]
        return "qcow2" if version >= 2 else "qcow"
    if buf[:4] == b"QED\x00":
        return "qed"
    if buf[:8] == b"conectix":
        return "vpc"
    if buf[:8] == b"vhdxfile":
        return "vhdx"
    if buf[:6] == b"LUKS\xba\xbe":
        return "luks"
    if buf[:4] in (b"KDMV", b"COWD"):
        return "vmdk"
    if len(buf) >= 0x44 and struct.unpack("<I", buf[0x40:0x44])[0] == 0xBEDA107F:
        return "vdi"
    if buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return "parallels"
    if buf[:32].rstrip(b"\x00") in (b"Bochs Virtual HD Image",):
        return "bochs"
    if buf.startswith(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1"):
        return "cloop"
    if filename.endswith(".dmg") and len(buf) > 0:
        return "dmg"
    if buf.startswith(b"# Disk DescriptorFile") or b"\n# Disk DescriptorFile" in buf[:512]:
        return "vmdk"
    return "raw"
