"""The prompt's progress line and Ctrl-C on a real pseudo-terminal (issue 12, points 5 and 6).

Slowness comes from ``null-co`` latency, never from sleeps: a blkdebug node with ``max-transfer`` splits
one command into sub-requests that each wait for the latency, and a qcow2 image whose backing file is a
slow null-co waits for it on every copy-on-write.  Every wait is for something to appear on the screen.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pexpect")
pytest.importorskip("pyte")

import pexpect

from oracle import ROOT as REPO
from pty_screen import Term, ready


def split_device(size: str, latency_ns: int) -> str:
    """A raw node over blkdebug (1 MiB max-transfer) over null-co: requests go down in 1 MiB pieces."""
    n = {"8M": 8 << 20, "4M": 4 << 20}[size]
    return ("json:{'driver': 'raw', 'file': {'driver': 'blkdebug', 'max-transfer': 1048576, "
            f"'image': {{'driver': 'null-co', 'size': {n}, 'latency-ns': {latency_ns}}}}}}}")



UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20}


def progress_lines(t: Term, cmd: str, total: str) -> list[tuple[int, float, float, int]]:
    """The progress lines of ``cmd`` on the screen: (bytes done, rate in bytes/s, elapsed s, row)."""
    pat = re.compile(re.escape(cmd) + r": ([\d.]+) (bytes|KiB|MiB) of " + re.escape(total)
                     + r", ([\d.]+) (bytes|KiB|MiB)/s, running (\d+\.\d) s$")
    found = []
    for row, line in enumerate(t.lines()):
        m = pat.fullmatch(line)
        if m:
            found.append((int(float(m[1]) * UNITS[m[2]]), float(m[3]) * UNITS[m[4]], float(m[5]), row))
    return found


def test_progress_counts_the_sub_requests_of_a_read(term) -> None:  # type: ignore[no-untyped-def]
    t = term(split_device("8M", 300_000_000))
    cmd = "read -P 0xab 0 8M"
    t.sendline(cmd)
    seen: list[tuple[int, float, float, int]] = []

    def advanced(t: Term) -> bool:
        seen.extend(progress_lines(t, cmd, "8 MiB"))
        return any(done >= 3 << 20 for done, *_ in seen)

    t.wait(advanced)  # 1 MiB pieces of 0.3 s each: done grows while the command runs
    done, rate, elapsed, row = next(s for s in seen if s[0] >= 3 << 20)
    assert done % (1 << 20) == 0 and done < 8 << 20
    # the rate is done / elapsed (elapsed is shown rounded to 0.1 s)
    assert done / (elapsed + 0.05) <= rate * 1.001 and rate <= done / max(elapsed - 0.05, 0.01) * 1.001
    assert t.screen.buffer[row][0].reverse  # reverse video
    t.wait("read 8388608/8388608 bytes at offset 0")
    ready(t, 2)
    assert progress_lines(t, cmd, "8 MiB") == [] and "running" not in t.text()  # erased at the end


def test_progress_counts_the_pieces_of_a_write(term) -> None:  # type: ignore[no-untyped-def]
    t = term(split_device("4M", 400_000_000))
    t.sendline("write -P 5 0 4M")
    t.wait(lambda t: any(done >= 1 << 20 for done, *_ in progress_lines(t, "write -P 5 0 4M", "4 MiB")))
    t.wait("wrote 4194304/4194304 bytes at offset 0")
    ready(t, 2)
    assert "running" not in t.text()


def test_a_command_without_a_size_shows_no_bytes(term) -> None:  # type: ignore[no-untyped-def]
    t = term("--image-opts", "driver=null-co,size=1M,latency-ns=1500000000")
    t.sendline("aio_write 0 512")
    ready(t, 2)
    t.sendline("aio_flush")
    t.wait(lambda t: any(re.fullmatch(r"aio_flush: running \d\.\d s, 1 aio in flight", line) for line in t.lines()))
    t.wait("wrote 512/512 bytes at offset 0")
    ready(t, 3)


def test_no_progress_line_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    """Standard input at a terminal, output to a file: the command is as slow, the file has no trace of
    a progress line."""
    out = tmp_path / "out.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm", XDG_STATE_HOME=str(tmp_path / "state"))
    child = pexpect.spawn("/bin/sh", ["-c", f'exec "{sys.executable}" -m qio "$0" > "{out}"',
                                      split_device("4M", 300_000_000)], env=env, timeout=30)
    child.send("read -P 0xab 0 4M\r")  # 4 pieces: 1.2 s, past the half second that shows progress
    child.send("quit\r")
    child.expect(pexpect.EOF)
    child.close()
    text = out.read_bytes()
    assert b"read 4194304/4194304 bytes at offset 0" in text
    assert b"running" not in text and b"of 4 MiB" not in text


def slow_qcow2(tmp_path: Path, latency_ns: int) -> tuple[Path, str]:
    """A new qcow2 image, opened over a slow null-co backing file: each allocating write copies the
    rest of its cluster from the backing file (one latency) before it writes the image file."""
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    return img, (f"json:{{'driver': 'qcow2', 'file': {{'driver': 'file', 'filename': '{img}'}}, "
                 f"'backing': {{'driver': 'null-co', 'size': 16777216, 'latency-ns': {latency_ns}}}}}")


def test_aio_completion_prints_at_an_idle_prompt_in_writethrough_mode(term, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The completion waits for the write-through flush (group commit); the idle prompt runs it."""
    _, dev = slow_qcow2(tmp_path, 600_000_000)
    t = term(dev)
    t.sendline("aio_write -P 0x11 0 4k")
    ready(t, 2)
    # nothing typed meanwhile; the line prints above the prompt, which is then drawn again
    t.wait(lambda t: "wrote 4096/4096 bytes at offset 0" in t.text() and t.prompt_line() == "qio>")


def test_ctrl_c_on_qcow2_loses_nothing(term, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C while a write waits: it and the aio_writes before it complete; after quit the image is
    clean for qio-img and qemu-img check, and qemu-io reads every write back."""
    img, dev = slow_qcow2(tmp_path, 3_000_000_000)
    t = term(dev, cols=140)
    writes = [(0x11, 0), (0x12, 64 << 10), (0x13, 132 << 10)]
    t.send("".join(f"aio_write -P {p:#x} {off} 4k\r" for p, off in writes) + "write -P 0x14 200k 4k\r")
    t.wait(lambda t: "write -P 0x14 200k 4k: 0 bytes of 4 KiB" in t.text())  # the progress line
    t.send("\x03")
    t.wait("interrupted: write -P 0x14 200k 4k (4 request(s) still in flight; their completions print when "
           "they finish)")
    for _, off in writes:  # the aio_writes' completions come later, at the prompt
        t.wait(f"wrote 4096/4096 bytes at offset {off}")
    t.sendline("quit")  # waits for the interrupted write too
    t.child.expect(pexpect.EOF)
    t.child.close()
    assert t.child.exitstatus == 1  # the interrupted command counts as a failure
    for check in ([sys.executable, "-m", "qio.img", "check", str(img)], ["qemu-img", "check", str(img)]):
        res = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert res.returncode == 0 and "No errors were found on the image." in res.stdout, (check, res)
        assert "leaked" not in res.stdout
    args = [a for p, off in [*writes, (0x14, 200 << 10)] for a in ("-c", f"read -P {p:#x} {off} 4k")]
    res = subprocess.run(["qemu-io", "-r", *args, str(img)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res
    assert res.stdout.count("read 4096/4096 bytes") == 4
