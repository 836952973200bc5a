"""LUKS1 headers compared across tools: what is random in a new volume (digest, salts, iteration counts,
UUID, key material) masked, and where qcow2's crypto header extension puts the header."""

from __future__ import annotations

import struct


def mask_luks(raw: bytearray, base: int) -> None:
    """Zero what is random in the LUKS1 header at ``base``: digest, salts, iteration counts, UUID, key material."""
    raw[base + 112:base + 208] = bytes(96)
    for i in range(8):
        slot = base + 208 + 48 * i
        raw[slot + 4:slot + 40] = bytes(36)
    payload = struct.unpack_from(">I", raw, base + 104)[0] * 512
    raw[base + 4096:base + payload] = bytes(payload - 4096)


def crypto_ext(raw: bytes | bytearray) -> tuple[int, int]:
    """(offset, length) of the LUKS header named by a qcow2 image's crypto header extension."""
    pos = struct.unpack_from(">I", raw, 100)[0]
    while True:
        magic, length = struct.unpack_from(">II", raw, pos)
        if magic == 0x0537BE77:
            off, ln = struct.unpack_from(">QQ", raw, pos + 8)
            return off, ln
        assert magic
        pos += 8 + (length + 7) // 8 * 8
