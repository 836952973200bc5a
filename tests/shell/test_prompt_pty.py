"""The interactive prompt as a person sees it (issue 12): qio on a real pseudo-terminal, keys typed,
the screen rendered by a terminal emulator.  Slowness comes from ``null-co`` latency, never from
sleeps: every wait is for something to appear on the screen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("pexpect")
pytest.importorskip("pyte")

from pty_screen import Term, ready

SLOW = "driver=null-co,size=1M,latency-ns=700000000"
DEBUG = "json:{'driver': 'raw', 'file': {'driver': 'blkdebug', 'image': {'driver': 'null-co', 'size': 1048576}}}"



def test_no_cpr_warning_on_a_terminal_that_does_not_answer(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", SLOW, cpr=False)
    t.sendline("length")
    t.wait("1 MiB")
    assert "WARNING" not in t.text() and "CPR" not in t.text()


def test_break_completes_event_names_in_a_menu(term) -> None:  # type: ignore[no-untyped-def]
    t = term(DEBUG)
    t.send("break wri\t")
    # the common prefix is inserted, the rest is listed with a description
    t.wait(lambda t: "write_compressed" in t.text())
    assert t.prompt_line() == "qio> break write_"
    menu = [line for line in t.lines() if "blkdebug event" in line]
    assert [line.split()[0] for line in menu] == ["write_aio", "write_compressed"]
    t.send("a\t")
    t.wait(lambda t: t.prompt_line() == "qio> break write_aio")  # one match: inserted with its space
    t.send("A\r")
    ready(t, 2)


def test_resume_offers_suspended_tags_first(term) -> None:  # type: ignore[no-untyped-def]
    t = term(DEBUG)
    for n, line in enumerate(("break read_aio A", "break write_aio B", "aio_write 0 512"), 2):
        t.sendline(line)
        ready(t, n)
    t.wait("Suspended request 'B'")
    t.send("resume \t")
    t.wait(lambda t: any("armed at read_aio" in line for line in t.lines()))
    menu = [line.split() for line in t.lines() if "suspended" in line.split() or "armed" in line.split()]
    assert [m[0] for m in menu] == ["B", "A"]
    assert menu[0][1] == "suspended"
    t.send("B\r")
    t.wait("wrote 512/512 bytes at offset 0")


def test_command_option_and_value_completion(term, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", SLOW)
    t.send("leng\t")
    t.wait(lambda t: t.prompt_line() == "qio> length")  # trailing space: the cursor is after it
    assert t.screen.cursor.x == len("qio> length ")
    t.send("\r")
    t.wait("1 MiB")
    t.send("reopen -c dir\t")
    t.wait(lambda t: t.prompt_line() == "qio> reopen -c directsync")
    t.send("\x15")  # Ctrl-U: clear the line
    t.send("help wri\t")
    t.wait(lambda t: "writev" in t.text() and "qio> help write" in t.text())
    assert any("writes a number of bytes" in line for line in t.lines())


def test_history_suggestion_accepted_with_right_arrow(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", SLOW)
    t.sendline("alloc 0 4096")
    t.wait("0/4096 bytes allocated")
    ready(t, 2)
    t.send("al")
    t.wait(lambda t: t.prompt_line() == "qio> alloc 0 4096")  # the suggestion (grey)
    y = len(t.lines()) - 1 - t.lines()[::-1].index("qio> alloc 0 4096")  # the prompt, not the first run
    assert t.screen.buffer[y][len("qio> al")].fg != t.screen.buffer[y][len("qio> a")].fg
    t.send("\x1b[C\r")  # right arrow accepts it
    t.wait(lambda t: t.text().count("0/4096 bytes allocated") == 2)


def test_live_output_keeps_the_half_typed_line(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", SLOW)
    t.sendline("aio_write 0 512")
    ready(t, 2)
    t.send("leng")
    t.wait("wrote 512/512 bytes at offset 0")  # printed while the line is half typed
    t.wait(lambda t: t.prompt_line() == "qio> leng" and t.screen.cursor.x == len("qio> leng"))
    lines = t.lines()
    assert lines.index("wrote 512/512 bytes at offset 0") < lines.index("qio> leng")
    t.send("th\r")
    t.wait("1 MiB")


def test_type_ahead_runs_in_order(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", SLOW)
    t.send("read 0 512\rlength\r")  # the second line is typed while the read waits 0.7 s
    t.wait("1 MiB")
    lines = [line for line in t.lines() if line]
    i = lines.index("read 512/512 bytes at offset 0")
    assert lines[i - 1] == "qio> read 0 512"
    assert lines[i + 2:i + 4] == ["qio> length", "1 MiB"]  # echoed as it runs, not in the output


def test_ctrl_c_interrupts_the_wait_not_the_request(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", "driver=null-co,size=1M,latency-ns=2500000000")
    t.sendline("aio_write 0 512")
    ready(t, 2)
    t.sendline("aio_flush")
    t.wait("running")  # the progress line: the command is waiting
    t.send("\x03")
    t.wait("interrupted: aio_flush (1 request(s) still in flight")
    ready(t, 3)
    t.send("\x03")  # a second Ctrl-C right after: how to quit
    t.wait("to leave qio, type quit")
    ready(t, 4)
    t.sendline("length")
    t.wait("1 MiB")
    t.wait("wrote 512/512 bytes at offset 0")  # the request completes later, at the prompt
    t.send("\x03")
    t.send("\x03")  # twice at an empty prompt: how to quit
    t.wait(lambda t: t.text().count("to leave qio, type quit") == 2)
    t.sendline("quit")
    t.child.expect(__import__("pexpect").EOF)
    t.child.close()
    assert t.child.exitstatus == 1  # the interrupted command counts as a failure


def test_progress_line_disappears(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", "driver=null-co,size=1M,latency-ns=1200000000")
    t.sendline("read 0 64k")
    # one request (no max-transfer): nothing is done until it completes
    t.wait(lambda t: any(re.fullmatch(r"read 0 64k: 0 bytes of 64 KiB, 0 bytes/s, running \d\.\d s", line)
                         for line in t.lines()))
    t.wait("read 65536/65536 bytes at offset 0")
    ready(t, 2)
    assert "running" not in t.text()


def test_status_line(term) -> None:  # type: ignore[no-untyped-def]
    t = term(DEBUG)
    t.wait(lambda t: "raw > blkdebug > null-co" in t.lines()[-1])
    assert "rw writethrough" in t.lines()[-1] and "in flight 0" in t.lines()[-1]
    t.sendline("break write_aio A")
    ready(t, 2)
    t.sendline("aio_write 0 512")
    t.wait(lambda t: "suspended A" in t.lines()[-1] and "in flight 1" in t.lines()[-1])
    t.send("\x1bOQ")  # F2 hides it
    t.wait(lambda t: "blkdebug" not in t.lines()[-1])
    t.send("\x1bOQ")
    t.wait(lambda t: "blkdebug" in t.lines()[-1])
    t.send("nosuch 1")  # validated while typed
    t.wait(lambda t: 'command "nosuch" not found' in t.lines()[-1])
    t.send("\r")  # Enter still runs it: qemu-io's own message
    t.wait(lambda t: 'command "nosuch" not found' in t.lines() and "suspended A" in t.lines()[-1])


def test_no_status_line_with_term_dumb(term) -> None:  # type: ignore[no-untyped-def]
    t = term(DEBUG, env={"TERM": "dumb"})
    t.sendline("length")
    t.wait("1 MiB")
    assert "blkdebug" not in t.text()


@pytest.mark.parametrize("no_color", [False, True])
def test_colouring_honours_no_color(term, no_color: bool) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", SLOW, env={"NO_COLOR": "1"} if no_color else {})
    t.send("read -v 0x200 512")
    t.wait(lambda t: t.prompt_line() == "qio> read -v 0x200 512")
    row = t.screen.buffer[t.lines().index("qio> read -v 0x200 512")]
    colours = {row[5].fg, row[10].fg, row[13].fg}
    if no_color:
        assert colours == {"default"}
    else:
        assert row[5].fg == "green" and row[10].fg == "cyan" and row[13].fg == "brown"


def test_record_writes_a_replayable_script(term, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from pty_screen import ROOT

    args = ["--image-opts", "driver=null-co,size=1M,read-zeroes=on"]
    t = term(*args)
    lines = ["write -P 5 0 512", "read -P 5 0 512", "aio_read -P 0 0 4k", "aio_flush", "length", "map"]
    t.sendline("record rec.qio")
    t.wait("record: writing the commands to rec.qio")
    for n, line in enumerate(lines, 3):
        t.sendline(line)
        ready(t, n)
    t.sendline("record stop")
    t.wait("record: stopped")
    assert (tmp_path / "rec.qio").read_text() == "".join(f"{line}\n" for line in lines)
    expected = (tmp_path / "rec.qio.out").read_text()
    assert "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)" in expected
    assert "Pattern verification failed at offset 0, 512 bytes" in expected  # null-co stores nothing
    with open(tmp_path / "rec.qio", "rb") as script:
        res = subprocess.run([sys.executable, "-m", "qio", *args], stdin=script, capture_output=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=60)
    replayed = re.sub(r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)",
                      "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", res.stdout.decode()).replace("qio> ", "")
    assert replayed == expected


def test_prompt_is_written_before_the_line_editor_loads(term) -> None:  # type: ignore[no-untyped-def]
    """Start-up: the first bytes on the screen are the prompt itself (prompt_toolkit's import, most of
    the start-up time, comes after); the editor then redraws it in place."""
    t = term("--image-opts", SLOW)
    assert t.raw.startswith(b"qio> \r")
    assert t.lines()[0] == "qio>"


def test_help_at_a_terminal_lists_object(tmp_path: Path) -> None:
    """qio takes ``--object`` (secrets), so its help at a terminal lists it like qemu-io's."""
    t = Term(["-h"], tmp_path, rows=80)
    t.wait("QEMU Disk exerciser")
    t.wait("--image-opts")
    t.close()
    assert "--object OBJECTDEF" in t.text()


def test_status_line_shows_nbd_clients(term, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The NBD server's clients and their requests in flight appear in the status line as they come."""
    import socket
    import subprocess

    sock = tmp_path / "s.sock"
    t = term(DEBUG, cols=160)
    t.sendline("break write_aio A")
    ready(t, 2)
    t.sendline(f"nbd_server_start unix:{sock}")
    t.wait(lambda t: "nbd s.sock 0 clients" in t.lines()[-1])
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(sock))
    t.wait(lambda t: "nbd s.sock 1 client " in t.lines()[-1])
    client = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write 0 4k", f"nbd+unix:///?socket={sock}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t.wait(lambda t: "2 clients (1 req)" in t.lines()[-1] and "suspended A" in t.lines()[-1])
        t.sendline("resume A")
        out, _ = client.communicate(timeout=30)
    finally:
        client.kill()
        raw.close()
    assert "wrote 4096/4096" in out
    t.wait(lambda t: "nbd s.sock 0 clients" in t.lines()[-1])
