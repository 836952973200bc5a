"""The nbd protocol driver against real qemu-io: exports served by qemu-nbd and by a scripted fake server.

Every differential test runs the same qemu-io command line twice, once with the real qemu-io and once
with qio (through a wrapper named ``qemu-io``, so messages carry the same program name), each against
a fresh image and a fresh server on the same socket path, and compares the iotests-filtered stdout,
stderr, exit status and the image bytes afterwards.  Servers are qemu-nbd (``--fork``: it returns once
it listens; killed in teardown) or :class:`FakeServer`, a scripted in-process server on a Unix socket
for protocol faults qemu-nbd never produces.  Everything is bounded by timeouts.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filters import filter_qemu_io
from oracle import QEMU_IMG, QEMU_IO, QEMU_NBD, qio_wrapper

oracle = pytest.mark.oracle("qemu-io", "qemu-nbd", "qemu-img")
TIMEOUT = 60

Result = tuple[str, str, int]


def _qio_prog(base: Path) -> str:
    bindir = base / "qio-bin"
    bindir.mkdir(exist_ok=True)
    prog = bindir / "qemu-io"
    if not prog.exists():
        qio_wrapper(prog)
    return str(prog)


def run_prog(prog: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Result:
    """Run one program; stdout/stderr through the iotests filter with the test dir replaced."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    full_env.update(LC_ALL="C", LANG="C")
    full_env.update(env or {})
    proc = subprocess.run([prog, *args], cwd=cwd, env=full_env, capture_output=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)

    def filt(data: bytes) -> str:
        text = data.decode("utf-8", "surrogateescape").replace(str(cwd), "TEST_DIR")
        return filter_qemu_io(text)

    return filt(proc.stdout), filt(proc.stderr), proc.returncode


class NbdServer:
    """qemu-nbd serving one image on a Unix socket (or loopback TCP port); stopped by :meth:`stop`."""

    def __init__(self, base: Path, image: Path, fmt: str = "raw", extra: list[str] | None = None,
                 port: int | None = None) -> None:
        self.pidfile = base / "nbd.pid"
        self.sock = base / "nbd.sock"
        addr = ["-b", "127.0.0.1", "-p", str(port)] if port else ["-k", str(self.sock)]
        assert QEMU_NBD is not None
        subprocess.run([QEMU_NBD, "--fork", "--pid-file", str(self.pidfile), "-t", *addr, "-f", fmt,
                        *(extra or []), str(image)], check=True, timeout=TIMEOUT, capture_output=True)
        self.pid = int(self.pidfile.read_text())

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # qemu-nbd --fork is not our child: wait until the pid is gone (bounded) before reusing the socket
        for _ in range(2000):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            threading.Event().wait(0.005)
        if self.sock.exists():
            self.sock.unlink()


@pytest.fixture
def servers() -> Iterator[list[NbdServer]]:
    started: list[NbdServer] = []
    yield started
    for s in started:
        s.stop()


def _make_image(path: Path, fmt: str, size: str, fill: list[str]) -> None:
    assert QEMU_IMG is not None and QEMU_IO is not None
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), size], check=True, timeout=TIMEOUT)
    for cmd in fill:
        subprocess.run([QEMU_IO, "-f", fmt, "-c", cmd, str(path)], check=True, timeout=TIMEOUT,
                       capture_output=True)


def differential(tmp_path: Path, servers: list[NbdServer], args: list[str], *, fmt: str = "raw",
                 serve_fmt: str = "raw", size: str = "1M", fill: list[str] | None = None,
                 nbd_args: list[str] | None = None, tcp: bool = False) -> tuple[Result, Result]:
    """Run ``args`` (``SOCK``/``URL`` substituted) through qemu-io and qio, each on a fresh export."""
    results: list[Result] = []
    images: list[bytes] = []
    port = _free_port() if tcp else None
    assert QEMU_IO is not None
    for prog in (QEMU_IO, _qio_prog(tmp_path)):
        work = tmp_path / "w"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        image = work / "img"
        _make_image(image, fmt, size, fill or [])
        server = NbdServer(tmp_path, image, serve_fmt, nbd_args, port)
        servers.append(server)
        sock = str(server.sock)
        url = f"nbd://127.0.0.1:{port}" if tcp else f"nbd+unix:///?socket={sock}"
        argv = [a.replace("SOCK", sock).replace("URL", url) for a in args]
        try:
            res = run_prog(prog, argv, work)
        finally:
            server.stop()
        results.append((res[0], res[1].replace(sock, "SOCK"), res[2]))
        images.append(image.read_bytes())
    assert results[1] == results[0]
    assert images[1] == images[0]
    return results[0], results[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- qemu-nbd exports ------------------------------------------------------------------------------
RAW_SCRIPT = ["-c", "read -P 5 0 64k", "-c", "map", "-c", "alloc 0 1M", "-c", "write -P 7 512 512",
              "-c", "write -f -P 8 8k 4k", "-c", "write -z 16k 16k", "-c", "write -z -u 64k 64k",
              "-c", "discard 128k 64k", "-c", "flush", "-c", "read -P 7 512 512", "-c", "read -P 0 16k 16k",
              "-c", "readv -P 8 8k 2k 2k", "-c", "writev -P 9 256k 1k 3k", "-c", "length", "-c", "info",
              "-c", "aio_write -P 3 512k 64k", "-c", "aio_flush", "-c", "read -P 3 512k 64k",
              "-c", "read 1048000 576", "-c", "read 1048576 1", "-c", "truncate 2M", "-c", "truncate 1M"]


@oracle
def test_raw_export(tmp_path: Path, servers: list[NbdServer]) -> None:
    (out, _, rc), _ = differential(tmp_path, servers, ["-f", "raw", *RAW_SCRIPT, "URL"],
                                     fill=["write -P 5 0 64k"])
    assert "wrote 4096/4096 bytes at offset 8192" in out and "Pattern verification failed" not in out
    assert rc == 1  # ``info`` fails silently over NBD


@oracle
def test_probed_export_warns_with_refreshed_filename(tmp_path: Path, servers: list[NbdServer]) -> None:
    (_, err, _), _ = differential(tmp_path, servers, ["-c", "read 0 512", "-c", "write 0 512", "URL"])
    assert "'nbd+unix://?socket=SOCK' and probing guessed raw" in err


@oracle
def test_tcp_export(tmp_path: Path, servers: list[NbdServer]) -> None:
    differential(tmp_path, servers, ["-f", "raw", "-c", "write -P 1 0 4k", "-c", "read -P 1 0 4k", "-c", "map",
                                     "URL"], tcp=True)


@oracle
@pytest.mark.parametrize("args", [
    ["-c", "read 0 512", "-c", "write 0 512", "URL"],
    ["-r", "-c", "read 0 512", "-c", "write 0 512", "-c", "discard 0 4k", "URL"],
    ["-r", "-f", "raw", "-c", "map", "-c", "reopen -w", "URL"],
], ids=["rw-open", "ro-open", "reopen-rw"])
def test_read_only_export(tmp_path: Path, servers: list[NbdServer], args: list[str]) -> None:
    differential(tmp_path, servers, args, nbd_args=["-r"])


@oracle
def test_qcow2_over_nbd(tmp_path: Path, servers: list[NbdServer]) -> None:
    script = ["-f", "qcow2", "-c", "read -P 1 0 64k", "-c", "write -P 2 1M 128k", "-c", "write -z 2M 64k",
              "-c", "map", "-c", "alloc 0 4M", "-c", "discard 0 64k", "-c", "read -P 0 0 64k", "-c", "info",
              "URL"]
    differential(tmp_path, servers, script, fmt="qcow2", size="4M", fill=["write -P 1 0 64k"])


@oracle
@pytest.mark.parametrize("args", [
    ["--image-opts", "-c", "read 0 512", "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=SOCK"],
    ["--image-opts", "-c", "read 0 512", "-c", "info", "driver=nbd,path=SOCK"],
    ["-c", "read 0 512", 'json:{"driver":"raw","file":{"driver":"nbd","path":"SOCK","export":""}}'],
    ["-c", "open -o driver=nbd,server.type=unix,server.path=SOCK", "-c", "read 0 512"],
    ["-f", "nbd", "-c", "info", "-c", "length", "nbd:unix:SOCK"],
    ["-f", "raw", "-c", "read 0 512", "nbd:unix:SOCK:exportname=nosuch"],
    ["-f", "raw", "-c", "read 0 512", "nbd+unix:///nosuch?socket=SOCK"],
    ["--image-opts", "-c", "read 0 512", "driver=nbd,path=SOCK,export=nosuch"],
    ["--image-opts", "driver=nbd,path=SOCK,bogus=1"],
    ["--image-opts", "driver=nbd,path=SOCK,x-dirty-bitmap=nosuch"],
], ids=["server-opts", "legacy-path", "json", "open-o", "f-nbd", "legacy-export", "uri-export",
        "opts-export", "unknown-opt", "dirty-bitmap"])
def test_option_forms(tmp_path: Path, servers: list[NbdServer], args: list[str]) -> None:
    differential(tmp_path, servers, args)


ERROR_FORMS = [
    "nbd://", "nbd://127.0.0.1:1/x?foo=bar", "nbd+unix:///x", "nbd+unix://host/x?socket=/s",
    "nbd+unix:///x?socket=/s&a=b", "nbd+unix:///x?sock=/s", "nbd:", "nbd:unix:/s:exportname=", "nbd:127.0.0.1",
    "nbd+xyz://foo", "nbd::1", "nbd:[::1", "nbd://127.0.0.1:abc/", "nbd:unix:TMP/nosuch.sock",
    "nbd+unix:///?socket=TMP/nosuch.sock", "nbd:unix:TMP",
]
OPTION_ERRORS = [
    "driver=nbd", "driver=nbd,port=1", "driver=nbd,path=/s,host=h", "driver=nbd,path=/s,port=1",
    "driver=nbd,path=/s,server.type=unix", "driver=nbd,server.path=/s", "driver=nbd,server.type=bogus",
    "driver=nbd,server.type=inet,server.host=h", "driver=nbd,path=/s,reconnect-delay=abc",
    "driver=nbd,path=/s,tls-creds=nosuch", "driver=nbd,path=/s,export=" + "x" * 4097,
]


@oracle
@pytest.mark.parametrize("form", ERROR_FORMS)
def test_bad_file_names(tmp_path: Path, form: str) -> None:
    assert QEMU_IO is not None
    form = form.replace("TMP", str(tmp_path))
    ref = run_prog(QEMU_IO, ["-c", "read 0 512", form], tmp_path)
    got = run_prog(_qio_prog(tmp_path), ["-c", "read 0 512", form], tmp_path)
    assert got == ref
    assert ref[2] == 1


@oracle
@pytest.mark.parametrize("opts", OPTION_ERRORS)
def test_bad_options(tmp_path: Path, opts: str) -> None:
    assert QEMU_IO is not None
    ref = run_prog(QEMU_IO, ["--image-opts", "-c", "read 0 512", opts], tmp_path)
    got = run_prog(_qio_prog(tmp_path), ["--image-opts", "-c", "read 0 512", opts], tmp_path)
    assert got == ref


@oracle
def test_url_with_export_option(tmp_path: Path) -> None:
    assert QEMU_IO is not None
    args = ["-c", "open -o export=x nbd+unix:///?socket=/s"]
    assert run_prog(_qio_prog(tmp_path), args, tmp_path) == run_prog(QEMU_IO, args, tmp_path)


@oracle
def test_refused_connection(tmp_path: Path) -> None:
    """A socket file nobody listens on: ``Connection refused``."""
    assert QEMU_IO is not None
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    args = ["-c", "read 0 512", f"nbd:unix:{path}"]
    ref = run_prog(QEMU_IO, args, tmp_path)
    assert "Connection refused" in ref[1]
    assert run_prog(_qio_prog(tmp_path), args, tmp_path) == ref


# -- a scripted fake server ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
SIMPLE = 0x67446698
CHUNK = 0x668E33EF


class Conn:
    """The server end of one connection, with bounded blocking reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(20)

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QIII", REP_MAGIC, opt, rtype, len(data)) + data)

    def handshake(self, size: int = 1 << 20, flags: int = 0x0CED, sr: bool = True, meta: bool = True,
                  block: tuple[int, int, int] | None = None) -> None:
        """Fixed newstyle with GO, like qemu-nbd (optionally refusing structured replies or the meta
        context, or announcing block-size constraints)."""
        self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        self.read(4)
        while True:
            _, opt, length = struct.unpack(">QII", self.read(16))
            self.read(length)
            if opt == 8 and sr:
                self.reply(opt, 1)
            elif opt == 10 and meta:
                self.reply(opt, 4, struct.pack(">I", 0) + b"base:allocation")
                self.reply(opt, 1)
            elif opt == 7:
                if block is not None:
                    self.reply(opt, 3, struct.pack(">HIII", 3, *block))
                self.reply(opt, 3, struct.pack(">HQH", 0, size, flags))
                self.reply(opt, 1)
                return
            else:
                self.reply(opt, 0x80000001)

    def request(self) -> tuple[int, int, int, int, int]:
        """(type, flags, handle, offset, length); a WRITE's payload is consumed."""
        return self.request_with_payload()[:5]  # type: ignore[return-value]

    def request_with_payload(self) -> tuple[int, int, int, int, int, bytes]:
        _, flags, typ, handle, offset, length = struct.unpack(">IHHQQI", self.read(28))
        return typ, flags, handle, offset, length, self.read(length) if typ == 1 else b""

    def chunk(self, handle: int, ctype: int, payload: bytes, done: bool = True) -> None:
        self.send(struct.pack(">IHHQI", CHUNK, 1 if done else 0, ctype, handle, len(payload)) + payload)


class FakeServer:
    """Accept clients on a Unix socket, one after another, and run one script per connection in a
    thread; the socket stops listening after the last script (no reconnection possible then)."""

    def __init__(self, path: Path, script: Callable[[Conn], None] | list[Callable[[Conn], None]]) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(20)
        self.scripts = script if isinstance(script, list) else [script]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i, script in enumerate(self.scripts):
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    return
                if i == len(self.scripts) - 1:
                    self.listener.close()
                try:
                    script(Conn(sock))
                except (OSError, EOFError):
                    pass
                finally:
                    sock.close()
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(30)


def fake_differential(tmp_path: Path, script: Callable[[Conn], None] | list[Callable[[Conn], None]], args: list[str],
                      env: dict[str, str] | None = None, reference: bool = True) -> Result:
    """Run ``args`` (``SOCK`` substituted) against a fresh fake server for each program."""
    path = tmp_path / "fake.sock"
    progs = [QEMU_IO, _qio_prog(tmp_path)] if reference else [_qio_prog(tmp_path)]
    results: list[Result] = []
    for prog in progs:
        assert prog is not None
        if path.exists():
            path.unlink()
        server = FakeServer(path, script)
        try:
            results.append(run_prog(prog, [a.replace("SOCK", str(path)) for a in args], tmp_path, env))
        finally:
            server.join()
    if reference:
        assert results[1] == results[0]
    return results[-1]


def _bad_initial_magic(c: Conn) -> None:
    c.send(struct.pack(">QQH", 0x1122334455667788, IHAVEOPT, 3))


def _bad_server_magic(c: Conn) -> None:
    c.send(struct.pack(">QQH", NBDMAGIC, 0x42, 3))


def _truncated_hello(c: Conn) -> None:
    c.send(struct.pack(">Q", NBDMAGIC) + b"IHAV")


def _go_denied(c: Conn) -> None:
    c.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    c.read(4)
    while True:
        _, opt, length = struct.unpack(">QII", c.read(16))
        c.read(length)
        if opt == 7:
            c.reply(opt, 0x80000002, b"not for you")
            return
        c.reply(opt, 0x80000001)


def _bad_block_size(c: Conn) -> None:
    c.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    c.read(4)
    while True:
        _, opt, length = struct.unpack(">QII", c.read(16))
        c.read(length)
        if opt == 7:
            c.reply(opt, 3, struct.pack(">HIII", 3, 3, 4096, 65536))
            return
        c.reply(opt, 0x80000001)


def _serve_simple(c: Conn) -> None:
    """Answer every request with a simple reply (reads return 0x2A bytes) until the client disconnects."""
    while True:
        typ, _, handle, _, length = c.request()
        if typ == 2:
            return
        c.send(struct.pack(">IIQ", SIMPLE, 0, handle) + (bytes([0x2A]) * length if typ == 0 else b""))


def _old_server(c: Conn) -> None:
    """Non-fixed newstyle: only EXPORT_NAME, then size, flags and 124 zero bytes."""
    c.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0))
    c.read(4)
    _, _, length = struct.unpack(">QII", c.read(16))
    c.read(length)
    c.send(struct.pack(">QH", 1 << 20, 0x0001 | 0x0004) + bytes(124))
    _serve_simple(c)


@oracle
@pytest.mark.parametrize("script", [_bad_initial_magic, _bad_server_magic, _truncated_hello, _go_denied,
                                    _bad_block_size],
                         ids=["initial-magic", "server-magic", "truncated", "go-denied", "block-size"])
def test_hostile_handshake(tmp_path: Path, script: Callable[[Conn], None]) -> None:
    _, err, rc = fake_differential(tmp_path, script, ["-f", "raw", "-c", "read 0 512", "nbd:unix:SOCK"])
    assert rc == 1 and "can't open device" in err


@oracle
def test_old_server_fallback(tmp_path: Path) -> None:
    out, _, rc = fake_differential(tmp_path, _old_server, ["-f", "raw", "-c", "read -P 42 0 4k", "-c", "map",
                                                           "-c", "write 0 512", "nbd:unix:SOCK"])
    assert "read 4096/4096" in out and rc == 0


def _serve_then(action: Callable[[Conn, int, int, int, int], None], n: int = 1) -> Callable[[Conn], None]:
    """Answer the first read request of the session (handshake included) with ``action``."""

    def script(c: Conn) -> None:
        c.handshake()
        for _ in range(n):
            typ, _, handle, offset, length = c.request()
            action(c, typ, handle, offset, length)
        while True:
            typ, _, handle, _, _ = c.request()
            if typ == 2:
                return
            c.chunk(handle, 0, b"")

    return script


def _bad_reply_magic(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.send(struct.pack(">IIQ", 0xDEADBEEF, 0, handle))


def _unknown_handle(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.chunk(handle ^ 0xFFFF, 0, b"")


def _simple_reply_to_read(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.send(struct.pack(">IIQ", SIMPLE, 0, handle) + bytes(length))


def _oversized_error_chunk(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.chunk(handle, 0x8001, struct.pack(">IH", 5, 2000) + b"x" * 2000)


def _data_outside(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.chunk(handle, 1, struct.pack(">Q", offset + length) + b"x")


def _truncated_chunk(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.send(struct.pack(">IHHQI", CHUNK, 1, 1, handle, 8 + length) + struct.pack(">Q", offset) + b"x" * 10)
    raise EOFError


def _huge_data_header(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    """A DATA chunk header claiming 2 GiB, then nothing: the client must not wait to buffer it."""
    c.send(struct.pack(">IHHQI", CHUNK, 1, 1, handle, 0x7FFFFFF0) + struct.pack(">Q", offset))
    c.sock.recv(1)  # the client gives up on its own


def _error_chunk(c: Conn, typ: int, handle: int, offset: int, length: int) -> None:
    c.chunk(handle, 0x8001, struct.pack(">IH", 28, 4) + b"full")


@oracle
@pytest.mark.parametrize("action", [_bad_reply_magic, _unknown_handle, _simple_reply_to_read,
                                    _oversized_error_chunk, _data_outside, _truncated_chunk, _error_chunk,
                                    _huge_data_header],
                         ids=["reply-magic", "unknown-handle", "simple-to-read", "big-error", "data-outside",
                              "truncated-chunk", "error-chunk", "huge-data"])
def test_hostile_replies(tmp_path: Path, action: Callable[[Conn, int, int, int, int], None]) -> None:
    out, err, _ = fake_differential(tmp_path, _serve_then(action),
                                     ["-f", "raw", "-c", "read 0 512", "-c", "read 0 512", "nbd:unix:SOCK"])
    assert "Traceback" not in err and "read failed" in out


def _die_with_two_in_flight(c: Conn) -> None:
    c.handshake()
    c.request()
    c.request()
    raise EOFError  # the server dies with both requests unanswered


@oracle
def test_server_dies_with_aio_in_flight(tmp_path: Path) -> None:
    out, _, _ = fake_differential(tmp_path, _die_with_two_in_flight,
                                  ["-f", "raw", "-c", "aio_read 0 512", "-c", "aio_read 512 512", "-c", "aio_flush",
                                   "-c", "read 0 512", "-c", "read 0 512", "nbd:unix:SOCK"])
    assert out.count("failed: Input/output error") == 4


def _read_pty(fd: int, until: bytes | None) -> bytes:
    """Read a pty master until ``until`` appears (or EOF), each wait bounded by the timeout."""
    out = b""
    while until is None or until not in out:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        if not ready:
            raise TimeoutError(out)
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the slave side is closed
            break
        if not data:
            break
        out += data
    return out


@oracle
def test_qemu_nbd_killed(tmp_path: Path, servers: list[NbdServer]) -> None:
    """qemu-nbd is killed between two commands of a piped session: requests fail with EIO until it is back.

    stdout is a pty, so both programs line-buffer it and the test can wait for the write's report.
    """
    assert QEMU_IO is not None
    results = []
    for prog in (QEMU_IO, _qio_prog(tmp_path)):
        image = tmp_path / "img"
        _make_image(image, "raw", "1M", [])
        server = NbdServer(tmp_path, image)
        servers.append(server)
        master, slave = pty.openpty()
        proc = subprocess.Popen([prog, "-f", "raw", f"nbd:unix:{server.sock}"], stdin=subprocess.PIPE,
                                stdout=slave, stderr=subprocess.PIPE, cwd=tmp_path)
        os.close(slave)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            proc.stdin.write(b"write -P 1 0 512\n")
            proc.stdin.flush()
            out = _read_pty(master, b"ops/sec)")
            server.stop()
            for _ in range(2):  # one line at a time: qemu-io reads a line per stdin wake-up
                proc.stdin.write(b"read 0 512\n")
                proc.stdin.flush()
                out += _read_pty(master, b"read failed")
            # The server comes back: QEMU's reconnect thread finds it on its next try, 1 s after the
            # failed one; the read after a 2.5 s sleep runs on the new connection.
            server = NbdServer(tmp_path, image)
            servers.append(server)
            proc.stdin.write(b"sleep 2500\nread -P 1 0 512\n")
            proc.stdin.close()
            out += _read_pty(master, None)
            proc.wait(TIMEOUT)
            err = proc.stderr.read()
        finally:
            server.stop()
            os.close(master)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        results.append((filter_qemu_io(out.decode()), err.decode(), proc.returncode))
    assert results[1] == results[0]
    assert results[0][0].count("read failed: Input/output error") == 2
    assert "read 512/512 bytes at offset 0" in results[0][0]


@oracle
def test_stalled_server_times_out(tmp_path: Path) -> None:
    """qemu-io would wait forever; qio gives up after QIO_NBD_TIMEOUT seconds with EIO."""
    def stall(c: Conn) -> None:
        c.handshake()
        c.request()
        c.sock.recv(1)  # until the client goes away

    out, _, rc = fake_differential(tmp_path, stall, ["-f", "raw", "-c", "read 0 512", "nbd:unix:SOCK"],
                                     env={"QIO_NBD_TIMEOUT": "1"}, reference=False)
    assert out == "read failed: Input/output error\n" and rc == 1


@oracle
def test_stalled_handshake_times_out(tmp_path: Path) -> None:
    def stall(c: Conn) -> None:
        c.sock.recv(1)

    _, err, rc = fake_differential(tmp_path, stall, ["-f", "raw", "-c", "read 0 512", "nbd:unix:SOCK"],
                                   env={"QIO_NBD_TIMEOUT": "1"}, reference=False)
    assert rc == 1 and "Connection timed out" in err


def test_hole_without_zero_maps_unallocated(tmp_path: Path) -> None:
    """A server reporting HOLE without ZERO: qemu-io's ``map`` shows the range as not allocated (obs)."""
    def script(c: Conn) -> None:
        c.handshake()
        while True:
            typ, _, handle, _, length = c.request()
            if typ == 2:
                return
            if typ == 7:
                c.chunk(handle, 5, struct.pack(">III", 0, length, 1))
            else:
                c.chunk(handle, 0, b"")

    out, _, rc = fake_differential(tmp_path, script, ["-f", "raw", "-c", "map", "-c", "alloc 0 64k",
                                                      "nbd:unix:SOCK"], reference=QEMU_IO is not None)
    assert out == ("1 MiB (0x100000) bytes not allocated at offset 0 bytes (0x0)\n"
                   "0/65536 bytes allocated at offset 0 bytes\n")
    assert rc == 0


def memdisk(log: list[tuple[int, int, int, int]], size: int = 1 << 20, flags: int = 0x0CED, sr: bool = True,
            block: tuple[int, int, int] | None = None) -> Callable[[Conn], None]:
    """A RAM disk that records every request (type, flags, offset, length) in ``log``."""

    def script(c: Conn) -> None:
        c.handshake(size, flags, sr=sr, block=block)
        data = bytearray(size)
        while True:
            typ, cflags, handle, offset, length, payload = c.request_with_payload()
            log.append((typ, cflags, offset, length))
            if typ == 2:
                return
            if typ == 1:
                data[offset : offset + length] = payload
            elif typ in (4, 6):
                data[offset : offset + length] = bytes(length)
            if not sr:
                c.send(struct.pack(">IIQ", SIMPLE, 0, handle) + (data[offset : offset + length] if typ == 0 else b""))
            elif typ == 0:
                c.chunk(handle, 1, struct.pack(">Q", offset) + data[offset : offset + length])
            elif typ == 7:
                c.chunk(handle, 5, struct.pack(">III", 0, min(length, 65536), 0 if offset < 65536 else 3))
            else:
                c.chunk(handle, 0, b"")

    return script


WIRE_SCRIPT = ["-c", "write -P 1 512 512", "-c", "read -P 1 512 512", "-c", "read 1 1", "-c", "write -z 0 64k",
               "-c", "write -z -u 64k 64k", "-c", "discard 0 4k", "-c", "write -f 4k 512", "-c", "flush",
               "-c", "map", "-c", "alloc 0 128k", "-c", "read 0 200k", "-c", "aio_write -P 2 8k 4k",
               "-c", "aio_flush", "-c", "write -c 0 64k"]


@oracle
@pytest.mark.parametrize("kind", ["default", "block-4k", "no-sr", "writeback", "no-trim-zero", "size-1000"])
def test_wire_requests(tmp_path: Path, kind: str) -> None:
    """The requests qio sends equal qemu-io's: alignment, splitting, FUA/NO_HOLE/FAST_ZERO flags."""
    kwargs: dict[str, object] = {
        "default": {}, "block-4k": {"block": (4096, 4096, 65536)}, "no-sr": {"sr": False},
        "writeback": {}, "no-trim-zero": {"flags": 0x000D}, "size-1000": {"size": 1000},
    }[kind]
    args = ["-f", "raw", *(["-t", "writeback"] if kind == "writeback" else []), *WIRE_SCRIPT, "nbd:unix:SOCK"]
    if kind == "size-1000":
        args = ["-f", "raw", "-c", "read 0 1024", "-c", "write 512 488", "-c", "map", "nbd:unix:SOCK"]
    logs: list[list[tuple[int, int, int, int]]] = []
    outs: list[Result] = []
    for prog in (QEMU_IO, _qio_prog(tmp_path)):
        assert prog is not None
        path = tmp_path / "fake.sock"
        if path.exists():
            path.unlink()
        log: list[tuple[int, int, int, int]] = []
        server = FakeServer(path, memdisk(log, **kwargs))  # type: ignore[arg-type]
        try:
            outs.append(run_prog(prog, [a.replace("SOCK", str(path)) for a in args], tmp_path))
        finally:
            server.join()
        logs.append(log)
    assert outs[1] == outs[0]
    assert logs[1] == logs[0]


def _drop_on_first_request(c: Conn) -> None:
    c.handshake()
    c.request_with_payload()
    raise EOFError


@oracle
@pytest.mark.parametrize("delay", ["0", "5", "1-gone"])
def test_reconnect_delay(tmp_path: Path, delay: str) -> None:
    """The connection drops under a write; with reconnect-delay it is sent again on a new connection
    (``1-gone``: the server never comes back, the write fails when the delay is over)."""
    log: list[tuple[int, int, int, int]] = []
    gone = delay != "5"
    delay = delay.split("-")[0]
    out, _, _ = fake_differential(
        tmp_path, [_drop_on_first_request] if gone else [_drop_on_first_request, memdisk(log)],
        ["--image-opts", "-c", "write -P 1 0 4k", "-c", "read -P 1 0 4k",
         f"driver=raw,file.driver=nbd,file.path=SOCK,file.reconnect-delay={delay}"])
    if gone:
        assert out.startswith("write failed: Input/output error\n")
    else:
        assert out.startswith("wrote 4096/4096 bytes at offset 0\n")


def _oldstyle(c: Conn) -> None:
    """The old-style greeting: size and flags at once, no options, simple replies."""
    c.send(struct.pack(">QQQI", NBDMAGIC, 0x0000420281861253, 1 << 20, 0x0001 | 0x0004) + bytes(124))
    _serve_simple(c)


@oracle
@pytest.mark.parametrize("name", ["nbd:unix:SOCK", "nbd:unix:SOCK:exportname=x"])
def test_oldstyle_server(tmp_path: Path, name: str) -> None:
    fake_differential(tmp_path, _oldstyle, ["-f", "raw", "-c", "read -P 42 0 4k", "-c", "map", "-c", "write 0 512",
                                            "-c", "discard 0 4k", name])


@oracle
def test_open_timeout_retries(tmp_path: Path) -> None:
    """open-timeout: the connection is retried for that long, then the last error is reported."""
    assert QEMU_IO is not None
    args = ["--image-opts", "-c", "read 0 512", f"driver=nbd,path={tmp_path}/nosuch.sock,open-timeout=1"]
    ref = run_prog(QEMU_IO, args, tmp_path)
    assert "No such file or directory" in ref[1]
    assert run_prog(_qio_prog(tmp_path), args, tmp_path) == ref


def _scripted_options(meta: list[tuple[int, bytes]], go: list[tuple[int, bytes]]) -> Callable[[Conn], None]:
    """Answer SET_META_CONTEXT and GO with the given (reply type, data) lists, then serve zeroes."""

    def script(c: Conn) -> None:
        c.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        c.read(4)
        while True:
            _, opt, length = struct.unpack(">QII", c.read(16))
            c.read(length)
            if opt == 8:
                c.reply(opt, 1)
            elif opt == 10:
                for rtype, data in meta:
                    c.reply(opt, rtype, data)
            elif opt == 7:
                for rtype, data in go:
                    c.reply(opt, rtype, data)
                if go[-1][0] != 0x80000001:
                    break
            elif opt == 1:  # EXPORT_NAME after GO was refused
                c.send(struct.pack(">QH", 1 << 20, 0x0CED))
                break
            else:
                c.reply(opt, 0x80000001)
        while True:
            typ, _, handle, offset, length = c.request()
            if typ == 2:
                return
            if typ == 0:
                c.chunk(handle, 1, struct.pack(">Q", offset) + bytes(length))
            elif typ == 7:
                c.chunk(handle, 5, struct.pack(">III", 0, length, 0))
            else:
                c.chunk(handle, 0, b"")

    return script


_CTX = (4, struct.pack(">I", 0) + b"base:allocation")
_EXPORT = (3, struct.pack(">HQH", 0, 1 << 20, 0x0CED))
_ACK = (1, b"")


@oracle
@pytest.mark.parametrize("meta, go", [
    ([(4, struct.pack(">I", 0) + b"qemu:other"), _ACK], [_EXPORT, _ACK]),
    ([_CTX, _CTX, _ACK], [_EXPORT, _ACK]),
    ([(0x80000003, b"nope")], [_EXPORT, _ACK]),
    ([_ACK], [_EXPORT, _ACK]),
    ([_CTX, _ACK], [(3, b"\x00")]),
    ([_CTX, _ACK], [(3, struct.pack(">HQ", 0, 1))]),
    ([_CTX, _ACK], [_ACK]),
    ([_CTX, _ACK], [_EXPORT, (1, b"x")]),
    ([_CTX, _ACK], [(3, struct.pack(">HIII", 3, 4096, 1000, 65536))]),
    ([_CTX, _ACK], [(3, struct.pack(">HIII", 3, 4096, 4096, 512))]),
    ([_CTX, _ACK], [(3, struct.pack(">HIII", 3, 4096, 4096, 65536)), (3, struct.pack(">HQH", 0, 1000, 1)), _ACK]),
    ([_CTX, _ACK], [(3, struct.pack(">H", 1) + b"name"), _EXPORT, _ACK]),
    ([_CTX, _ACK], [(0x80000005, b""), _ACK]),
    ([_CTX, _ACK], [(0x80000042, b"odd"), _ACK]),
    ([_CTX, _ACK], [(0x80000001, b"")]),
    ([_CTX, _ACK], [(2, b"")]),
], ids=["other-context", "two-contexts", "meta-error", "no-context", "info-short", "export-short", "no-export",
        "ack-payload", "bad-preferred", "bad-max", "size-not-aligned", "unknown-info", "tls-required",
        "unknown-error", "go-unsupported", "unexpected-reply"])
def test_hostile_options(tmp_path: Path, meta: list[tuple[int, bytes]], go: list[tuple[int, bytes]]) -> None:
    _, err, _ = fake_differential(tmp_path, _scripted_options(meta, go),
                                  ["-f", "raw", "-c", "read 0 512", "-c", "map", "nbd:unix:SOCK"])
    assert "Traceback" not in err


@oracle
def test_x_dirty_bitmap_allocation_depth(tmp_path: Path, servers: list[NbdServer]) -> None:
    """``x-dirty-bitmap=qemu:allocation-depth`` (qemu-nbd -A): its flags are read as base:allocation's."""
    differential(tmp_path, servers, ["--image-opts", "-c", "map", "-c", "alloc 0 1M",
                                     "driver=raw,file.driver=nbd,file.path=SOCK,"
                                     "file.x-dirty-bitmap=qemu:allocation-depth"],
                 fmt="qcow2", serve_fmt="qcow2", fill=["write 0 64k"], nbd_args=["-A"])


def test_huge_data_chunk_for_block_status(tmp_path: Path) -> None:
    """A DATA chunk answering a block-status query is refused from its header (no 2 GiB buffering)."""
    def script(c: Conn) -> None:
        c.handshake(size=4 << 30)
        typ, _, handle, offset, _ = c.request()
        assert typ == 7
        c.send(struct.pack(">IHHQI", CHUNK, 1, 1, handle, 0x7FFFFFF0) + struct.pack(">Q", offset))
        c.sock.recv(1)

    out, _, _ = fake_differential(tmp_path, script, ["-f", "raw", "-c", "alloc 0 2G", "nbd:unix:SOCK"],
                                  env={"QIO_NBD_TIMEOUT": "5"}, reference=QEMU_IO is not None)
    assert out == "is_allocated failed: Invalid argument\n"


def _fuzz_server(seed: int) -> Callable[[Conn], None]:
    """A seeded hostile server: garbage at a random stage (greeting, option replies, the reply to a
    request), or well-formed headers with random types, flags and lengths, then it hangs up."""
    import random

    rng = random.Random(seed)
    stage = rng.randrange(4)
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 96)))

    def script(c: Conn) -> None:
        if stage == 0:
            c.send(junk)
            return
        if stage == 1:
            c.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
            c.read(4)
            _, opt, length = struct.unpack(">QII", c.read(16))
            c.read(length)
            c.send(struct.pack(">QII", REP_MAGIC, opt, rng.choice([1, 3, 4, 0x80000001, rng.getrandbits(32)]))
                   + struct.pack(">I", rng.choice([0, 4, 18, 1 << 20, 0xFFFFFFFF])) + junk)
            return
        c.handshake()
        _, _, handle, _, length = c.request()
        if stage == 2:
            c.send(junk)
            return
        ctype = rng.choice([0, 1, 2, 5, 0x8001, 0x8002, rng.getrandbits(16)])
        clen = rng.choice([0, 4, 8, 12, length, length + 8, 0x7FFFFFF0, rng.getrandbits(32)])
        flags = rng.getrandbits(16)
        h = handle if rng.random() < 0.8 else rng.getrandbits(64)
        c.send(struct.pack(">IHHQI", CHUNK, flags, ctype, h, clen) + junk)

    return script


@oracle
@pytest.mark.parametrize("seed", range(24))
def test_fuzzed_hostile_server(tmp_path: Path, seed: int) -> None:
    """Whatever a broken server sends, qio ends with an error message: no traceback, no hang (the
    run is bounded by QIO_NBD_TIMEOUT), no unbounded allocation (a 2 GiB length is never buffered)."""
    out, err, rc = fake_differential(tmp_path, _fuzz_server(seed),
                                     ["-f", "raw", "-c", "read 0 512", "-c", "map", "nbd:unix:SOCK"],
                                     env={"QIO_NBD_TIMEOUT": "5"}, reference=False)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert rc in (0, 1)
    assert "read failed" in out or "can't open" in err or "read 512/512" in out, (out, err)


@oracle
def test_large_and_queued_writes(tmp_path: Path, servers: list[NbdServer]) -> None:
    """A 16 MiB write is more than the socket takes at once (the rest goes through the writer task),
    20 queued aio_writes exceed the 16 requests in flight; every byte arrives, in order."""
    script = ["-f", "raw", "-c", "write -q -P 0x11 0 16M", "-c", "writev -q -P 0x22 1M 3k 64k 1",
              *(a for i in range(20) for a in ("-c", f"aio_write -q -P {i + 1} {2048 + i * 256}k 100k")),
              "-c", "aio_flush", "-c", "read -q -P 0x11 15M 1M", "-c", "read -q -P 20 6912k 100k",
              "-c", "read -q -P 0x22 1M 3k", "URL"]
    (out, _, rc), _ = differential(tmp_path, servers, script, size="16M")
    assert rc == 0 and "fail" not in out
