"""qio's NBD server (``nbd_server_start``/``nbd_server_stop``) against real NBD clients.

Real ``qemu-io``/``qemu-img`` connect to a qio export on a Unix socket; qio runs a ``-c`` script
that waits for their requests at breakpoints.  Every process is bounded by a timeout; the only wait
on a condition is for the socket to appear (the server renames it into place once it listens).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oracle import ROOT

pytestmark = pytest.mark.oracle("qemu-io", "qemu-img", "qemu-nbd")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def launch(argv: list[str], sock: Path) -> subprocess.Popen[str]:
    """Start qio with ``argv`` and wait until its export's socket is in place (it accepts by then)."""
    proc = subprocess.Popen([sys.executable, "-m", "qio", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0]
            raise AssertionError(f"the export did not come up:\n{out}")
        time.sleep(0.02)
    return proc


def start_qio(img: Path, sock: Path, *cmds: str, fmt: str = "raw", clients: int = 1) -> subprocess.Popen[str]:
    """qio serving ``img``: the commands run, then the server stops once ``clients`` came and went."""
    argv = ["-f", fmt, "-c", f"nbd_server_start unix:{sock}"]
    for c in cmds:
        argv += ["-c", c]
    return launch([*argv, "-c", f"nbd_server_stop -c {clients}", str(img)], sock)


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def client(sock: Path, *cmds: str, fmt: str = "raw") -> subprocess.Popen[str]:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(f"nbd+unix:///?socket={sock}")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def done(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    img = tmp_path / "t.raw"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 4k", str(img)],
                   check=True, capture_output=True)
    return img


def test_qemu_io_reads_and_writes_through_the_export(raw: Path, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    qio = start_qio(raw, sock)
    out = done(client(sock, "read -P 0x11 0 64k", "write -P 0x33 2M 64k", "write -z 3M 64k", "discard 3M 4k",
                      "flush", "read -P 0x33 2M 64k", "read -P 0 3M 64k"))
    assert "1 client served" in finish(qio)
    assert "Pattern verification failed" not in out and "failed" not in out, out
    assert out.count("read 65536/65536") == 3 and out.count("wrote 65536/65536") == 2
    data = raw.read_bytes()
    assert data[2 << 20:(2 << 20) + 65536] == b"\x33" * 65536


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_img_map_matches_qemu_nbd(raw: Path, tmp_path: Path, fmt: str) -> None:
    """The ``base:allocation`` extents a client sees are those qemu-nbd gives for the same image
    (for qcow2: the format's allocation refined by the file's holes, as QEMU's block-status walk)."""
    img = raw
    if fmt == "qcow2":
        img = tmp_path / "t.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 4k",
                        "-c", "write -z 2M 64k", str(img)], check=True, capture_output=True)
    sock = tmp_path / "s.sock"
    qio = start_qio(img, sock, fmt=fmt)
    ours = subprocess.run(["qemu-img", "map", "-f", "raw", "--output=json", f"nbd+unix:///?socket={sock}"],
                          capture_output=True, text=True, timeout=60)
    finish(qio)
    qsock = tmp_path / "q.sock"
    nbd = subprocess.Popen(["qemu-nbd", "-k", str(qsock), "-f", fmt, str(img)])
    try:
        deadline = time.monotonic() + 20
        while not qsock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        theirs = subprocess.run(["qemu-img", "map", "-f", "raw", "--output=json", f"nbd+unix:///?socket={qsock}"],
                                capture_output=True, text=True, timeout=60)
    finally:
        nbd.kill()
        nbd.wait()
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout


def test_qemu_img_convert_and_compare(raw: Path, tmp_path: Path) -> None:
    """qemu-img reads the whole export (block status and data) into a qcow2 image equal to the source."""
    ref = tmp_path / "ref.raw"
    ref.write_bytes(raw.read_bytes())
    sock = tmp_path / "s.sock"
    qio = start_qio(raw, sock, clients=2)
    uri = f"nbd+unix:///?socket={sock}"
    conv = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(tmp_path / "c.qcow2")],
                          capture_output=True, text=True, timeout=120)
    cmp_ = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(ref)],
                          capture_output=True, text=True, timeout=120)
    finish(qio)
    assert conv.returncode == 0, conv.stderr
    assert cmp_.returncode == 0 and "Images are identical" in cmp_.stdout, cmp_.stdout + cmp_.stderr
    res = subprocess.run(["qemu-img", "compare", "-F", "raw", str(tmp_path / "c.qcow2"), str(ref)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_breakpoint_on_a_client_request(raw: Path, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    img = f"blkdebug::{raw}"
    qio = launch(["-f", "raw", "-c", "break write_aio A", "-c", f"nbd_server_start unix:{sock}",
            "-c", "wait_break A", "-c", "debug_state", "-c", "read -P 0x11 0 4k", "-c", "resume A", "-c",
            "nbd_server_stop", img], sock)
    c = client(sock, "write -P 0x44 0 4k")
    cout = done(c)
    out = finish(qio)
    assert "wrote 4096/4096 bytes at offset 0" in cout, cout
    # While the client's write was suspended, the shell still read the old data.
    assert out.index("blkdebug: Suspended request 'A'") < out.index("read 4096/4096 bytes at offset 0") \
        < out.index("blkdebug: Resuming request 'A'"), out
    assert "1 client served" in out
    assert f"nbd export '' on unix:{sock}: 1 connected, 1 served\n  client #1: 1 in flight\n" \
           "    write 4096 bytes at offset 0 (handle 0x" in out, out
    assert raw.read_bytes()[:4096] == b"\x44" * 4096


def test_race_between_two_clients_replayed(raw: Path, tmp_path: Path) -> None:
    """Client 1 writes 0..8k, client 2 writes 4k..12k.  Holding client 1 at ``write_aio`` until client
    2's data is on disk makes client 1's bytes win the overlap, whatever order they connected in."""
    sock = tmp_path / "s.sock"
    img = f"blkdebug::{raw}"
    qio = launch(["-f", "raw", "-c", "break -o 0 write_aio A",
            "-c", "break -o 8k pwritev_done B", "-c", f"nbd_server_start unix:{sock}",
            "-c", "wait_break A", "-c", "wait_break B", "-c", "resume B", "-c", "resume A", "-c", "nbd_server_stop",
            img], sock)
    c1 = client(sock, "write -P 0x55 0 8k")
    c2 = client(sock, "write -P 0x66 4k 8k")
    out1, out2 = done(c1), done(c2)
    out = finish(qio)
    assert "wrote 8192/8192 bytes at offset 0" in out1 and "wrote 8192/8192 bytes at offset 4096" in out2
    assert "2 clients served" in out
    data = raw.read_bytes()
    assert data[:8192] == b"\x55" * 8192 and data[8192:12288] == b"\x66" * 4096


def test_quit_with_a_request_in_flight_answers_it(raw: Path, tmp_path: Path) -> None:
    """``nbd_server_stop`` (and quit) finish requests in flight: a suspended one is resumed, not lost."""
    sock = tmp_path / "s.sock"
    img = f"blkdebug::{raw}"
    qio = launch(["-f", "raw", "-c", "break write_aio A", "-c", f"nbd_server_start unix:{sock}",
            "-c", "wait_break A", "-c", "quit", img], sock)
    cout = done(client(sock, "write -P 0x77 64k 4k"))
    out = finish(qio)
    assert "wrote 4096/4096 bytes at offset 65536" in cout, cout
    assert "would wait forever" in out and "stopped; 1 client served" in out
    assert raw.read_bytes()[65536:65536 + 4096] == b"\x77" * 4096


def _connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    return s


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.mark.parametrize("junk", [
    b"\x00\x00\x00\x07" + b"garbage-not-an-option",                      # bad option magic
    b"\x00\x00\x00\x03" + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30),  # huge option length
    b"\xff\xff\xff\xff",                                                 # unknown client flags
    b"\x00\x00\x00\x03",                                                 # then silence: the client leaves
])
def test_hostile_clients_are_dropped_and_the_server_goes_on(raw: Path, tmp_path: Path, junk: bytes) -> None:
    sock = tmp_path / "s.sock"
    qio = start_qio(raw, sock, clients=2)
    s = _connect(sock)
    greeting = _recv(s, 18)
    assert greeting[:8] == b"NBDMAGIC"
    s.sendall(junk)
    s.close()
    cout = done(client(sock, "read -P 0x11 0 4k"))
    out = finish(qio)
    assert "read 4096/4096" in cout, cout
    assert "Traceback" not in out and "2 clients served" in out, out


def test_transmission_garbage_disconnects(raw: Path, tmp_path: Path) -> None:
    """After NBD_OPT_EXPORT_NAME, a request with a bad magic closes the connection, nothing else."""
    sock = tmp_path / "s.sock"
    qio = start_qio(raw, sock)
    s = _connect(sock)
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))
    info = _recv(s, 10)
    assert struct.unpack(">Q", info[:8])[0] == 4 << 20
    s.sendall(b"\x01" * 28)
    assert _recv(s, 1) == b""  # closed
    s.close()
    out = finish(qio)
    assert "Traceback" not in out


def test_errors(raw: Path, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    res = subprocess.run([sys.executable, "-m", "qio", "-f", "raw", "-c", "nbd_server_stop", "-c",
                          "nbd_server_start bogus", "-c", "nbd_server_start 127.0.0.1:\u00b2",
                          "-c", f"nbd_server_start unix:{tmp_path}/no/such/dir/s",
                          "-c", f"nbd_server_start unix:{tmp_path}",
                          "-c", f"nbd_server_start unix:{sock}", "-c", f"nbd_server_start unix:{sock}2",
                          "-c", "nbd_server_start", str(raw)],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert res.stderr.splitlines() == [
        "qio: no NBD server is running",
        "qio: nbd_server_start: bad address 'bogus' (unix:PATH or HOST:PORT)",
        "qio: nbd_server_start: bad address '127.0.0.1:\u00b2' (unix:PATH or HOST:PORT)",  # int() takes no '²'
        f"qio: Failed to listen on 'unix:{tmp_path}/no/such/dir/s': No such file or directory",
        f"qio: Failed to listen on 'unix:{tmp_path}': Is a directory",
        "qio: an NBD server is already running; stop it with nbd_server_stop",
        "bad argument count 0 to nbd_server_start, expected at least 1 arguments",
    ], res.stderr
    assert "stopped; 0 clients served" in res.stdout
    assert not sock.exists() and not list(tmp_path.glob("*.tmp"))


def test_read_only_export_refuses_writes(raw: Path, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    qio = launch(["-r", "-f", "raw", "-c", f"nbd_server_start unix:{sock}",
            "-c", "nbd_server_stop -c 1", str(raw)], sock)
    cout = done(client(sock, "write -P 0x99 0 4k"))
    out = finish(qio)
    assert "read-only" in out
    # qemu-io sees the export's read-only flag and refuses a writable open, as with a read-only qemu-nbd
    assert "Could not open image: Permission denied" in cout, cout
    assert raw.read_bytes()[:4096] == b"\x11" * 4096


def _serve_with(raw: Path, sock: Path, rule: str, *client_cmds: str) -> tuple[str, str]:
    proc = launch(["-f", "raw", "-c", f"nbd_fault {rule}", "-c", f"nbd_server_start unix:{sock}",
            "-c", "nbd_server_stop -c 1", "-c", "nbd_fault", str(raw)], sock)
    cout = done(client(sock, *client_cmds))
    return cout, finish(proc)


@pytest.mark.parametrize(("rule", "expect", "written"), [
    ("action=error cmd=write errno=ENOSPC",
     ["read 4096/4096", "write failed: No space left on device", "read 4096/4096"], False),
    ("action=error cmd=read after=1", ["read 4096/4096", "wrote 4096/4096", "read failed: Input/output error"], True),
    # the write ran, then the connection dropped instead of its reply
    ("action=disconnect cmd=write", ["read 4096/4096", "write failed: Input/output error", "read failed"], True),
    ("action=short cmd=read", ["read failed: Input/output error", "write failed", "read failed"], False),
    ("action=malformed cmd=read", ["read failed: Input/output error", "write failed", "read failed"], False),
    ("action=delay ns=200000000 cmd=write", ["read 4096/4096", "wrote 4096/4096", "read 4096/4096"], True),
    ("point=handshake action=disconnect after=1", ["can't open device"], False),
])
def test_protocol_faults(raw: Path, tmp_path: Path, rule: str, expect: list[str], written: bool) -> None:
    cout, out = _serve_with(raw, tmp_path / "s.sock", rule, "read 0 4k", "write -P 0x5a 0 4k", "read 0 4k")
    lines = [ln for ln in cout.splitlines() if " ops; " not in ln]
    assert len(lines) == len(expect), cout
    assert all(e in ln for e, ln in zip(expect, lines, strict=True)), cout
    assert "fired=1" in out, out
    assert (raw.read_bytes()[:4096] == b"\x5a" * 4096) == written
    if "delay" in rule:
        write_time = cout.splitlines()[3]
        assert " 00.2" in write_time or " 00.3" in write_time or " 00.4" in write_time, cout


def test_fault_rule_errors(raw: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "qio", "-c", "nbd_fault action=bogus", "-c", "nbd_fault point=x",
                          "-c", "nbd_fault action=delay", "-c", "nbd_fault action=error errno=EWHAT",
                          "-c", "nbd_fault point=handshake action=short", "-c", "nbd_fault action=error colour=red",
                          "-c", "nbd_fault oops", "-c", "nbd_fault -r 9", "-c", "nbd_fault action=error count=x",
                          "-c", "nbd_fault action=disconnect", "-c", "nbd_fault", "-c", "nbd_fault -r 1",
                          "-c", "nbd_fault"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert res.stderr.splitlines() == [
        "qio: nbd_fault: action must be one of disconnect, delay, error, short, malformed",
        "qio: nbd_fault: point must be one of handshake, reply",
        "qio: nbd_fault: ns= is the delay of action=delay (and only of it)",
        "qio: nbd_fault: unknown errno 'EWHAT'",
        "qio: nbd_fault: only action=disconnect acts during the handshake",
        "qio: nbd_fault: unknown key 'colour' (one of action, after, cmd, count, errno, ns, point)",
        "qio: nbd_fault: no rule #9",
        "qio: nbd_fault: count must be a non-negative number, not 'x'",
    ], res.stderr
    assert res.stdout.splitlines() == [
        "nbd_fault: expected KEY=VALUE, not 'oops'",
        "nbd_fault: rule #1 added",
        "#1 point=reply action=disconnect cmd=any after=0 count=1 matched=0 fired=0",
    ]


def test_random_garbage_never_breaks_the_server(raw: Path, tmp_path: Path) -> None:
    """A seeded stream of broken clients (random bytes after a plausible start); the server stays up,
    answers a real client afterwards and prints no traceback."""
    import random

    rng = random.Random(1234)
    n = 40
    sock = tmp_path / "s.sock"
    qio = start_qio(raw, sock, clients=n + 1)
    for _ in range(n):
        s = _connect(sock)
        _recv(s, 18)
        start = rng.choice([b"", struct.pack(">I", 3), struct.pack(">I", 3) + struct.pack(">Q", 0x49484156454F5054)])
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        try:
            s.sendall(start + body)
        except OSError:
            pass
        s.close()
    cout = done(client(sock, "read -P 0x11 0 4k"))
    out = finish(qio)
    assert "read 4096/4096" in cout, cout
    assert "Traceback" not in out and f"{n + 1} clients served" in out, out
