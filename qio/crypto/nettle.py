"""Serpent and Twofish from the system's libnettle, through ctypes: the very library (``libnettle.so.8``) and
functions that QEMU 7.2's nettle cipher backend (``crypto/cipher-nettle.c.inc``) uses, so volumes made with
them read and write byte for byte as in QEMU.  The ``cryptography`` package has neither cipher.

The library is loaded on first use; where it cannot be, the cipher is refused with QEMU's message for an
algorithm its backend lacks (``Unsupported cipher algorithm NAME``).  Every call hands nettle a whole buffer
(ECB, CBC, CTR and XTS run in C), never one block at a time."""

from __future__ import annotations

import ctypes
from typing import Any

from qio.block.errors import QemuError

#: The libraries tried in turn: Debian's qemu-img links ``libnettle.so.8`` (nettle 3.6 and later).
LIBRARY_NAMES: tuple[str, ...] = ("libnettle.so.8",)
BLOCK = 16
#: Context bytes allocated per key schedule, with room to spare over nettle's public headers:
#: ``struct serpent_ctx { uint32_t keys[33][4]; }`` is 528 bytes, ``struct twofish_ctx { uint32_t keys[40];
#: uint32_t s_box[4][256]; }`` 4256.
_CTX_BYTES = {"serpent": 1024, "twofish": 8192}
_lib: Any = None
_tried = False


def _find() -> Any:
    """The loaded library with its prototypes declared, or None."""
    for name in LIBRARY_NAMES:
        try:
            lib = ctypes.CDLL(name)
            vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
            for fam in _CTX_BYTES:
                getattr(lib, f"nettle_{fam}_set_key").argtypes = [vp, sz, cp]
                for op in ("encrypt", "decrypt"):
                    getattr(lib, f"nettle_{fam}_{op}").argtypes = [vp, sz, vp, cp]
            for fn in ("nettle_cbc_encrypt", "nettle_cbc_decrypt", "nettle_ctr_crypt"):
                getattr(lib, fn).argtypes = [vp, vp, sz, vp, sz, vp, cp]
            lib.nettle_xts_encrypt_message.argtypes = [vp, vp, vp, cp, sz, vp, cp]
            lib.nettle_xts_decrypt_message.argtypes = [vp, vp, vp, vp, cp, sz, vp, cp]
        except (OSError, AttributeError):
            continue
        for fn in ("serpent_set_key", "serpent_encrypt", "serpent_decrypt", "twofish_set_key", "twofish_encrypt",
                   "twofish_decrypt", "cbc_encrypt", "cbc_decrypt", "ctr_crypt", "xts_encrypt_message",
                   "xts_decrypt_message"):
            getattr(lib, f"nettle_{fn}").restype = None
        return lib
    return None


def library(alg: str) -> Any:
    """libnettle, loaded once; QEMU's refusal of ``alg`` where it cannot be loaded."""
    global _lib, _tried
    if not _tried:
        _lib, _tried = _find(), True
    if _lib is None:
        raise QemuError(f"Unsupported cipher algorithm {alg}")
    return _lib


class NettleCipher:
    """One serpent or twofish key (two for XTS: data key, tweak key) in ECB, CBC, CTR or XTS mode; the IV is
    given per call, as ``QCryptoCipher``'s setiv before each sector."""

    def __init__(self, alg: str, family: str, mode: str, key: bytes) -> None:
        lib = library(alg)
        self.mode = mode
        keys = [key[:len(key) // 2], key[len(key) // 2:]] if mode == "xts" else [key]
        self._ctx = [ctypes.create_string_buffer(_CTX_BYTES[family]) for _ in keys]
        set_key = getattr(lib, f"nettle_{family}_set_key")
        for ctx, k in zip(self._ctx, keys, strict=True):
            set_key(ctx, len(k), k)
        self._enc = getattr(lib, f"nettle_{family}_encrypt")
        self._dec = getattr(lib, f"nettle_{family}_decrypt")
        self._encf = ctypes.cast(self._enc, ctypes.c_void_p).value
        self._decf = ctypes.cast(self._dec, ctypes.c_void_p).value
        self._lib = lib

    def crypt(self, data: bytes | bytearray | memoryview, iv: bytes, encrypt: bool) -> bytes:
        """Encrypt or decrypt ``data`` (whole blocks) with ``iv`` (none for ECB) in one nettle call."""
        n = len(data)
        if n % BLOCK:
            raise QemuError(f"Length {n} must be a multiple of block size {BLOCK}")
        src = bytes(data)
        dst = ctypes.create_string_buffer(n)
        lib, ctx = self._lib, self._ctx[0]
        if self.mode == "ecb":
            (self._enc if encrypt else self._dec)(ctx, n, dst, src)
        elif self.mode == "xts":
            if n:  # nettle asserts on an empty message
                if encrypt:
                    lib.nettle_xts_encrypt_message(ctx, self._ctx[1], self._encf, iv, n, dst, src)
                else:
                    lib.nettle_xts_decrypt_message(ctx, self._ctx[1], self._decf, self._encf, iv, n, dst, src)
        else:
            ivbuf = ctypes.create_string_buffer(iv, BLOCK)  # nettle advances it: a copy
            if self.mode == "ctr":
                lib.nettle_ctr_crypt(ctx, self._encf, BLOCK, ivbuf, n, dst, src)
            elif encrypt:
                lib.nettle_cbc_encrypt(ctx, self._encf, BLOCK, ivbuf, n, dst, src)
            else:
                lib.nettle_cbc_decrypt(ctx, self._decf, BLOCK, ivbuf, n, dst, src)
        return dst.raw
