"""Every call of the public API (docs/api-reference.md) and each of its failures: a closed image, bad
ranges, a read-only image, breakpoints after removal, timeouts.  Written with qio's own pytest plugin
(``qio_images``: the images are checked after each test, and no test can hang).  Where qemu-io has the
same failure, its message is compared too."""

from __future__ import annotations

import errno
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import qio
from oracle import qemu_io
from qio.pytest_plugin import ImageFile, QioImages

SIZE = 1 << 20


@pytest.fixture
def debug_raw(qio_images: QioImages) -> ImageFile:
    """``blkdebug::disk.raw``."""
    return qio_images.raw("disk.raw").blkdebug()


# -- a closed image ------------------------------------------------------------------------------------
async def test_closed_image_every_call(debug_raw: ImageFile) -> None:
    img = await debug_raw.open()
    bp = img.breakpoint("write_aio", "A")
    done = img.submit_read(0, 4)
    assert await done == b"\0" * 4
    await img.close()
    assert img.closed and img.requests == []
    calls: list[Callable[[], Any]] = [
        lambda: img.submit_read(0, 1), lambda: img.submit_write(0, b"x"), lambda: img.submit_discard(0, 512),
        lambda: img.discard(0, 512), img.drain, lambda: img.block_status(0, 1), lambda: img.write(0, 1, zero=True),
        lambda: img.add_rule("inject-error", event="read_aio"), img.rules, lambda: img.remove_rule(1),
        lambda: img.resume("A"), img.events, lambda: img.breakpoint("read_aio", "B"), bp.hit, bp.resume,
        bp.remove,
    ]
    for call in calls:
        with pytest.raises(qio.ImageClosedError, match=r"^image is closed$") as e:
            result = call()
            if isinstance(result, Awaitable):
                await result
        assert e.value.errno == errno.EBADF
    assert await done == b"\0" * 4  # a finished request keeps its result
    await img.close()  # idempotent


def test_sync_image_after_close(qio_raw: ImageFile) -> None:
    img = qio_raw.open_sync()
    img.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        calls: list[Callable[[], Any]] = [
            lambda: img.read(0, 1), lambda: img.write(0, b"x"), lambda: img.discard(0, 1), img.flush, img.drain,
            lambda: img.truncate(0), img.length, lambda: img.block_status(0, 1), img.map, img.info,
            lambda: img.submit_read(0, 1), lambda: img.submit_write(0, b"x"),
        ]
        for call in calls:
            with pytest.raises(qio.ImageClosedError):
                call()
        img.close()  # idempotent


# -- bad ranges ----------------------------------------------------------------------------------------
BAD_RANGES = [(-1, 512), (0, -1), (SIZE, 1), (SIZE - 1, 2), (1 << 63, 512), (1 << 64, 1)]


@pytest.mark.parametrize(("offset", "length"), BAD_RANGES)
async def test_bad_ranges_are_eio(qio_raw: ImageFile, offset: int, length: int) -> None:
    """Requests outside the image fail as qemu-io's do (``read failed: Input/output error``)."""
    async with qio_raw.open() as img:
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: img.read(offset, length), lambda: img.discard(offset, length),
            lambda: img.submit_read(offset, length).wait(), lambda: img.submit_discard(offset, length).wait(),
            lambda: img.write(offset, length, zero=True),
        ]
        if length > 0:
            calls += [lambda: img.write(offset, b"x" * length), lambda: img.submit_write(offset, b"x" * length).wait()]
        for call in calls:
            with pytest.raises(qio.QioError, match=r"^Input/output error$") as e:
                await call()
            assert e.value.errno == errno.EIO
        assert await img.read(0, 16) == b"\0" * 16  # nothing was written


@pytest.mark.oracle
def test_bad_range_messages_match_qemu_io(qio_raw: ImageFile) -> None:
    out = qemu_io("-f", "raw", "-c", "read 1M 1", "-c", "write 1M 1", "-c", "discard 1M 512", "-c", "aio_read 1M 1",
                  "-c", "aio_flush", str(qio_raw.path), check=False)
    failures = [line.partition(": ")[2] for line in out.stdout.splitlines() if "failed" in line]
    assert failures == ["Input/output error"] * 4


async def test_limits_and_arguments(qio_raw: ImageFile) -> None:
    async with qio_raw.open() as img:
        for call in (lambda: img.read(0, 1 << 31), lambda: img.discard(0, 1 << 31),
                     lambda: img.write(0, 1 << 31, zero=True)):
            with pytest.raises(qio.QioError, match="length cannot exceed 2147483136, given 2147483648") as e:
                await call()
            assert e.value.errno == errno.EINVAL
        sync_calls: list[Callable[[], qio.Request]] = [lambda: img.submit_read(0, 1 << 31),
                                                       lambda: img.submit_discard(0, 1 << 31)]
        for sync_call in sync_calls:
            with pytest.raises(qio.QioError, match="length cannot exceed"):
                sync_call()
        assert await img.read(0, 0) == b""
        with pytest.raises(qio.QioError, match=r"^Image size cannot be negative$") as e:
            await img.truncate(-1)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(qio.QioError, match="must not be negative") as e:
            await img.block_status(-1, 512)
        assert e.value.errno == errno.EINVAL
        assert await img.block_status(SIZE, 512) == qio.Extent(SIZE, 0, False)
        assert await img.block_status(2 * SIZE, 512) == qio.Extent(2 * SIZE, 0, False)
        with pytest.raises(TypeError):
            await img.write(0, "text")  # type: ignore[arg-type]
        with pytest.raises(qio.QioError, match="data must be bytes unless zero=True"):
            img.submit_write(0, 512)


# -- read-only -----------------------------------------------------------------------------------------
async def test_read_only_every_write(qio_qcow2: ImageFile) -> None:
    async with qio_qcow2.open(read_only=True) as img:
        calls: list[Callable[[], Any]] = [
            lambda: img.write(0, b"x"), lambda: img.write(0, 512, zero=True, unmap=True), lambda: img.discard(0, 512),
            lambda: img.truncate(2 * SIZE), lambda: img.submit_write(0, b"x"), lambda: img.submit_discard(0, 512),
        ]
        for call in calls:
            with pytest.raises(qio.ReadOnlyError, match=r"^Block node is read-only$") as e:
                result = call()
                if isinstance(result, Awaitable):
                    await result
            assert e.value.errno == errno.EPERM and isinstance(e.value, qio.QioError)
        # what reads are allowed still works
        await img.flush()
        assert await img.read(0, 4) == b"\0" * 4
        assert await img.map() == [qio.Extent(0, SIZE, False)]
        assert (await img.info()).format == "qcow2"
        assert await img.submit_read(0, 2) == b"\0\0"
    assert qio_qcow2.check().failed() is False


@pytest.mark.oracle
def test_read_only_message_matches_qemu_io(qio_raw: ImageFile) -> None:
    out = qemu_io("-r", "-f", "raw", "-c", "write 0 512", str(qio_raw.path), check=False)
    assert (out.stdout, out.stderr) == ("", "qemu-io: Block node is read-only\n")


def test_snapshot_and_force_share(qio_images: QioImages) -> None:
    disk = qio_images.raw("s.raw", data=b"\x01" * 512)
    with disk.open_sync(snapshot=True) as img:  # -s: writes go to a temporary overlay
        img.write(0, b"\x02" * 512)
        assert img.read(0, 1) == b"\x02"
    assert disk.read_bytes()[:1] == b"\x01"
    with disk.open_sync() as writer, disk.open_sync(read_only=True, force_share=True) as reader:
        writer.write(0, b"\x03" * 512)
        assert reader.read(0, 1) == b"\x03"
    with pytest.raises(qio.QioError, match="mutually exclusive"):
        qio.open_sync(None, "raw", f"driver=raw,file.filename={disk.path}")


# -- breakpoints, removed ------------------------------------------------------------------------------
async def test_removing_a_breakpoint_resumes_its_request(debug_raw: ImageFile) -> None:
    async with debug_raw.open() as img:
        bp = img.breakpoint("write_aio", "A")
        w = img.submit_write(0, b"\x05" * 512)
        assert await bp.hit() is w and img.requests == [w] and w.tag == "A"
        assert repr(w) == "<Request write offset=0 length=512 suspended>"
        # remove_break A of a breakpoint that was hit: the parked request is resumed, and the breakpoint
        # itself was used up, so qemu-io says "Could not remove breakpoint A: No such file or directory"
        with pytest.raises(qio.BreakpointError, match=r"^Could not remove breakpoint A: No such file or directory$"):
            bp.remove()
        await w
        assert w.state == "done" and img.requests == []
        for call in (bp.resume, bp.remove):
            with pytest.raises(qio.BreakpointError, match=r"^breakpoint 'A' was removed$"):
                call()
        with pytest.raises(qio.BreakpointError, match="was removed"):
            await bp.hit(timeout=0.1)
        again = img.breakpoint("write_aio", "A")  # the tag can be used again
        w2 = img.submit_write(512, b"\x06" * 512)
        assert await again.hit() is w2
        again.resume()
        await w2
        # a breakpoint already used up: nothing to remove, as qemu-io's remove_break says
        with pytest.raises(qio.BreakpointError, match="Could not remove breakpoint A: No such file or directory"):
            again.remove()
        assert again.removed
        assert img.log == ["blkdebug: Suspended request 'A'\n", "blkdebug: Resuming request 'A'\n",
                           "blkdebug: Suspended request 'A'\n", "blkdebug: Resuming request 'A'\n"]


async def test_breakpoint_conditions(debug_raw: ImageFile) -> None:
    async with debug_raw.open() as img:
        with pytest.raises(qio.BreakpointError, match="unknown iotype 'bogus'") as e:
            img.breakpoint("write_aio", "Z", iotype="bogus")
        assert e.value.errno == errno.EINVAL
        reads = img.breakpoint("pwritev", "R", iotype="write", offset=4096)  # only a write touching 4096
        w0 = img.submit_write(0, b"\x01" * 512)
        await w0  # not at 4096: goes through
        w1 = img.submit_write(4096, b"\x02" * 512)
        assert await reads.hit() is w1
        reads.resume()
        await w1
        second = img.breakpoint("read_aio", "N", nth=2)  # the second matching request
        await img.read(0, 512)
        r = img.submit_read(0, 512)
        assert await second.hit() is r
        second.resume()
        assert await r == b"\x01" * 512


async def test_request_failure_and_states(debug_raw: ImageFile) -> None:
    async with debug_raw.open() as img:
        img.add_rule("inject-error", event="write_aio", errno=5, once=True)
        w = img.submit_write(0, b"x" * 512)
        for _ in range(2):  # awaited any number of times
            with pytest.raises(qio.QioError, match=r"^Input/output error$"):
                await w
        assert (w.state, w.done, w.tag) == ("failed", True, None)
        d = img.submit_discard(0, 512)
        assert (d.kind, await d, d.state) == ("discard", None, "done")


# -- timeouts ------------------------------------------------------------------------------------------
SLOW = {"driver": "raw", "file": {"driver": "blkdebug", "image": {"driver": "null-co", "latency-ns": 300_000_000}}}


async def test_timeouts(qio_images: QioImages) -> None:
    async with qio_images.open(options=SLOW) as img:
        w = img.submit_write(0, b"x" * 512)
        start = time.monotonic()
        with pytest.raises(qio.RequestTimeout, match=r"write request at offset 0: timed out after 0\.05 s") as e:
            await w.wait(timeout=0.05)
        assert isinstance(e.value, TimeoutError) and e.value.errno == errno.ETIMEDOUT
        assert w.state == "running" and w in img.requests
        assert await w.wait(timeout=30) is None
        assert time.monotonic() - start < 10
        bp = img.breakpoint("pwritev_done", "A")
        r = img.submit_read(0, 512)
        with pytest.raises(qio.BreakpointTimeout, match="waiting for request 'A'"):
            await bp.hit(timeout=0.05)  # the read could still get there (reads raise no pwritev_done, it won't)
        await r
        with pytest.raises(qio.BreakpointError) as e2:
            await bp.hit(timeout=30)  # nothing in flight any more: fails at once
        assert not isinstance(e2.value, qio.BreakpointTimeout)
        assert time.monotonic() - start < 10
        bp.remove()


async def test_parked_request_with_timeout_is_a_standstill(debug_raw: ImageFile) -> None:
    """A timeout does not turn a wait that can never end into a slow failure: it fails at once."""
    async with debug_raw.open() as img:
        bp = img.breakpoint("write_aio", "A")
        w = img.submit_write(0, b"x" * 512)
        start = time.monotonic()
        with pytest.raises(qio.StandstillError) as e:
            await w.wait(timeout=30)
        assert e.value.errno == errno.EDEADLK and time.monotonic() - start < 5
        with pytest.raises(qio.StandstillError):
            await img.drain()
        assert await img.read(512, 1) == b"\0"  # other requests still run
        bp.resume()
        await w


async def test_events_end_when_the_image_closes(debug_raw: ImageFile) -> None:
    img = await debug_raw.open()
    stream = img.events("blkdebug_*")
    await img.write(0, b"x" * 512)
    names = {ev.name for ev in stream.pending()}
    assert "blkdebug_event" in names
    await img.close()
    # the flush of closing is recorded too; then the stream ends (nothing can fire any more)
    assert [(ev.event, ev.op) async for ev in stream] == [("flush_to_os", None), ("flush_to_disk", None)]
    assert stream.pending() == []
    stream.close()
    stream.close()  # idempotent
    assert stream.closed


def test_error_hierarchy() -> None:
    for cls in (qio.OpenError, qio.ImageClosedError, qio.ReadOnlyError, qio.BreakpointError, qio.RequestTimeout,
                qio.StandstillError, qio.BreakpointTimeout):
        assert issubclass(cls, qio.QioError) and issubclass(cls, OSError)
    assert issubclass(qio.BreakpointTimeout, qio.BreakpointError)
    assert issubclass(qio.BreakpointTimeout, TimeoutError) and issubclass(qio.RequestTimeout, TimeoutError)
    e = qio.QioError(errno.ENOSPC)
    assert (e.errno, e.strerror, str(e)) == (errno.ENOSPC, "No space left on device", "No space left on device")
