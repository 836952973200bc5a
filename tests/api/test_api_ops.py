"""One code path (issue 14 point 1): the shell's commands and the API issue their requests through the same
functions of qio/ops.py, so what one does the other does, byte for byte and message for message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qio
from qio import ops
from qio.block.qcow2.create import create
from qio.render import cvtstr
from qio_helpers import InProc


def raw(tmp_path: Path, name: str = "t.raw", size: int = 1 << 20) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _spy(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> list[str]:
    """Record every call of the named qio.ops functions (whoever makes it)."""
    calls: list[str] = []
    for name in names:
        real: Callable[..., Any] = getattr(ops, name)

        def wrapper(*a: Any, _real: Callable[..., Any] = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(ops, name, wrapper)
    return calls


OPS = ["read", "write", "write_request", "submit_write", "submit", "discard", "flush", "truncate", "length",
       "extents", "is_allocated", "info", "set_breakpoint", "resume", "remove_breakpoint", "wait_break", "add_rule",
       "rules", "remove_rule"]

# (shell lines, API calls) that must reach the same qio.ops functions
SCENARIO_SHELL = ["write -P 1 0 4k", "read -P 1 0 4k", "aio_write -P 2 4k 4k", "aio_flush", "discard 0 512", "flush",
                  "truncate 2M", "length", "map", "info", "break write_aio A", "aio_write 0 512", "wait_break A",
                  "resume A", "aio_flush", "break read_aio B", "remove_break B", "inject event=read_aio errno=5",
                  "rules"]


async def _api_scenario(img: qio.Image) -> None:
    await img.write(0, b"\x01" * 4096)
    assert await img.read(0, 4096) == b"\x01" * 4096
    await img.submit_write(4096, b"\x02" * 4096)
    await img.drain()
    await img.discard(0, 512)
    await img.flush()
    await img.truncate(2 << 20)
    assert await img.length() == 2 << 20
    await img.map()
    await img.info()
    bp = img.breakpoint("write_aio", "A")
    req = img.submit_write(0, b"\x00" * 512)
    assert await bp.hit() is req
    bp.resume()
    await img.drain()
    img.breakpoint("read_aio", "B").remove()
    rule = img.add_rule("inject-error", event="read_aio", errno=5)
    img.rules()
    img.remove_rule(rule)


def test_shell_and_api_share_the_operations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, OPS)
    sh = InProc(tmp_path)
    try:
        from qio.block.modes import OpenFlags

        assert not sh.sh.session.open_image(f"blkdebug::{raw(tmp_path, 'a.raw')}", OpenFlags(), {"driver": "raw"})
        rets, out, err = sh.run(*SCENARIO_SHELL)
        assert rets == [0] * len(rets), (rets, err)
        rule_id = out.split("rule #")[1].split()[0]
        assert sh.run(f"unrule {rule_id}")[0] == [0]
    finally:
        sh.close()
    shell_calls = set(calls)
    calls.clear()

    async def go() -> None:
        async with qio.open(f"blkdebug::{raw(tmp_path, 'b.raw')}", fmt="raw") as img:
            await _api_scenario(img)

    asyncio.run(go())
    api_calls = set(calls)
    # every operation the scenario exercises is reached by both front ends
    assert {"read", "write_request", "submit_write", "discard", "flush", "truncate", "length", "extents", "info",
            "set_breakpoint", "resume", "remove_breakpoint", "wait_break", "add_rule", "rules",
            "remove_rule"} <= shell_calls
    assert {"read", "write", "write_request", "submit", "discard", "flush", "truncate", "length", "extents",
            "info", "set_breakpoint", "resume", "remove_breakpoint", "wait_break", "add_rule", "rules",
            "remove_rule"} <= api_calls


def test_same_image_bytes(tmp_path: Path) -> None:
    """Zero, FUA and plain writes, discards and a truncate leave the same bytes either way."""
    a, b = raw(tmp_path, "a.raw"), raw(tmp_path, "b.raw")
    sh = InProc(tmp_path, image=a)
    try:
        rets, _, _ = sh.run("write -P 0x11 0 64k", "write -z 4k 4k", "write -f -P 0x22 8k 512", "discard 16k 4k",
                            "aio_write -P 0x33 32k 4k", "aio_write -z 36k 4k", "aio_flush", "truncate 1536k")
        assert rets == [0] * 8
    finally:
        sh.close()

    async def go() -> None:
        async with qio.open(str(b), fmt="raw") as img:
            await img.write(0, b"\x11" * 65536)
            await img.write(4096, 4096, zero=True)
            await img.write(8192, b"\x22" * 512, fua=True)
            await img.discard(16384, 4096)
            await img.submit_write(32768, b"\x33" * 4096)
            await img.submit_write(36864, 4096, zero=True)
            await img.drain()
            await img.truncate(1536 << 10)

    asyncio.run(go())
    assert a.read_bytes() == b.read_bytes()


def test_compressed_write_same_as_shell(tmp_path: Path) -> None:
    """``write -c`` and ``img.write(compressed=True)`` write the same qcow2 image."""
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create(a, 1 << 20)
    create(b, 1 << 20)
    sh = InProc(tmp_path)
    try:
        from qio.block.modes import OpenFlags

        assert not sh.sh.session.open_image(a, OpenFlags(), {"driver": "qcow2"})
        rets, out, _ = sh.run("write -c -P 0x5a 0 64k", "write -c 64k 64k")
        assert rets == [0, 0], out
    finally:
        sh.close()

    async def go() -> None:
        async with qio.open(b, fmt="qcow2") as img:
            await img.write(0, b"\x5a" * 65536, compressed=True)
            await img.write(65536, b"\xcd" * 65536, compressed=True)
            assert await img.read(0, 65536) == b"\x5a" * 65536

    asyncio.run(go())
    assert Path(a).read_bytes() == Path(b).read_bytes()


@pytest.mark.parametrize(("words", "kw"), [
    ("write -f -c 0 512", {"fua": True, "compressed": True}),
    ("write -u 0 512", {"unmap": True}),
])
def test_write_conflicts_same_message(tmp_path: Path, words: str, kw: dict[str, bool]) -> None:
    path = raw(tmp_path)
    sh = InProc(tmp_path, image=path)
    try:
        _, out, _ = sh.run(words)
    finally:
        sh.close()

    async def go() -> str:
        async with qio.open(str(path), fmt="raw") as img:
            with pytest.raises(qio.QioError) as e:
                await img.write(0, b"\0" * 512, **kw)
            return str(e.value)

    assert asyncio.run(go()) + "\n" == out


def test_map_walk_matches_shell(tmp_path: Path) -> None:
    """The API's extents are the shell's ``map`` lines."""
    path = tmp_path / "m.qcow2"
    create(str(path), 4 << 20)
    sh = InProc(tmp_path)
    try:
        from qio.block.modes import OpenFlags

        assert not sh.sh.session.open_image(str(path), OpenFlags(), {"driver": "qcow2"})
        _, _, _ = sh.run("write 64k 128k", "write 1M 64k")
        _, out, _ = sh.run("map")
    finally:
        sh.close()

    async def go() -> list[Any]:
        async with qio.open(str(path), fmt="qcow2") as img:
            return await img.map()

    extents = asyncio.run(go())
    assert len(extents) == 5
    assert "".join(f"{cvtstr(e.length)} (0x{e.length:x}) bytes {'    allocated' if e.allocated else 'not allocated'} "
                   f"at offset {cvtstr(e.offset)} (0x{e.offset:x})\n" for e in extents) == out
