"""The public asyncio API (qio/api.py, docs/api.md): every call and failure, and the race tutorial's
main scenario (docs/tutorial-race.md, "Order 1") with the outcome the shell shows.  No test may hang:
each wait that could never end must raise."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import qio
from oracle import ROOT, env_with_root, qemu_img, qemu_io

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await fn()

    return asyncio.run(main())


def raw(tmp_path: Path, size: int = 1 << 20) -> str:
    path = tmp_path / "t.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


# -- opening ---------------------------------------------------------------------------------------
def test_open_forms(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> list[str]:
        formats = []
        async with qio.open(path, fmt="raw") as img:
            formats.append((await img.info()).format)
        async with qio.open(f"blkdebug::{path}", fmt="raw") as img:
            formats.append((await img.info()).format)
        spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": path}})
        async with qio.open(f"json:{spec}") as img:
            formats.append((await img.info()).format)
        async with qio.open(options={"driver": "raw", "file": {"driver": "file", "filename": path}}) as img:
            formats.append((await img.info()).format)
        async with qio.open(options=f"driver=raw,file.filename={path}") as img:
            formats.append((await img.info()).format)
        img2 = await qio.open(path, "raw", cache="none")
        formats.append(str(await img2.length()))
        await img2.close()
        await img2.close()  # idempotent
        assert img2.closed
        return formats

    assert run(go) == ["raw"] * 5 + [str(1 << 20)]


def test_open_errors(tmp_path: Path) -> None:
    async def go(**kw: Any) -> None:
        await qio.open(**kw)

    with pytest.raises(qio.OpenError) as e:
        run(lambda: go(filename=str(tmp_path / "missing"), fmt="raw"))
    assert e.value.errno == errno.ENOENT
    assert str(e.value).startswith(f"can't open device {tmp_path}/missing: Could not open")
    assert isinstance(e.value, OSError)
    with pytest.raises(qio.QioError, match="Invalid cache option: bogus") as e2:
        run(lambda: go(filename=raw(tmp_path), fmt="raw", cache="bogus"))
    assert e2.value.errno == errno.EINVAL
    with pytest.raises(qio.OpenError, match="Unknown driver 'nope'"):
        run(lambda: go(filename=raw(tmp_path), fmt="nope"))


# -- requests ----------------------------------------------------------------------------------------
def test_read_write_flush_discard_truncate(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> None:
        async with qio.open(path, "raw") as img:
            await img.write(512, b"\x11" * 1024)
            await img.write(1024, b"\x22" * 512, fua=True)
            assert await img.read(0, 2048) == b"\0" * 512 + b"\x11" * 512 + b"\x22" * 512 + b"\0" * 512
            await img.write(512, 512, zero=True)
            assert await img.read(512, 512) == b"\0" * 512
            await img.write(0, bytearray(b"\x33" * 512), zero=False)
            await img.flush()
            await img.write(65536, b"\x44" * 4096)
            await img.discard(65536, 4096)
            assert await img.read(65536, 4096) == b"\0" * 4096
            await img.truncate(2 << 20)
            assert await img.length() == 2 << 20
            await img.truncate(1 << 20, "off")
            assert await img.length() == 1 << 20

    run(go)
    with open(path, "rb") as f:
        assert f.read(2048) == b"\x33" * 512 + b"\0" * 512 + b"\x22" * 512 + b"\0" * 512


def test_request_failures(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> None:
        async with qio.open(path, "raw") as img:
            size = await img.length()
            for call in (lambda: img.read(size - 512, 1024), lambda: img.write(size, b"x"),
                         lambda: img.read(-1, 1), lambda: img.discard(size, 512)):
                with pytest.raises(qio.QioError, match=r"^Input/output error$") as e:
                    await call()
                assert e.value.errno == errno.EIO
            with pytest.raises(qio.QioError, match="length cannot exceed") as e:
                await img.read(0, 1 << 31)
            assert e.value.errno == errno.EINVAL
            with pytest.raises(qio.QioError, match="data must be bytes"):
                await img.write(0, 512)
            with pytest.raises(qio.QioError, match="-u requires -z"):
                await img.write(0, b"x", unmap=True)
            with pytest.raises(qio.QioError, match="Invalid preallocation mode 'huge'"):
                await img.truncate(0, "huge")
        # closed image
        closed_calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: img.read(0, 1), lambda: img.write(0, b"x"), img.flush, img.length, img.map, img.info,
            lambda: img.truncate(0)]
        for closed_call in closed_calls:
            with pytest.raises(qio.ImageClosedError, match="image is closed") as e:
                await closed_call()
            assert e.value.errno == errno.EBADF
        with pytest.raises(qio.ImageClosedError):
            img.breakpoint("write_aio", "A")

    run(go)


def test_read_only(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> None:
        async with qio.open(path, "raw", read_only=True) as img:
            assert await img.read(0, 4) == b"\0" * 4
            ro_calls: list[Callable[[], Awaitable[None]]] = [
                lambda: img.write(0, b"x"), lambda: img.discard(0, 512), lambda: img.truncate(0)]
            for call in ro_calls:
                with pytest.raises(qio.ReadOnlyError, match=r"^Block node is read-only$") as e:
                    await call()
                assert e.value.errno == errno.EPERM

    run(go)


def test_map_block_status_info_qcow2(tmp_path: Path) -> None:
    path = str(tmp_path / "t.qcow2")
    subprocess.run([sys.executable, "-c", "import sys; from qio.img.cli import main; "
                    "sys.exit(main(['qemu-img', 'create', '-q', '-f', 'qcow2', sys.argv[1], '1M']))", path],
                   check=True, cwd=ROOT, env=env_with_root())

    async def go() -> None:
        async with qio.open(path, "qcow2") as img:
            await img.write(64 << 10, b"\x5a" * 65536)
            assert await img.map() == [qio.Extent(0, 65536, False), qio.Extent(65536, 65536, True),
                                       qio.Extent(131072, 1048576 - 131072, False)]
            assert await img.block_status(65536, 4096) == qio.Extent(65536, 4096, True)
            assert await img.block_status(0, 1 << 20) == qio.Extent(0, 65536, False)
            info = await img.info()
            assert (info.format, info.cluster_size, info.vm_state_offset) == ("qcow2", 65536, 512 << 20)
            assert ("compat", "1.1") in info.specific or any(k == "compat" for k, _ in info.specific)

    run(go)


@pytest.mark.oracle
def test_bytes_match_qemu_io(tmp_path: Path) -> None:
    """The same writes through the API and through real qemu-io leave the same image bytes."""
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(256 << 10)

    async def go() -> None:
        async with qio.open(str(a), "raw") as img:
            await img.write(0, b"\xcd" * 4096)
            await img.write(6144, b"\xcd" * 8192, fua=True)
            await img.write(8192, 4096, zero=True)
            await img.discard(65536, 4096)

    run(go)
    qemu_io("-f", "raw", "-c", "write 0 4k", "-c", "write -f 6k 8k", "-c", "write -z 8k 4k",
            "-c", "discard 64k 4k", str(b))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.oracle
def test_qcow2_bytes_match_qemu_io(tmp_path: Path) -> None:
    """qcow2 through the API (writes, zero writes, discard, truncate) leaves the file qemu-io leaves."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        qemu_img("create", "-q", "-f", "qcow2", str(p), "1M")

    async def go() -> None:
        async with qio.open(str(a), "qcow2") as img:
            await img.write(0, b"\xcd" * 4096)
            await img.write(200 << 10, b"\xcd" * 70000)
            await img.write(64 << 10, 65536, zero=True, unmap=True)
            await img.discard(0, 65536)
            await img.truncate(2 << 20)

    run(go)
    qemu_io("-f", "qcow2", "-c", "write 0 4k", "-c", "write 200k 70000", "-c", "write -z -u 64k 64k",
            "-c", "discard 0 64k", "-c", "truncate 2M", str(b))
    assert a.read_bytes() == b.read_bytes()


# -- handles, breakpoints and races -------------------------------------------------------------------
def test_tutorial_race_order1(tmp_path: Path) -> None:
    """docs/tutorial-race.md, "Order 1": W1 parked at write_aio, W2 completes, W1 resumed lands last."""
    path = raw(tmp_path)

    async def go() -> tuple[bytes, bytes, list[str]]:
        async with qio.open(f"blkdebug::{path}", fmt="raw") as img:
            bp = img.breakpoint("write_aio", tag="A")
            w1 = img.submit_write(0, b"\x11" * 8192)
            assert (w1.offset, w1.length, w1.kind) == (0, 8192, "write")
            assert await bp.hit(timeout=5) is w1
            assert (w1.state, w1.tag) == ("suspended", "A")
            w2 = img.submit_write(4096, b"\x22" * 8192)
            await w2
            assert w2.state == "done" and w1.state == "suspended"
            with pytest.raises(qio.StandstillError, match="'A' suspended") as e:
                await w1  # nothing would ever resume it: raises instead of hanging
            assert e.value.errno == errno.EDEADLK
            assert w1.state == "suspended"
            bp.resume()
            await w1
            assert w1.state == "done"
            await img.drain()
            return await img.read(4088, 16), await img.read(8184, 16), img.log

    overlap, tail, log = run(go)
    assert overlap == b"\x11" * 16
    assert tail == b"\x11" * 8 + b"\x22" * 8
    assert log == ["blkdebug: Suspended request 'A'\n", "blkdebug: Resuming request 'A'\n"]


@pytest.mark.oracle
def test_tutorial_race_matches_shell(tmp_path: Path) -> None:
    """The same scenario in real qemu-io leaves the same bytes as the API test."""
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(1 << 20)

    async def go() -> None:
        async with qio.open(f"blkdebug::{a}", fmt="raw") as img:
            bp = img.breakpoint("write_aio", "A")
            w1 = img.submit_write(0, b"\x11" * 8192)
            await bp.hit()
            await img.submit_write(4096, b"\x22" * 8192)
            bp.resume()
            await w1

    run(go)
    qemu_io("-f", "raw", "-c", "break write_aio A", "-c", "aio_write -P 0x11 0 8k", "-c",
            "aio_write -P 0x22 4k 8k", "-c", "sleep 100", "-c", "resume A", "-c", "aio_flush", f"blkdebug::{b}")
    assert a.read_bytes() == b.read_bytes()


def test_tutorial_race_order2(tmp_path: Path) -> None:
    """docs/tutorial-race.md, "Order 2": W1 parked at pwritev_done (its data already in the file), so W2
    lands last; as there, the breakpoint is reached only while the event loop runs (``bp.hit``)."""
    path = raw(tmp_path)

    async def go() -> bytes:
        async with qio.open(f"blkdebug::{path}", fmt="raw") as img:
            bp = img.breakpoint("pwritev_done", "A")
            w1 = img.submit_write(0, b"\x11" * 8192)
            assert await bp.hit(timeout=5) is w1
            await img.submit_write(4096, b"\x22" * 8192)
            bp.resume()
            await w1
            return await img.read(4088, 16)

    assert run(go) == b"\x11" * 8 + b"\x22" * 8


def test_docs_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The complete examples of docs/api.md (the tutorial, the synchronous one) run as written."""
    import re

    text = (ROOT / "docs" / "api.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "import qio" in b
              or "open_sync" in b]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    raw(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), {"qio": qio, "asyncio": asyncio, "print": lambda *a: None})


def test_breakpoint_failures(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> None:
        async with qio.open(path, "raw") as img:  # no blkdebug node
            with pytest.raises(qio.BreakpointError) as e:
                img.breakpoint("write_aio", "A")
            assert e.value.errno == errno.ENOTSUP
        async with qio.open(f"blkdebug::{path}", "raw") as img:
            with pytest.raises(qio.BreakpointError, match="Could not set breakpoint: No such file") as e:
                img.breakpoint("no_such_event", "A")
            assert e.value.errno == errno.ENOENT
            bp = img.breakpoint("write_aio", "A")
            # no request in flight: the breakpoint can never be hit, so hit() fails at once, even untimed
            with pytest.raises(qio.BreakpointError, match="no request can reach a breakpoint tagged 'A'"):
                await bp.hit()
            with pytest.raises(qio.BreakpointError, match="Could not resume request: No such file"):
                bp.resume()
            with pytest.raises(qio.BreakpointError, match="Could not resume request"):
                img.resume("Z")
            bp.remove()
            assert repr(bp) == "<Breakpoint write_aio 'A' removed>"
            for call in (bp.hit, bp.resume, bp.remove):
                with pytest.raises(qio.BreakpointError, match="breakpoint 'A' was removed") as e:
                    await call() if call == bp.hit else call()
                assert e.value.errno == errno.ENOENT
            # removed before it was hit: requests go through
            await img.write(0, b"\x01" * 512)
            # a request parked under one tag does not satisfy another: with nothing else able to move,
            # waiting for C fails at once rather than hang (or wait out its timeout)
            bp_b = img.breakpoint("write_aio", "B")
            bp_c = img.breakpoint("read_aio", "C")
            w = img.submit_write(0, b"\x02" * 512)
            assert await bp_b.hit(timeout=1) is w
            with pytest.raises(qio.BreakpointError, match="no request can reach a breakpoint tagged 'C'"):
                await bp_c.hit(timeout=30)
            bp_b.resume()
            await w
            bp_c.remove()
            assert await img.read(0, 512) == b"\x02" * 512

    run(go)


def test_breakpoint_timeout() -> None:
    """A breakpoint a request could still reach, but not before the timeout: BreakpointTimeout.

    The null driver's ``latency-ns`` keeps the write in flight on a real timer (0.5 s)."""
    opts = {"driver": "raw", "file": {"driver": "blkdebug",
                                      "image": {"driver": "null-co", "latency-ns": 500_000_000}}}

    async def go() -> None:
        async with qio.open(options=opts) as img:
            bp = img.breakpoint("pwritev_done", "A")
            w = img.submit_write(0, b"\x01" * 512)
            with pytest.raises(qio.BreakpointTimeout, match=r"timed out after 0.1 s") as e:
                await bp.hit(timeout=0.1)
            assert e.value.errno == errno.ETIMEDOUT and isinstance(e.value, TimeoutError)
            assert w.state == "running"
            bp.remove()
            with pytest.raises(qio.RequestTimeout, match=r"write request at offset 0: timed out after 0.1 s") as e2:
                await w.wait(timeout=0.1)
            assert e2.value.errno == errno.ETIMEDOUT and isinstance(e2.value, TimeoutError)
            assert await w.wait(timeout=30) is None

    run(go)


def test_rules_at_run_time(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> None:
        async with qio.open(path, "raw") as img:
            with pytest.raises(qio.QioError, match="no blkdebug node") as e:
                img.add_rule("inject-error", event="write_aio")
            assert e.value.errno == errno.ENOTSUP
        async with qio.open(f"blkdebug::{path}", "raw") as img:
            rid = img.add_rule("inject-error", event="write_aio", errno=28, once=True)
            assert img.rules() == [f"#{rid} inject-error event=write_aio errno=28 once=on (matched 0, fired 0)"]
            with pytest.raises(qio.QioError, match="No space left on device") as e:
                await img.write(0, b"x" * 512)
            assert e.value.errno == errno.ENOSPC
            await img.write(0, b"x" * 512)  # once: the second write goes through
            rid2 = img.add_rule("inject-error", event="read_aio", errno=5)
            img.remove_rule(rid2)
            assert await img.read(0, 1) == b"x"
            with pytest.raises(qio.QioError, match=f"no rule #{rid2}"):
                img.remove_rule(rid2)
            with pytest.raises(qio.QioError, match="Missing event name"):
                img.add_rule("inject-error", errno=5)
            with pytest.raises(qio.QioError, match="doesn't support the option 'bogus'"):
                img.add_rule("delay", event="write_aio", bogus=1)
            with pytest.raises(qio.QioError, match="no option group 'nope'"):
                img.add_rule("nope")

    run(go)


def test_events(tmp_path: Path) -> None:
    """The trace as events: the same blkdebug_event lines ``qio -T blkdebug_event`` prints for the
    request, recorded whatever call ran it; iteration ends (never hangs) when nothing can fire more."""
    path = raw(tmp_path)

    async def go() -> tuple[list[qio.TraceEvent], list[qio.TraceEvent]]:
        async with qio.open(f"blkdebug::{path}", "raw") as img:
            with img.events() as evs:
                bp = img.breakpoint("write_aio", "A")
                w1 = img.submit_write(0, b"x" * 8192)
                await bp.hit()
                first = evs.pending()
                bp.resume()
                rest = [ev async for ev in evs]
                assert w1.done
            assert evs.closed and [ev async for ev in evs] == []
            with pytest.raises(qio.QioError, match="trace event 'nope' does not exist"):
                img.events("nope")
            return first, rest

    first, rest = run(go)
    assert first == [qio.TraceEvent("blkdebug_event", "write_aio request write offset 0 bytes 8192 state 1",
                                    "write_aio", "write", 0, 8192, 1)]
    assert [(ev.event, ev.op, ev.offset, ev.length) for ev in rest] == [
        ("pwritev", "write", 0, 8192), ("pwritev_done", "write", 0, 8192), ("flush_to_os", "write", 0, 8192)]
    from qio import trace

    assert "blkdebug_event" not in trace.enabled  # closing the stream restored the trace state


def test_events_match_shell_trace(tmp_path: Path) -> None:
    """The events recorded through the API are the lines ``qio -T blkdebug_event`` prints."""
    path = raw(tmp_path)
    shell = subprocess.run([sys.executable, "-m", "qio", "-T", "blkdebug_event", "-f", "raw", "-c",
                            "break write_aio A", "-c", "aio_write 0 8k", "-c", "resume A", "-c", "aio_flush",
                            f"blkdebug::{path}"], capture_output=True, text=True, cwd=ROOT, env=env_with_root())
    expected = [line for line in shell.stderr.splitlines() if "offset 0 bytes 8192" in line]

    async def go() -> list[str]:
        async with qio.open(f"blkdebug::{path}", "raw") as img:
            with img.events() as evs:
                bp = img.breakpoint("write_aio", "A")
                w1 = img.submit_write(0, b"x" * 8192)
                await bp.hit()
                bp.resume()
                await w1
                return [f"{ev.name} {ev.text}" for ev in evs.pending()]

    assert run(go) == expected and len(expected) == 4


def test_awaited_request_at_breakpoint(tmp_path: Path) -> None:
    """``await img.write`` caught by a breakpoint: StandstillError at once (qemu-io would hang); the
    request stays in flight, and a resume lets it finish (drain waits for it)."""
    path = raw(tmp_path)

    async def go() -> bytes:
        async with qio.open(f"blkdebug::{path}", "raw") as img:
            bp = img.breakpoint("write_aio", "A")
            with pytest.raises(qio.StandstillError, match="write at offset 0 can never finish: request"
                                                          r"\(s\) 'A' suspended") as e:
                await img.write(0, b"\x09" * 512)
            assert e.value.errno == errno.EDEADLK
            with pytest.raises(qio.StandstillError):
                await img.drain()
            bp.resume()
            await img.drain()
            return await img.read(0, 512)

    assert run(go) == b"\x09" * 512


def test_close_resumes_parked(tmp_path: Path) -> None:
    path = raw(tmp_path)

    async def go() -> list[str]:
        async with qio.open(f"blkdebug::{path}", "raw") as img:
            bp = img.breakpoint("write_aio", "A")
            w = img.submit_write(0, b"\x07" * 512)
            await bp.hit()
        assert w.state == "done"
        return img.log

    log = run(go)
    assert "closing the image would wait forever" in "".join(log)
    with open(path, "rb") as f:
        assert f.read(512) == b"\x07" * 512


def test_two_images(tmp_path: Path) -> None:
    a = raw(tmp_path)
    b = str(tmp_path / "b.raw")
    with open(b, "wb") as f:
        f.truncate(1 << 20)

    async def go() -> None:
        async with qio.open(a, "raw") as ia, qio.open(f"blkdebug::{b}", "raw") as ib:
            bp = ib.breakpoint("write_aio", "A")
            wb = ib.submit_write(0, b"\x0b" * 512)
            await bp.hit()
            await ia.write(0, b"\x0a" * 512)
            bp.resume()
            await wb
            assert await ia.read(0, 1) == b"\x0a" and await ib.read(0, 1) == b"\x0b"

    run(go)


# -- the synchronous facade --------------------------------------------------------------------------
def test_sync_facade(tmp_path: Path) -> None:
    path = raw(tmp_path)
    with qio.open_sync(f"blkdebug::{path}", "raw") as img:
        img.write(0, b"\x44" * 512)
        assert img.read(0, 512) == b"\x44" * 512
        img.flush()
        img.discard(0, 512)
        assert img.length() == 1 << 20
        assert img.map() == [qio.Extent(0, 1 << 20, True)]
        assert img.block_status(0, 512).allocated
        assert img.info().format == "raw"
        bp = img.breakpoint("write_aio", "A")
        w = img.submit_write(512, b"\x55" * 512)
        assert img.hit(bp, timeout=1) is w
        bp.resume()
        img.wait(w)
        assert img.wait(img.submit_read(512, 512)) == b"\x55" * 512
        img.truncate(2 << 20)
        img.drain()
        assert img.log == ["blkdebug: Suspended request 'A'\n", "blkdebug: Resuming request 'A'\n"]
    with pytest.raises(qio.OpenError):
        qio.open_sync(str(tmp_path / "nope"), "raw")
    with qio.open_sync(path, "raw", read_only=True) as ro, pytest.raises(qio.ReadOnlyError):
        ro.write(0, b"x")


def test_lazy_export() -> None:
    """``import qio`` does not load the API (the shell's start-up stays small)."""
    code = "import sys, qio; a = 'qio.api' in sys.modules; qio.open; print(a, 'qio.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=env_with_root())
    assert out.stdout == "False True\n"
    assert "open_sync" in dir(qio)
    with pytest.raises(AttributeError):
        qio.nothing  # noqa: B018
