"""``qio-img create`` with encryption: ``-f luks`` (``block_crypto_co_create_opts_luks``) and qcow2's
``encrypt.*``/``encryption`` options (``qcow2_set_up_encryption``), with QEMU's option checks."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qio.block.errors import QemuError

if TYPE_CHECKING:
    from qio.crypto.luks import CreateOptions

STRING, NUMBER, SIZE = "str", "number", "size"
#: ``block_crypto_create_opts_luks`` in QEMU's order (then the protocol's options).
LUKS_OPTS: list[tuple[str, str, str | None]] = [
    ("size", SIZE, None), ("key-secret", STRING, None), ("cipher-alg", STRING, None), ("cipher-mode", STRING, None),
    ("ivgen-alg", STRING, None), ("ivgen-hash-alg", STRING, None), ("hash-alg", STRING, None),
    ("iter-time", NUMBER, None)]
LUKS_HELP = {
    "key-secret": "ID of the secret that provides the keyslot passphrase",
    "cipher-alg": "Name of encryption cipher algorithm", "cipher-mode": "Name of encryption cipher mode",
    "ivgen-alg": "Name of IV generator algorithm", "ivgen-hash-alg": "Name of IV generator hash algorithm",
    "hash-alg": "Name of encryption hash algorithm", "iter-time": "Time to spend in PBKDF in milliseconds"}
_LUKS_KEYS = ("key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time")


@dataclass
class EncryptSpec:
    """What a new qcow2 image is to be encrypted with: ``aes`` (a key secret) or ``luks`` (all options)."""

    fmt: str
    key_secret: str | None
    luks: CreateOptions | None = None


def _enum(name: str, value: str, allowed: Any) -> str:
    if value not in allowed:
        raise QemuError(f"Parameter '{name}' does not accept value '{value}'")
    return value


def luks_options(values: dict[str, str], iter_time: int | None) -> CreateOptions:
    """The QAPI visit of ``QCryptoBlockCreateOptionsLUKS``: enums checked, defaults filled in."""
    from qio.crypto.cipher import CIPHER_ALGS, CIPHER_MODES, HASH_ALGS, IVGEN_ALGS
    from qio.crypto.luks import CreateOptions

    o = CreateOptions(key_secret=values.get("key-secret"))
    if "cipher-alg" in values:
        o.cipher_alg = _enum("cipher-alg", values["cipher-alg"], CIPHER_ALGS)
    if "cipher-mode" in values:
        o.cipher_mode = _enum("cipher-mode", values["cipher-mode"], CIPHER_MODES)
    if "ivgen-alg" in values:
        o.ivgen_alg = _enum("ivgen-alg", values["ivgen-alg"], IVGEN_ALGS)
    if "ivgen-hash-alg" in values:
        o.ivgen_hash_alg = _enum("ivgen-hash-alg", values["ivgen-hash-alg"], HASH_ALGS)
    if "hash-alg" in values:
        o.hash_alg = _enum("hash-alg", values["hash-alg"], HASH_ALGS)
    if iter_time is not None:
        o.iter_time = iter_time
    return o


def qcow2_encrypt_spec(strs: dict[str, str], nums: dict[str, int]) -> EncryptSpec | None:
    """``qcow2_co_create_opts``'s handling of ``encryption`` and ``encrypt.*`` (in QEMU's order)."""
    from qio.qemuopts import opt_bool

    fmt = strs.get("encrypt.format")
    enc = strs.get("encryption")
    if enc is not None:
        if fmt is not None:
            raise QemuError("'encrypt.format' and its alias 'encryption' can't be used at the same time")
        if not opt_bool({"x": enc}, "x", False):
            return None
        fmt = "aes"
    if fmt is None:
        return None
    if fmt not in ("aes", "luks"):
        raise QemuError(f"Parameter 'format' does not accept value '{fmt}'")
    sub = {k[len("encrypt."):]: v for k, v in strs.items() if k.startswith("encrypt.") and k != "encrypt.format"}
    if fmt == "aes":
        extra = [k for k in sub if k != "key-secret"]
        if extra:
            raise QemuError(f"Parameter 'encrypt.{extra[0]}' is unexpected")
        return EncryptSpec("aes", sub.get("key-secret"))
    it = nums.get("encrypt.iter-time")
    return EncryptSpec("luks", sub.get("key-secret"), luks_options(sub, it))


def create_luks(filename: str, size: int, strs: dict[str, str], nums: dict[str, int]) -> None:
    """``block_crypto_co_create_opts_luks``: the file, a LUKS header and key material, the payload size."""
    from qio.aio import run_sync
    from qio.crypto.luks import luks_create

    opts = luks_options({k: strs[k] for k in _LUKS_KEYS if k in strs}, nums.get("iter-time"))
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        code = e.errno or errno.EIO
        raise QemuError(f"Could not create '{filename}': {os.strerror(code)}", code) from None
    ok = False
    try:
        async def init(headerlen: int) -> None:
            os.ftruncate(fd, headerlen + size)

        async def write(off: int, data: bytes) -> None:
            os.pwrite(fd, data, off)

        run_sync(luks_create(opts, "", init, write))
        ok = True
    except OSError as e:
        code = e.errno or errno.EIO
        raise QemuError(f"Could not write encryption header: {os.strerror(code)}", code) from None
    finally:
        os.close(fd)
        if not ok:
            try:
                os.unlink(filename)
            except OSError:
                pass
