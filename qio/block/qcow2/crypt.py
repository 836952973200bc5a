"""qcow2 encryption (``encrypt.format=luks|aes``): the crypt header extension, opening the crypto
context, and encryption between the cluster mapping and the data file (``qcow2_co_encdec``)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.qcow2 import layout as L
from qio.block.qcow2.state import Qcow2State, _pread

if TYPE_CHECKING:
    from qio.crypto.block import CryptoBlock
    from qio.img.crypt import EncryptSpec

#: ``QCOW_MAX_CRYPT_CLUSTERS``: an encrypted request is split into parts of at most this many clusters.
MAX_CRYPT_CLUSTERS = 32
#: The runtime options qcow2 takes for encryption (``encrypt.*``).
CRYPT_OPTS = frozenset({"encrypt.format", "encrypt.key-secret"})
#: Encrypted images take requests in whole encryption sectors (``qcow2_refresh_limits``).
SECTOR_ALIGN = 512


def take_extra_crypt_opts(options: dict[str, Any]) -> list[str]:
    """qcow2 takes every ``encrypt.*`` option (``qdict_extract_subqdict``); those other than format and
    key-secret are errors only for an encrypted image (the crypto layer's QAPI visitor rejects them)."""
    extra = [k for k in options if k.startswith("encrypt.") and k not in CRYPT_OPTS]
    for k in extra:
        del options[k]
    return [k[len("encrypt."):] for k in extra]


def check_format_option(s: Qcow2State, opts: dict[str, Any]) -> None:
    """The ``encrypt.format`` checks of ``qcow2_update_options_prepare``."""
    fmt = opts.get("encrypt.format")
    if s.crypt_method_header == L.CRYPT_NONE:
        if fmt is not None:
            raise QemuError(f"No encryption in image header, but options specified format '{fmt}'")
    elif s.crypt_method_header == L.CRYPT_AES:
        if fmt is not None and fmt != "aes":
            raise QemuError(f"Header reported 'aes' encryption format but options specify '{fmt}'")
    elif s.crypt_method_header == L.CRYPT_LUKS and fmt is not None and fmt != "luks":
        raise QemuError(f"Header reported 'luks' encryption format but options specify '{fmt}'")
    if s.crypt_method_header and s.crypt_extra_opts:
        raise QemuError(f"Parameter '{s.crypt_extra_opts[0]}' is unexpected")
    s.crypt_physical_offset = s.crypt_method_header != L.CRYPT_AES


async def open_luks_header(s: Qcow2State, data: bytes) -> None:
    """The ``QCOW2_EXT_MAGIC_CRYPTO_HEADER`` case of ``qcow2_read_extensions`` after its checks:
    open the LUKS header stored in the image's clusters."""
    from qio.crypto.luks import luks_open

    offset, length = L.CRYPTO_EXT.unpack(data)
    s.crypto_header = (offset, length)

    async def read(off: int, n: int) -> bytes:
        if off + n > length:
            raise QemuError("Request for data outside of extension header")
        try:
            return bytes(await _pread(s, offset + off, n))
        except BlockError as e:
            raise QemuError.wrap(e, "Could not read encryption header") from None

    s.crypto = await luks_open(read, s.opts.get("encrypt.key-secret"), "encrypt.", _no_io(s.bs.flags))


def _no_io(flags: OpenFlags) -> bool:
    return bool(getattr(flags, "no_io", False))


def open_without_extension(s: Qcow2State, flags: OpenFlags) -> None:
    """``qcow2_do_open`` after the extensions: AES needs no header; LUKS without one is an error."""
    if not s.crypt_method_header or s.crypto is not None:
        return
    if s.crypt_method_header == L.CRYPT_AES:
        from qio.crypto.qcow import qcow_open

        s.crypto = qcow_open(s.opts.get("encrypt.key-secret"), "encrypt.", _no_io(flags))
    elif not _no_io(flags):
        raise QemuError(f"Missing CRYPTO header for crypt method {s.crypt_method_header}", errno.EINVAL)


def _block(s: Qcow2State) -> CryptoBlock:
    assert s.crypto is not None
    blk: CryptoBlock = s.crypto
    return blk


def encrypt(s: Qcow2State, host: int, guest: int, buf: bytearray | memoryview) -> None:
    """``qcow2_co_encrypt``: LUKS counts IVs from the host offset, the legacy AES from the guest offset."""
    try:
        _block(s).encrypt(host if s.crypt_physical_offset else guest, buf)
    except QemuError:
        raise BlockError(errno.EIO) from None


def decrypt(s: Qcow2State, host: int, guest: int, buf: bytearray | memoryview) -> None:
    """``qcow2_co_decrypt``."""
    try:
        _block(s).decrypt(host if s.crypt_physical_offset else guest, buf)
    except QemuError:
        raise BlockError(errno.EIO) from None


def specific_info(s: Qcow2State) -> list[tuple[str, Any]] | None:
    """The ``encrypt`` entry of ``qcow2_get_specific_info``."""
    if s.crypto is None:
        return None
    if s.crypt_method_header == L.CRYPT_AES:
        return [("format", "aes")]
    fields = list(_block(s).info_fields)
    pos = next((i for i, (k, _) in enumerate(fields) if k == "uuid"), len(fields) - 1) + 1
    return [*fields[:pos], ("format", "luks"), *fields[pos:]]


async def set_up_qcow2(node: Any, spec: EncryptSpec) -> None:
    """``qcow2_set_up_encryption`` on the new image (after its L1 table and backing file): the LUKS header
    in freshly allocated clusters, the crypt method and header extension in the qcow2 header."""
    from qio.block import io
    from qio.block.qcow2.header import update_header
    from qio.block.qcow2.refcount import alloc_clusters
    from qio.crypto.luks import luks_create

    s = node.s
    if spec.fmt == "aes":
        if spec.key_secret is None:
            raise QemuError("Parameter 'encrypt.key-secret' is required for cipher")
        from qio.secrets import lookup_as_utf8

        lookup_as_utf8(spec.key_secret)
        s.crypt_method_header = L.CRYPT_AES
    else:
        assert spec.luks is not None
        s.crypt_method_header = L.CRYPT_LUKS

        async def init(headerlen: int) -> None:
            try:
                off = await alloc_clusters(s, headerlen)
            except BlockError as e:
                raise QemuError.wrap(e, f"Cannot allocate cluster for LUKS header size {headerlen}") from None
            s.crypto_header = (off, headerlen)
            n = -(-headerlen // s.cluster_size) * s.cluster_size
            try:
                await io.pwrite_zeroes(node.file, off, n)
            except BlockError as e:
                raise QemuError.wrap(e, "Could not zero fill encryption header") from None

        async def write(off: int, data: bytes) -> None:
            if off + len(data) > s.crypto_header[1]:
                raise QemuError("Request for data outside of extension header")
            try:
                await io.pwritev(node.file, s.crypto_header[0] + off, len(data), [memoryview(data)])
            except BlockError as e:
                raise QemuError.wrap(e, "Could not read encryption header") from None

        spec.luks.key_secret = spec.key_secret
        await luks_create(spec.luks, "encrypt.", init, write)
    try:
        await update_header(s)
    except BlockError as e:
        raise QemuError.wrap(e, "Could not write encryption header") from None
