"""The interactive prompt (prompt_toolkit), driven headlessly through a pipe input.

While the loop runs, qio sends its stdout/stderr through prompt_toolkit's ``patch_stdout`` proxy, which
writes to the *app session's* output; the tests give the app session a plain-text output over a
StringIO to capture it, and the prompt itself a DummyOutput so no rendering gets mixed in.

Ordering caveat (a qio issue, reported): the proxy writes text directly when no prompt is active but
hands it to the event loop while one is, and leaving ``patch_stdout`` joins the proxy's thread while the
loop is blocked; so text printed just before a type-ahead Ctrl-D can arrive after the EOF newline.
The tests therefore assert which lines were printed, not their order across commands.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.output.plain_text import PlainTextOutput

from qio.block.modes import OpenFlags
from qio.interactive import history_path, interactive_loop, make_session
from qio.output import Output
from qio.shell import Shell

STATS = "512 bytes, 1 ops; "


class Session:
    def __init__(self, tmp_path: Path) -> None:
        self.img = tmp_path / "test.img"
        self.img.write_bytes(bytes(65536))
        # Output writes to file descriptors until the loop redirects it; nothing may arrive here.
        self.fd = os.open(tmp_path / "fd.out", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.fd_path = tmp_path / "fd.out"
        self.sh = Shell(Output("qio", self.fd, self.fd), "qio")
        assert not self.sh.session.open_image(str(self.img), OpenFlags(), {"driver": "raw"})

    def run(self, keys: str, history: History | None = None, use_default_history: bool = False) -> str:
        """Type ``keys`` into a fresh prompt session; return everything qio printed."""
        captured = io.StringIO()

        async def main() -> None:
            with create_pipe_input() as inp, create_app_session(input=inp, output=PlainTextOutput(captured)):
                inp.send_text(keys)
                if use_default_history:
                    session = make_session(self.sh, input=inp, output=DummyOutput())
                else:
                    session = make_session(self.sh, history=history or InMemoryHistory(), input=inp,
                                           output=DummyOutput())
                await asyncio.wait_for(interactive_loop(self.sh, session), timeout=30)
            await self.sh.session.drain()

        asyncio.run(main())
        return captured.getvalue()

    def close(self) -> None:
        asyncio.run(self.sh.session.close_image())
        os.close(self.fd)


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Session]:
    sess = Session(tmp_path)
    yield sess
    sess.close()


def test_write_read_quit(s: Session) -> None:
    out = s.run("write -P 0x41 0 512\rread -P 0x41 0 512\rquit\r")
    assert s.img.read_bytes()[:512] == b"A" * 512
    assert s.img.read_bytes()[512:] == bytes(65536 - 512)
    # Only membership is asserted: patch_stdout may deliver chunks out of order (see the module docstring).
    lines = out.splitlines()
    assert "wrote 512/512 bytes at offset 0" in lines
    assert "read 512/512 bytes at offset 0" in lines
    assert len([line for line in lines if line.startswith(STATS) and line.endswith(" ops/sec)")]) == 2
    assert len(lines) == 4
    assert s.sh.session.quit is True
    assert s.sh.last_error == 0
    assert s.fd_path.read_bytes() == b""


def test_errors_are_shown_and_remembered(s: Session) -> None:
    out = s.run("nosuch\rread -P 0x42 0 4\rread -x 0 1\rq\r")
    assert 'command "nosuch" not found\n' in out
    assert "Pattern verification failed at offset 0, 4 bytes\n" in out
    assert "read: invalid option -- 'x'\n" in out
    assert s.sh.last_error < 0


def test_hex_dump_and_length(s: Session) -> None:
    out = s.run("write -P 0x61 16 3\rread -v 16 4\rlength\rquit\r")
    assert "00000010:  61 61 61 00  aaa.\n" in out
    assert "\n64 KiB\n" in out


def test_quit_stops_before_later_lines(s: Session) -> None:
    out = s.run("quit\rwrite -P 0x41 0 512\r")
    assert out == ""
    assert s.img.read_bytes() == bytes(65536)


def test_ctrl_d_ends_the_loop(s: Session) -> None:
    out = s.run("write -P 0x5a 0 1\r\x04")
    assert s.img.read_bytes()[:2] == b"Z\0"
    assert "wrote 1/1 bytes at offset 0\n1 bytes, 1 ops; " in out
    # EOF prints a newline, as qemu-io's readline does (it can overtake the lines above, see the docstring)
    assert out.count("\n") == 3
    assert "\n\n" in out or out.startswith("\n")
    assert s.sh.session.quit is False


def test_ctrl_d_at_once(s: Session) -> None:
    assert s.run("\x04") == "\n"


def test_ctrl_c_cancels_the_line_only(s: Session) -> None:
    out = s.run("write -P 0x41 0 512\x03length\rquit\r")
    assert out == "64 KiB\n"
    assert s.img.read_bytes() == bytes(65536)


def test_aio_completion_is_printed(s: Session) -> None:
    out = s.run("aio_write -P 0x33 0 512\raio_flush\rquit\r")
    assert "wrote 512/512 bytes at offset 0\n" in out
    assert s.img.read_bytes()[:512] == b"3" * 512


def test_in_memory_history_records_commands(s: Session) -> None:
    hist = InMemoryHistory()
    s.run("length\rinfo\rquit\r", history=hist)
    assert list(hist.get_strings()) == ["length", "info", "quit"]


def test_up_arrow_recalls_history(s: Session) -> None:
    hist = InMemoryHistory()
    hist.append_string("write -P 0x77 0 2")
    s.run("\x1b[A\rquit\r", history=hist)
    assert s.img.read_bytes()[:3] == b"ww\0"


def test_history_file_in_xdg_state_home(s: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    path = state / "qio" / "history"
    assert history_path() == path
    assert not path.exists()
    s.run("length\rread 0 1\rquit\r", use_default_history=True)
    assert path.is_file()
    assert list(FileHistory(str(path)).load_history_strings()) == ["quit", "read 0 1", "length"]
    # a second session sees the first one's history
    s.sh.session.quit = False
    s.run("\x1b[A\x1b[A\x1b[A\r\x04", use_default_history=True)
    entries = list(FileHistory(str(path)).load_history_strings())
    assert entries[0] == "length"  # the recalled line was executed and appended again


def test_history_path_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_path() == tmp_path / ".local" / "state" / "qio" / "history"
    monkeypatch.setenv("XDG_STATE_HOME", "")
    assert history_path() == tmp_path / ".local" / "state" / "qio" / "history"


def test_completer_is_wired_to_the_table(s: Session) -> None:
    with create_pipe_input() as inp:
        session = make_session(s.sh, history=InMemoryHistory(), input=inp, output=DummyOutput())
    assert session.completer is not None
    words = [c.text for c in session.completer.get_completions(Document("le"), CompleteEvent())]
    assert words == ["length"]
    assert [c.text for c in session.completer.get_completions(Document("discard -"), CompleteEvent())] == ["-C", "-q"]


def test_completion_drained_after_eof_is_not_lost(tmp_path: Path) -> None:
    """An aio_write still in flight at EOF completes in the drain at exit; qemu-io prints it then."""
    from qio.block import file as file_driver

    img = tmp_path / "big.img"
    img.write_bytes(b"")
    os.truncate(img, 16 << 20)
    fd_path = tmp_path / "fd.out"
    fd = os.open(fd_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    sh = Shell(Output("qio", fd, fd), "qio")
    assert not sh.session.open_image(str(img), OpenFlags(), {"driver": "raw"})
    # Requests above 8 MiB go to the file driver's thread pool: occupy its workers so the write
    # deterministically stays in flight until the prompt loop has ended.
    release = threading.Event()
    pool = file_driver._executor()
    blockers = [pool.submit(release.wait, 30) for _ in range(pool._max_workers)]
    captured = io.StringIO()

    async def main() -> None:
        try:
            with create_pipe_input() as inp, create_app_session(input=inp, output=PlainTextOutput(captured)):
                inp.send_text("aio_write -P 0x41 0 9M\r\x04")
                session = make_session(sh, history=InMemoryHistory(), input=inp, output=DummyOutput())
                await asyncio.wait_for(interactive_loop(sh, session), timeout=30)
            assert len(sh.session.aio.inflight) == 1
        finally:
            release.set()
        await sh.session.drain()  # what qio.cli does after the loop
        await sh.session.close_image()
        sh.out.flush()

    try:
        asyncio.run(main())
    finally:
        release.set()
        for b in blockers:
            b.result(timeout=30)
        os.close(fd)
    assert img.read_bytes()[: 9 << 20] == b"A" * (9 << 20)
    printed = captured.getvalue() + fd_path.read_bytes().decode()
    assert "wrote 9437184/9437184 bytes at offset 0\n" in printed
