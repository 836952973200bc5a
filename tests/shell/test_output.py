"""stdout/stderr emulation (spec §1.4): glibc's 4096-byte full buffering when stdout is not a terminal,
line buffering on a terminal, unbuffered stderr.

Both streams are sent to one file descriptor (as with ``2>&1``), so the byte offset at which a stderr
line lands shows exactly when buffered stdout data reached the descriptor.
"""

from __future__ import annotations

import os
import select
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qio.output import BLOCK, Output


class Merged:
    """An Output whose stdout and stderr share one file (``2>&1``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.o = Output("qio", self.fd, self.fd)

    def data(self) -> bytes:
        return self.path.read_bytes()

    def err_at(self) -> int:
        """Offset of the single stderr marker ``E\\n`` written so far."""
        data = self.data()
        assert data.count(b"E") == 1, data
        return data.index(b"E\n")

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def m(tmp_path: Path) -> Iterator[Merged]:
    merged = Merged(tmp_path / "out")
    yield merged
    merged.close()


def test_not_line_buffered_on_a_file(m: Merged) -> None:
    assert m.o.line_buffered is False


def test_stderr_overtakes_buffered_stdout(m: Merged) -> None:
    m.o.out("read 512/512 bytes at offset 0\n")
    m.o.err('command "nosuch" not found\n')
    assert m.data() == b'command "nosuch" not found\n'
    m.o.flush()
    assert m.data() == b'command "nosuch" not found\nread 512/512 bytes at offset 0\n'


def test_exactly_full_buffer_is_not_flushed(m: Merged) -> None:
    m.o.out("x" * BLOCK)
    assert m.data() == b""
    m.o.err("E\n")
    assert m.err_at() == 0
    m.o.flush()
    assert m.data() == b"E\n" + b"x" * BLOCK


def test_full_buffer_is_flushed_by_the_next_byte(m: Merged) -> None:
    m.o.out("x" * BLOCK)
    m.o.out("y")
    m.o.err("E\n")
    assert m.err_at() == BLOCK
    m.o.flush()
    assert m.data() == b"x" * BLOCK + b"E\n" + b"y"


def test_many_small_writes_fill_to_exactly_4096(m: Merged) -> None:
    for _ in range(BLOCK // 64):
        m.o.out("z" * 63 + "\n")
    m.o.err("E\n")
    assert m.err_at() == 0
    m.o.out("\n")
    m.o.err("F\n")
    data = m.data()
    assert data.index(b"F\n") == 2 + BLOCK


def test_write_straddling_the_boundary(m: Merged) -> None:
    m.o.out("a" * 4000)
    m.o.out("b" * 200)  # 96 bytes complete the block, which is written; 104 stay buffered
    m.o.err("E\n")
    assert m.err_at() == BLOCK
    m.o.flush()
    assert m.data() == b"a" * 4000 + b"b" * 96 + b"E\n" + b"b" * 104


def test_large_write_into_empty_buffer_writes_whole_blocks_directly(m: Merged) -> None:
    m.o.out("z" * 10000)  # 4096 via the buffer, 4096 directly, 1808 buffered
    m.o.err("E\n")
    assert m.err_at() == 2 * BLOCK
    m.o.flush()
    assert m.data() == b"z" * 8192 + b"E\n" + b"z" * 1808


def test_large_write_after_partial_buffer(m: Merged) -> None:
    m.o.out("a" * 10)
    m.o.out("b" * 20000)  # fill+flush 4096, then 3 whole blocks directly, 3626 buffered
    m.o.err("E\n")
    assert m.err_at() == 4 * BLOCK
    m.o.flush()
    assert m.data() == b"a" * 10 + b"b" * (4 * BLOCK - 10) + b"E\n" + b"b" * (20000 - 4 * BLOCK + 10)


def test_large_write_that_is_a_block_multiple_after_filling(m: Merged) -> None:
    m.o.out("a" * 96)
    m.o.out("b" * (4000 + 2 * BLOCK))  # the rest after filling is exactly two blocks: nothing buffered
    m.o.err("E\n")
    assert m.err_at() == 3 * BLOCK
    m.o.flush()
    assert m.data().endswith(b"E\n")


def test_spec_example_offsets(m: Merged) -> None:
    """A -c run whose stats lines exceed 4096 bytes: stderr lines land at 4096-multiples of stdout."""
    line1 = "read 512/512 bytes at offset 0\n"
    line2 = "512 bytes, 1 ops; 00.00 sec (2.838 MiB/sec and 5811.9599 ops/sec)\n"  # 97 bytes a pair
    msg = "bad argument count 0 to read, expected at least 2 arguments\n"
    for i in range(150):
        m.o.out(line1)
        m.o.out(line2)
        if i % 50 == 49:  # after 4850, 9700 and 14550 bytes of stdout
            m.o.err(msg)
    data = m.data()
    n = len(msg)
    assert [i for i in range(len(data)) if data.startswith(msg.encode(), i)] == [4096, 8192 + n, 12288 + 2 * n]
    m.o.flush()
    assert len(line1 + line2) == 97
    assert len(m.data()) == 150 * 97 + 3 * n


def test_byte_counting_uses_encoded_length(m: Merged) -> None:
    m.o.out("\u00e9" * (BLOCK // 2))  # 4096 bytes of UTF-8: exactly full
    m.o.err("E\n")
    assert m.err_at() == 0
    m.o.out("\u00e9")
    m.o.err("F\n")
    assert m.data().index(b"F\n") == 2 + BLOCK


def test_surrogateescape_round_trips_raw_bytes(m: Merged) -> None:
    m.o.out("\udcff\udc80x\n")
    m.o.flush()
    assert m.data() == b"\xff\x80x\n"


def test_discard_loses_unflushed_stdout(m: Merged) -> None:
    m.o.out("x" * (BLOCK + 10))
    m.o.discard()
    m.o.flush()
    assert m.data() == b"x" * BLOCK


def test_flush_on_empty_buffer_writes_nothing(m: Merged) -> None:
    m.o.flush()
    assert m.data() == b""


def test_error_and_warning_report_prefixes(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "e", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        o = Output("myio", fd, fd)
        o.out("buffered\n")
        o.error_report("Block node is read-only")
        o.warn_report("Using a multiplier suffix on hex numbers is deprecated: 0x1k")
        o.flush()
    finally:
        os.close(fd)
    assert (tmp_path / "e").read_bytes() == (
        b"myio: Block node is read-only\n"
        b"myio: warning: Using a multiplier suffix on hex numbers is deprecated: 0x1k\n"
        b"buffered\n"
    )


def test_separate_streams(tmp_path: Path) -> None:
    fo = os.open(tmp_path / "o", os.O_RDWR | os.O_CREAT, 0o600)
    fe = os.open(tmp_path / "e", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        o = Output("qio", fo, fe)
        o.out("out\n")
        o.err("err\n")
        assert (tmp_path / "o").read_bytes() == b""
        assert (tmp_path / "e").read_bytes() == b"err\n"
        o.flush()
        assert (tmp_path / "o").read_bytes() == b"out\n"
    finally:
        os.close(fo)
        os.close(fe)


def test_redirect_flushes_first_then_is_line_buffered(m: Merged) -> None:
    m.o.out("pending\n")
    got: list[tuple[str, bytes]] = []
    m.o.redirect(lambda b: got.append(("out", b)), lambda b: got.append(("err", b)))
    assert m.data() == b"pending\n"
    m.o.out("partial")
    assert got == []
    m.o.out(" line\n")
    m.o.err("E\n")
    assert got == [("out", b"partial line\n"), ("err", b"E\n")]


# -- glibc model differential ---------------------------------------------------------------------
class GlibcModel:
    """The reference model of spec §1.4 (``_IO_new_file_xsputn`` with a 4096-byte buffer)."""

    def __init__(self) -> None:
        self.buf, self.written = b"", b""

    def w(self, data: bytes) -> None:
        self.written += data

    def write(self, data: bytes) -> None:
        space = BLOCK - len(self.buf)
        if len(data) <= space:
            self.buf += data
            return
        self.buf += data[:space]
        data = data[space:]
        self.w(self.buf)
        self.buf = b""
        n = len(data) - len(data) % BLOCK
        if n:
            self.w(data[:n])
            data = data[n:]
        self.buf = data

    def flush(self) -> None:
        if self.buf:
            self.w(self.buf)
            self.buf = b""


ops = st.lists(st.one_of(
    st.tuples(st.just("out"), st.integers(0, 9000)),
    st.tuples(st.just("err"), st.integers(1, 50)),
    st.tuples(st.just("flush"), st.just(0)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_matches_glibc_model(tmp_path_factory: pytest.TempPathFactory, seq: list[tuple[str, int]]) -> None:
    path = tmp_path_factory.mktemp("model") / "out"
    merged = Merged(path)
    model = GlibcModel()
    try:
        for i, (op, n) in enumerate(seq):
            byte = bytes([0x41 + i % 26])
            if op == "out":
                merged.o.out((byte * n).decode())
                model.write(byte * n)
            elif op == "err":
                merged.o.err((b"!" * n).decode())
                model.w(b"!" * n)
            else:
                merged.o.flush()
                model.flush()
            assert merged.data() == model.written
        merged.o.flush()
        model.flush()
        assert merged.data() == model.written
    finally:
        merged.close()


# -- terminal: line buffered ----------------------------------------------------------------------------
def _read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, f"timed out, got {data!r}"
        data += os.read(fd, n - len(data))
    return data


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no \n -> \r\n translation
    try:
        yield master, slave
    finally:
        os.close(slave)
        os.close(master)


def test_line_buffered_on_a_tty(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    o = Output("qio", slave, slave)
    assert o.line_buffered is True
    o.out("abc")
    os.write(slave, b"|")  # a marker written directly: "abc" must still be buffered
    o.out("def\n")
    assert _read_exactly(master, 8) == b"|abcdef\n"


def test_tty_keeps_natural_order(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    o = Output("qio", slave, slave)
    o.out("read 512/512 bytes at offset 0\n")
    o.err('command "nosuch" not found\n')
    o.out("wrote 1/1 bytes at offset 0\n")
    expect = b'read 512/512 bytes at offset 0\ncommand "nosuch" not found\nwrote 1/1 bytes at offset 0\n'
    assert _read_exactly(master, len(expect)) == expect


def test_tty_prompt_without_newline_needs_flush(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    o = Output("qio", slave, slave)
    o.out("qio> ")
    os.write(slave, b"|")
    o.flush()
    assert _read_exactly(master, 6) == b"|qio> "
