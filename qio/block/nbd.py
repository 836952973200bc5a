"""The ``nbd`` protocol driver: an export of an NBD server as a block node (QEMU 7.2's block/nbd.c).

Addressing follows QEMU: URIs (``nbd://HOST[:PORT]/EXPORT``, ``nbd+tcp://``, ``nbd+unix:///EXPORT?socket=P``),
legacy pseudo-filenames (``nbd:HOST:PORT[:exportname=X]``, ``nbd:unix:PATH[:exportname=X]``) and the
``server.*``/``host``/``port``/``path``/``export`` options, with QEMU's error texts.

Open-time negotiation (:class:`qio.block.nbd_proto.Handshake`) runs on a blocking socket with a timeout.
In the transmission phase a request sends its header and payload at once (one ``sendmsg`` of the
header and the caller's buffers) and waits for its reply the way a thread-pool request waits in QEMU:
the event loop keeps running, and a reader callback on the socket (registered while requests are in
flight) parses replies and completes whichever requests they answer.  Requests driven without an
event loop (open-time probing and format headers, :func:`qio.aio.run_sync`) read their reply
synchronously instead.  Every length from the server is bounded before it is buffered; a stalled
server is given up after ``QIO_NBD_TIMEOUT`` seconds (qemu-io would wait forever).

After a transport failure (EOF, reset, timeout) the requests in flight fail with EIO and so does the
next one; later ones connect again when QEMU's reconnect thread would have (``reconnect-delay=0``).
With ``reconnect-delay=N`` requests instead wait up to N seconds for a new connection and are sent
again on it.  A protocol violation fails the request whose reply broke the rules with EINVAL (bad
chunks) or EIO (bad magic, unknown handle), the others with EIO, and the connection is never used
again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from qio.aio import AIO, AioContext, External
from qio.block import io
from qio.block import nbd_proto as P
from qio.block.driver import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    REQ_FUA,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    BlockDriver,
    BlockInfo,
    IOVec,
)
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.numbers import INT_MAX

MAX_INFLIGHT = 16
_RUNTIME_KEYS = ("host", "port", "path", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap",
                "reconnect-delay", "open-timeout")
_SERVER_KEYS = {"inet": {"host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"},
                "unix": {"path", "abstract", "tight"}, "vsock": {"cid", "port"}, "fd": {"str"}}

CONNECTED, DISCONNECTED, QUIT = 0, 1, 2
#: Not an errno: the request met a dropped connection while ``reconnect-delay`` lets it wait and retry.
RETRY = -1


def _timeout() -> float:
    """Seconds a silent server is waited for (qio's addition; QEMU has no such limit)."""
    try:
        value = float(os.environ.get("QIO_NBD_TIMEOUT", "60"))
    except ValueError:
        value = 60.0
    return value if value > 0 else 60.0


# -- file names and options ----------------------------------------------------------------------
def parse_filename(filename: str, options: dict[str, Any]) -> None:
    """``nbd_parse_filename``: fill ``server.*``/``export`` from a URI or legacy pseudo-filename."""
    for key in options:
        if key in ("host", "port", "path", "export") or key.startswith("server."):
            raise QemuError(f"Option '{key}' cannot be used with a file name")
    if "://" in filename:
        if not _parse_uri(filename, options):
            raise QemuError("No valid URL specified")
        return
    file = filename
    pos = file.find(":exportname=")
    if pos >= 0:
        name = file[pos + len(":exportname="):]
        if not name:
            return
        file = file[:pos]
        options["export"] = name
    if not file.startswith("nbd:"):
        raise QemuError("File name string for NBD must start with 'nbd:'")
    spec = file[4:]
    if not spec:
        return
    if spec.startswith("unix:"):
        options["server.type"] = "unix"
        options["server.path"] = spec[5:]
        return
    host, port = _inet_parse(spec)
    options["server.type"] = "inet"
    options["server.host"] = host
    options["server.port"] = port


def _inet_parse(spec: str) -> tuple[str, str]:
    """``inet_parse``'s host:port split (options after a comma are ignored here)."""
    if spec.startswith(":"):
        port = spec[1:].split(",", 1)[0]
        if not port:
            raise QemuError(f"error parsing port in address '{spec}'")
        return "", port
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0 or spec[end + 1 : end + 2] != ":" or not spec[end + 2 :].split(",", 1)[0]:
            raise QemuError(f"error parsing IPv6 address '{spec}'")
        return spec[1:end], spec[end + 2 :].split(",", 1)[0]
    host, colon, rest = spec.partition(":")
    port = rest.split(",", 1)[0]
    if not host or not colon or not port:
        raise QemuError(f"error parsing address '{spec}'")
    return host, port


def _parse_uri(filename: str, options: dict[str, Any]) -> bool:
    """``nbd_parse_uri``; False for any malformed URI."""
    try:
        uri = urllib.parse.urlsplit(filename)
        port = uri.port
    except ValueError:
        return False
    if uri.scheme in ("nbd", "nbd+tcp"):
        is_unix = False
    elif uri.scheme == "nbd+unix":
        is_unix = True
    else:
        return False
    if uri.fragment or any(ch in filename for ch in " \t\n"):
        return False
    path = uri.path[1:] if uri.path.startswith("/") else uri.path
    path = urllib.parse.unquote(path)
    params = [p for p in uri.query.replace(";", "&").split("&") if p] if uri.query else []
    if len(params) > 1 or (is_unix and not params) or (not is_unix and params):
        return False
    new: dict[str, Any] = {}
    if path:
        new["export"] = path
    if is_unix:
        name, _, value = params[0].partition("=")
        if uri.netloc or urllib.parse.unquote(name) != "socket":
            return False
        new["server.type"] = "unix"
        new["server.path"] = urllib.parse.unquote(value)
    else:
        host = uri.hostname if uri.netloc.startswith("[") else uri.netloc.rsplit("@", 1)[-1].split(":", 1)[0]
        if not host:
            return False
        if uri.netloc.startswith("["):
            host = uri.netloc.rsplit("@", 1)[-1][1:].split("]", 1)[0]
        new["server.type"] = "inet"
        new["server.host"] = urllib.parse.unquote(host)
        new["server.port"] = str(port or P.DEFAULT_PORT)
    options.update(new)
    return True


def _number(key: str, value: Any) -> int:
    """A QemuOpts number: decimal, 0x hex or 0 octal; negative input wraps to 32 bits as in QEMU."""
    if isinstance(value, bool):
        raise QemuError(f"Parameter '{key}' expects a number")
    if isinstance(value, int):
        return value % 2**32
    try:
        text = str(value).strip()
        neg = text.startswith("-")
        body = text[1:] if neg else text
        n = int(body, 16) if body[:2].lower() == "0x" else int(body, 8) if body.startswith("0") and len(body) > 1 \
            else int(body, 10)
    except ValueError:
        raise QemuError(f"Parameter '{key}' expects a number") from None
    return (-n if neg else n) % 2**32


class Address:
    """Where the server listens: a Unix socket path or a TCP host and port."""

    def __init__(self, kind: str, host: str = "", port: str = "", path: str = "") -> None:
        self.kind, self.host, self.port, self.path = kind, host, port, path

    def describe(self) -> str:
        return self.path if self.kind == "unix" else f"{self.host}:{self.port}"


def _server_address(options: dict[str, Any]) -> Address:
    """``nbd_process_legacy_socket_options`` then ``nbd_config``: the ``server.*`` address."""
    path, host, port = options.pop("path", None), options.pop("host", None), options.pop("port", None)
    if path is not None or host is not None or port is not None:
        if any(k.startswith("server.") for k in options):
            raise QemuError("Cannot use 'server' and path/host/port at the same time")
        if path is not None and host is not None:
            raise QemuError("path and host may not be used at the same time")
        if path is not None:
            if port is not None:
                raise QemuError("port may not be used without host")
            options["server.type"], options["server.path"] = "unix", str(path)
        elif host is not None:
            options["server.type"], options["server.host"] = "inet", str(host)
            options["server.port"] = str(port) if port is not None else str(P.DEFAULT_PORT)
    server = {k[7:]: options.pop(k) for k in list(options) if k.startswith("server.")}
    if not server:
        raise QemuError("NBD server address missing")
    kind = server.pop("type", None)
    if kind is None:
        raise QemuError("Parameter 'type' is missing")
    kind = str(kind)
    if kind not in _SERVER_KEYS:
        raise QemuError(f"Parameter 'type' does not accept value '{kind}'")
    for key in ("host", "port") if kind == "inet" else ("path",) if kind == "unix" else ():
        if key not in server:
            raise QemuError(f"Parameter '{key}' is missing")
    for key in server:
        if key not in _SERVER_KEYS[kind]:
            raise QemuError(f"Parameter '{key}' is unexpected")
    if kind == "unix":
        return Address("unix", path=str(server["path"]))
    if kind == "inet":
        return Address("inet", host=str(server["host"]), port=str(server["port"]))
    raise QemuError(f"NBD server type '{kind}' is not supported by qio")


def _connect(addr: Address, timeout: float) -> socket.socket:
    """One connection attempt with QEMU's messages."""
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr.path)
        except OSError as e:
            sock.close()
            raise QemuError(f"Failed to connect to '{addr.path}': {os.strerror(e.errno or errno.EIO)}",
                            errno.ECONNREFUSED) from None
        return sock
    try:
        if not addr.host:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        infos = socket.getaddrinfo(addr.host, addr.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise QemuError(f"address resolution failed for {addr.host}:{addr.port}: {e.strerror}") from None
    except UnicodeError:
        raise QemuError(f"address resolution failed for {addr.host}:{addr.port}: Name or service not known") \
            from None
    err: OSError | None = None
    for family, stype, proto, _, sa in infos:
        sock = socket.socket(family, stype, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sa)
        except OSError as e:
            sock.close()
            err = e
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    code = err.errno if err is not None and err.errno else errno.ECONNREFUSED
    raise QemuError(f"Failed to connect to '{addr.host}:{addr.port}': {os.strerror(code)}", errno.ECONNREFUSED)


# -- requests --------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class Req:
    """One request in flight and what its reply chunks said."""

    cmd: int
    handle: int
    offset: int
    length: int
    qiov: IOVec | None
    done: bool = False
    err: int = 0
    extent: tuple[int, int] | None = None
    wait: External | None = None

    def finish(self, err: int = 0) -> None:
        if self.done:
            return
        if err and not self.err:
            self.err = err
        self.done = True
        if self.wait is not None:
            self.wait.complete()


class ProtocolError(Exception):
    """The server broke the protocol: the connection is dropped for good."""


class NbdDriver(BlockDriver):
    format_name = "nbd"
    protocol_name = "nbd+unix"  # what qemu-io 7.2's ``info`` prints for ``-f nbd`` (obs)

    def __init__(self) -> None:
        super().__init__()
        self.addr = Address("unix")
        self.export = ""
        self.context = "base:allocation"
        self.timeout = _timeout()
        self.info = P.ExportInfo()
        self.sock: socket.socket | None = None
        self.state = QUIT
        #: Reconnection after a drop: when the emulated background thread tries next, and its back-off.
        self.next_attempt: float | None = None
        self.backoff = 1.0
        self.reconnect_delay = 0
        #: While requests may wait for a reconnection (``reconnect-delay``): until when.
        self.wait_deadline: float | None = None
        self.inflight: dict[int, Req] = {}
        self._handles = 0
        self._rbuf = bytearray()
        #: What each read of the socket lands in first (one buffer for the connection's life: a fresh
        #: 256 KiB ``recv`` result per read cost an mmap, mremap and munmap each).
        self._rspace = memoryview(bytearray(1 << 18))
        self._wbuf = bytearray()
        #: The event loop the socket's reader callback is registered with, while replies are awaited.
        self._reader: asyncio.AbstractEventLoop | None = None
        self._reader_timer: asyncio.TimerHandle | None = None
        self._last_reply = 0.0
        self._writer: asyncio.Task[None] | None = None
        self._slot_waiters: list[asyncio.Future[None]] = []

    # -- open --------------------------------------------------------------------------------
    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> bool:
        parse_filename(filename, options)
        return True

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        opts = {k: options.pop(k) for k in _RUNTIME_KEYS if k in options}
        for key in ("reconnect-delay", "open-timeout"):
            if key in opts:
                opts[key] = _number(key, opts[key])
        # QEMU absorbs legacy keys first, then maps host/port/path to server.*.
        for key in ("host", "port", "path"):
            if key in opts:
                options[key] = opts.pop(key)
        self.addr = _server_address(options)
        export = opts.get("export")
        self.export = "" if export is None else str(export)
        if len(self.export.encode()) > P.MAX_STRING:
            raise QemuError("export name too long to send to server")
        if "tls-creds" in opts:
            raise QemuError(f"No TLS credentials with id '{opts['tls-creds']}'")
        bitmap = opts.get("x-dirty-bitmap")
        if bitmap is not None:
            if len(str(bitmap).encode()) > P.MAX_STRING:
                raise QemuError("x-dirty-bitmap query too long to send to server")
            self.context = str(bitmap)
        open_timeout = int(opts.get("open-timeout", 0))
        self.reconnect_delay = int(opts.get("reconnect-delay", 0))
        self.filename = self._exact_filename(export is not None)
        self._establish(open_timeout)
        info = self.info
        if bitmap is not None and not info.base_allocation:
            self._drop_connection()
            raise QemuError("Could not open image: Invalid argument")
        if info.flags & P.TF_READ_ONLY and not flags.read_only:
            if str(options.get("auto-read-only", "off")) not in ("on", "true", "True"):
                self._drop_connection()
                raise QemuError("Could not open image: Permission denied", errno.EACCES)
            flags.read_only = True
        self.read_only = flags.read_only
        self.flags = flags
        self.supported_write_flags = self.supported_zero_flags = 0
        if info.flags & P.TF_SEND_FUA:
            self.supported_write_flags = REQ_FUA
            self.supported_zero_flags = REQ_FUA
        if info.flags & P.TF_SEND_WRITE_ZEROES:
            self.supported_zero_flags |= REQ_MAY_UNMAP
            if info.flags & P.TF_SEND_FAST_ZERO:
                self.supported_zero_flags |= REQ_NO_FALLBACK
        self.refresh_limits()

    def refresh_limits(self) -> None:
        """``nbd_refresh_limits``: the server's minimum block size, or a guess QEMU also makes."""
        info = self.info
        align = info.min_block
        if not align:
            align = 1 if info.size % 512 or info.base_allocation else 512
        self.request_alignment = align
        self.max_transfer = min(P.MAX_BUFFER, info.max_block) if info.max_block else P.MAX_BUFFER
        self.max_pwrite_zeroes = self.max_transfer
        self.max_pdiscard = INT_MAX // align * align

    def _exact_filename(self, has_export: bool) -> str:
        """``nbd_refresh_filename``."""
        a = self.addr
        if a.kind == "unix":
            return f"nbd+unix:///{self.export}?socket={a.path}" if has_export else f"nbd+unix://?socket={a.path}"
        return f"nbd://{a.host}:{a.port}/{self.export}" if has_export else f"nbd://{a.host}:{a.port}"

    def _establish(self, open_timeout: int) -> None:
        """Connect (retrying for ``open-timeout`` seconds) and negotiate."""
        deadline = time.monotonic() + open_timeout
        delay = 1.0
        while True:
            try:
                sock = _connect(self.addr, self.timeout)
                break
            except QemuError:
                remaining = deadline - time.monotonic()
                if open_timeout <= 0 or remaining <= 0:
                    raise
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 16.0)
        try:
            self.info = P.Handshake(sock, self.export, self.context).run()
        except QemuError:
            sock.close()
            raise
        self.sock = sock
        self.state = CONNECTED
        self._rbuf.clear()
        self._wbuf.clear()

    def _try_reconnect(self) -> bool:
        """QEMU's reconnect thread, emulated on demand.

        The first request after a drop starts the thread and fails at once; the thread tries at once,
        then again after sleeping 1, 2, 4, 8, 16, 16... seconds.  qio makes each attempt when a request
        finds one due, so a request succeeds exactly when QEMU's thread would have reconnected by then.
        """
        now = time.monotonic()
        if self.next_attempt is None:
            self.next_attempt, self.backoff = now + 1.0, 2.0
            self._reconnect()  # on success the next request finds the new connection
            return False
        if now < self.next_attempt:
            return False
        if self._reconnect():
            return True
        self.next_attempt = now + self.backoff
        self.backoff = min(self.backoff * 2, 16.0)
        return False

    def _reconnect(self) -> bool:
        """One attempt to connect again after a dropped connection (size and flags must not change)."""
        old = self.info
        try:
            self._establish(0)
        except QemuError:
            return False
        new = self.info
        if (new.size, new.flags & P.TF_READ_ONLY) != (old.size, old.flags & P.TF_READ_ONLY):
            self.info = old
            self._drop_connection()
            self.state = QUIT
            return False
        return True

    # -- life cycle ---------------------------------------------------------------------------
    def _drop_connection(self) -> None:
        self._stop_reading()
        sock, self.sock = self.sock, None
        task = self._writer
        if task is not None and not task.done():
            task.cancel()
        self._writer = None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def closed(self) -> None:
        """``nbd_client_close``: NBD_CMD_DISC (no reply), then close the socket."""
        if self.sock is not None and self.state == CONNECTED:
            try:
                self.sock.send(P.pack_request(P.CMD_DISC, 0, 0, 0, 0), socket.MSG_DONTWAIT)
            except OSError:
                pass
        self.state = QUIT
        self._fail_all(errno.EIO)
        self._drop_connection()

    def check_reopen(self, flags: OpenFlags, options: dict[str, Any]) -> None:
        if not flags.read_only and self.info.flags & P.TF_READ_ONLY:
            raise QemuError("Can't reopen read-only NBD mount as read/write", errno.EACCES)

    # -- failures ---------------------------------------------------------------------------
    def _fail_all(self, err: int, culprit: Req | None = None, culprit_err: int = errno.EINVAL) -> None:
        reqs = list(self.inflight.values())
        self.inflight.clear()
        for req in reqs:
            req.finish(culprit_err if req is culprit else err)
        self._wake_slots()

    def _transport_error(self) -> None:
        """EOF, reset or a stalled server: in-flight requests fail with EIO; a reconnect may follow."""
        retry = False
        if self.state == CONNECTED:
            self.state = DISCONNECTED
            self.next_attempt = None
            if self.reconnect_delay:  # QEMU's wait mode: requests wait and are sent again
                now = time.monotonic()
                self.wait_deadline, self.next_attempt, self.backoff = now + self.reconnect_delay, now, 1.0
        retry = self.state == DISCONNECTED and self.wait_deadline is not None
        self._drop_connection()
        self._fail_all(RETRY if retry else errno.EIO)

    def _protocol_error(self, culprit: Req | None) -> None:
        self.state = QUIT
        self._drop_connection()
        self._fail_all(errno.EIO, culprit)

    def _wake_slots(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- reply parsing (shared by the reader task and synchronous requests) ---------------------
    def _parse_all(self) -> None:
        try:
            while self._parse_one():
                pass
        except ProtocolError as e:
            culprit = e.args[0] if e.args and isinstance(e.args[0], Req) else None
            self._protocol_error(culprit)

    def _lookup(self, handle: int) -> Req:
        req = self.inflight.get(handle)
        if req is None:
            raise ProtocolError()
        return req

    def _parse_one(self) -> bool:
        """Consume one complete reply or chunk from the buffer; False if more bytes are needed."""
        buf = self._rbuf
        if len(buf) < 4:
            return False
        magic = struct.unpack_from(">I", buf)[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            if len(buf) < P.SIMPLE_REPLY.size:
                return False
            _, err, handle = P.SIMPLE_REPLY.unpack_from(buf)
            req = self._lookup(handle)
            if req.cmd == P.CMD_READ and self.info.structured_reply:
                raise ProtocolError(req)
            need = P.SIMPLE_REPLY.size + (req.length if req.cmd == P.CMD_READ and not err else 0)
            if len(buf) < need:
                return False
            if req.cmd == P.CMD_READ and not err:
                assert req.qiov is not None
                with memoryview(buf) as mv:
                    io.iov_from_bytes(req.qiov, 0, mv[P.SIMPLE_REPLY.size : need])
            del buf[:need]
            self._complete(req, P.wire_errno(err) if err else 0)
            return True
        if magic != P.STRUCTURED_REPLY_MAGIC or not self.info.structured_reply:
            raise ProtocolError()
        if len(buf) < P.CHUNK.size:
            return False
        _, cflags, ctype, handle, length = P.CHUNK.unpack_from(buf)
        req = self._lookup(handle)
        if ctype == P.REPLY_TYPE_OFFSET_DATA and req.cmd != P.CMD_READ:
            raise ProtocolError(req)  # before buffering: a block-status request may span 2 GiB
        limit = 8 + req.length if ctype == P.REPLY_TYPE_OFFSET_DATA else P.MAX_SMALL_PAYLOAD
        if length > limit:
            raise ProtocolError(req)
        if len(buf) < P.CHUNK.size + length:
            return False
        end = P.CHUNK.size + length
        payload = bytes(buf[P.CHUNK.size : end]) if ctype != P.REPLY_TYPE_OFFSET_DATA else b""
        with memoryview(buf) as mv, mv[P.CHUNK.size : end] as data_view:
            self._chunk(req, cflags, ctype, payload, data_view)
        del buf[: P.CHUNK.size + length]
        if cflags & P.REPLY_FLAG_DONE:
            err = req.err
            if not err and req.cmd == P.CMD_BLOCK_STATUS and req.extent is None:
                err = errno.EIO
            self._complete(req, err)
        return True

    def _chunk(self, req: Req, cflags: int, ctype: int, payload: bytes, data: memoryview) -> None:
        """Check one structured chunk against its request (QEMU's checks) and apply it."""
        if ctype == P.REPLY_TYPE_NONE:
            if not cflags & P.REPLY_FLAG_DONE or payload:
                raise ProtocolError(req)
            return
        if ctype & 0x8000:
            if len(payload) < 6:
                raise ProtocolError(req)
            err, msglen = struct.unpack_from(">IH", payload)
            if not err or msglen > len(payload) - 6:
                raise ProtocolError(req)
            if not req.err:
                req.err = P.wire_errno(err)
            return
        if ctype == P.REPLY_TYPE_OFFSET_DATA:
            if req.cmd != P.CMD_READ or len(data) <= 8:
                raise ProtocolError(req)
            offset = struct.unpack_from(">Q", data)[0]
            n = len(data) - 8
            if offset < req.offset or offset + n > req.offset + req.length:
                raise ProtocolError(req)
            assert req.qiov is not None
            io.iov_from_bytes(req.qiov, offset - req.offset, data[8:])
            return
        if ctype == P.REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != P.CMD_READ or len(payload) != 12:
                raise ProtocolError(req)
            offset, size = struct.unpack(">QI", payload)
            if not size or offset < req.offset or offset + size > req.offset + req.length:
                raise ProtocolError(req)
            assert req.qiov is not None
            io.iov_memset(req.qiov, offset - req.offset, size)
            return
        if ctype == P.REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != P.CMD_BLOCK_STATUS or req.extent is not None or len(payload) < 12:
                raise ProtocolError(req)
            ctx, length, flags = struct.unpack_from(">III", payload)
            if ctx != self.info.context_id or not length:
                raise ProtocolError(req)
            req.extent = (length, flags)
            return
        raise ProtocolError(req)

    def _complete(self, req: Req, err: int) -> None:
        self.inflight.pop(req.handle, None)
        req.finish(err)
        self._wake_slots()

    # -- sending ---------------------------------------------------------------------------------
    async def _request(self, cmd: int, flags: int, offset: int, length: int, qiov: IOVec | None = None,
                       payload: IOVec | None = None) -> Req:
        """Send one request and wait for its reply; BlockError on failure."""
        AIO.yields += 1  # QEMU's request coroutine always waits for its reply
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if AIO.inline:
            loop = None
        while True:
            req = await self._attempt(loop, cmd, flags, offset, length, qiov, payload)
            if req.err != RETRY:
                break
        if req.err:
            raise BlockError(req.err)
        return req

    async def _wait_reconnect(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """``reconnect-delay``: wait for QEMU's reconnect thread (attempts after 1, 2, 4... s) until the
        delay is over; then every waiting and later request fails at once until a connection exists."""
        while self.state == DISCONNECTED and self.wait_deadline is not None:
            now = time.monotonic()
            if self.next_attempt is not None and now >= self.next_attempt:
                if self._reconnect():
                    self.wait_deadline = None
                    return True
                self.next_attempt = now + self.backoff
                self.backoff = min(self.backoff * 2, 16.0)
            if now >= self.wait_deadline:
                self.wait_deadline = None
                return False
            pause = max(0.0, min(self.next_attempt or now, self.wait_deadline) - now)
            if loop is None:
                time.sleep(pause)
            else:
                timer: asyncio.Future[None] = loop.create_future()
                handle = loop.call_later(pause, _resolve, timer)
                try:
                    await _wait_net(timer)
                finally:
                    handle.cancel()
        return self.state == CONNECTED

    async def _attempt(self, loop: asyncio.AbstractEventLoop | None, cmd: int, flags: int, offset: int,
                       length: int, qiov: IOVec | None, payload: IOVec | None) -> Req:
        """Send the request once and wait for its reply (``req.err`` RETRY: the connection dropped)."""
        if self.state == DISCONNECTED and self.wait_deadline is not None and not await self._wait_reconnect(loop):
            raise BlockError(errno.EIO)
        if self.state == QUIT:
            raise BlockError(errno.EIO)
        if self.state == DISCONNECTED and not self._try_reconnect():
            raise BlockError(errno.EIO)
        while loop is not None and len(self.inflight) >= MAX_INFLIGHT:
            slot: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(slot)
            await _wait_net(slot)
            if self.state != CONNECTED:
                if self.wait_deadline is None:
                    raise BlockError(errno.EIO)
                retry = Req(cmd, 0, offset, length, qiov)
                retry.err = RETRY
                return retry
        self._handles += 1
        req = Req(cmd, self._handles, offset, length, qiov)
        self.inflight[req.handle] = req
        data: list[bytes | memoryview] = [P.pack_request(cmd, flags, req.handle, offset, length)]
        if payload:
            data += payload
        if loop is None:
            self._sync_roundtrip(req, b"".join(data))
        else:
            req.wait = External()
            self._send(loop, data)
            if len(self.inflight) == 1:  # a silent server is timed from now
                self._last_reply = time.monotonic()
            if self.state == CONNECTED and (self._reader is not loop or self._reader_timer is None):
                self._start_reading(loop)
            if not req.done:
                await _wait_reply(req.wait)
        return req

    def _sync_roundtrip(self, req: Req, data: bytes) -> None:
        """Without an event loop (open time): blocking send and receive, bounded by the timeout."""
        sock = self.sock
        assert sock is not None
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
            while not req.done:
                chunk = sock.recv(1 << 18)
                if not chunk:
                    self._transport_error()
                    break
                self._rbuf += chunk
                self._parse_all()
        except OSError:
            self._transport_error()
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)

    def _send(self, loop: asyncio.AbstractEventLoop, parts: list[bytes | memoryview]) -> None:
        """Queue bytes for the server: sent at once if the socket takes them (header and payload
        buffers in one ``sendmsg``, without joining them), else the rest by a writer task."""
        sock = self.sock
        if sock is None:
            return
        if sock.gettimeout() != 0.0:  # (left with a timeout by a synchronous round trip or the handshake)
            sock.setblocking(False)
        if self._writer is None:
            try:
                n = sock.sendmsg(parts) if len(parts) <= io.IOV_MAX else 0
            except BlockingIOError:
                n = 0
            except OSError:
                self._transport_error()
                return
            total = sum(map(len, parts))
            if n == total:
                return
            self._wbuf += b"".join(parts)[n:]
        else:
            for part in parts:
                self._wbuf += part
        if self._writer is None:
            self._writer = loop.create_task(self._write_out())

    async def _write_out(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._wbuf and self.sock is not None:
                data, self._wbuf = bytes(self._wbuf), bytearray()
                await asyncio.wait_for(loop.sock_sendall(self.sock, data), self.timeout)
        except (OSError, TimeoutError):
            self._writer = None
            self._transport_error()
        finally:
            self._writer = None

    def _start_reading(self, loop: asyncio.AbstractEventLoop) -> None:
        """Parse replies as they arrive while requests are in flight: a callback on the socket's
        readability (one event-loop wake-up per batch of replies; a reader task awaiting ``sock_recv``
        under ``wait_for`` took several per reply), with a timer for a silent server.

        Both stay in place between requests (no registration per request); the socket is only read
        while requests are in flight: readable with none (EOF, unsolicited bytes), the callback
        unregisters itself and the next request finds what happened, as before."""
        sock = self.sock
        assert sock is not None
        if self._reader is not loop:  # (a later asyncio.run of an API user: a new loop)
            self._stop_reading()
            loop.add_reader(sock.fileno(), self._on_readable)
            self._reader = loop
        if self._reader_timer is None:
            self._reader_timer = loop.call_later(self.timeout, self._on_silence)

    def _stop_reading(self) -> None:
        loop, self._reader = self._reader, None
        if loop is None:
            return
        if self._reader_timer is not None:
            self._reader_timer.cancel()
            self._reader_timer = None
        if self.sock is not None:
            loop.remove_reader(self.sock.fileno())
        AioContext.current().notify()

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None or not self.inflight:
            self._stop_reading()
            return
        space = self._rspace
        try:
            n = sock.recv_into(space)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._stop_reading()
            self._transport_error()
            return
        self._last_reply = time.monotonic()
        self._rbuf += space[:n]
        self._parse_all()
        if self._reader is not None and (self.state != CONNECTED or self.sock is None):
            self._stop_reading()

    def _on_silence(self) -> None:
        """No reply for ``timeout`` seconds while requests wait: the server is given up on."""
        loop = self._reader
        if loop is None:
            return
        if not self.inflight:  # idle: armed again by the next request
            self._reader_timer = None
            return
        left = self._last_reply + self.timeout - time.monotonic()
        if left > 0:
            self._reader_timer = loop.call_later(left, self._on_silence)
            return
        self._stop_reading()
        self._transport_error()

    # -- I/O ---------------------------------------------------------------------------------
    def getlength(self) -> int:
        return self.info.size

    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        size = self.info.size
        if offset >= size:
            io.iov_memset(qiov, 0, nbytes)
            return
        if offset + nbytes > size:  # the block layer rounded the size up: zero the tail
            io.iov_memset(qiov, size - offset, offset + nbytes - size)
            nbytes = size - offset
        pos = 0
        while pos < nbytes:
            n = min(nbytes - pos, self.max_transfer)
            await self._request(P.CMD_READ, 0, offset + pos, n, io.iov_slice(qiov, pos, n))
            pos += n

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        if not nbytes:
            return
        cflags = P.CMD_FLAG_FUA if flags & REQ_FUA else 0
        await self._request(P.CMD_WRITE, cflags, offset, nbytes, None, qiov)

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        if not self.info.flags & P.TF_SEND_WRITE_ZEROES:
            raise BlockError(errno.ENOTSUP)
        cflags = P.CMD_FLAG_FUA if flags & REQ_FUA else 0
        if not flags & REQ_MAY_UNMAP:
            cflags |= P.CMD_FLAG_NO_HOLE
        if flags & REQ_NO_FALLBACK:
            cflags |= P.CMD_FLAG_FAST_ZERO
        if nbytes:
            await self._request(P.CMD_WRITE_ZEROES, cflags, offset, nbytes)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        if self.info.flags & P.TF_SEND_TRIM and nbytes:
            await self._request(P.CMD_TRIM, 0, offset, nbytes)

    async def co_flush_to_disk(self) -> bool:
        if self.info.flags & P.TF_SEND_FLUSH:
            await self._request(P.CMD_FLUSH, 0, 0, 0)
        return False

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        if offset != self.info.size and exact:
            raise QemuError("Cannot resize NBD nodes", errno.ENOTSUP)
        if offset > self.info.size:
            raise QemuError("Cannot grow NBD nodes", errno.EINVAL)

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        info = self.info
        if not info.base_allocation:
            return BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID, nbytes
        if offset >= info.size:
            return BLOCK_ZERO | BLOCK_ALLOCATED, nbytes
        align = self.request_alignment
        length = min(INT_MAX // align * align, nbytes, info.size - offset)
        req = await self._request(P.CMD_BLOCK_STATUS, P.CMD_FLAG_REQ_ONE, offset, length)
        assert req.extent is not None
        ext_len, ext_flags = req.extent
        if info.min_block and ext_len % info.min_block:
            if ext_len > info.min_block:
                ext_len -= ext_len % info.min_block
            else:
                ext_len, ext_flags = info.min_block, 0
        ext_len = min(ext_len, nbytes)
        status = (0 if ext_flags & P.STATE_HOLE else BLOCK_DATA) | (BLOCK_ZERO if ext_flags & P.STATE_ZERO else 0)
        if status:
            status |= BLOCK_ALLOCATED
        return status | BLOCK_OFFSET_VALID, ext_len

    def get_info(self) -> BlockInfo | None:
        return None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait_reply(wait: External) -> None:
    """A request waits for its reply: as :func:`_wait_net`, but completed by a plain call from the
    reader callback (:class:`qio.aio.External`), one event-loop pass sooner."""
    AIO.busy += 1
    try:
        await wait
    finally:
        AIO.busy -= 1
        AioContext.current().notify()


async def _wait_net(fut: asyncio.Future[None]) -> None:
    """The one integration point with :mod:`qio.aio`: a request waiting for the server is like a
    thread-pool request, it completes without help, so ``AIO.busy`` tells the shell to wait for it
    (``Session.run_until`` sleeps on ``AioContext.notify`` rather than declaring a standstill).

    With a scheduler that drives request coroutines itself (a Co awaiting an asyncio future is then
    treated as waiting for a real thread), this becomes a plain ``await fut``; the reader task would
    ideally wake the request directly (QEMU's ``aio_co_wake`` from the reply-reading coroutine), so
    completions keep the server's reply order."""
    AIO.busy += 1
    try:
        await fut
    finally:
        AIO.busy -= 1
        AioContext.current().notify()
