"""Ciphers, IV generators and the sector-wise encryption helper (``crypto/cipher.c``, ``crypto/ivgen*.c``,
``qcrypto_block_cipher_{en,de}crypt_helper``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from qio.block.errors import QemuError, assert_fail

#: QEMU's cipher algorithm names with (family, key bytes, block bytes).  No ``sm4``: QEMU 7.2 as Debian builds
#: it (nettle 3.8, no ``CONFIG_CRYPTO_SM4``) has no such value (``does not accept value 'sm4'``).
CIPHER_ALGS: dict[str, tuple[str, int, int]] = {
    "aes-128": ("aes", 16, 16), "aes-192": ("aes", 24, 16), "aes-256": ("aes", 32, 16),
    "des": ("des", 8, 8), "3des": ("3des", 24, 8), "cast5-128": ("cast5", 16, 8),
    "serpent-128": ("serpent", 16, 16), "serpent-192": ("serpent", 24, 16), "serpent-256": ("serpent", 32, 16),
    "twofish-128": ("twofish", 16, 16), "twofish-192": ("twofish", 24, 16), "twofish-256": ("twofish", 32, 16),
}
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
#: QEMU's hash algorithm names (``QCryptoHashAlgorithm``) with their hashlib names.
HASH_ALGS = {"md5": "md5", "sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
             "sha512": "sha512", "ripemd160": "ripemd160"}


def digest_len(hash_alg: str) -> int:
    return hashlib.new(HASH_ALGS[hash_alg]).digest_size


def hash_bytes(hash_alg: str, data: bytes) -> bytes:
    return hashlib.new(HASH_ALGS[hash_alg], data).digest()


def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """``qcrypto_pbkdf2`` (hashlib's C implementation)."""
    return hashlib.pbkdf2_hmac(HASH_ALGS[hash_alg], password, salt, iterations, length)


#: Families that come from the system's libnettle (``qio/crypto/nettle.py``); the others from ``cryptography``.
NETTLE_FAMILIES = ("serpent", "twofish")


def _algorithm(alg: str, key: bytes) -> Any:
    """A ``cryptography`` algorithm object for QEMU's cipher name."""
    from cryptography.hazmat.primitives.ciphers import algorithms

    family = CIPHER_ALGS[alg][0]
    if family == "aes":
        return algorithms.AES(key)
    from cryptography.hazmat.decrepit.ciphers import algorithms as old

    if family == "cast5":
        return old.CAST5(key)
    return old.TripleDES(key if family == "3des" else key * 3)


class Cipher:
    """``QCryptoCipher``: one algorithm, mode and key; the IV is given per call.  QEMU's key checks, then the
    backend: libnettle for serpent and twofish, OpenSSL (``cryptography``) for the rest."""

    def __init__(self, alg: str, mode: str, key: bytes) -> None:
        family, keylen, self.block = CIPHER_ALGS[alg]
        if mode == "xts":
            if family in ("des", "3des"):
                raise QemuError("XTS mode not compatible with DES/3DES")
            if len(key) % 2:
                raise QemuError("XTS cipher key length should be a multiple of 2")
            if len(key) != keylen * 2:
                raise QemuError(f"Cipher key length {len(key)} should be {keylen * 2}")
            if self.block != 16:  # cast5: QEMU's backends have no 64-bit-block XTS
                raise QemuError(f"Unsupported cipher mode {mode}")
        elif len(key) != keylen:
            raise QemuError(f"Cipher key length {len(key)} should be {keylen}")
        self.alg, self.mode, self.key = alg, mode, key
        self.niv = 0 if mode == "ecb" else self.block
        self._impl: _Backend
        if family in NETTLE_FAMILIES:
            from qio.crypto.nettle import NettleCipher

            self._impl = NettleCipher(alg, family, mode, key)
        else:
            self._impl = _OpenSSLBackend(alg, mode, key)

    def encrypt(self, data: bytes | memoryview, iv: bytes = b"") -> bytes:
        return self._impl.crypt(data, iv, True)

    def decrypt(self, data: bytes | memoryview, iv: bytes = b"") -> bytes:
        return self._impl.crypt(data, iv, False)


class _Backend(Protocol):
    def crypt(self, data: bytes | memoryview, iv: bytes, encrypt: bool) -> bytes: ...


class _OpenSSLBackend:
    """The ``cryptography`` package; XTS built from two ECB ciphers where OpenSSL has none for the key
    (AES-192) or refuses it (equal halves)."""

    def __init__(self, alg: str, mode: str, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher as _C
        from cryptography.hazmat.primitives.ciphers import algorithms, modes

        self.mode = mode
        self._C, self._modes = _C, modes
        self._xts: tuple[Cipher, Cipher] | None = None
        self._algo: Any = None
        if mode == "xts":
            half = len(key) // 2
            if CIPHER_ALGS[alg][0] == "aes" and half in (16, 32) and key[:half] != key[half:]:
                self._algo = algorithms.AES(key)
            else:
                self._xts = (Cipher(alg, "ecb", key[:half]), Cipher(alg, "ecb", key[half:]))
        else:
            self._algo = _algorithm(alg, key)

    def _mode(self, iv: bytes) -> Any:
        m = self._modes
        if self.mode == "ecb":
            return m.ECB()
        if self.mode == "cbc":
            return m.CBC(iv)
        if self.mode == "ctr":
            return m.CTR(iv)
        return m.XTS(iv)

    def crypt(self, data: bytes | memoryview, iv: bytes, encrypt: bool) -> bytes:
        if self._xts is not None:
            return self._xts_crypt(data, iv, encrypt)
        c = self._C(self._algo, self._mode(iv))
        op = c.encryptor() if encrypt else c.decryptor()
        return op.update(data) + op.finalize()

    def _xts_crypt(self, data: bytes | memoryview, iv: bytes, enc: bool) -> bytes:
        """XTS (IEEE P1619, as ``crypto/xts.c``) over ECB: whole blocks, the tweak doubled in GF(2^128)."""
        assert self._xts is not None
        data1, data2 = self._xts
        n = len(data)
        if n % 16:
            raise QemuError("XTS data must be a multiple of the block size")
        t = int.from_bytes(data2.encrypt(iv), "little")
        tweaks = bytearray()
        mask = (1 << 128) - 1
        for _ in range(n // 16):
            tweaks += t.to_bytes(16, "little")
            t <<= 1
            if t >> 128:
                t = (t & mask) ^ 0x87
        tw = int.from_bytes(tweaks, "little")
        x = (int.from_bytes(data, "little") ^ tw).to_bytes(n, "little")
        y = data1.encrypt(x) if enc else data1.decrypt(x)
        return (int.from_bytes(y, "little") ^ tw).to_bytes(n, "little")


@dataclass
class IVGen:
    """``QCryptoIVGen``: the IV of a sector number (plain: 32 bits, plain64: 64 bits, essiv: encrypted)."""

    alg: str
    niv: int
    essiv: Cipher | None = None

    @classmethod
    def new(cls, alg: str, cipher_alg: str, hash_alg: str | None, key: bytes, niv: int) -> IVGen:
        if alg != "essiv":
            return cls(alg, niv)
        assert hash_alg is not None
        salt = hash_bytes(hash_alg, key)[:CIPHER_ALGS[cipher_alg][1]]
        return cls(alg, niv, Cipher(cipher_alg, "ecb", salt))

    def calculate(self, sector: int) -> bytes:
        if self.alg == "plain":
            raw = (sector & 0xFFFFFFFF).to_bytes(4, "little")
        elif self.alg == "plain64":
            raw = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
        else:
            assert self.essiv is not None
            nd = self.essiv.block
            data = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")[:nd].ljust(nd, b"\0")
            raw = self.essiv.encrypt(data)
        return raw[:self.niv].ljust(self.niv, b"\0")


def crypt_sectors(cipher: Cipher, ivgen: IVGen | None, sector_size: int, offset: int, buf: bytearray | memoryview,
                  encrypt: bool) -> None:
    """``qcrypto_block_cipher_{en,de}crypt_helper``: each sector with the IV of its number, in place."""
    mv = memoryview(buf)
    if len(mv) % sector_size:  # a 24-byte master key's split key (192-bit ciphers but XTS): 96000 bytes
        assert_fail("../../crypto/block.c:372: do_qcrypto_block_cipher_encdec", "QEMU_IS_ALIGNED(len, sectorsize)")
    if cipher.niv == 0 or ivgen is None:
        out = cipher.encrypt(mv) if encrypt else cipher.decrypt(mv)
        mv[:] = out
        return
    sector = offset // sector_size
    fn = cipher.encrypt if encrypt else cipher.decrypt
    pos, n = 0, len(mv)
    while pos < n:
        end = min(pos + sector_size, n)
        mv[pos:end] = fn(mv[pos:end], ivgen.calculate(sector))
        sector += 1
        pos = end
