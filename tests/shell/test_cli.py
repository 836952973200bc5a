"""qio's own command-line behaviour where it intentionally differs from qemu-io (documented in
docs/user-guide.md): its version text, --object, and its own trace events."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import qio


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qio", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_version_is_qios_own() -> None:
    res = run("-V")
    assert res.returncode == 0
    assert res.stdout.splitlines()[0] == f"qio version {qio.__version__} (qio, a re-creation of qemu-io 7.2)"


def test_object_secret_is_accepted() -> None:
    """``--object secret`` defines a secret (as qemu-io does: silently); a bad one ends the program."""
    res = run("--object", "secret,id=s0,data=x", "-c", "quit")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = run("--object", "secret,id=s0", "-c", "quit")
    assert (res.returncode, res.stderr) == (1, "qio: Either 'file' or 'data' must be provided\n")


def test_trace_help_lists_qio_events() -> None:
    res = run("-T", "help")
    assert res.returncode == 0
    assert res.stdout.split() == ["blkdebug_event", "blkdebug_rule", "blkdebug_fire"]


def test_trace_unknown_event_warns_like_qemu() -> None:
    res = run("-T", "no_such_event", "-c", "quit")
    assert res.returncode == 0
    assert res.stderr == "qio: warning: trace event 'no_such_event' does not exist\n"


def test_truncate_without_size_does_not_crash(tmp_path: object) -> None:
    """qemu-io 7.2 segfaults on ``truncate -m off``; qio prints the usage line instead."""
    import pathlib

    img = pathlib.Path(str(tmp_path)) / "t.raw"
    img.write_bytes(bytes(4096))
    res = run("-f", "raw", "-c", "truncate -m off", str(img))
    assert res.returncode == 1
    assert res.stdout == "truncate [-m prealloc_mode] off -- truncates the current file at the given offset\n"
    assert img.stat().st_size == 4096


def test_read_only_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """qemu-io blocks in open(O_RDONLY) until a writer opens the FIFO, then refuses it as not a regular
    file; qio refuses it at once with that message (documented in docs/user-guide.md)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (["-r"], ["-r", "-f", "raw"], ["-r", "-f", "file"]):
        res = run(*args, "-c", "read 0 512", str(fifo))  # run() times out after 60 s: a hang fails
        assert res.returncode == 1
        assert res.stderr == f"qio: can't open device {fifo}: 'file' driver requires '{fifo}' to be a regular file\n"
        assert res.stdout == ""
