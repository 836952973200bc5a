"""qcow2 zstd compression against its references.

* The ``zstandard`` bundle against the system libzstd (what QEMU 7.2 links): same frames for QEMU's
  parameters (``ZSTD_compressStream2(ZSTD_e_end)``, defaults, ``cluster_size - 1`` output buffer).
* qio's bounded frame-walking decompressor against ``qcow2_zstd_decompress``'s streaming loop, re-done
  with ctypes on the system libzstd: the same bytes or the same EIO for valid, multi-frame, skippable,
  truncated, bit-flipped and lying frames; decompression bombs end quickly.
* qio-img ``create``/``info``/``check``/``map`` on zstd images against qemu-img, and images written by
  one tool read and checked by the other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import random
import struct
import sys
import time
from pathlib import Path

import pytest

from oracle import QEMU_IMG, QEMU_IO, RUN_QIO_IMG, run
from qio.block.errors import BlockError
from qio.block.qcow2 import zstd as qzstd

zstandard = pytest.importorskip("zstandard")


# -- the system libzstd, driven the way block/qcow2-threads.c drives it --------------------------
class _Buf(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


def _libzstd() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("zstd") or "libzstd.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.ZSTD_createCCtx.restype = ctypes.c_void_p
    lib.ZSTD_createDCtx.restype = ctypes.c_void_p
    lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
    lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
    lib.ZSTD_compressStream2.restype = ctypes.c_size_t
    lib.ZSTD_compressStream2.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buf), ctypes.POINTER(_Buf), ctypes.c_int]
    lib.ZSTD_decompressStream.restype = ctypes.c_size_t
    lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buf), ctypes.POINTER(_Buf)]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    return lib


LIB = _libzstd()
needs_lib = pytest.mark.skipif(LIB is None, reason="no system libzstd")


def qemu_compress(src: bytes, dest_size: int) -> bytes | None:
    """``qcow2_zstd_compress``: None for -ENOMEM (and -EIO, which QEMU never sees for whole clusters)."""
    assert LIB is not None
    cctx = LIB.ZSTD_createCCtx()
    out = ctypes.create_string_buffer(dest_size)
    inp = ctypes.create_string_buffer(src, len(src))
    o = _Buf(ctypes.cast(out, ctypes.c_void_p), dest_size, 0)
    i = _Buf(ctypes.cast(inp, ctypes.c_void_p), len(src), 0)
    ret = LIB.ZSTD_compressStream2(cctx, ctypes.byref(o), ctypes.byref(i), 2)  # ZSTD_e_end
    LIB.ZSTD_freeCCtx(cctx)
    return None if ret else out.raw[: o.pos]


def qemu_decompress(src: bytes, dest_size: int) -> bytes | None:
    """``qcow2_zstd_decompress``'s loop; None for -EIO."""
    assert LIB is not None
    dctx = LIB.ZSTD_createDCtx()
    out = ctypes.create_string_buffer(dest_size)
    inp = ctypes.create_string_buffer(src, len(src))
    o = _Buf(ctypes.cast(out, ctypes.c_void_p), dest_size, 0)
    i = _Buf(ctypes.cast(inp, ctypes.c_void_p), len(src), 0)
    ret, failed = 0, False
    try:
        while o.pos < o.size:
            last_in, last_out = i.pos, o.pos
            ret = LIB.ZSTD_decompressStream(dctx, ctypes.byref(o), ctypes.byref(i))
            if LIB.ZSTD_isError(ret):
                failed = True
                break
            if last_in >= i.pos and last_out >= o.pos:
                failed = True
                break
        if ret > 0 and not LIB.ZSTD_isError(ret):
            failed = True
    finally:
        LIB.ZSTD_freeDCtx(dctx)
    return None if failed else out.raw


def qio_decompress(src: bytes, dest_size: int) -> bytes | None:
    try:
        return qzstd.decompress(src, dest_size)
    except BlockError as e:
        assert e.errno == errno.EIO
        return None


def _cluster(rng: random.Random, kind: int, cs: int) -> bytes:
    if kind == 0:
        return bytes([rng.randrange(256)]) * cs
    if kind == 1:
        return rng.randbytes(cs)
    words = [rng.randbytes(rng.randrange(1, 12)) for _ in range(200)]
    b = bytearray()
    while len(b) < cs:
        b += rng.choice(words) if kind == 2 else bytes(rng.randrange(4) for _ in range(8)) * rng.randrange(1, 9)
    if kind == 3:
        for k in range(0, cs, 97):
            b[k] = rng.randrange(256)
    return bytes(b[:cs])


@needs_lib
@pytest.mark.parametrize("cluster_bits", [9, 12, 16, 21])
def test_bundled_zstd_writes_the_system_libzstds_bytes(cluster_bits: int) -> None:
    """Why zstandard is pinned to 0.20.0: its libzstd 1.5.4 makes QEMU's frames (1.5.7 differs)."""
    assert LIB is not None
    if LIB.ZSTD_versionNumber() != 10504:
        pytest.skip(f"system libzstd {LIB.ZSTD_versionNumber()} is not the 1.5.4 QEMU 7.2 links on Debian")
    rng = random.Random(cluster_bits)
    cs = 1 << cluster_bits
    for t in range(24 if cluster_bits < 21 else 6):
        src = _cluster(rng, t % 4, cs)
        assert qzstd.compress(src, cs - 1) == qemu_compress(src, cs - 1), (cluster_bits, t)


def _frames(rng: random.Random, cs: int) -> list[bytes]:
    """Valid and hostile compressed areas for one cluster of ``cs`` bytes."""
    data = _cluster(rng, 2, cs)
    z = zstandard.ZstdCompressor
    whole = z(level=3).compress(data)
    half = cs // 2
    cases = [
        whole, whole + rng.randbytes(50),  # the area read is longer than the frame
        z(level=3, write_checksum=True).compress(data),
        z(level=1, write_content_size=False).compress(data),
        z(level=3).compress(data[:half]) + z(level=3).compress(data[half:]),  # two frames
        z(level=3, write_content_size=False).compress(data[:100]) + z().compress(data[100:]),
        b"\x50\x2a\x4d\x18" + struct.pack("<I", 5) + b"skip!" + whole,  # a skippable frame first
        b"\x50\x2a\x4d\x18" + struct.pack("<I", 1 << 30) + whole,  # a skippable frame past the end
        z(level=3).compress(data[:half]),  # too short: input runs out
        z(level=3).compress(data + b"x"),  # one byte too long
        z(level=3, write_content_size=False).compress(data + b"xy"),
        z(level=3).compress(b""), z(level=3).compress(b"") + whole,  # an empty frame (content size 0)
        b"", b"\x28\xb5\x2f\xfd", rng.randbytes(64),
    ]
    # truncations and single-byte damage of the checksummed frame
    ck = z(level=3, write_checksum=True).compress(data)
    for cut in sorted({0, 3, 4, 5, 6, 9, len(ck) // 2, len(ck) - 4, len(ck) - 1}):
        cases.append(ck[:cut])
    for _ in range(40):
        b = bytearray(ck)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        cases.append(bytes(b))
    for _ in range(20):
        b = bytearray(whole)
        pos = rng.randrange(min(len(b), 16))
        b[pos] = rng.randrange(256)
        cases.append(bytes(b))
    return cases


@needs_lib
@pytest.mark.parametrize("cluster_bits", [9, 12, 16])
def test_decompress_matches_qemus_streaming_loop(cluster_bits: int) -> None:
    rng = random.Random(100 + cluster_bits)
    cs = 1 << cluster_bits
    for n, area in enumerate(_frames(rng, cs)):
        assert qio_decompress(area, cs) == qemu_decompress(area, cs), (cluster_bits, n, area[:24].hex())


def _rle_bomb(blocks: int, content_size: bool) -> bytes:
    """A frame of ``blocks`` RLE blocks of 128 KiB each (4 input bytes per 128 KiB of output), with a
    128 KiB window; with ``content_size`` the header declares the full size (8-byte field)."""
    header = b"\x28\xb5\x2f\xfd" + (b"\xc0\x38" + struct.pack("<Q", blocks << 17) if content_size else b"\x00\x38")
    body = b"".join(struct.pack("<I", ((1 << 17) << 3) | (1 << 1) | (i == blocks - 1))[:3] + b"A"
                    for i in range(blocks))
    return header + body


@pytest.mark.parametrize("content_size", [False, True])
def test_decompression_bomb_is_bounded(content_size: bool) -> None:
    """A 2 MiB compressed area that would expand to 64 GiB: EIO at once, not after inflating it."""
    bomb = _rle_bomb((2 << 20) // 4 - 4, content_size)
    start = time.monotonic()
    assert qio_decompress(bomb, 1 << 16) is None
    assert time.monotonic() - start < 5
    if LIB is not None:
        assert qemu_decompress(bomb[:4096], 1 << 16) is None


def test_compress_gives_up_when_the_frame_does_not_fit() -> None:
    """QEMU's -ENOMEM (write the cluster uncompressed) for a frame longer than ``cluster_size - 1``."""
    rnd = random.Random(7).randbytes(4096)
    assert qzstd.compress(rnd, 4095) is None
    assert qzstd.compress(bytes(4096), 4095) is not None


# -- qio-img and the images of both tools ---------------------------------------------------------
oracle = pytest.mark.oracle("qemu-io", "qemu-img")


def _qio_img(args: list[str], cwd: Path) -> tuple[str, str, int]:
    return run([sys.executable, "-c", RUN_QIO_IMG, *args], cwd)


def _qemu_img(args: list[str], cwd: Path) -> tuple[str, str, int]:
    assert QEMU_IMG is not None
    return run([QEMU_IMG, *args], cwd)


def _qio_io(args: list[str], cwd: Path) -> tuple[str, str, int]:
    return run([sys.executable, "-m", "qio", *args], cwd)


def _qemu_io(args: list[str], cwd: Path) -> tuple[str, str, int]:
    assert QEMU_IO is not None
    return run([QEMU_IO, *args], cwd)


@oracle
@pytest.mark.parametrize("opts", ["compression_type=zstd", "compression_type=zstd,cluster_size=4k",
                                  "compression_type=zstd,cluster_size=2M,lazy_refcounts=on",
                                  "compression_type=zstd,refcount_bits=1", "compression_type=zlib",
                                  "compression_type=zstd,compat=0.10", "compression_type=lz4"])
def test_create_is_byte_identical(tmp_path: Path, opts: str) -> None:
    ref = _qemu_img(["create", "-f", "qcow2", "-o", opts, "a.qcow2", "64M"], tmp_path)
    ours = _qio_img(["create", "-f", "qcow2", "-o", opts, "b.qcow2", "64M"], tmp_path)
    assert ours == (ref[0].replace("a.qcow2", "b.qcow2"), ref[1].replace("a.qcow2", "b.qcow2"), ref[2])
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    assert a.exists() == b.exists()
    if a.exists():
        assert a.read_bytes() == b.read_bytes()


WRITES = ["write -c -P 0x11 0 64k", "write -c -P 0 64k 64k", "write -c -s text.bin 128k 64k",
          "write -c -s rand.bin 256k 64k", "write -P 0x22 320k 4k", "write -c -s text.bin 1M 64k"]


def _prepare(tmp_path: Path, name: str) -> None:
    (tmp_path / "text.bin").write_bytes(b"".join(b"line %d of a zstd test\n" % i for i in range(4000)))
    (tmp_path / "rand.bin").write_bytes(random.Random(3).randbytes(65536))
    _qemu_img(["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", name, "4M"], tmp_path)


@oracle
def test_images_cross_between_the_tools(tmp_path: Path) -> None:
    """Written by qemu-io, read by qio and the reverse; both images equal and clean for qemu-img check,
    and qio-img info/check/map (text and JSON) say what qemu-img says."""
    _prepare(tmp_path, "q.qcow2")
    _prepare(tmp_path, "i.qcow2")
    cmds = [a for w in WRITES for a in ("-c", w)]
    assert _qemu_io([*cmds, "q.qcow2"], tmp_path)[2] == 0
    assert _qio_io([*cmds, "i.qcow2"], tmp_path)[2] == 0
    assert (tmp_path / "q.qcow2").read_bytes() == (tmp_path / "i.qcow2").read_bytes()
    reads = ["read -P 0x11 0 64k", "read -P 0 64k 64k", "read -v 128k 64", "read -v 256k 32",
             "read -P 0x22 320k 4k", "read -v 1M 64", "map"]
    rcmds = [a for r in reads for a in ("-c", r)]
    theirs_by_qio = _qio_io(["-r", *rcmds, "q.qcow2"], tmp_path)
    ours_by_qemu = _qemu_io(["-r", *rcmds, "i.qcow2"], tmp_path)
    strip = [ln for ln in theirs_by_qio[0].splitlines() if " ops; " not in ln]
    assert strip == [ln for ln in ours_by_qemu[0].splitlines() if " ops; " not in ln]
    assert "Pattern verification failed" not in theirs_by_qio[0] + ours_by_qemu[0]
    check = _qemu_img(["check", "i.qcow2"], tmp_path)  # qio's image, by QEMU's checker
    assert check[2] == 0 and "No errors were found" in check[0], check
    for args in (["check", "i.qcow2"], ["check", "--output=json", "i.qcow2"], ["info", "i.qcow2"],
                 ["info", "--output=json", "i.qcow2"], ["map", "i.qcow2"], ["map", "--output=json", "i.qcow2"]):
        assert _qio_img(args, tmp_path) == _qemu_img(args, tmp_path), args
    info = json.loads(_qemu_img(["info", "--output=json", "i.qcow2"], tmp_path)[0])
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    assert "compression type: zstd" in _qio_img(["info", "i.qcow2"], tmp_path)[0]


@oracle
def test_compress_filter_images_equal_and_clean(tmp_path: Path) -> None:
    """Plain writes through the compress filter: qio's image equals qemu-io's and checks clean."""
    _prepare(tmp_path, "q.qcow2")
    _prepare(tmp_path, "i.qcow2")
    plain = [w.replace("write -c ", "write ") for w in WRITES] + ["write -P 5 2M 3k"]
    cmds = [a for w in plain for a in ("-c", w)]
    for prog, name in ((_qemu_io, "q.qcow2"), (_qio_io, "i.qcow2")):
        out = prog(["--image-opts", *cmds, f"driver=compress,file.driver=qcow2,file.file.filename={name}"], tmp_path)
        assert out[2] == 0, out
    assert (tmp_path / "q.qcow2").read_bytes() == (tmp_path / "i.qcow2").read_bytes()
    check = _qemu_img(["check", "i.qcow2"], tmp_path)
    assert check[2] == 0 and "No errors were found" in check[0]
    assert "compressed clusters" in check[0]


@oracle
@pytest.mark.parametrize("extra", ["", ",file.lazy-refcounts=on", ",file.file.aio=threads"])
def test_qio_img_on_the_compress_filter(tmp_path: Path, extra: str) -> None:
    """info (the filter's json: name, its child's cluster size), check and map through the filter."""
    _prepare(tmp_path, "i.qcow2")
    assert _qemu_io(["-c", "write -c -P 1 0 64k", "-c", "write -P 2 64k 64k", "i.qcow2"], tmp_path)[2] == 0
    spec = f"driver=compress,file.driver=qcow2,file.file.filename=i.qcow2{extra}"
    for cmd in (["info"], ["info", "--output=json"], ["check"], ["check", "--output=json"],
                ["map", "--output=json"]):
        args = [*cmd, "--image-opts", spec]
        assert _qio_img(args, tmp_path)[::2] == _qemu_img(args, tmp_path)[::2], args


def _l2_entry_offset(img: bytes, index: int) -> int:
    """File offset of the L2 entry of cluster ``index`` (first L2 table, 64 KiB clusters)."""
    l1 = struct.unpack_from(">Q", img, 40)[0]
    l2 = struct.unpack_from(">Q", img, l1)[0] & 0x00FFFFFFFFFFFE00
    return int(l2) + 8 * index


@oracle
@pytest.mark.parametrize("seed", range(8))
def test_hostile_zstd_clusters_read_like_qemu(tmp_path: Path, seed: int) -> None:
    """Seeded damage to QEMU-written zstd clusters (compressed bytes, descriptor sizes and offsets): qio
    reads each cluster with qemu-io's result (data or EIO), never a traceback."""
    rng = random.Random(seed)
    _prepare(tmp_path, "h.qcow2")
    cmds = [a for i in range(4) for a in ("-c", f"write -c -s text.bin {i * 64}k 64k" if i % 2
                                          else f"write -c -P {i + 1} {i * 64}k 64k")]
    assert _qemu_io([*cmds, "h.qcow2"], tmp_path)[2] == 0
    path = tmp_path / "h.qcow2"
    img = bytearray(path.read_bytes())
    x = 62 - (16 - 8)
    for _ in range(3):
        i = rng.randrange(4)
        pos = _l2_entry_offset(bytes(img), i)
        entry = struct.unpack_from(">Q", img, pos)[0]
        off, nsec = entry & ((1 << x) - 1), (entry >> x) & 0xFF
        what = rng.randrange(4)
        if what == 0:  # flip bytes in the compressed data
            for _ in range(rng.randrange(1, 4)):
                img[off + rng.randrange(64)] ^= 1 << rng.randrange(8)
        elif what == 1:  # another sector count
            entry = (entry & ~(0xFF << x)) | (rng.randrange(256) << x)
        elif what == 2:  # shift the data offset
            entry = (entry & ~((1 << x) - 1)) | max(0, off + rng.randrange(-600, 600))
        else:  # truncate the frame in place: zero its tail
            cut = off + rng.randrange(1, (nsec + 1) * 512)
            img[cut: off + (nsec + 1) * 512] = bytes(len(img[cut: off + (nsec + 1) * 512]))
        struct.pack_into(">Q", img, pos, entry | (1 << 62))
    path.write_bytes(bytes(img))
    reads = [a for i in range(4) for a in ("-c", f"read -v {i * 64}k 32", "-c", f"read {i * 64}k 64k")]
    ours, ref = _qio_io(["-r", *reads, "h.qcow2"], tmp_path), _qemu_io(["-r", *reads, "h.qcow2"], tmp_path)
    assert "Traceback" not in ours[1]
    strip = [ln for ln in ours[0].splitlines() if " ops; " not in ln]
    assert (strip, ours[1], ours[2]) == ([ln for ln in ref[0].splitlines() if " ops; " not in ln], ref[1], ref[2])


# -- legacy frames (zstd v0.4 to v0.7; tests/legacy.c of the zstd repository) ---------------------------
LEGACY = {
    4: bytes.fromhex(
        "24b52ffd000000bbb002c010001eb0010200008000e892341297c8dfe9f3ef53ea1d274f0c44900c8df1b48917001800"
        "18003fe6e2e374d6ecc94ae07171423e644f6a454e78ec49033fc680ab8f755e6f2e3e7ec6dc45696cc5fdc740b8848a"
        "01eba8d14039904c64f8eb53e6180b6712adb899b35a6f8a190301506756f59f358460a06091c90adcababe0e281facf"
        "c6ba010e00540000190000541400242404fe04844e410027e202c4b100d251007958412800e00c0168650004130cda0c"
        "802206c00000"
    ),
    5: bytes.fromhex(
        "25b52ffd000000ad12b07d1eb0010200008000e892341297c8dfe9f3ef53ea1d274f0c44900c8df1b4890301506756f5"
        "9f358460a06091c90adcababe0e281facfc6baeba8d14039904c64f8eb53e6180b6712adb899b35a6f8af9630cb8fa58"
        "e7f5e6e2e367cc5d94c656dc7f0c844ba8f8632e3e4e67cd9eac041e1727e443f6a456e484c79e340e0000324080a800"
        "014981e03c01291d0087ce807508807224007b5200940020cc0186d200810983c134a08801c00000"
    ),
    6: bytes.fromhex(
        "26b52ffd42ef0000a612b07d1eb00102000054a0ba248dc425f277fafcfb947ac7c91303112443633c6d220301506756"
        "f59f358460a06091c90adcababe0e281facfc6baeba8d14039904c64f8eb53e6180b6712adb899b35a6f8af9630cb8fa"
        "58e7f5e6e2e367cc5d94c656dc7f0c844ba8f8632e3e4e67cd9eac041e1727e443f6a456e484c79e340e00350b71b5c0"
        "2a5c269422208b4c8d13475867156cf11c4b54109d3150854b540e014b3d01c00000"
    ),
    7: bytes.fromhex(
        "27b52ffd20ef0000a612e4841fb001100000003559a6e7a1ef7cfcbd3fff9fefeeef61c3aa311d343822220444218032"
        "ad28f3d6280c0a0ed65cac198d205f45022e1750666dac8b9c6e077346bb4414e798c3b917326e337c0e21b1dbcb8951"
        "2334ab9dbc6d20f503a9914c2e1f59dbd935674b0c9579100085a696952edf787b4a5c097697d15c96127535a3554ad4"
        "0b00350b71b5c02a5ce60845f13943f11c4b54109d3150854b540e014b3d01c00000"
    ),
}
#: what each of them decodes to (three haiku, 239 bytes)
LEGACY_TEXT_SIZE = 239


def _rle(n: int, byte: int = 0x41) -> bytes:
    """A modern frame of ``n`` bytes ``byte`` (one RLE block, content size given)."""
    head = b"\x20" + bytes([n]) if n < 256 else b"\x60" + (n - 256).to_bytes(2, "little")
    return b"\x28\xb5\x2f\xfd" + head + (1 | 2 | n << 3).to_bytes(3, "little") + bytes([byte])


def _legacy_areas(rng: random.Random, cs: int) -> list[bytes]:
    f5, f6, f7, n = LEGACY[5], LEGACY[6], LEGACY[7], LEGACY_TEXT_SIZE
    cases = [f5 + _rle(cs - n), f6 + f7 + _rle(cs - 2 * n), _rle(cs - n) + f7, f5, f5 + bytes(64),
             (f5 + f6 + f7) * (cs // n // 3 + 1), _rle(cs - n + 1) + f7, _rle(cs - n - 1) + f7 + f5,
             LEGACY[4] + _rle(cs - n), b"\x50\x2a\x4d\x18" + struct.pack("<I", 3) + b"abc" + f6 + _rle(cs - n)]
    if cs // n > 3:
        k = cs // n
        cases.append(_rle(cs - k * n) + b"".join(LEGACY[5 + i % 3] for i in range(k)))
    for frame in (f5, f6, f7):
        for cut in range(0, len(frame), 7):
            cases.append(frame[:cut] + _rle(cs - n))
        for _ in range(30):
            b = bytearray(frame + _rle(cs - n))
            b[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            cases.append(bytes(b))
    return cases


@needs_lib
@pytest.mark.parametrize("cluster_bits", [9, 12, 16])
def test_legacy_frames_decode_as_qemus_libzstd_does(cluster_bits: int) -> None:
    """Pre-v0.8 frames, which the bundled library cannot read, decode through the system libzstd with
    QEMU's loop: the same bytes or the same EIO (truncated, damaged, overrunning, unsupported v0.4)."""
    assert LIB is not None
    rng = random.Random(200 + cluster_bits)
    cs = 1 << cluster_bits
    decoded = 0
    for n, area in enumerate(_legacy_areas(rng, cs)):
        ref = qemu_decompress(area, cs)
        assert qio_decompress(area, cs) == ref, (cluster_bits, n, area[:24].hex())
        decoded += ref is not None
    assert decoded >= 4
    text = qzstd.decompress(LEGACY[7] + _rle(cs - LEGACY_TEXT_SIZE), cs)
    assert text.startswith(b"snowden is snowed in") and text.endswith(b"A" * (cs - LEGACY_TEXT_SIZE))


def test_legacy_frames_without_a_system_libzstd_are_eio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qzstd, "_libzstd", False)
    assert qio_decompress(LEGACY[5] + _rle(512 - LEGACY_TEXT_SIZE), 512) is None
    assert qio_decompress(_rle(512), 512) == b"A" * 512  # modern frames do not need it
