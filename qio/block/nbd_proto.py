"""NBD wire protocol, client side: constants, the blocking handshake, reply-chunk decoding.

Written from the NBD protocol document (summarised in the project's nbd.md reference); QEMU 7.2's
client (``nbd/client.c``) decides *which* options are negotiated and the error texts.  The handshake
runs at open time on a blocking socket with a timeout; the transmission phase lives in
:mod:`qio.block.nbd`.  Every length read from the server is checked against a bound before anything
is allocated for it.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from qio.block.errors import QemuError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x0000420281861253
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

STATE_HOLE = 1
STATE_ZERO = 2

DEFAULT_PORT = 10809
MAX_STRING = 4096
MAX_BUFFER = 32 << 20
#: Largest payload of a non-data chunk QEMU accepts (``NBD_MAX_MALLOC_PAYLOAD``).
MAX_SMALL_PAYLOAD = 1000

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")

#: Server error values that keep their meaning; anything else is EINVAL (``nbd_errno_to_system_errno``).
_WIRE_ERRNOS = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC,
                75: errno.EOVERFLOW, 95: errno.ENOTSUP, 108: errno.ESHUTDOWN}

_OPT_NAMES = {OPT_EXPORT_NAME: "export name", OPT_ABORT: "abort", OPT_LIST: "list", OPT_STARTTLS: "starttls",
              OPT_INFO: "info", OPT_GO: "go", OPT_STRUCTURED_REPLY: "structured reply",
              OPT_LIST_META_CONTEXT: "list meta context", OPT_SET_META_CONTEXT: "set meta context"}
_REP_NAMES = {REP_ACK: "ack", REP_SERVER: "server", REP_INFO: "info", REP_META_CONTEXT: "meta context",
              REP_ERR_UNSUP: "unsupported", REP_ERR_POLICY: "denied by policy", REP_ERR_INVALID: "invalid",
              REP_ERR_PLATFORM: "platform lacks support", REP_ERR_TLS_REQD: "TLS required",
              REP_ERR_UNKNOWN: "export unknown", REP_ERR_SHUTDOWN: "server shutting down",
              REP_ERR_BLOCK_SIZE_REQD: "block size required"}


def wire_errno(value: int) -> int:
    return _WIRE_ERRNOS.get(value, errno.EINVAL)


def opt_name(opt: int) -> str:
    return _OPT_NAMES.get(opt, "<unknown>")


def rep_name(rep: int) -> str:
    return _REP_NAMES.get(rep, "<unknown>")


def pack_request(cmd: int, flags: int, handle: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)


@dataclass
class ExportInfo:
    """What negotiation learnt about the export (QEMU's ``NBDExportInfo``)."""

    size: int = 0
    flags: int = 0
    min_block: int = 0
    opt_block: int = 0
    max_block: int = 0
    structured_reply: bool = False
    base_allocation: bool = False
    context_id: int = 0


class Handshake:
    """The client side of fixed-newstyle negotiation, on a blocking socket (QEMU's sequence)."""

    def __init__(self, sock: socket.socket, export: str, context: str) -> None:
        self.sock = sock
        self.export = export.encode()
        self.context = context
        self.info = ExportInfo()

    # -- socket helpers with QEMU's messages -----------------------------------------------------
    def _read(self, n: int, what: str | None) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(min(n - len(out), 1 << 20))
            except TimeoutError:
                raise self._fail(what, "Unable to read from socket: Connection timed out") from None
            except OSError as e:
                raise self._fail(what, f"Unable to read from socket: {_strerror(e)}") from None
            if not chunk:
                raise self._fail(what, "Unexpected end-of-file before all data were read")
            out += chunk
        return bytes(out)

    @staticmethod
    def _fail(what: str | None, msg: str) -> QemuError:
        return QemuError(f"Failed to read {what}: {msg}" if what else msg)

    def _drop(self, n: int, what: str | None) -> None:
        while n > 0:
            step = min(n, 65536)
            self._read(step, what)
            n -= step

    def _write(self, data: bytes, prefix: str) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise QemuError(f"{prefix}Unable to write to socket: {_strerror(e)}") from None

    def _abort(self) -> None:
        """``nbd_send_opt_abort``: a courtesy, never waited for."""
        try:
            self.sock.send(struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def _send_option(self, opt: int, data: bytes) -> None:
        self._write(struct.pack(">QII", IHAVEOPT, opt, len(data)), "Failed to send option request header: ")
        if data:
            self._write(data, "Failed to send option request data: ")

    def _option_reply(self, opt: int) -> tuple[int, int]:
        """``nbd_receive_option_reply``: (type, length) of the next reply to ``opt``."""
        magic, option, rtype, length = struct.unpack(">QIII", self._read(20, "option reply"))
        if magic != REP_MAGIC:
            self._abort()
            raise QemuError("Unexpected option reply magic")
        if option != opt:
            self._abort()
            raise QemuError(f"Unexpected option type {option} ({opt_name(option)}), "
                            f"expected {opt} ({opt_name(opt)})")
        return rtype, length

    def _reply_err(self, opt: int, rtype: int, length: int, strict: bool) -> bool:
        """``nbd_handle_reply_err``: False for a (tolerated) error reply; raises for a fatal one."""
        if not rtype & REP_ERR:
            return True
        msg = b""
        if length:
            if length > MAX_BUFFER:
                self._abort()
                raise QemuError(f"server error {rtype} ({rep_name(rtype)}) message is too long")
            try:
                msg = self._read(length, None)
            except QemuError as e:
                self._abort()
                raise QemuError(f"Failed to read option error {rtype} ({rep_name(rtype)}) message: {e}") from None
        if rtype == REP_ERR_UNSUP or not strict:
            return False
        what = f"option {opt} ({opt_name(opt)})"
        text = {REP_ERR_POLICY: f"Denied by server for {what}",
                REP_ERR_INVALID: f"Invalid parameters for {what}",
                REP_ERR_PLATFORM: f"Server lacks support for {what}",
                REP_ERR_TLS_REQD: f"TLS negotiation required before {what}\nDid you forget a valid tls-creds?",
                REP_ERR_UNKNOWN: "Requested export not available",
                REP_ERR_SHUTDOWN: f"Server shutting down before {what}",
                REP_ERR_BLOCK_SIZE_REQD: f"Server requires INFO_BLOCK_SIZE for {what}",
                }.get(rtype, f"Unknown error code when asking for {what}")
        if msg:
            text += "\nserver reported: " + msg.split(b"\0", 1)[0].decode("utf-8", "replace")
        self._abort()
        raise QemuError(text)

    # -- the sequence ----------------------------------------------------------------------------
    def run(self) -> ExportInfo:
        """``nbd_receive_negotiate`` with structured replies, one meta context and BLOCK_SIZE asked."""
        magic = struct.unpack(">Q", self._read(8, "initial magic"))[0]
        if magic != NBDMAGIC:
            raise QemuError(f"Bad initial magic received: 0x{magic:x}")
        magic = struct.unpack(">Q", self._read(8, "server magic"))[0]
        zeroes = True
        if magic == OLDSTYLE_MAGIC:
            if self.export:
                raise QemuError("Server does not support non-empty export names")
            size, flags = struct.unpack(">QI", self._read(8, "export length") + self._read(4, "export flags"))
            if flags & ~0xFFFF:
                raise QemuError(f"Unexpected export flags {flags:0x}x")
            self.info.size, self.info.flags = size, flags
        elif magic == IHAVEOPT:
            gflags = struct.unpack(">H", self._read(2, "server flags"))[0]
            fixed = bool(gflags & FLAG_FIXED_NEWSTYLE)
            cflags = FLAG_FIXED_NEWSTYLE if fixed else 0
            if gflags & FLAG_NO_ZEROES:
                zeroes = False
                cflags |= FLAG_NO_ZEROES
            self._write(struct.pack(">I", cflags), "Failed to send clientflags field: ")
            if fixed and self._fixed_newstyle():
                return self.info
            self._send_option(OPT_EXPORT_NAME, self.export)
            self.info.size = struct.unpack(">Q", self._read(8, "export length"))[0]
            self.info.flags = struct.unpack(">H", self._read(2, "export flags"))[0]
        else:
            raise QemuError(f"Bad server magic received: 0x{magic:x}")
        if zeroes:
            try:
                self._drop(124, None)
            except QemuError as e:
                raise QemuError(f"Failed to read reserved block: {e}") from None
        return self.info

    def _fixed_newstyle(self) -> bool:
        """Structured replies, meta context, GO; False when the caller must fall back to EXPORT_NAME."""
        self._send_option(OPT_STRUCTURED_REPLY, b"")
        rtype, length = self._option_reply(OPT_STRUCTURED_REPLY)
        if self._reply_err(OPT_STRUCTURED_REPLY, rtype, length, False):
            if rtype != REP_ACK:
                self._abort()
                raise QemuError(f"Server answered option {OPT_STRUCTURED_REPLY} ({opt_name(OPT_STRUCTURED_REPLY)}) "
                                f"with unexpected reply {rtype} ({rep_name(rtype)})")
            if length:
                self._abort()
                raise QemuError(f"Option {OPT_STRUCTURED_REPLY} ('{opt_name(OPT_STRUCTURED_REPLY)}') response "
                                f"length is {length} (it should be zero)")
            self.info.structured_reply = True
            self.info.base_allocation = self._set_meta_context()
        if self._go():
            return True
        self._query_exports()
        return False

    def _set_meta_context(self) -> bool:
        query = self.context.encode()
        data = struct.pack(">I", len(self.export)) + self.export + struct.pack(">II", 1, len(query)) + query
        self._send_option(OPT_SET_META_CONTEXT, data)
        name = self._meta_reply()
        if name is None:
            return False
        if name != query:
            self._abort()
            got = name.split(b"\0", 1)[0].decode("utf-8", "replace")
            raise QemuError(f"Failed to negotiate meta context '{self.context}', server answered with "
                            f"different context '{got}'")
        if self._meta_reply(keep_id=False) is not None:
            self._abort()
            raise QemuError("Server answered with more than one context")
        return True

    def _meta_reply(self, keep_id: bool = True) -> bytes | None:
        """``nbd_receive_one_meta_context``: a context name, or None at the end (or on any error)."""
        rtype, length = self._option_reply(OPT_SET_META_CONTEXT)
        if not self._reply_err(OPT_SET_META_CONTEXT, rtype, length, False):
            return None
        if rtype == REP_ACK:
            if length:
                self._abort()
                raise QemuError("Unexpected length to ACK response")
            return None
        if rtype != REP_META_CONTEXT:
            self._abort()
            raise QemuError(f"Unexpected reply type {rtype} ({rep_name(rtype)}), expected "
                            f"{REP_META_CONTEXT} ({rep_name(REP_META_CONTEXT)})")
        if length <= 4 or length > MAX_BUFFER:
            self._abort()
            raise QemuError(f"Failed to negotiate meta context, server answered with unexpected length {length}")
        ctx_id = struct.unpack(">I", self._read(4, "context id"))[0]
        name = self._read(length - 4, "context name")  # <= 32 MiB, as QEMU allows
        if keep_id:
            self.info.context_id = ctx_id
        return name

    def _go(self) -> bool:
        """``nbd_opt_info_or_go(NBD_OPT_GO)``: True when transmission starts, False on ERR_UNSUP."""
        info = self.info
        data = struct.pack(">I", len(self.export)) + self.export + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send_option(OPT_GO, data)
        info.flags = 0
        while True:
            rtype, length = self._option_reply(OPT_GO)
            if not self._reply_err(OPT_GO, rtype, length, True):
                return False
            if rtype == REP_ACK:
                if length:
                    raise QemuError("server sent invalid NBD_REP_ACK")
                if not info.flags:
                    raise QemuError("broken server omitted NBD_INFO_EXPORT")
                return True
            if rtype != REP_INFO:
                self._abort()
                raise QemuError(f"unexpected reply type {rtype} ({rep_name(rtype)}), expected "
                                f"{REP_INFO} ({rep_name(REP_INFO)})")
            if length < 2:
                self._abort()
                raise QemuError(f"NBD_REP_INFO length {length} is too short")
            itype = struct.unpack(">H", self._read(2, "info type"))[0]
            length -= 2
            if itype == INFO_EXPORT:
                if length != 10:
                    self._abort()
                    raise QemuError(f"remaining export info len {length} is unexpected size")
                info.size = struct.unpack(">Q", self._read(8, "info size"))[0]
                info.flags = struct.unpack(">H", self._read(2, "info flags"))[0]
                if info.min_block and info.size % info.min_block:
                    self._abort()
                    raise QemuError(f"export size {info.size} is not multiple of minimum block size "
                                    f"{info.min_block}")
            elif itype == INFO_BLOCK_SIZE:
                if length != 12:
                    self._abort()
                    raise QemuError(f"remaining export info len {length} is unexpected size")
                info.min_block = struct.unpack(">I", self._read(4, "info minimum block size"))[0]
                if not _pow2(info.min_block):
                    self._abort()
                    raise QemuError(f"server minimum block size {info.min_block} is not a power of two")
                info.opt_block = struct.unpack(">I", self._read(4, "info preferred block size"))[0]
                if not _pow2(info.opt_block) or info.opt_block < info.min_block:
                    self._abort()
                    raise QemuError(f"server preferred block size {info.opt_block} is not valid")
                info.max_block = struct.unpack(">I", self._read(4, "info maximum block size"))[0]
                if info.max_block < info.min_block:
                    self._abort()
                    raise QemuError(f"server maximum block size {info.max_block} is not valid")
            else:
                try:
                    self._drop(length, None)
                except QemuError as e:
                    self._abort()
                    raise QemuError(f"Failed to read info payload: {e}") from None

    def _query_exports(self) -> None:
        """``nbd_receive_query_exports``: a friendlier error than EXPORT_NAME's bare close."""
        self._send_option(OPT_LIST, b"")
        empty, found = True, False
        while True:
            rtype, length = self._option_reply(OPT_LIST)
            if not self._reply_err(OPT_LIST, rtype, length, True):
                return
            if rtype == REP_ACK:
                if length:
                    self._abort()
                    raise QemuError("length too long for option end")
                break
            if rtype != REP_SERVER:
                self._abort()
                raise QemuError(f"Unexpected reply type {rtype} ({rep_name(rtype)}), expected "
                                f"{REP_SERVER} ({rep_name(REP_SERVER)})")
            if length < 4 or length > MAX_BUFFER:
                self._abort()
                raise QemuError(f"incorrect option length {length}")
            namelen = struct.unpack(">I", self._read(4, "option name length"))[0]
            length -= 4
            if length < namelen or namelen > MAX_STRING:
                self._abort()
                raise QemuError("incorrect name length in server's list response")
            name = self._read(namelen, "export name")
            length -= namelen
            if length > MAX_STRING:
                self._abort()
                raise QemuError("incorrect description length in server's list response")
            self._drop(length, "export description")
            empty = False
            found = found or name == self.export
        if not empty and not found:
            self._abort()
            raise QemuError(f"No export with name '{self.export.decode()}' available")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _strerror(e: OSError) -> str:
    import os

    return os.strerror(e.errno) if e.errno else str(e)
