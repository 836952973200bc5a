"""``QCryptoBlock``: an unlocked encryption context that formats (qcow2, luks) call per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qio.crypto.cipher import Cipher, IVGen, crypt_sectors


@dataclass
class CryptoBlock:
    """The cipher and IV generator of an opened header (None when opened without I/O, as ``qemu-img info``
    does), the sector size the IVs count in and where the payload starts."""

    fmt: str
    sector_size: int
    payload_offset: int
    cipher: Cipher | None = None
    ivgen: IVGen | None = None
    info_fields: list[tuple[str, Any]] = field(default_factory=list)
    header: Any = None

    def encrypt(self, offset: int, buf: bytearray | memoryview) -> None:
        """``qcrypto_block_encrypt``: in place; ``offset`` counts sectors for the IVs."""
        assert self.cipher is not None
        crypt_sectors(self.cipher, self.ivgen, self.sector_size, offset, buf, True)

    def decrypt(self, offset: int, buf: bytearray | memoryview) -> None:
        """``qcrypto_block_decrypt``: in place."""
        assert self.cipher is not None
        crypt_sectors(self.cipher, self.ivgen, self.sector_size, offset, buf, False)
