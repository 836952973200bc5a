"""Damaged LUKS headers (the luks driver and qcow2's crypt header extension): qio fails with QEMU's
message and exit status, compared with the real qemu-io; never a traceback, a hang or a write outside
the image.  PBKDF2 iteration counts that would make QEMU compute for hours end at qio's own limit."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from oracle import QEMU_IMG, QEMU_IO, missing, qio_wrapper

pytestmark = pytest.mark.skipif(bool(missing()), reason="needs qemu-io and qemu-img")

SECRET = "secret,id=sec0,data=hunter0"
SLOT0 = 208  # first key slot in the LUKS1 header (48 bytes each: active, iters, salt, offset, stripes)


def _create(args: list[str], path: Path) -> None:
    """qemu-img create, retried: under load its PBKDF2 timing fails ("Unable to get accurate CPU usage")."""
    assert QEMU_IMG is not None
    for _ in range(30):
        p = subprocess.run([QEMU_IMG, "create", "-q", "--object", SECRET, *args, str(path), "1M"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            return
    raise AssertionError(p.stderr)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("luks")
    luks, qcow = d / "v.luks", d / "v.qcow2"
    _create(["-f", "luks", "-o", "key-secret=sec0,iter-time=10"], luks)
    _create(["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"], qcow)
    qio_wrapper(d / "qemu-io")
    return {"luks": luks, "qcow2": qcow, "qio": d / "qemu-io"}


def _run(prog: str, img: Path, fmt: str) -> tuple[str, int]:
    opts = (f"driver=luks,file.filename={img},key-secret=sec0" if fmt == "luks"
            else f"driver=qcow2,file.filename={img},encrypt.key-secret=sec0")
    p = subprocess.run([prog, "--object", SECRET, "-c", "read -P 0x5 0 512", "-c", "write -P 0x5 0 512",
                        "--image-opts", opts], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr
    return p.stdout.split(" sec (")[0] + p.stderr, p.returncode


def _patched(images: dict[str, Path], tmp_path: Path, fmt: str, patch: Callable[[bytearray, int], None],
             name: str) -> Path:
    src = images[fmt]
    raw = bytearray(src.read_bytes())
    base = 0 if fmt == "luks" else _crypto_ext(raw)[0]
    patch(raw, base)
    out = tmp_path / name
    out.write_bytes(raw)
    return out


def _crypto_ext(raw: bytearray) -> tuple[int, int, int]:
    """(LUKS header offset, its length, where the extension's data sits) of a qcow2 image."""
    pos = struct.unpack_from(">I", raw, 100)[0]
    while True:
        magic, length = struct.unpack_from(">II", raw, pos)
        if magic == 0x0537BE77:
            off, ln = struct.unpack_from(">QQ", raw, pos + 8)
            return off, ln, pos + 8
        assert magic, "no crypto header extension"
        pos += 8 + (length + 7) // 8 * 8


def _put(off: int, fmt: str, *vals: int | bytes) -> Callable[[bytearray, int], None]:
    def patch(raw: bytearray, base: int) -> None:
        raw[base + off:base + off + struct.calcsize(fmt)] = struct.pack(fmt, *vals)
    return patch


def _slot(i: int, field: int, value: int) -> Callable[[bytearray, int], None]:
    return _put(SLOT0 + 48 * i + field, ">I", value)


HEADER_DAMAGE: dict[str, Callable[[bytearray, int], None]] = {
    "bad-magic": _put(0, ">6s", b"LUKS\0\0"),
    "version-2": _put(6, ">H", 2),
    "cipher-name-unterminated": _put(8, ">32s", b"a" * 32),
    "cipher-mode-unterminated": _put(40, ">32s", b"x" * 32),
    "hash-unterminated": _put(72, ">32s", b"s" * 32),
    "cipher-mode-no-dash": _put(40, ">32s", b"xts"),
    "cipher-mode-unknown": _put(40, ">32s", b"foo-plain64"),
    "ivgen-unknown": _put(40, ">32s", b"xts-bogus"),
    "essiv-without-hash": _put(40, ">32s", b"xts-essiv"),
    "ivhash-unknown": _put(40, ">32s", b"xts-essiv:md4"),
    "cipher-unknown": _put(8, ">32s", b"rot13"),
    "hash-unknown": _put(72, ">32s", b"sha3"),
    "payload-in-header": _put(104, ">I", 1),
    "payload-past-end": _put(104, ">I", 0x7FFFFFFF),
    "payload-huge": _put(104, ">I", 0xFFFFFFFF),
    "key-len-huge": _put(108, ">I", 0xFFFFFFFF),
    "key-len-zero": _put(108, ">I", 0),
    "key-len-odd": _put(108, ">I", 33),
    "mk-iterations-zero": _put(164, ">I", 0),
    "digest-wrong": _put(112, ">20s", b"\1" * 20),
    "slot-stripes": _slot(0, 44, 1),
    "slot-stripes-huge": _slot(3, 44, 0xFFFFFFFF),
    "slot-state": _slot(0, 0, 5),
    "slot-iterations-zero": _slot(0, 4, 0),
    "slot-in-header": _slot(2, 40, 1),
    "slot-past-payload": _slot(0, 40, 0xFFFFFF00),
    "slots-overlap": _slot(1, 40, 8),
    "slot-disabled": _slot(0, 0, 0xDEAD),
    "slot-material-garbage": _put(4096, ">16s", b"\xff" * 16),
}


@pytest.mark.parametrize("fmt", ["luks", "qcow2"])
@pytest.mark.parametrize("name", sorted(HEADER_DAMAGE))
def test_damaged_luks_header_like_qemu(images: dict[str, Path], tmp_path: Path, fmt: str, name: str) -> None:
    assert QEMU_IO is not None
    a = _patched(images, tmp_path, fmt, HEADER_DAMAGE[name], "a")
    b = tmp_path / "b"
    shutil.copyfile(a, b)
    ref = _run(QEMU_IO, a, fmt)
    got = _run(str(images["qio"]), b, fmt)
    assert got == ref
    assert a.read_bytes() == b.read_bytes()


def _qcow2_ext(field: str, value: int) -> Callable[[bytearray, int], None]:
    def patch(raw: bytearray, base: int) -> None:
        _, _, data = _crypto_ext(raw)
        if field == "offset":
            struct.pack_into(">Q", raw, data, value)
        elif field == "length":
            struct.pack_into(">Q", raw, data + 8, value)
        elif field == "ext-size":
            struct.pack_into(">I", raw, data - 4, value)
        elif field == "magic":
            struct.pack_into(">I", raw, data - 8, value)
        elif field == "method":
            struct.pack_into(">I", raw, 32, value)
    return patch


QCOW2_EXT_DAMAGE = {
    "offset-unaligned": ("offset", 1000),
    "offset-past-end": ("offset", 1 << 40),
    "offset-zero": ("offset", 0),
    "length-short": ("length", 100),
    "length-zero": ("length", 0),
    "length-huge": ("length", (1 << 64) - 1),
    "ext-size-8": ("ext-size", 8),
    "ext-size-huge": ("ext-size", 0xFFFFFFF0),
    "ext-missing": ("magic", 0x12345678),
    "method-aes": ("method", 1),
    "method-3": ("method", 3),
    "method-none": ("method", 0),
}


@pytest.mark.parametrize("name", sorted(QCOW2_EXT_DAMAGE))
def test_damaged_qcow2_crypt_extension_like_qemu(images: dict[str, Path], tmp_path: Path, name: str) -> None:
    assert QEMU_IO is not None
    field, value = QCOW2_EXT_DAMAGE[name]
    raw = bytearray(images["qcow2"].read_bytes())
    _qcow2_ext(field, value)(raw, 0)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(raw)
    b.write_bytes(raw)
    assert _run(str(images["qio"]), b, "qcow2") == _run(QEMU_IO, a, "qcow2")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("where", ["slot", "master"])
def test_huge_pbkdf2_iterations_end_at_qios_limit(images: dict[str, Path], tmp_path: Path, where: str) -> None:
    """QEMU would run PBKDF2 for ~2^32 iterations (hours); qio refuses at once with its own message."""
    patch = _slot(0, 4, 0xFFFFFFFF) if where == "slot" else _put(164, ">I", 0xFFFFFFFF)
    img = _patched(images, tmp_path, "luks", patch, "a")
    out, rc = _run(str(images["qio"]), img, "luks")
    what = "Keyslot 0" if where == "slot" else "LUKS master key"
    assert rc == 1
    assert f"can't open: {what} iteration count 4294967295 exceeds qio's PBKDF2 limit" in out
