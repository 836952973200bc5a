"""LUKS1 headers (``crypto/block-luks.c``, ``crypto/afsplit.c``): checking, unlocking a key slot with
PBKDF2 and the anti-forensic merge, and writing new headers as QEMU lays them out."""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from qio.block.errors import QemuError
from qio.crypto.block import CryptoBlock
from qio.crypto.cipher import (
    CIPHER_ALGS,
    CIPHER_MODES,
    HASH_ALGS,
    IVGEN_ALGS,
    Cipher,
    IVGen,
    crypt_sectors,
    digest_len,
    hash_bytes,
    pbkdf2,
)

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
SECTOR_SIZE = 512
KEY_SLOT_OFFSET = 4096
NUM_KEY_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
MIN_SLOT_KEY_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
DEFAULT_ITER_TIME_MS = 2000
#: qio's own bound on PBKDF2 work while unlocking (QEMU has none below 2^32 and would compute for hours
#: on a hostile header): per key slot and for the whole unlock.
MAX_SLOT_ITERS = 1 << 26
MAX_TOTAL_ITERS = 1 << 27

_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEADER.size + NUM_KEY_SLOTS * _SLOT.size  # 592

#: Cipher family names in LUKS headers, with their key sizes.
_NAME_SIZES = {"aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"}, "cast5": {16: "cast5-128"},
               "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
               "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"}}

ReadFunc = Callable[[int, int], Awaitable[bytes]]
WriteFunc = Callable[[int, bytes], Awaitable[None]]


@dataclass
class KeySlot:
    active: int
    iterations: int
    salt: bytes
    key_offset_sector: int
    stripes: int


@dataclass
class Header:
    magic: bytes
    version: int
    cipher_name: bytes
    cipher_mode: bytes
    hash_spec: bytes
    payload_offset_sector: int
    master_key_len: int
    master_key_digest: bytes
    master_key_salt: bytes
    master_key_iterations: int
    uuid: bytes
    slots: list[KeySlot] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        h = cls(*_HEADER.unpack_from(raw))
        h.slots = [KeySlot(*_SLOT.unpack_from(raw, _HEADER.size + i * _SLOT.size)) for i in range(NUM_KEY_SLOTS)]
        return h

    def pack(self) -> bytes:
        out = _HEADER.pack(self.magic, self.version, self.cipher_name, self.cipher_mode, self.hash_spec,
                           self.payload_offset_sector, self.master_key_len, self.master_key_digest,
                           self.master_key_salt, self.master_key_iterations, self.uuid)
        return out + b"".join(_SLOT.pack(s.active, s.iterations, s.salt, s.key_offset_sector, s.stripes)
                              for s in self.slots)


def has_format(buf: bytes) -> bool:
    """``qcrypto_block_luks_has_format`` (probing)."""
    return len(buf) >= 40 and buf[:6] == MAGIC and int.from_bytes(buf[6:8], "big") == VERSION


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("latin-1")


def _splitkeylen_sectors(h: Header, header_sectors: int, stripes: int) -> int:
    """``qcrypto_block_luks_splitkeylen_sectors`` (cryptsetup's rounding), in C's unsigned int."""
    sectors = -(-(h.master_key_len * stripes) // SECTOR_SIZE)
    return (-(-sectors // header_sectors) * header_sectors) & 0xFFFFFFFF


def check_header(h: Header) -> None:
    """``qcrypto_block_luks_check_header``: QEMU's messages in QEMU's order."""
    header_sectors = KEY_SLOT_OFFSET // SECTOR_SIZE
    if h.magic != MAGIC:
        raise QemuError("Volume is not in LUKS format")
    if h.version != VERSION:
        raise QemuError(f"LUKS version {h.version} is not supported")
    for what, val in (("cipher name", h.cipher_name), ("cipher mode", h.cipher_mode), ("hash spec", h.hash_spec)):
        if b"\0" not in val:
            raise QemuError(f"LUKS header {what} is not NUL terminated")
    if h.payload_offset_sector < header_sectors:
        raise QemuError("LUKS payload is overlapping with the header")
    if h.master_key_iterations == 0:
        raise QemuError("LUKS key iteration count is zero")
    m32 = 0xFFFFFFFF
    for i, s in enumerate(h.slots):
        start1, len1 = s.key_offset_sector, _splitkeylen_sectors(h, header_sectors, s.stripes)
        if s.stripes != STRIPES:
            raise QemuError(f"Keyslot {i} is corrupted (stripes {_i32(s.stripes)} != {STRIPES})")
        if s.active not in (SLOT_DISABLED, SLOT_ENABLED):
            raise QemuError(f"Keyslot {i} state (active/disable) is corrupted")
        if s.active == SLOT_ENABLED and s.iterations == 0:
            raise QemuError(f"Keyslot {i} iteration count is zero")
        if start1 < header_sectors:
            raise QemuError(f"Keyslot {i} is overlapping with the LUKS header")
        if (start1 + len1) & m32 > h.payload_offset_sector:
            raise QemuError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, NUM_KEY_SLOTS):
            s2 = h.slots[j]
            start2, len2 = s2.key_offset_sector, _splitkeylen_sectors(h, header_sectors, s2.stripes)
            if (start1 + len1) & m32 > start2 and (start2 + len2) & m32 > start1:
                raise QemuError(f"Keyslots {i} and {j} are overlapping in the header")


def _i32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass
class Params:
    """What ``qcrypto_block_luks_parse_header`` derives from the header strings."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    ivgen_cipher_alg: str
    hash_alg: str


def _lookup(name: str, table: Any, what: str) -> str:
    if name not in table:
        raise QemuError(f"{what} '{name}' not supported")
    return name


def essiv_cipher(cipher_alg: str, hash_alg: str) -> str:
    """``qcrypto_block_luks_essiv_cipher``: the ESSIV cipher whose key size fits the hash."""
    dl = digest_len(hash_alg)
    family, keylen, _ = CIPHER_ALGS[cipher_alg]
    if dl == keylen:
        return cipher_alg
    names = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}
    if family not in names:
        raise QemuError(f"Cipher {cipher_alg} not supported with essiv")
    alg = _NAME_SIZES[family].get(dl)
    if alg is None:
        raise QemuError(f"No {names[family]} cipher with key size {dl} available")
    return alg


def parse_header(h: Header) -> Params:
    """``qcrypto_block_luks_parse_header``."""
    spec = _cstr(h.cipher_mode)
    if "-" not in spec:
        raise QemuError(f"Unexpected cipher mode string format '{spec}'")
    mode, ivgen = spec.split("-", 1)
    ivhash: str | None = None
    if ":" in ivgen:
        ivgen, ivhash = ivgen.split(":", 1)
        _lookup(ivhash, HASH_ALGS, "Hash algorithm")
    _lookup(mode, CIPHER_MODES, "Cipher mode")
    name = _cstr(h.cipher_name)
    key_bytes = h.master_key_len // 2 if mode == "xts" else h.master_key_len
    alg = _NAME_SIZES.get(name, {}).get(key_bytes)
    if alg is None:
        raise QemuError(f"Algorithm '{name}' with key size {_i32(key_bytes)} bytes not supported")
    hash_alg = _lookup(_cstr(h.hash_spec), HASH_ALGS, "Hash algorithm")
    _lookup(ivgen, IVGEN_ALGS, "IV generator")
    if ivgen == "essiv":
        if ivhash is None:
            raise QemuError("Missing IV generator hash specification")
        ivcipher = essiv_cipher(alg, ivhash)
    else:
        ivcipher = alg
    return Params(alg, mode, ivgen, ivhash, ivcipher, hash_alg)


def _af_diffuse(hash_alg: str, block: bytearray) -> None:
    """``qcrypto_afsplit_hash``: hash each digest-sized piece with its index in front."""
    dl = digest_len(hash_alg)
    n = len(block)
    for i, pos in enumerate(range(0, n, dl)):
        end = min(pos + dl, n)
        block[pos:end] = hash_bytes(hash_alg, i.to_bytes(4, "big") + bytes(block[pos:end]))[:end - pos]


def _xor(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    n = len(a)
    return bytearray((int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little"))


def af_merge(hash_alg: str, blocklen: int, stripes: int, split: bytes) -> bytes:
    """``qcrypto_afsplit_decode``."""
    block = bytearray(blocklen)
    for i in range(stripes - 1):
        block = _xor(block, split[i * blocklen:(i + 1) * blocklen])
        _af_diffuse(hash_alg, block)
    return bytes(_xor(block, split[(stripes - 1) * blocklen:stripes * blocklen]))


def af_split(hash_alg: str, key: bytes, stripes: int) -> bytes:
    """``qcrypto_afsplit_encode``: random stripes, the last one carries the key."""
    blocklen = len(key)
    out = bytearray(os.urandom(blocklen * (stripes - 1)))
    block = bytearray(blocklen)
    for i in range(stripes - 1):
        block = _xor(block, out[i * blocklen:(i + 1) * blocklen])
        _af_diffuse(hash_alg, block)
    return bytes(out + _xor(block, key))


def _make_block(p: Params, key: bytes, payload_offset: int, h: Header | None) -> CryptoBlock:
    cipher = _cipher(p.cipher_alg, p.cipher_mode, key)
    ivgen = IVGen.new(p.ivgen_alg, p.ivgen_cipher_alg, p.ivgen_hash_alg, key, cipher.niv)
    return CryptoBlock("luks", SECTOR_SIZE, payload_offset, cipher, ivgen, header=h)


def _cipher(alg: str, mode: str, key: bytes) -> Cipher:
    try:
        return Cipher(alg, mode, key)
    except ValueError as e:  # e.g. XTS with equal key halves
        raise QemuError(f"Cannot initialize cipher: {e}") from None


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_TOTAL_ITERS

    def take(self, n: int, what: str) -> None:
        if n > MAX_SLOT_ITERS or n > self.left:
            raise QemuError(f"{what} iteration count {n} exceeds qio's PBKDF2 limit ({MAX_SLOT_ITERS})")
        self.left -= n


async def _load_key(h: Header, p: Params, idx: int, password: bytes, read: ReadFunc,
                    budget: _Budget) -> bytes | None:
    """``qcrypto_block_luks_load_key``: the master key if the password opens slot ``idx``."""
    s = h.slots[idx]
    if s.active != SLOT_ENABLED:
        return None
    mkl = h.master_key_len
    budget.take(s.iterations, f"Keyslot {idx}")
    slotkey = pbkdf2(p.hash_alg, password, s.salt, s.iterations, mkl)
    splitkey = bytearray(await read(s.key_offset_sector * SECTOR_SIZE, mkl * s.stripes))
    cipher = _cipher(p.cipher_alg, p.cipher_mode, slotkey)
    ivgen = IVGen.new(p.ivgen_alg, p.ivgen_cipher_alg, p.ivgen_hash_alg, slotkey, cipher.niv)
    crypt_sectors(cipher, ivgen, SECTOR_SIZE, 0, splitkey, False)
    key = af_merge(p.hash_alg, mkl, s.stripes, bytes(splitkey))
    budget.take(h.master_key_iterations, "LUKS master key")
    digest = pbkdf2(p.hash_alg, key, h.master_key_salt, h.master_key_iterations, DIGEST_LEN)
    return key if digest == h.master_key_digest else None


async def luks_open(read: ReadFunc, key_secret: str | None, optprefix: str, no_io: bool) -> CryptoBlock:
    """``qcrypto_block_luks_open``: check and parse the header, then find the slot the secret opens."""
    password = b""
    if not no_io:
        if key_secret is None:
            raise QemuError(f"Parameter '{optprefix}key-secret' is required for cipher")
        from qio.secrets import lookup_as_utf8

        password = lookup_as_utf8(key_secret)
    h = Header.parse(await read(0, HEADER_SIZE))
    check_header(h)
    p = parse_header(h)
    payload = h.payload_offset_sector * SECTOR_SIZE
    if no_io:
        block = CryptoBlock("luks", SECTOR_SIZE, payload, header=h)
    else:
        budget = _Budget()
        for i in range(NUM_KEY_SLOTS):
            key = await _load_key(h, p, i, password, read, budget)
            if key is not None:
                break
        else:
            raise QemuError("Invalid password, cannot unlock any keyslot")
        block = _make_block(p, key, payload, h)
    block.info_fields = info(h, p)
    return block


def info(h: Header, p: Params) -> list[tuple[str, Any]]:
    """``qcrypto_block_luks_get_info`` in the key order QEMU's QDict prints it."""
    slots: list[list[tuple[str, Any]]] = []
    for s in h.slots:
        active = s.active == SLOT_ENABLED
        if active:
            slots.append([("active", True), ("iters", s.iterations), ("key-offset", s.key_offset_sector * SECTOR_SIZE),
                          ("stripes", s.stripes)])
        else:
            slots.append([("active", False), ("key-offset", s.key_offset_sector * SECTOR_SIZE)])
    out: list[tuple[str, Any]] = [("ivgen-alg", p.ivgen_alg), ("hash-alg", p.hash_alg),
                                  ("cipher-alg", p.cipher_alg), ("uuid", _cstr(h.uuid))]
    if p.ivgen_hash_alg is not None and p.ivgen_alg == "essiv":
        out.append(("ivgen-hash-alg", p.ivgen_hash_alg))
    out += [("cipher-mode", p.cipher_mode), ("slots", slots),
            ("payload-offset", h.payload_offset_sector * SECTOR_SIZE),
            ("master-key-iters", h.master_key_iterations)]
    return out


# -- creation --------------------------------------------------------------------------------------


@dataclass
class CreateOptions:
    """``QCryptoBlockCreateOptionsLUKS`` (defaults: aes-256, xts, plain64, sha256, 2000 ms)."""

    key_secret: str | None = None
    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME_MS


def count_iters(hash_alg: str, password: bytes, salt: bytes, nout: int) -> int:
    """``qcrypto_pbkdf2_count_iters``: PBKDF2 iterations per second of CPU time."""
    iterations = 1 << 15
    while True:
        t0 = time.thread_time()
        pbkdf2(hash_alg, password, salt, iterations, nout)
        ms = int((time.thread_time() - t0) * 1000)
        if ms > 500:
            break
        if ms < 100:  # QEMU fails at 0 ms ("Unable to get accurate CPU usage"); qio measures longer
            iterations *= 10
        else:
            iterations = iterations * 1000 // ms
    return iterations * 1000 // ms


def payload_size(o: CreateOptions) -> int:
    """The header, key material included, that a new volume starts with (payload offset)."""
    mkl = CIPHER_ALGS[o.cipher_alg][1] * (2 if o.cipher_mode == "xts" else 1)
    header_sectors = KEY_SLOT_OFFSET // SECTOR_SIZE
    sectors = -(-(mkl * STRIPES) // SECTOR_SIZE)
    split = -(-sectors // header_sectors) * header_sectors
    return (header_sectors + NUM_KEY_SLOTS * split) * SECTOR_SIZE


async def luks_create(o: CreateOptions, optprefix: str, init: Callable[[int], Awaitable[None]],
                      write: WriteFunc) -> CryptoBlock:
    """``qcrypto_block_luks_create``: a new header with slot 0 holding a random master key."""
    if o.ivgen_alg == "essiv" and o.ivgen_hash_alg is None:
        o.ivgen_hash_alg = "sha256"
    if o.key_secret is None:
        raise QemuError(f"Parameter '{optprefix}key-secret' is required for cipher")
    from qio.secrets import lookup_as_utf8

    password = lookup_as_utf8(o.key_secret)
    family = CIPHER_ALGS[o.cipher_alg][0]
    if family not in _NAME_SIZES:
        raise QemuError(f"Algorithm '{o.cipher_alg}' not supported")
    spec = f"{o.cipher_mode}-{o.ivgen_alg}" + (f":{o.ivgen_hash_alg}" if o.ivgen_hash_alg else "")
    if len(spec) >= 32:
        raise QemuError(f"Cipher mode '{spec}' is too long for LUKS header")
    ivcipher = essiv_cipher(o.cipher_alg, o.ivgen_hash_alg) if o.ivgen_alg == "essiv" and o.ivgen_hash_alg \
        else o.cipher_alg
    p = Params(o.cipher_alg, o.cipher_mode, o.ivgen_alg, o.ivgen_hash_alg, ivcipher, o.hash_alg)
    mkl = CIPHER_ALGS[o.cipher_alg][1] * (2 if o.cipher_mode == "xts" else 1)
    mk_salt = os.urandom(SALT_LEN)
    masterkey = os.urandom(mkl)
    block = _make_block(p, masterkey, 0, None)
    iters = count_iters(o.hash_alg, masterkey, mk_salt, DIGEST_LEN) * o.iter_time // 1000 // 8
    if iters > 0xFFFFFFFF:
        raise QemuError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}: Numerical result out of range")
    mk_iters = max(iters, MIN_MASTER_KEY_ITERS)
    h = Header(MAGIC, VERSION, family.encode(), spec.encode(), o.hash_alg.encode(), 0, mkl,
               pbkdf2(o.hash_alg, masterkey, mk_salt, mk_iters, DIGEST_LEN), mk_salt, mk_iters,
               str(uuid.uuid4()).encode())
    header_sectors = KEY_SLOT_OFFSET // SECTOR_SIZE
    split = _splitkeylen_sectors(h, header_sectors, STRIPES)
    h.slots = [KeySlot(SLOT_DISABLED, 0, bytes(SALT_LEN), header_sectors + i * split, STRIPES)
               for i in range(NUM_KEY_SLOTS)]
    h.payload_offset_sector = header_sectors + NUM_KEY_SLOTS * split
    block.payload_offset = h.payload_offset_sector * SECTOR_SIZE
    await init(block.payload_offset)
    # store_key for slot 0
    s = h.slots[0]
    s.salt = os.urandom(SALT_LEN)
    it = count_iters(o.hash_alg, password, s.salt, mkl) * o.iter_time // 1000
    if it > 0xFFFFFFFF:
        raise QemuError(f"PBKDF iterations {it} larger than {0xFFFFFFFF}: Numerical result out of range")
    s.iterations = max(it, MIN_SLOT_KEY_ITERS)
    slotkey = pbkdf2(o.hash_alg, password, s.salt, s.iterations, mkl)
    splitkey = bytearray(af_split(o.hash_alg, masterkey, STRIPES))
    cipher = _cipher(o.cipher_alg, o.cipher_mode, slotkey)
    ivgen = IVGen.new(o.ivgen_alg, ivcipher, o.ivgen_hash_alg, slotkey, cipher.niv)
    crypt_sectors(cipher, ivgen, SECTOR_SIZE, 0, splitkey, True)
    await write(s.key_offset_sector * SECTOR_SIZE, bytes(splitkey))
    s.active = SLOT_ENABLED
    await write(0, h.pack())
    block.header = h
    block.info_fields = info(h, p)
    return block
