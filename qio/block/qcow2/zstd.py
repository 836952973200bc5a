"""zstd cluster compression (``compression_type=zstd``), as ``qcow2_zstd_compress``/``_decompress`` do it.

The ``zstandard`` package is imported lazily (start-up time).  It is pinned to 0.20.0 in pyproject.toml
because that release bundles libzstd 1.5.4, the library QEMU 7.2 links on Debian bookworm: newer
bundles (1.5.5+) compress level-3 clusters into different bytes, and qio's image bytes must be
QEMU's (tests/block/qcow2/test_zstd.py compares them with the system libzstd and with qemu-io).

Compression: one ``ZSTD_compressStream2(ZSTD_e_end)`` with default parameters (level 3, content size
written, no checksum) into a ``cluster_size - 1`` byte buffer; a frame that does not fit means "write
the cluster uncompressed".  ``ZstdCompressor(level=3).compress`` is that same call.

Decompression: QEMU streams frames out of the (over-long) compressed area until exactly one cluster is
produced, failing with EIO on any zstd error, on input running out, and on a frame that is still
unfinished when the cluster is full.  The ``zstandard`` API has no bounded streaming call that reports
"frame unfinished", so the frames are delimited here by walking their block headers (RFC 8878), and each
is decoded with a call whose output is bounded by the bytes still missing from the cluster, never by
what a hostile header claims.

Legacy frames (zstd before v0.8, magics 0xFD2FB522..0xFD2FB527) are decoded by libzstd only when it was
built with legacy support, as Debian's 1.5.4 is (v0.5 to v0.7).  The bundled library of ``zstandard``
has none, so a compressed area that reaches such a frame is decoded again from its start by the system
``libzstd.so.1`` (loaded through ctypes on first need) with ``qcow2_zstd_decompress``'s own streaming
loop: the same library and the same loop give QEMU's bytes and verdicts.  Without that library it is
EIO.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any

from qio.block.errors import BlockError

_MAGIC = 0xFD2FB528
_LEGACY_FIRST = 0xFD2FB522  # zstd v0.2; the system library decides which of these it knows
_SKIPPABLE_MASK, _SKIPPABLE = 0xFFFFFFF0, 0x184D2A50
_BLOCK_RESERVED = 3
_BLOCK_RLE = 1


_compressor: Any = None


def compress(src: bytes | memoryview, dest_size: int) -> bytes | None:
    """The zstd frame of ``src`` if it fits in ``dest_size`` bytes, else None (QEMU's -ENOMEM).

    One compressor is kept: a reused context gives the same frames as QEMU's fresh one per cluster (every
    ``compress`` call starts a new frame with the same parameters) without re-allocating its tables."""
    global _compressor
    if _compressor is None:
        import zstandard

        _compressor = zstandard.ZstdCompressor(level=3)
    out: bytes = _compressor.compress(src)
    return out if len(out) <= dest_size else None


def _frame_end(buf: bytes, pos: int) -> int:
    """End offset of the zstd frame starting at ``pos`` (header, blocks, checksum); EIO if truncated."""
    import zstandard

    try:
        hsize = zstandard.frame_header_size(buf[pos: pos + 18])
    except zstandard.ZstdError:
        raise BlockError(errno.EIO) from None
    fhd = buf[pos + 4]
    p = pos + hsize
    while True:
        if p + 3 > len(buf):
            raise BlockError(errno.EIO)
        bh = int.from_bytes(buf[p: p + 3], "little")
        btype = (bh >> 1) & 3
        if btype == _BLOCK_RESERVED:
            raise BlockError(errno.EIO)
        p += 3 + (1 if btype == _BLOCK_RLE else bh >> 3)
        if bh & 1:
            break
    if fhd & 4:  # Content_Checksum_flag
        p += 4
    if p > len(buf):
        raise BlockError(errno.EIO)
    return p


_decompressor: Any = None


def decompress(src: bytes, dest_size: int) -> bytes:
    """Exactly ``dest_size`` bytes out of the zstd frames at the start of ``src``; BlockError(EIO) otherwise."""
    import zstandard

    global _decompressor
    if _decompressor is None:
        _decompressor = zstandard.ZstdDecompressor()
    try:  # fast path, what QEMU writes: one frame that declares exactly one cluster
        if zstandard.frame_content_size(src[:18]) == dest_size:
            data: bytes = _decompressor.decompress(src)
            if len(data) == dest_size:
                return data
    except zstandard.ZstdError:
        pass  # the frame walk below gives the exact verdict
    out = bytearray()
    pos = 0
    while len(out) < dest_size:
        if pos + 8 > len(src):
            raise BlockError(errno.EIO)
        magic = int.from_bytes(src[pos: pos + 4], "little")
        if magic & _SKIPPABLE_MASK == _SKIPPABLE:
            pos += 8 + int.from_bytes(src[pos + 4: pos + 8], "little")
            continue
        if _LEGACY_FIRST <= magic < _MAGIC:
            return _system_decompress(src, dest_size)
        if magic != _MAGIC:
            raise BlockError(errno.EIO)
        end = _frame_end(src, pos)
        frame = src[pos:end]
        room = dest_size - len(out)
        dctx = zstandard.ZstdDecompressor()
        try:
            fcs = zstandard.frame_content_size(frame)
            if fcs < 0:  # unknown: the output buffer is what is left of the cluster
                data = dctx.decompress(frame, max_output_size=room)
            elif fcs > room:  # the frame would overrun the cluster (or lies): EIO either way
                raise BlockError(errno.EIO)
            else:  # bounded by the declared size, which libzstd enforces block by block
                dobj = dctx.decompressobj()
                data = dobj.decompress(frame)
                if len(data) != fcs:
                    raise BlockError(errno.EIO)
        except zstandard.ZstdError:
            raise BlockError(errno.EIO) from None
        out += data
        pos = end
    return bytes(out)


class _Buffer(ctypes.Structure):
    """``ZSTD_inBuffer``/``ZSTD_outBuffer`` (same layout)."""

    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


_libzstd: Any = None


def _system_lib() -> Any:
    """The system libzstd (QEMU's), or False when there is none; looked up once."""
    global _libzstd
    if _libzstd is None:
        lib: Any
        try:
            lib = ctypes.CDLL("libzstd.so.1")
            lib.ZSTD_createDCtx.restype = ctypes.c_void_p
            lib.ZSTD_createDCtx.argtypes = []
            lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
            lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
            lib.ZSTD_decompressStream.restype = ctypes.c_size_t
            lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffer), ctypes.POINTER(_Buffer)]
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            lib = False
        _libzstd = lib
    return _libzstd


def _system_decompress(src: bytes, dest_size: int) -> bytes:
    """``qcow2_zstd_decompress`` with the system libzstd: stream into one cluster until it is full; EIO on
    a zstd error, on a call that makes no progress (input exhausted) and on a frame not finished when the
    cluster is (the last call's return value is not 0)."""
    lib = _system_lib()
    if not lib:
        raise BlockError(errno.EIO)
    dctx = lib.ZSTD_createDCtx()
    if not dctx:
        raise BlockError(errno.EIO)
    out = ctypes.create_string_buffer(dest_size)
    inp = ctypes.create_string_buffer(bytes(src), len(src))
    output = _Buffer(ctypes.cast(out, ctypes.c_void_p), dest_size, 0)
    inbuf = _Buffer(ctypes.cast(inp, ctypes.c_void_p), len(src), 0)
    ret = 0
    try:
        while output.pos < output.size:
            last_in, last_out = inbuf.pos, output.pos
            ret = lib.ZSTD_decompressStream(dctx, ctypes.byref(output), ctypes.byref(inbuf))
            if lib.ZSTD_isError(ret):
                raise BlockError(errno.EIO)
            if last_in >= inbuf.pos and last_out >= output.pos:
                raise BlockError(errno.EIO)
        if ret > 0:
            raise BlockError(errno.EIO)
    finally:
        lib.ZSTD_freeDCtx(dctx)
    return out.raw
