"""The legacy qcow/qcow2 AES encryption (``crypto/block-qcow.c``): AES-128-CBC, plain64 IVs, the
passphrase's first 16 bytes as the key."""

from __future__ import annotations

from qio.block.errors import QemuError
from qio.crypto.block import CryptoBlock
from qio.crypto.cipher import Cipher, IVGen

SECTOR_SIZE = 512


def qcow_open(key_secret: str | None, optprefix: str, no_io: bool) -> CryptoBlock:
    """``qcrypto_block_qcow_open``."""
    block = CryptoBlock("qcow", SECTOR_SIZE, 0)
    if no_io:
        return block
    if key_secret is None:
        raise QemuError(f"Parameter '{optprefix}key-secret' is required for cipher")
    return qcow_init(block, key_secret)


def qcow_init(block: CryptoBlock, key_secret: str) -> CryptoBlock:
    from qio.secrets import lookup_as_utf8

    password = lookup_as_utf8(key_secret)
    key = password[:16].ljust(16, b"\0")
    block.cipher = Cipher("aes-128", "cbc", key)
    block.ivgen = IVGen("plain64", block.cipher.niv)
    return block
