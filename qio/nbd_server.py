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
from qio.block.driver import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_ZERO, REQ_FUA, REQ_MAY_UNMAP, REQ_ZERO_WRITE
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
    if not colon or not port.isdigit() or int(port) > 65535:
        raise QemuError(f"nbd_server_start: bad address '{text}' (unix:PATH or HOST:PORT)")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port))


class Export:
    """One listening NBD server exporting the session's image under ``name``."""

    def __init__(self, aio: AioContext, blk: Callable[[], BlockBackend | None], name: str, writable: bool,
                 report: Callable[[str], None]) -> None:
        self.aio = aio
        self._blk = blk
        self.name = name
        self.writable = writable
        self.report = report
        self.address = ""
        self.clients: set[Client] = set()
        self.served = 0
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
                os.rename(tmp, where)
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

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(self, reader, writer)
        self.clients.add(client)
        self.served += 1
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

    def __init__(self, export: Export, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.export = export
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
                self._send_error(handle, err, "invalid request")
                continue
            self._submit(cmd, flags, handle, offset, length, payload)

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

    def _submit(self, cmd: int, flags: int, handle: int, offset: int, length: int, payload: bytes) -> None:
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

        def done(exc: BaseException | None, result: Any) -> None:
            self.pending -= 1
            if not self.pending:
                self._idle.set()
            if self.writer.is_closing():
                return
            if exc is not None:
                self._send_error(handle, nbd_errno(exc), str(exc))
            elif cmd == P.CMD_READ:
                assert buf is not None
                self._send_data(handle, offset, buf)
            elif cmd == P.CMD_BLOCK_STATUS:
                self._send_extents(handle, result)
            else:
                self._send_ok(handle)

        self.export.aio.submit(coro, done)
        self.export.aio.notify()

    # -- replies ---------------------------------------------------------------------------------
    def _send_ok(self, handle: int) -> None:
        if self.structured:
            self.writer.write(P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE,
                                           handle, 0))
        else:
            self.writer.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle))

    def _send_error(self, handle: int, err: int, msg: str) -> None:
        if self.structured:
            text = msg.encode()[:P.MAX_SMALL_PAYLOAD - 6]
            self.writer.write(P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR,
                                           handle, 6 + len(text)) + struct.pack(">IH", err, len(text)) + text)
        else:
            self.writer.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, handle))

    def _send_data(self, handle: int, offset: int, buf: memoryview) -> None:
        if self.structured:
            self.writer.write(P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA,
                                           handle, 8 + len(buf)) + _Q.pack(offset))
        else:
            self.writer.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle))
        self.writer.write(buf)

    def _send_extents(self, handle: int, extents: list[tuple[int, int]]) -> None:
        body = struct.pack(">I", META_ID) + b"".join(struct.pack(">II", n, f) for n, f in extents)
        self.writer.write(P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS,
                                       handle, len(body)) + body)


async def _status_above(node: BlockDriver, offset: int, nbytes: int) -> tuple[int, int]:
    """Block status of the whole backing chain (``bdrv_block_status_above``): unallocated ranges of a
    layer take the status of the layer below; past a short backing file the data reads as zeroes."""
    while True:
        status, pnum = await io.block_status(node, offset, nbytes)
        if pnum == 0:
            return BLOCK_ZERO, nbytes
        backing = node.child("backing")
        if status & BLOCK_ALLOCATED or backing is None:
            return status, pnum
        node, nbytes = backing.node, pnum


async def _extents(node: BlockDriver, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """``base:allocation`` extents for ``length`` bytes (at most 1024 extents, one with REQ_ONE)."""
    out: list[tuple[int, int]] = []
    end = offset + length
    while offset < end and len(out) < (1 if one else 1024):
        status, pnum = await _status_above(node, offset, min(end - offset, 0x80000000 - 512))
        pnum = min(pnum, end - offset)
        flags = (0 if status & BLOCK_DATA else P.STATE_HOLE) | (P.STATE_ZERO if status & BLOCK_ZERO else 0)
        if out and out[-1][1] == flags and out[-1][0] + pnum < 1 << 32:
            out[-1] = (out[-1][0] + pnum, flags)
        else:
            out.append((pnum, flags))
        offset += pnum
    return out
