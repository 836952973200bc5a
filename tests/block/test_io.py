"""The generic request path (qio/block/io.py, QEMU's block/io.c) on an in-memory node, no QEMU needed:
what reaches the driver for unaligned reads and writes (read-modify-write of the head and tail
blocks), zero writes with partial blocks, max_transfer fragmenting, the zero-write fallback, FUA
emulation, reads past the end, discard cut at the alignment, and the serialisation that keeps two
overlapping read-modify-writes from losing each other's data."""

from __future__ import annotations

import contextvars
import errno
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from qio.aio import AIO, Co, WaitQueue, enter, run_sync
from qio.block import io
from qio.block.driver import REQ_FUA, BlockDriver, IOVec
from qio.block.errors import BlockError


class MemNode(BlockDriver):
    """A protocol node over a bytearray that logs every driver call the generic layer makes."""

    format_name = "mem"

    def __init__(self, size: int, align: int = 1, max_transfer: int = 0, zeroes: bool = True,
                 fua: bool = False) -> None:
        super().__init__()
        self.data = bytearray(size)
        self.request_alignment = align
        self.max_transfer = max_transfer
        self.zeroes = zeroes
        self.supported_write_flags = REQ_FUA if fua else 0
        self.log: list[tuple[Any, ...]] = []

    def getlength(self) -> int:
        return len(self.data)

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        self.log.append(("read", offset, nbytes))
        io.iov_from_bytes(qiov, 0, bytes(self.data[offset:offset + nbytes]))

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        self.log.append(("write", offset, nbytes, flags))
        self.data[offset:offset + nbytes] = io.iov_to_bytes(qiov)

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        if not self.zeroes:
            raise BlockError(errno.ENOTSUP)
        self.log.append(("zero", offset, nbytes))
        self.data[offset:offset + nbytes] = bytes(nbytes)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        self.log.append(("discard", offset, nbytes))

    async def co_flush_to_disk(self) -> bool:
        self.log.append(("flush",))
        return False


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Outside any coroutine scheduler: the request runs straight through (as open-time I/O does)."""
    return run_sync(coro)


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def read(node: MemNode, offset: int, n: int) -> bytes:
    buf = memoryview(bytearray(n))
    run(io.preadv(node, offset, n, [buf]))
    return bytes(buf)


def write(node: MemNode, offset: int, data: bytes, flags: int = 0) -> None:
    run(io.pwritev(node, offset, len(data), [memoryview(data)], flags))


# -- reads -----------------------------------------------------------------------------------------
def test_unaligned_read_is_widened_to_the_alignment() -> None:
    node = MemNode(8192, align=512)
    node.data[:] = pattern(8192)
    assert read(node, 700, 100) == pattern(8192)[700:800]
    assert node.log == [("read", 512, 512)]


def test_unaligned_read_across_blocks_reads_head_to_tail_in_one_request() -> None:
    node = MemNode(8192, align=512)
    node.data[:] = pattern(8192)
    assert read(node, 500, 1100) == pattern(8192)[500:1600]
    assert node.log == [("read", 0, 2048)]


def test_aligned_read_passes_through_unchanged() -> None:
    node = MemNode(8192, align=512)
    read(node, 1024, 2048)
    assert node.log == [("read", 1024, 2048)]


def test_read_is_cut_at_max_transfer() -> None:
    node = MemNode(1 << 20, align=512, max_transfer=4096)
    node.data[:] = pattern(1 << 20)
    assert read(node, 0, 10000 // 512 * 512) == pattern(1 << 20)[:9728]
    assert node.log == [("read", 0, 4096), ("read", 4096, 4096), ("read", 8192, 1536)]


def test_read_past_the_end_is_zero_filled_without_asking_the_driver() -> None:
    node = MemNode(1000, align=1)  # the generic layer rounds the length up to 1024 (whole sectors)
    node.data[:] = b"\xff" * 1000
    got = read(node, 512, 2048)
    assert node.log == [("read", 512, 512)]
    assert got[:488] == b"\xff" * 488 and got[512:] == bytes(1536)


# -- writes: read-modify-write ---------------------------------------------------------------------
def test_unaligned_write_inside_one_block_reads_it_then_writes_it_whole() -> None:
    node = MemNode(8192, align=512)
    node.data[:] = pattern(8192)
    write(node, 600, b"\xaa" * 100)
    assert node.log == [("read", 512, 512), ("write", 512, 512, 0)]
    expect = bytearray(pattern(8192))
    expect[600:700] = b"\xaa" * 100
    assert node.data == expect


def test_unaligned_write_over_several_blocks_reads_only_head_and_tail() -> None:
    node = MemNode(8192, align=512)
    node.data[:] = pattern(8192)
    write(node, 100, b"\xbb" * 2000)  # 100..2100: head block 0, tail block 2048
    assert node.log == [("read", 0, 512), ("read", 2048, 512), ("write", 0, 2560, 0)]
    expect = bytearray(pattern(8192))
    expect[100:2100] = b"\xbb" * 2000
    assert node.data == expect


def test_unaligned_write_spanning_exactly_two_blocks_reads_them_in_one_request() -> None:
    node = MemNode(8192, align=512)
    node.data[:] = pattern(8192)
    write(node, 500, b"\xcc" * 100)  # 500..600: the head and tail blocks are adjacent
    assert node.log == [("read", 0, 1024), ("write", 0, 1024, 0)]
    assert node.data[500:600] == b"\xcc" * 100 and node.data[:500] == pattern(8192)[:500]


def test_aligned_write_needs_no_read() -> None:
    node = MemNode(8192, align=512)
    write(node, 512, b"\x01" * 1024)
    assert node.log == [("write", 512, 1024, 0)]


def test_write_is_cut_at_max_transfer_aligned_down() -> None:
    node = MemNode(1 << 16, align=512, max_transfer=1000)  # 1000 rounds down to 512
    write(node, 0, pattern(1536))
    assert node.log == [("write", 0, 512, 0), ("write", 512, 512, 0), ("write", 1024, 512, 0)]
    assert node.data[:1536] == pattern(1536)


def test_emulated_fua_is_one_flush_after_the_last_fragment() -> None:
    node = MemNode(1 << 16, align=512, max_transfer=512)
    write(node, 4096, b"x")  # unflushed: the FUA flush has something to sync
    node.log.clear()
    write(node, 0, pattern(1024), REQ_FUA)
    assert node.log == [("write", 0, 512, 0), ("write", 512, 512, 0), ("flush",)]


def test_emulated_fua_flush_does_not_count_its_own_write() -> None:
    """As in QEMU (bdrv_driver_pwritev flushes before bdrv_co_write_req_finish bumps write_gen): with
    nothing else unflushed, the emulated FUA finds the node clean and syncs nothing."""
    node = MemNode(1 << 16, align=512)
    write(node, 0, pattern(512), REQ_FUA)
    assert node.log == [("write", 0, 512, 0)]


def test_native_fua_goes_with_every_fragment_and_needs_no_flush() -> None:
    node = MemNode(1 << 16, align=512, max_transfer=512, fua=True)
    write(node, 0, pattern(1024), REQ_FUA)
    assert node.log == [("write", 0, 512, REQ_FUA), ("write", 512, 512, REQ_FUA)]


def test_write_to_a_read_only_node_fails_with_eperm() -> None:
    node = MemNode(4096)
    node.read_only = True
    with pytest.raises(BlockError) as e:
        write(node, 0, b"x")
    assert e.value.code == errno.EPERM
    assert node.log == []


# -- zero writes -----------------------------------------------------------------------------------
def test_unaligned_zero_write_writes_partial_blocks_as_data_and_zeroes_the_middle() -> None:
    node = MemNode(8192, align=512)
    node.data[:] = b"\xff" * 8192
    run(io.pwrite_zeroes(node, 100, 2000))
    assert node.log == [("read", 0, 512), ("read", 2048, 512), ("write", 0, 512, 0), ("zero", 512, 1536),
                        ("write", 2048, 512, 0)]
    assert node.data == b"\xff" * 100 + bytes(2000) + b"\xff" * (8192 - 2100)


def test_zero_write_falls_back_to_writing_zeroes() -> None:
    node = MemNode(8192, align=512, zeroes=False)
    node.data[:] = b"\xff" * 8192
    run(io.pwrite_zeroes(node, 1024, 2048))
    assert node.log == [("write", 1024, 2048, 0)]
    assert node.data[1024:3072] == bytes(2048) and node.data[:1024] == b"\xff" * 1024


def test_detect_zeroes_turns_a_buffer_of_zeroes_into_a_zero_write() -> None:
    node = MemNode(8192, align=512)
    node.detect_zeroes = "on"
    write(node, 0, bytes(1024))
    assert node.log == [("zero", 0, 1024)]


# -- discard, flush ---------------------------------------------------------------------------------
def test_discard_is_cut_at_the_discard_alignment() -> None:
    node = MemNode(1 << 20, align=512)
    node.pdiscard_alignment = 4096
    run(io.pdiscard(node, 1024, 10240))  # 1024..11264
    assert node.log == [("discard", 1024, 3072), ("discard", 4096, 4096), ("discard", 8192, 3072)]


def test_discard_with_discard_ignore_is_a_no_op() -> None:
    node = MemNode(1 << 20)
    node.flags.unmap = False
    run(io.pdiscard(node, 0, 4096))
    assert node.log == []


def test_flush_syncs_only_what_was_written_since_the_last_flush() -> None:
    node = MemNode(8192)
    run(io.flush(node))
    assert node.log == []  # nothing written yet: clean
    write(node, 0, b"x")
    run(io.flush(node))
    run(io.flush(node))
    assert node.log == [("write", 0, 1, 0), ("flush",)]


def test_request_beyond_the_maximum_length_fails_with_eio() -> None:
    node = MemNode(4096)
    with pytest.raises(BlockError) as e:
        run(io.preadv(node, -1, 1, [memoryview(bytearray(1))]))
    assert e.value.code == errno.EIO


# -- serialisation of overlapping read-modify-writes -------------------------------------------------
class GatedNode(MemNode):
    """Reads park on a gate until the test opens it, as a blkdebug breakpoint would park them."""

    def __init__(self, size: int, align: int) -> None:
        super().__init__(size, align)
        self.gate = WaitQueue()

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        self.log.append(("parked", offset, nbytes))
        await self.gate.wait()
        await super().co_preadv(offset, nbytes, qiov)


@pytest.fixture
def tracking() -> Iterator[None]:
    """Requests are tracked only while something can interleave them (a blkdebug node: yield_on_io)."""
    saved = AIO.yield_on_io
    AIO.yield_on_io = True
    yield
    AIO.yield_on_io = saved


def test_overlapping_read_modify_writes_do_not_lose_each_other(tracking: None) -> None:
    """Two unaligned writes into one 512-byte block: the second waits for the first's RMW (QEMU's
    serialising requests), so both survive; without serialisation the second would read the block
    before the first wrote it and write the stale bytes back."""
    node = GatedNode(4096, align=512)
    first = Co(io.pwritev(node, 100, 10, [memoryview(b"A" * 10)]), contextvars.copy_context())
    second = Co(io.pwritev(node, 300, 10, [memoryview(b"B" * 10)]), contextvars.copy_context())
    enter(first)
    enter(second)
    assert node.log == [("parked", 0, 512)]  # the second request waits before reading anything
    node.gate.next()
    assert first.finished
    node.gate.next()  # the second request's own padding read, once the first is done
    assert second.finished and first.value() is None and second.value() is None
    assert node.data[100:110] == b"A" * 10 and node.data[300:310] == b"B" * 10
    assert node.log == [("parked", 0, 512), ("read", 0, 512), ("write", 0, 512, 0), ("parked", 0, 512),
                        ("read", 0, 512), ("write", 0, 512, 0)]


def test_aligned_requests_are_not_serialised(tracking: None) -> None:
    node = GatedNode(4096, align=512)
    reader = Co(io.preadv(node, 0, 512, [memoryview(bytearray(512))]), contextvars.copy_context())
    writer = Co(io.pwritev(node, 512, 512, [memoryview(b"W" * 512)]), contextvars.copy_context())
    enter(reader)
    enter(writer)  # no overlap, no padding: runs straight through while the read is parked
    assert writer.finished and not reader.finished
    node.gate.next()
    assert reader.finished


class GrowingNode(MemNode):
    """file-posix's zero write: past the end of the file it serialises to the end of the address
    space (``raw_do_pwrite_zeroes``) before it parks in the "thread pool" (the gate)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.tracks_all = True
        self.eof = size // 2
        self.gate = WaitQueue()

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        if offset + nbytes > self.eof:
            await io.serialise_to_end(self)
        self.log.append(("parked", offset, nbytes))
        await self.gate.wait()
        await super().co_pwrite_zeroes(offset, nbytes, flags)
        self.eof = max(self.eof, offset + nbytes)


def test_zero_writes_past_the_end_of_the_file_run_one_after_another(tracking: None) -> None:
    """qcow2 allocating three clusters at the end of the image file: each zero write past the end
    waits for the one before it, while a write below the first one's start goes straight through
    (fuzz qcow2-writeback-1291)."""
    node = GrowingNode(8192)
    first = Co(io.pwrite_zeroes(node, 4096, 1024), contextvars.copy_context())
    second = Co(io.pwrite_zeroes(node, 6144, 1024), contextvars.copy_context())
    below = Co(io.pwritev(node, 0, 512, [memoryview(b"D" * 512)]), contextvars.copy_context())
    enter(first)
    enter(second)
    enter(below)
    assert below.finished
    assert node.log == [("parked", 4096, 1024), ("write", 0, 512, 0)]  # the second zero write waits
    node.gate.next()
    assert first.finished  # and only now the second zero write reaches the pool:
    assert node.log[-2:] == [("zero", 4096, 1024), ("parked", 6144, 1024)]
    node.gate.next()
    assert second.finished and second.value() is None


def test_zero_write_inside_the_file_is_not_serialised(tracking: None) -> None:
    node = GrowingNode(8192)
    first = Co(io.pwrite_zeroes(node, 0, 1024), contextvars.copy_context())
    second = Co(io.pwrite_zeroes(node, 1024, 1024), contextvars.copy_context())
    enter(first)
    enter(second)
    assert node.log == [("parked", 0, 1024), ("parked", 1024, 1024)]
    node.gate.restart_all()
    assert first.finished and second.finished
