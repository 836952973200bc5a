"""Fast paths of the per-request hot path (issue 10, speed) give exactly what the general code gives.

Each shortcut is compared with the code it bypasses, on every input of a small exhaustive set or on
random inputs, so that a later change to either side that makes them disagree fails here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from pathlib import Path
from typing import Any

import pytest

from qio.commands import spec as spec_mod
from qio.commands.common import pattern_iov
from qio.commands.spec import Invocation, ParseFailure
from qio.commands.table import build_table
from qio.lines import MAXLINE, LineReader
from qio.output import BLOCK, Output

TABLE = build_table()
WORDS = ("-q", "-C", "-qC", "-Cq", "-f", "-i", "-z", "-u", "-P", "-P0x5a", "-Pz", "-x", "-:", "--", "-",
         "0", "4k", "-1", "-qx", "--q")


def _options(inv: Invocation, convert: dict[str, Any], slow: bool) -> Any:
    """``inv.options(convert)`` with or without the flags-only shortcut: its result, or the failure."""
    saved = spec_mod._flags_only
    if slow:
        spec_mod._flags_only = lambda *a: None
    try:
        found, args = inv.options(convert)
        return list(found.items()), args, list(inv.messages)
    except ParseFailure as f:
        return "fail", f.ret, list(f.messages)
    except ValueError as e:  # a converter's own failure (the test converter below)
        return "conv", str(e), list(inv.messages)
    finally:
        spec_mod._flags_only = saved


def _conv(arg: str) -> str:
    if arg == "z":
        raise ValueError(arg)
    return arg.upper()


@pytest.mark.parametrize("name", ["aio_write", "read", "discard", "writev"])
def test_flags_only_options_match_getopt(name: str) -> None:
    spec = TABLE.find(name)
    assert spec is not None
    letters = [c for c in spec.optstring if c != ":"]
    # every letter as a flag, as a converted option, or unhandled (missing from the table)
    converts = [
        {c: None for c in letters},
        {c: (_conv if c in "Pqs" else None) for c in letters},
        {c: None for c in letters if c != "C"},
    ]
    shortcut_taken = 0
    for n in range(4):
        for words in itertools.product(WORDS, repeat=n):
            argv = [name, *words]
            for convert in converts:
                fast = _options(Invocation(spec, list(argv), "qio", TABLE), convert, slow=False)
                slow = _options(Invocation(spec, list(argv), "qio", TABLE), convert, slow=True)
                assert fast == slow, argv
                found: dict[str, Any] = {}
                if spec_mod._flags_only(argv, spec.optstring, convert, found) is not None:
                    shortcut_taken += 1
    assert shortcut_taken > 200  # the shortcut is really exercised


def _fgets_lines(data: bytes) -> list[str]:
    """What qemu-io reads with ``fgets(line, 1024, stdin)``: pieces of at most 1023 bytes, each
    without its newline and cut at a NUL."""
    out = []
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos, pos + MAXLINE - 1)
        end = nl + 1 if nl >= 0 else min(len(data), pos + MAXLINE - 1)
        piece = data[pos:end]
        pos = end
        if piece.endswith(b"\n"):
            piece = piece[:-1]
        piece = piece.split(b"\0", 1)[0]
        out.append(piece.decode("utf-8", "surrogateescape"))
    return out


class _Aio:
    inflight: set[int] = set()
    external = 0

    def flush_pending(self) -> bool:
        return False

    def has_pending(self) -> bool:
        return False


def _read_all(path: Path) -> list[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = LineReader(fd)
        lines = []

        async def run() -> None:
            while (line := await reader.fetchline(_Aio())) is not None:  # type: ignore[arg-type]
                lines.append(line)

        asyncio.run(run())
        return lines
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", range(12))
def test_line_reader_splits_as_fgets(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randrange(1, 4000)):
        kind = rng.random()
        if kind < 0.8:
            n = rng.randrange(0, 40)
        elif kind < 0.95:
            n = rng.choice([MAXLINE - 3, MAXLINE - 2, MAXLINE - 1, MAXLINE, MAXLINE + 1, 2 * MAXLINE - 2])
        else:
            n = rng.randrange(0, 5000)
        line = bytes(rng.choice(b"abc \t\0\xff\xc3\xa9") for _ in range(n))
        parts.append(line + (b"\r\n" if rng.random() < 0.05 else b"\n"))
    data = b"".join(parts)
    if seed % 2:
        data += b"no newline at the end"
    path = tmp_path / "script"
    path.write_bytes(data)
    assert _read_all(path) == _fgets_lines(data)


def test_line_reader_long_and_empty_lines(tmp_path: Path) -> None:
    data = b"\n\n" + b"x" * (MAXLINE - 2) + b"\n" + b"y" * (MAXLINE - 1) + b"\n\nz"
    path = tmp_path / "script"
    path.write_bytes(data)
    assert _read_all(path) == _fgets_lines(data)
    assert _read_all(path)[:3] == ["", "", "x" * (MAXLINE - 2)]


@pytest.mark.parametrize("buffered", ["", "abc", "x" * (BLOCK - 2), "y" * (BLOCK + 7)])
@pytest.mark.parametrize("prompt", ["qio> ", "p" * BLOCK, "q" * (BLOCK + 1), "a\nb> "])
@pytest.mark.parametrize("line_buffered", [False, True])
def test_prompt_writes_what_out_and_flush_write(buffered: str, prompt: str, line_buffered: bool) -> None:
    def run(use_prompt: bool) -> list[tuple[str, bytes]]:
        writes: list[tuple[str, bytes]] = []
        o = Output("qio", -1, -1)
        o._w_out = lambda b: writes.append(("out", bytes(b)))  # type: ignore[method-assign]
        o._w_err = lambda b: writes.append(("err", bytes(b)))  # type: ignore[method-assign]
        o.line_buffered = line_buffered
        o.out(buffered)
        if use_prompt:
            o.prompt(prompt)
        else:
            o.out(prompt)
            o.flush()
        o.err("E\n")
        return writes

    assert run(True) == run(False)


def test_pattern_buffers_are_shared_read_only_and_right() -> None:
    a = pattern_iov(0xCD, 4096)
    b = pattern_iov(0xCD, 4096)
    assert a is not b and a[0] is b[0]  # a fresh list, one shared buffer
    assert a[0].readonly and bytes(a[0]) == b"\xcd" * 4096
    assert bytes(pattern_iov(0x5A, 512)[0]) == b"\x5a" * 512
    for n in (0, 1, 65536, 65537, 1 << 20, (1 << 20) + 5, 3 << 20):
        iov = pattern_iov(7, n)
        assert sum(len(v) for v in iov) == n and all(v.tobytes() == bytes([7]) * len(v) for v in iov)


# -- aio_write's fast path: parser, executor, inline submission ------------------------------------
NUM_WORDS = ("0", "4k", "512", "08", "0x10", "1.5k", "0x10k", "-1", "²", "1k2", "", "9223372036854775807",
             "9223372036854775808", "2147483648", "2147483136", "3G")


def test_fast_aio_write_parses_as_parse_aio_write() -> None:
    spec = TABLE.find("aio_write")
    assert spec is not None and spec.fast is not None
    words = ("-q", "-C", "-qC", "-z", "-f", "-i", "--", "-P", "0xab", *NUM_WORDS)
    accepted = 0
    for n in range(1, 5):
        for rest in itertools.product(words, repeat=n):
            argv = ["aio_write", *(w for w in rest if w)]
            fast = spec.fast(argv)
            if fast is None:
                continue
            accepted += 1
            inv = Invocation(spec, list(argv), "qio", TABLE)
            assert spec.parse is not None
            assert spec.parse(inv) == fast, argv
            assert inv.messages == [], argv
    assert accepted > 100


SIZE = 1 << 20
FAIL_AT = 77 * 4096  # the host write at this offset fails (ENOSPC)


MISC_LINES = ("aio_flush", "read -q -P 0xcd 0 4k", "aio_read -q 4096 512", "aio_write  -q  0  4k",
              "aio_write -q 0 4k 4k", "aio_write -qC 0 512", "aio_write 0 -q 4k", "aio_write -q ² 4k",
              "aio_write -q 0x10k 512", "aio_write -q 1.5k 512", "aio_write -q -1 4k", "aio_write -q 0 -1",
              "aio_write -q 0 3G", "aio_write -q", "aio_write -q 0", "sleep 0", "aio_write -P 0x5a 0 512",
              "aio_write -z 0 512", "write -q 0 4k", "aio_write 512 1k", "aio_write -q 8k")


def _script(seed: int, img: Path) -> list[str]:
    rng = random.Random(seed)
    open_rw = f"open -t writeback -o driver=raw {img}"
    lines = [open_rw]
    for _ in range(400):
        k = rng.random()
        off = rng.randrange(SIZE // 4096) * 4096
        if k < 0.5:
            lines.append(f"aio_write -q {off} 4k")
        elif k < 0.6:
            lines.append(f"aio_write {off + rng.choice((0, 1, 511))} {rng.choice(('512', '1k', '0', '4096'))}")
        elif k < 0.65:
            lines.append(f"aio_write -q {SIZE - rng.choice((0, 100, 4096))} {rng.choice(('4k', '1', '0'))}")
        elif k < 0.7:
            lines.append(f"aio_write -q {FAIL_AT} 4k")
        elif k < 0.8:
            lines.append(rng.choice(MISC_LINES))
        elif k < 0.85:
            lines += ["close", "aio_write -q 0 4k", f"open -r -o driver=raw {img}", "aio_write -q 4096 4k",
                      "aio_write 0 512", "close", open_rw]
        elif k < 0.9:
            lines += ["close", f"open -o driver=raw {img}", f"aio_write -q {off} 4k", "close", open_rw]
        else:
            lines.append(f"aio_write -q {off} {rng.choice(('512', '64k', '1', '8k'))}")
    return [*lines, *MISC_LINES, f"aio_write -q {FAIL_AT} 4k", f"aio_write -q {SIZE} 1", "close",
            f"open -r -o driver=raw {img}", "aio_write -q 4096 4k"]


def _merged(writes: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The output as ``2>&1`` shows it: consecutive writes to one stream joined (held prompts go out
    in fewer, larger writes; the byte order is what counts)."""
    out: list[tuple[str, bytes]] = []
    for stream, data in writes:
        if out and out[-1][0] == stream:
            out[-1] = (stream, out[-1][1] + data)
        elif data:
            out.append((stream, data))
    return out


def _run_script(tmp_path: Path, name: str, lines: list[str], slow: bool, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[Any, ...]:
    """The script through the piped loop, with or without the fast path of aio_write: what it wrote to
    stdout and stderr (in order), the image, and the event loop's bookkeeping."""
    from qio import aio as aio_mod
    from qio.block.backend import BlockBackend
    from qio.lines import pipe_loop
    from qio.shell import Shell

    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    script = tmp_path / name
    script.write_text("".join(f"{line}\n" for line in lines).replace("IMG", str(img)))
    writes: list[tuple[str, bytes]] = []
    out = Output("qio", -1, -1)
    out._w_out = lambda b: writes.append(("out", bytes(b)))  # type: ignore[method-assign]
    out._w_err = lambda b: writes.append(("err", bytes(b)))  # type: ignore[method-assign]
    clock = itertools.count(10**12, 1234567)
    real_pwritev = os.pwritev

    def pwritev(fd: int, bufs: Any, offset: int) -> int:
        if offset == FAIL_AT:
            raise OSError(28, "No space left on device")
        return real_pwritev(fd, bufs, offset)

    with monkeypatch.context() as m:
        m.setattr(os, "pwritev", pwritev)
        m.setattr("time.monotonic_ns", lambda: next(clock))
        sh = Shell(out, "qio")
        if slow:  # the general path, and every prompt written at once as qemu-io does
            m.setattr(out, "prompt_held", out.prompt)
            spec = sh.table.find("aio_write")
            assert spec is not None
            sh.table._lookup["aio_write"] = spec._replace(fast=None, run_now=None)
            m.setattr(sh, "execute_now", lambda line: None)
            m.setattr(BlockBackend, "can_write_inline", lambda *a: False)
        yields = aio_mod.AIO.yields
        fd = os.open(script, os.O_RDONLY)

        async def main() -> None:
            await pipe_loop(sh, fd)
            await sh.session.drain("exiting")
            await sh.session.close_image()

        try:
            asyncio.run(main())
        finally:
            os.close(fd)
        out.flush()
    aio = sh.session.aio
    return (_merged(writes), img.read_bytes(), sh.last_error, aio_mod.AIO.yields - yields, aio._seq, aio.polls,
            aio.progress, sorted((k, v - yields) for k, v in aio.finished_yields.items()),
            sorted(aio._undelivered), aio.inflight)


@pytest.mark.parametrize("seed", range(4))
def test_fast_aio_write_runs_as_the_general_path(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    lines = _script(seed, Path("IMG"))
    fast = _run_script(tmp_path, "fast", lines, False, monkeypatch)
    slow = _run_script(tmp_path, "slow", lines, True, monkeypatch)
    assert fast == slow
    text = b"".join(data for _, data in fast[0])
    for expected in (b"aio_write failed: No space left on device", b"aio_write failed: Input/output error",
                     b"wrote 512/512 bytes", b"Parsing error", b"no file open", b"Block node is read-only"):
        assert expected in text, expected


@pytest.mark.parametrize("seed", range(20))
def test_held_prompts_keep_the_merged_stream(seed: int) -> None:
    """Output.prompt_held against Output.prompt (qemu-io's printf + fflush) over random sequences of
    output: what reached the (2>&1) stream is always a prefix of what qemu-io's writes give, the rest
    is held prompt bytes only (at most HELD_MAX), and every write to stderr, flush, release and exit
    brings both to the same bytes."""
    from qio import stdio
    from qio.output import HELD_MAX

    rng = random.Random(seed)

    def make() -> tuple[Output, bytearray]:
        stream = bytearray()
        o = Output("qio", -1, -1)
        o._w_out = stream.extend  # type: ignore[assignment]
        o._w_err = stream.extend  # type: ignore[assignment]
        return o, stream

    held, got = make()
    ref, want = make()
    for _ in range(rng.randrange(50, 3000)):
        k = rng.random()
        if k < 0.6:
            text = rng.choice(("qio> ", "p" * rng.randrange(1, 5000), "a\nb> "))
            held.prompt_held(text)
            ref.prompt(text)
        elif k < 0.75:
            text = rng.choice(("x", "line\n", "y" * rng.randrange(1, 9000)))
            held.out(text)
            ref.out(text)
        elif k < 0.85:
            held.err("E\n")
            ref.err("E\n")
            assert got == want
        elif k < 0.9:
            held.flush()
            ref.flush()
            assert got == want
        elif k < 0.95:
            stdio.release()  # the hook of direct writers (block layer errors, abort)
            assert got == want
        else:
            held.prompt("qio> ")  # a prompt before a read that may wait
            ref.prompt("qio> ")
            assert got == want
        assert want[: len(got)] == got
        assert len(want) - len(got) <= HELD_MAX + 5000
    held.flush()
    ref.flush()
    assert got == want


def test_fatal_signal_writes_held_prompts_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM/SIGHUP (default action) while prompts are held: they are written, then the process dies
    of the signal with its default action."""
    import signal

    from qio import stdio

    raised: list[int] = []
    stream = bytearray()
    saved = {sig: signal.getsignal(sig) for sig in stdio.FATAL}
    monkeypatch.setattr(stdio, "_release", None)
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    try:
        for sig in stdio.FATAL:
            signal.signal(sig, signal.SIG_DFL)
        o = Output("qio", -1, -1)
        o._w_out = stream.extend  # type: ignore[assignment]
        o.prompt_held("qio> ")
        o.prompt_held("qio> ")
        assert stream == b"" and signal.getsignal(signal.SIGTERM) is stdio._fatal
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        assert stream == b"qio> qio> " and raised == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)
