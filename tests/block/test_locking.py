"""Image locking against the real qemu-io 7.2: qio must take the same OFD byte-range locks (QEMU's
offsets 100+bit for permissions held, 200+bit for permissions not shared) so that the two exclude
each other exactly as two qemu-io processes do.

A *holder* process keeps the image open (``-c length -c 'sleep 60000'``) with its stdout on a pty:
stdout is then line-buffered, so the ``length`` line arriving on the pty proves the image is fully
open (the locks pass through intermediate states while the block graph is built, so "some locks
appeared in /proc/locks" would not be enough).  /proc/locks is read after that; holders are killed
in a ``finally``.

Every expected message below was first observed with real qemu-io, and each test also compares qio
with what real qemu-io does in the same situation.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from oracle import QEMU_IO, qio_wrapper

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks"),
]

TIMEOUT = 30
STATS = re.compile(r"^(\S+ bytes|[0-9.]+ [KMGTPE]iB), 1 ops; .*$", re.M)

Lock = tuple[str, str, int, int]  # (kind, type, start, end)


@pytest.fixture(scope="module")
def progs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``qio`` (a wrapper running this checkout's qio) and ``qemu-io`` (a symlink to it, so qio's program
    name is qemu-io), plus the real binary."""
    bindir = tmp_path_factory.mktemp("bin")
    wrapper = qio_wrapper(bindir / "qio")
    (bindir / "qemu-io").symlink_to("qio")
    return {"qio": str(wrapper), "qio-as-qemu-io": str(bindir / "qemu-io"), "real": QEMU_IO or "qemu-io"}


def locks_of(path: Path) -> list[Lock]:
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "->":  # a blocked waiter, not a held lock
                continue
            if fields[5] == dev:
                found.append((fields[1], fields[3], int(fields[6]), int(fields[7])))
    return sorted(found)


@contextmanager
def holding(prog: str, args: list[str], img: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``prog ARGS -c length -c 'sleep 60000' IMG`` and yield once the image is open."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([prog, *args, "-c", "length", "-c", "sleep 60000", str(img)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=subprocess.PIPE, cwd=img.parent)
    os.close(slave)
    try:
        got = b""
        while b"\n" not in got:
            ready, _, _ = select.select([master], [], [], TIMEOUT)
            assert ready, f"{prog} {args}: no output within {TIMEOUT} s"
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the process is gone
                chunk = b""
            if not chunk:
                proc.kill()
                _, err = proc.communicate(timeout=TIMEOUT)
                pytest.fail(f"{prog} {args} exited early: {err.decode(errors='replace')}")
            got += chunk
        assert proc.poll() is None
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
        os.close(master)


def run(prog: str, args: list[str], img: Path) -> tuple[int, str, str]:
    p = subprocess.run([prog, *args, img.name], capture_output=True, timeout=TIMEOUT, cwd=img.parent,
                       stdin=subprocess.DEVNULL)
    return p.returncode, STATS.sub("<stats>", p.stdout.decode()), p.stderr.decode()


def lock_error(prgname: str, name: str, shared: bool) -> str:
    what = 'shared "write"' if shared else '"write"'
    return (f"{prgname}: can't open device {name}: Failed to get {what} lock\n"
            f"Is another process using the image [{name}]?\n")


# -- (a) the same byte ranges as qemu-io ------------------------------------------------------------------
@pytest.mark.parametrize(("args", "expect"), [
    (["-f", "raw"], [("OFDLCK", "READ", 100, 101)]),  # consistent read + write held, everything shared
    (["-f", "raw", "-r"], [("OFDLCK", "READ", 100, 100)]),
    (["-f", "raw", "-r", "-U"], [("OFDLCK", "READ", 100, 100)]),
    (["-f", "file"], [("OFDLCK", "READ", 100, 101)]),
    (["-f", "file", "-r"], [("OFDLCK", "READ", 100, 100)]),
])
def test_same_lock_bytes_as_qemu_io(progs: dict[str, str], raw_img: Path, args: list[str],
                                    expect: list[Lock]) -> None:
    assert locks_of(raw_img) == []
    with holding(progs["real"], args, raw_img):
        real = locks_of(raw_img)
    assert locks_of(raw_img) == []
    with holding(progs["qio"], args, raw_img):
        mine = locks_of(raw_img)
    assert locks_of(raw_img) == []
    assert real == expect  # the premise, observed with qemu-io 7.2
    assert mine == real


# -- (b) qemu-io holds a qcow2 image: qio is refused exactly like a second qemu-io -------------------------
def test_qemu_io_qcow2_holder_premise(progs: dict[str, str], qcow2_img: Path) -> None:
    with holding(progs["real"], ["-f", "qcow2"], qcow2_img):
        # qcow2 holds read+write+resize and does not share write and resize
        assert locks_of(qcow2_img) == [("OFDLCK", "READ", 100, 101), ("OFDLCK", "READ", 103, 103),
                                       ("OFDLCK", "READ", 201, 201), ("OFDLCK", "READ", 203, 203)]


@pytest.mark.parametrize("fmt", ["raw", "file"])
def test_write_lock_refused_like_qemu_io(progs: dict[str, str], qcow2_img: Path, fmt: str) -> None:
    args = ["-f", fmt, "-c", "read 0 1"]
    name = qcow2_img.name
    with holding(progs["real"], ["-f", "qcow2"], qcow2_img):
        real = run(progs["real"], args, qcow2_img)
        as_qemu_io = run(progs["qio-as-qemu-io"], args, qcow2_img)
        as_qio = run(progs["qio"], args, qcow2_img)
    assert real == (1, "", lock_error("qemu-io", name, shared=False))
    assert as_qemu_io == real
    assert as_qio == (1, "", lock_error("qio", name, shared=False))


@pytest.mark.parametrize("extra", [["-r"], ["-r", "-U"]])
def test_read_only_raw_open_is_allowed_like_qemu_io(progs: dict[str, str], qcow2_img: Path,
                                                    extra: list[str]) -> None:
    """A read-only raw open neither needs write nor unshares anything, so qcow2's locks do not stop it."""
    args = ["-f", "raw", *extra, "-c", "read -v 0 4"]
    with holding(progs["real"], ["-f", "qcow2"], qcow2_img):
        real = run(progs["real"], args, qcow2_img)
        mine = run(progs["qio-as-qemu-io"], args, qcow2_img)
    assert real == (0, "00000000:  51 46 49 fb  QFI.\nread 4/4 bytes at offset 0\n<stats>\n", "")
    assert mine == real


def test_force_share_needs_read_only_like_qemu_io(progs: dict[str, str], qcow2_img: Path) -> None:
    args = ["-f", "raw", "-U", "-c", "read 0 1"]
    with holding(progs["real"], ["-f", "qcow2"], qcow2_img):
        real = run(progs["real"], args, qcow2_img)
        mine = run(progs["qio-as-qemu-io"], args, qcow2_img)
    assert real == (1, "", f"qemu-io: can't open device {qcow2_img.name}: force-share=on can only be used "
                           "with read-only images\n")
    assert mine == real


# -- (c) the other direction: qio holds the image, real qemu-io contends ------------------------------------
CONTENDERS = [
    ["-f", "qcow2"],  # wants to unshare write, but the holder writes
    ["-f", "qcow2", "-r"],  # also unshares write
    ["-f", "qcow2", "-r", "-U"],  # shares everything
    ["-f", "raw"],
    ["-f", "raw", "-r"],
]


@pytest.mark.parametrize("holder_args", [["-f", "raw"], ["-f", "raw", "-r"]])
def test_qemu_io_sees_qio_locks_as_qemu_io_locks(progs: dict[str, str], qcow2_img: Path,
                                                 holder_args: list[str]) -> None:
    results = {}
    for holder in ("real", "qio"):
        with holding(progs[holder], holder_args, qcow2_img):
            results[holder] = [run(progs["real"], [*c, "-c", "read 0 1"], qcow2_img) for c in CONTENDERS]
    assert results["qio"] == results["real"]
    name = qcow2_img.name
    ok = (0, "read 1/1 bytes at offset 0\n<stats>\n", "")
    refused = (1, "", lock_error("qemu-io", name, shared=True))
    if holder_args == ["-f", "raw"]:
        assert results["real"] == [refused, refused, ok, ok, ok]
    else:
        assert results["real"] == [ok] * len(CONTENDERS)


def test_two_qio_writers_share_a_raw_image(progs: dict[str, str], raw_img: Path) -> None:
    """raw shares every permission, so a second read-write open succeeds (as with two qemu-io)."""
    with holding(progs["qio"], ["-f", "raw"], raw_img):
        mine = run(progs["qio-as-qemu-io"], ["-f", "raw", "-c", "write -P 0x61 0 2"], raw_img)
        real = run(progs["real"], ["-f", "raw", "-c", "read -P 0x61 0 2"], raw_img)
    assert mine == (0, "wrote 2/2 bytes at offset 0\n<stats>\n", "")
    assert real == (0, "read 2/2 bytes at offset 0\n<stats>\n", "")


def test_locks_are_released_when_qio_exits(progs: dict[str, str], raw_img: Path) -> None:
    with holding(progs["qio"], ["-f", "raw"], raw_img) as proc:
        assert locks_of(raw_img) != []
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        assert locks_of(raw_img) == []
