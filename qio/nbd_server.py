"""An NBD server for the open image (qio's own, no qemu-io counterpart): ``nbd_server_start``.

External clients (qemu-img, qemu-io, QEMU, the kernel) reach the session's driver stack through a
Unix socket or loopback TCP while the prompt stays live.  Each client request becomes an AIO request
of the session (``AioContext.submit``), exactly like ``aio_read``/``aio_write``: it passes the same
blkdebug events, so ``break``/``wait_break``/``resume``, rules and ``trace`` apply to it.

Written from the NBD protocol document (fixed newstyle handshake, ``NBD_OPT_GO``/``INFO``/
``EXPORT_NAME``/``LIST``, structured replies, the ``base:allocation`` meta context).  Every length a
client sends is checked before anything is allocated for it; a client that breaks the protocol is
disconnected, never answered with a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from qio.block import io
from qio.block import nbd_proto as P
from qio.block.driver import BLOCK_DATA, BLOCK_ZERO, REQ_FUA, REQ_MAY_UNMAP, REQ_ZERO_WRITE
from qio.block.errors import BlockError, QemuError

if TYPE_CHECKING:
    from qio.aio import AioContext
    from qio.block.backend import BlockBackend
    from qio.block.driver import BlockDriver

META_BASE_ALLOCATION = "base:allocation"
META_ID = 1
#: The largest request (and write payload) the server accepts: the NBD document's 32 MiB.
MAX_REQUEST = P.MAX_BUFFER
_NBD_ERRNO = {errno.EPERM: 1, errno.EACCES: 1, errno.EROFS: 1, errno.EIO: 5, errno.ENOMEM: 12,
              errno.EINVAL: 22, errno.ENOSPC: 28, errno.EFBIG: 28, errno.EDQUOT: 28, errno.EOVERFLOW: 75,
              errno.ENOTSUP: 95, errno.ESHUTDOWN: 108}
_Q = struct.Struct(">Q")
_OPT_HEADER = struct.Struct(">QII")
_REP_HEADER = struct.Struct(">QIII")


class Disconnect(Exception):
    """The client broke the protocol or left: drop the connection."""


#: Protocol-level fault rules (``nbd_fault``): where they act and what they do.
FAULT_POINTS = ("handshake", "reply")
FAULT_ACTIONS = ("disconnect", "delay", "error", "short", "malformed")
FAULT_CMDS = {"read": P.CMD_READ, "write": P.CMD_WRITE, "flush": P.CMD_FLUSH, "trim": P.CMD_TRIM,
              "write-zeroes": P.CMD_WRITE_ZEROES, "block-status": P.CMD_BLOCK_STATUS}
_CMD_NAMES = {v: k for k, v in FAULT_CMDS.items()}
_ERRNO_NAMES = {"EPERM": errno.EPERM, "EIO": errno.EIO, "ENOMEM": errno.ENOMEM, "EINVAL": errno.EINVAL,
                "ENOSPC": errno.ENOSPC, "EOVERFLOW": errno.EOVERFLOW, "ENOTSUP": errno.ENOTSUP,
                "ESHUTDOWN": errno.ESHUTDOWN}


class Fault:
    """One protocol fault rule, with the blkdebug extensions' conventions: ``after`` matches pass
    first, then it fires ``count`` times (0: without limit); ``cmd`` filters transmission requests.

    * ``point=handshake``: ``disconnect`` before answering option number ``after + 1``.
    * ``point=reply``: ``disconnect`` instead of the reply (the request ran), ``delay`` the reply by
      ``ns`` nanoseconds, ``error`` answers ``errno`` without running the request, ``short`` sends
      half of the reply then disconnects, ``malformed`` sends the reply with a bad magic.
    """

    def __init__(self, fid: int, keys: dict[str, str]) -> None:
        self.id = fid
        known = {"point", "action", "cmd", "after", "count", "ns", "errno"}
        for k in keys:
            if k not in known:
                raise QemuError(f"nbd_fault: unknown key '{k}' (one of {', '.join(sorted(known))})")
        self.point = keys.get("point", "reply")
        if self.point not in FAULT_POINTS:
            raise QemuError(f"nbd_fault: point must be one of {', '.join(FAULT_POINTS)}")
        self.action = keys.get("action", "")
        if self.action not in FAULT_ACTIONS:
            raise QemuError(f"nbd_fault: action must be one of {', '.join(FAULT_ACTIONS)}")
        if self.point == "handshake" and self.action != "disconnect":
            raise QemuError("nbd_fault: only action=disconnect acts during the handshake")
        cmd = keys.get("cmd")
        if cmd is not None and cmd not in FAULT_CMDS:
            raise QemuError(f"nbd_fault: cmd must be one of {', '.join(FAULT_CMDS)}")
        if cmd is not None and self.point == "handshake":
            raise QemuError("nbd_fault: cmd= filters transmission requests, not the handshake")
        self.cmd = None if cmd is None else FAULT_CMDS[cmd]
        self.after = self._number(keys, "after", 0)
        self.count = self._number(keys, "count", 1)
        self.ns = self._number(keys, "ns", 0)
        if (self.action == "delay") != ("ns" in keys):
            raise QemuError("nbd_fault: ns= is the delay of action=delay (and only of it)")
        err = keys.get("errno", "EIO" if self.action == "error" else None)
        if err is not None and self.action != "error":
            raise QemuError("nbd_fault: errno= belongs to action=error")
        self.errno = 0
        if err is not None:
            code = _ERRNO_NAMES.get(err.upper(), int(err) if err.isascii() and err.isdigit() else None)
            if code is None:
                raise QemuError(f"nbd_fault: unknown errno '{err}'")
            self.errno = code
        self.matched = self.fired = 0

    @staticmethod
    def _number(keys: dict[str, str], key: str, default: int) -> int:
        value = keys.get(key)
        if value is None:
            return default
        if not (value.isascii() and value.isdigit()):
            raise QemuError(f"nbd_fault: {key} must be a non-negative number, not '{value}'")
        return int(value)

    def match(self, point: str, cmd: int | None) -> bool:
        """Count a match; True when the rule fires now."""
        if point != self.point or (self.cmd is not None and cmd != self.cmd):
            return False
        if self.count and self.fired >= self.count:
            return False
        self.matched += 1
        if self.matched <= self.after:
            return False
        self.fired += 1
        return True

    def describe(self) -> str:
        cmd = "any" if self.cmd is None else _CMD_NAMES[self.cmd]
        extra = f" ns={self.ns}" if self.action == "delay" else f" errno={self.errno}" if self.errno else ""
        return (f"#{self.id} point={self.point} action={self.action}{extra} cmd={cmd} after={self.after} "
                f"count={self.count} matched={self.matched} fired={self.fired}")


def nbd_errno(exc: BaseException) -> int:
    """The wire error for a failed request (EIO for anything unexpected)."""
    code = exc.code if isinstance(exc, BlockError) else getattr(exc, "errno", None) or errno.EIO
    return _NBD_ERRNO.get(code, 5)


def parse_address(text: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH`` or ``[tcp:]HOST:PORT`` (loopback or any host the user names)."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise QemuError("nbd_server_start: empty socket path")
        return "unix", path
    spec = text[4:] if text.startswith("tcp:") else text
    host, colon, port = spec.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise QemuError(f"nbd_server_start: bad address '{text}' (unix:PATH or HOST:PORT)")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


class Export:
    """One listening NBD server exporting the session's image under ``name``."""

    def __init__(self, aio: AioContext, blk: Callable[[], BlockBackend | None], name: str, writable: bool,
                 faults: list[Fault]) -> None:
        self.aio = aio
        self._blk = blk
        self.name = name
        self.writable = writable
        self.address = ""
        self.clients: set[Client] = set()
        self.served = 0
        #: Protocol fault rules (``nbd_fault``), the session's list: they outlive a restart.
        self.faults = faults
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def blk(self) -> BlockBackend:
        blk = self._blk()
        if blk is None:
            raise Disconnect("no image")
        return blk

    async def start(self, address: str) -> None:
        kind, where = parse_address(address)
        try:
            if kind == "unix":
                assert isinstance(where, str)
                # Listen on a temporary name, then rename: the socket appears only once it accepts.
                tmp = f"{where}.{os.getpid()}.tmp"
                self._server = await asyncio.start_unix_server(self._accept, tmp)
                try:
                    os.rename(tmp, where)
                except OSError:
                    self._server.close()
                    self._server = None
                    os.unlink(tmp)
                    raise
                self.address = f"unix:{where}"
            else:
                assert isinstance(where, tuple)
                self._server = await asyncio.start_server(self._accept, where[0], where[1])
                port = self._server.sockets[0].getsockname()[1]
                self.address = f"{where[0]}:{port}"
        except OSError as e:
            raise QemuError(f"Failed to listen on '{address}': {os.strerror(e.errno or errno.EIO)}",
                            e.errno or errno.EIO) from None
        self.aio.external += 1

    def describe(self) -> list[str]:
        """``debug_state``'s lines: the export, its clients and their requests in flight."""
        lines = [f"nbd export '{self.name}' on {self.address}: {len(self.clients)} connected, "
                 f"{self.served} served"]
        for c in sorted(self.clients, key=lambda c: c.number):
            lines.append(f"  client #{c.number}: {c.pending} in flight")
            lines.extend(f"    {what}" for what in c.inflight.values())
        return lines

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.served += 1
        client = Client(self, reader, writer, self.served)
        self.clients.add(client)
        self.aio.notify()  # the status line and a waiting ``nbd_server_stop -c`` look again
        task = asyncio.ensure_future(client.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, wait: Callable[[Callable[[], bool], str], Awaitable[Any]]) -> None:
        """Stop listening, let requests in flight finish (``wait`` runs the event loop), then close."""
        if self._server is None:
            return
        self._server.close()
        path = self.address[5:] if self.address.startswith("unix:") else None
        self._server = None
        self.aio.external -= 1
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        for c in self.clients:
            c.closing = True
        await wait(lambda: all(c.pending == 0 for c in self.clients), "stopping the NBD server")
        for c in list(self.clients):
            await c.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


class Client:
    """One connection: the handshake, then requests submitted to the session as AIO requests."""

    def __init__(self, export: Export, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 number: int) -> None:
        self.export = export
        self.number = number
        #: handle -> "read 4096 bytes at offset 0": what ``debug_state`` shows of requests in flight.
        self.inflight: dict[int, str] = {}
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.meta = False
        self.no_zeroes = False
        self.pending = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self) -> None:
        try:
            if await self._negotiate():
                await self._transmission()
        except (Disconnect, ConnectionError, asyncio.IncompleteReadError, QemuError):
            pass
        finally:
            await self._idle.wait()  # replies of requests in flight still go out
            await self.close()

    async def close(self) -> None:
        self.export.clients.discard(self)
        self.export.aio.notify()  # a waiting ``nbd_server_stop -c`` re-checks
        if not self.writer.is_closing():
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (ConnectionError, TimeoutError):
                pass

    # -- handshake ---------------------------------------------------------------------------------
    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self.writer.write(_REP_HEADER.pack(P.REP_MAGIC, opt, rep, len(data)) + data)

    def _error(self, opt: int, rep: int, msg: str) -> None:
        self._reply(opt, rep, msg.encode())

    async def _negotiate(self) -> bool:
        """Fixed newstyle; True when the client entered the transmission phase."""
        self.writer.write(_Q.pack(P.NBDMAGIC) + _Q.pack(P.IHAVEOPT)
                          + struct.pack(">H", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self._read(4))
        if cflags & ~(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES):
            raise Disconnect("unknown client flags")
        self.no_zeroes = bool(cflags & P.FLAG_NO_ZEROES)
        while True:
            await self.writer.drain()
            magic, opt, length = _OPT_HEADER.unpack(await self._read(_OPT_HEADER.size))
            if magic != P.IHAVEOPT:
                raise Disconnect("bad option magic")
            if length > P.MAX_STRING + 64 and opt != P.OPT_SET_META_CONTEXT:
                raise Disconnect("option too long")
            if length > 64 * 1024:
                raise Disconnect("option too long")
            data = await self._read(length)
            if self._fault("handshake", None) is not None:
                raise Disconnect("nbd_fault: disconnect during the handshake")
            if opt == P.OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.export.name:
                    raise Disconnect("unknown export")
                size, tflags = self._export_info()
                self.writer.write(_Q.pack(size) + struct.pack(">H", tflags)
                                  + (b"" if self.no_zeroes else bytes(124)))
                return True
            if opt == P.OPT_ABORT:
                self._reply(opt, P.REP_ACK)
                await self.writer.drain()
                return False
            if opt == P.OPT_LIST:
                if data:
                    self._error(opt, P.REP_ERR_INVALID, "OPT_LIST should not have length")
                    continue
                name = self.export.name.encode()
                self._reply(opt, P.REP_SERVER, struct.pack(">I", len(name)) + name)
                self._reply(opt, P.REP_ACK)
            elif opt == P.OPT_STRUCTURED_REPLY:
                if data:
                    self._error(opt, P.REP_ERR_INVALID, "structured reply request with data")
                elif self.structured:
                    self._error(opt, P.REP_ERR_INVALID, "structured reply already negotiated")
                else:
                    self.structured = True
                    self._reply(opt, P.REP_ACK)
            elif opt in (P.OPT_INFO, P.OPT_GO):
                if self._info(opt, data) and opt == P.OPT_GO:
                    await self.writer.drain()
                    return True
            elif opt in (P.OPT_SET_META_CONTEXT, P.OPT_LIST_META_CONTEXT):
                self._meta(opt, data)
            elif opt == P.OPT_STARTTLS:
                self._error(opt, P.REP_ERR_POLICY, "TLS not configured")
            else:
                self._error(opt, P.REP_ERR_UNSUP, f"Unsupported option {opt}")

    def _export_info(self) -> tuple[int, int]:
        blk = self.export.blk
        tflags = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA
        if self.export.writable and not blk.flags.read_only:
            tflags |= P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES
        else:
            tflags |= P.TF_READ_ONLY
        try:
            size = blk.getlength()
        except BlockError as e:
            raise Disconnect(str(e)) from None
        return size, tflags

    def _info(self, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            self._error(opt, P.REP_ERR_INVALID, "option too short")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > len(data) - 6:
            self._error(opt, P.REP_ERR_INVALID, "name length past the option")
            return False
        name = data[4:4 + nlen].decode("utf-8", "replace")
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * nreq:
            self._error(opt, P.REP_ERR_INVALID, "bad information request count")
            return False
        if name != self.export.name:
            self._error(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return False
        size, tflags = self._export_info()
        self._reply(opt, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, size, tflags))
        self._reply(opt, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self._reply(opt, P.REP_ACK)
        return True

    def _meta(self, opt: int, data: bytes) -> None:
        if opt == P.OPT_SET_META_CONTEXT and not self.structured:
            self._error(opt, P.REP_ERR_INVALID, "structured replies not negotiated")
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = data[4:4 + nlen].decode("utf-8", "replace")
            pos = 4 + nlen
            (nq,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > P.MAX_STRING or pos + qlen > len(data):
                    raise struct.error
                queries.append(data[pos:pos + qlen].decode("utf-8", "replace"))
                pos += qlen
            if pos != len(data) or nlen > len(data):
                raise struct.error
        except struct.error:
            self._error(opt, P.REP_ERR_INVALID, "malformed meta context request")
            return
        if name != self.export.name:
            self._error(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return
        want = (not queries and opt == P.OPT_LIST_META_CONTEXT) or any(
            q in (META_BASE_ALLOCATION, "base:") for q in queries)
        if opt == P.OPT_SET_META_CONTEXT:
            self.meta = want
        if want:
            self._reply(opt, P.REP_META_CONTEXT, struct.pack(">I", META_ID) + META_BASE_ALLOCATION.encode())
        self._reply(opt, P.REP_ACK)

    # -- transmission --------------------------------------------------------------------------
    async def _transmission(self) -> None:
        while not self.closing:
            await self.writer.drain()
            try:
                header = await self._read(P.REQUEST.size)
            except asyncio.IncompleteReadError:
                return
            magic, flags, cmd, handle, offset, length = P.REQUEST.unpack(header)
            if magic != P.REQUEST_MAGIC:
                raise Disconnect("bad request magic")
            if cmd == P.CMD_DISC:
                return
            payload = b""
            if cmd == P.CMD_WRITE:
                if length > MAX_REQUEST:
                    raise Disconnect("write payload too large")  # the payload cannot be skipped safely
                payload = await self._read(length)
            err = self._check(cmd, flags, offset, length)
            if err:
                self._send(self._error_reply(handle, err, "invalid request"), None)
                continue
            fault = self._fault("reply", cmd)
            if fault is not None and fault.action == "error":
                self._send(self._error_reply(handle, _NBD_ERRNO.get(fault.errno, 5), "nbd_fault: injected error"),
                           None)
                continue
            self._submit(cmd, flags, handle, offset, length, payload, fault)

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        if cmd not in (P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS):
            return 22
        if cmd == P.CMD_BLOCK_STATUS and not self.meta:
            return 22
        if cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and (
                not self.export.writable or self.export.blk.flags.read_only):
            return 1
        if cmd in (P.CMD_READ, P.CMD_WRITE) and length > MAX_REQUEST:
            return 22
        if cmd != P.CMD_FLUSH:
            size = self.export.blk.getlength()
            if offset > size or length > size - offset:
                return 22
        return 0

    def _fault(self, point: str, cmd: int | None) -> Fault | None:
        for f in self.export.faults:
            if f.match(point, cmd):
                return f
        return None

    def _submit(self, cmd: int, flags: int, handle: int, offset: int, length: int, payload: bytes,
                fault: Fault | None) -> None:
        blk = self.export.blk
        buf = memoryview(bytearray(length)) if cmd == P.CMD_READ else None
        coro: Any
        if cmd == P.CMD_READ:
            assert buf is not None
            coro = blk.preadv(offset, length, [buf])
        elif cmd == P.CMD_WRITE:
            coro = blk.pwritev(offset, length, [memoryview(payload)], REQ_FUA if flags & P.CMD_FLAG_FUA else 0)
        elif cmd == P.CMD_WRITE_ZEROES:
            zflags = REQ_ZERO_WRITE | (0 if flags & P.CMD_FLAG_NO_HOLE else REQ_MAY_UNMAP)
            coro = blk.pwritev(offset, length, None, zflags | (REQ_FUA if flags & P.CMD_FLAG_FUA else 0))
        elif cmd == P.CMD_TRIM:
            coro = blk.pdiscard(offset, length)
        elif cmd == P.CMD_FLUSH:
            coro = blk.flush()
        else:
            coro = _extents(blk.root, offset, length, bool(flags & P.CMD_FLAG_REQ_ONE))
        self.pending += 1
        self._idle.clear()
        self.inflight[handle] = f"{_CMD_NAMES[cmd]} {length} bytes at offset {offset} (handle {handle:#x})"

        def finish(reply: list[bytes | memoryview], fault: Fault | None) -> None:
            self.inflight.pop(handle, None)
            if not self.writer.is_closing():
                self._send(reply, fault)
            self.pending -= 1
            if not self.pending:
                self._idle.set()
            self.export.aio.notify()

        def done(exc: BaseException | None, result: Any) -> None:
            reply: list[bytes | memoryview]
            if exc is not None:
                reply = self._error_reply(handle, nbd_errno(exc), str(exc))
            elif cmd == P.CMD_READ:
                assert buf is not None
                reply = self._data_reply(handle, offset, buf)
            elif cmd == P.CMD_BLOCK_STATUS:
                reply = self._extents_reply(handle, result)
            else:
                reply = self._ok_reply(handle)
            if fault is not None and fault.action == "delay":  # the request stays in flight meanwhile
                asyncio.get_running_loop().call_later(fault.ns / 1e9, finish, reply, None)
            else:
                finish(reply, fault)

        self.export.aio.submit(coro, done)
        self.export.aio.notify()

    # -- replies ---------------------------------------------------------------------------------
    def _send(self, reply: list[bytes | memoryview], fault: Fault | None) -> None:
        """Write one reply, as a ``point=reply`` fault rule says if one fired for the request."""
        if fault is None:
            for part in reply:
                self.writer.write(part)
            return
        if fault.action == "disconnect":
            self.writer.transport.abort()
        elif fault.action == "short":
            data = b"".join(bytes(p) for p in reply)
            self.writer.write(data[:max(1, len(data) // 2)])
            self.writer.transport.close()  # the half already queued still goes out
        elif fault.action == "malformed":
            first = bytearray(reply[0])
            first[0] ^= 0xFF  # a magic the client does not know
            self._send([bytes(first), *reply[1:]], None)

    def _ok_reply(self, handle: int) -> list[bytes | memoryview]:
        if self.structured:
            return [P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0)]
        return [P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle)]

    def _error_reply(self, handle: int, err: int, msg: str) -> list[bytes | memoryview]:
        if self.structured:
            text = msg.encode()[:P.MAX_SMALL_PAYLOAD - 6]
            return [P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, handle,
                                 6 + len(text)) + struct.pack(">IH", err, len(text)) + text]
        return [P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, handle)]

    def _data_reply(self, handle: int, offset: int, buf: memoryview) -> list[bytes | memoryview]:
        if self.structured:
            return [P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, handle,
                                 8 + len(buf)) + _Q.pack(offset), buf]
        return [P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle), buf]

    def _extents_reply(self, handle: int, extents: list[tuple[int, int]]) -> list[bytes | memoryview]:
        body = struct.pack(">I", META_ID) + b"".join(struct.pack(">II", n, f) for n, f in extents)
        return [P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, handle,
                             len(body)) + body]


async def _extents(node: BlockDriver, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """``base:allocation`` extents for ``length`` bytes (at most 1024 extents, one with REQ_ONE)."""
    out: list[tuple[int, int]] = []
    end = offset + length
    while offset < end and len(out) < (1 if one else 1024):
        status, pnum = await io.block_status_above(node, True, offset, min(end - offset, 0x80000000 - 512))
        if not pnum:  # past the end of a short image: reads as zeroes
            status, pnum = BLOCK_ZERO, end - offset
        pnum = min(pnum, end - offset)
        flags = (0 if status & BLOCK_DATA else P.STATE_HOLE) | (P.STATE_ZERO if status & BLOCK_ZERO else 0)
        if out and out[-1][1] == flags and out[-1][0] + pnum < 1 << 32:
            out[-1] = (out[-1][0] + pnum, flags)
        else:
            out.append((pnum, flags))
        offset += pnum
    return out
