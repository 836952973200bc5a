"""The I/O commands: read, readv, write, writev, aio_read, aio_write, aio_flush, flush, discard,
truncate, length, info, map, alloc.  Each has a parser producing a typed command and an executor."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from qio import ops, render, stdio
from qio.aio import buffer_cost
from qio.block.driver import BDRV_REQUEST_MAX_BYTES, REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK, SECTOR
from qio.block.errors import BlockError, QemuError
from qio.commands.common import iovec_sizes, num, pattern, pattern_iov, pattern_vector, verify
from qio.commands.spec import STDERR, STDOUT, Invocation, ParseFailure
from qio.numbers import cvtnum

if TYPE_CHECKING:
    from qio.session import Session

EINVAL = -errno.EINVAL


def _aligned(inv: Invocation, offset: int, count: int) -> None:
    if offset % SECTOR:
        raise inv.fail(EINVAL, f"{offset} is not a sector-aligned value for 'offset'\n")
    if count % SECTOR:
        raise inv.fail(EINVAL, f"{count} is not a sector-aligned value for 'count'\n")


def _offset_count(inv: Invocation, args: list[str]) -> tuple[int, int]:
    """``off len`` of read, discard and aio_discard, with qemu-io's request length limit."""
    if len(args) != 2:
        raise inv.usage(EINVAL)
    offset, count = num(inv, args[0]), num(inv, args[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        raise inv.fail(EINVAL, f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {args[1]}\n")
    return offset, count


async def _timed(session: Session, op: Coroutine[Any, Any, Any], name: str, offset: int, count: int) -> int:
    """Run a synchronous command's operation (:mod:`qio.ops`): elapsed ns, or -errno after qemu-io's
    ``NAME failed: ...``."""
    t1 = time.monotonic_ns()
    try:
        await op
    except BlockError as e:
        session.out.failed(name, name, offset, count, e.code, str(e))
        return -e.code
    return time.monotonic_ns() - t1


# -- read ----------------------------------------------------------------------------------------
class Read(NamedTuple):
    offset: int
    nbytes: int
    csv: bool = False
    quiet: bool = False
    verbose: bool = False
    vmstate: bool = False
    pattern: int | None = None
    poff: int = 0
    plen: int = 0


def parse_read(inv: Invocation) -> Read:
    n = partial(num, inv)
    o, args = inv.options({"b": None, "C": None, "l": n, "p": None, "P": partial(pattern, inv), "q": None,
                           "s": n, "v": None})
    offset, count = _offset_count(inv, args)
    pat = o.get("P")
    if pat is None and ("l" in o or "s" in o):
        raise inv.usage(EINVAL)
    poff = o.get("s", 0)
    plen = o.get("l", count - poff)
    if plen < 0 or plen + poff > count:
        raise inv.fail(EINVAL, "pattern verification range exceeds end of read data\n")
    if "b" in o:
        _aligned(inv, offset, count)
    return Read(offset, count, "C" in o, "q" in o, "v" in o, "b" in o, pat, poff, plen)

async def run_read(session: Session, cmd: Read) -> int:
    blk = session.require_blk()
    _prepare(session, (cmd.nbytes,))
    t1 = time.monotonic_ns()
    try:
        buf = await ops.read(session.sync, blk, cmd.offset, cmd.nbytes, vmstate=cmd.vmstate)
    except BlockError as e:
        session.out.failed("read", "read", cmd.offset, cmd.nbytes, e.code, str(e))
        return -e.code
    ns = time.monotonic_ns() - t1
    ret = 0
    if cmd.pattern is not None and not verify(buf[cmd.poff : cmd.poff + cmd.plen], cmd.pattern):
        session.out.mismatch("read", cmd.offset + cmd.poff, cmd.plen)
        ret = EINVAL
    if not cmd.quiet:
        if cmd.verbose:
            session.out.dump("read", buf, cmd.offset)
        session.out.report("read", "read", ns, cmd.offset, cmd.nbytes, cmd.csv)
    return ret


# -- readv / writev --------------------------------------------------------------------------------
class Vector(NamedTuple):
    offset: int
    sizes: tuple[int, ...]
    csv: bool = False
    quiet: bool = False
    verbose: bool = False
    pattern: int | None = None
    fua: bool = False


def parse_readv(inv: Invocation) -> Vector:
    o, args = inv.options({"C": None, "P": partial(pattern, inv), "q": None, "v": None})
    return _vector(inv, o, args)


def _vector(inv: Invocation, o: dict[str, Any], args: list[str], pat: int | None = None) -> Vector:
    """``off len [len..]`` of readv/writev/aio_read (create_iovec's checks)."""
    if len(args) < 2:
        raise inv.usage(EINVAL)
    offset = num(inv, args[0])
    sizes = iovec_sizes(inv, args[1:])
    return Vector(offset, tuple(sizes), "C" in o, "q" in o, "v" in o, o.get("P", pat), "f" in o)

async def run_readv(session: Session, cmd: Vector) -> int:
    blk = session.require_blk()
    total = sum(cmd.sizes)
    _prepare(session, cmd.sizes)
    t1 = time.monotonic_ns()
    try:
        buf = await ops.read(session.sync, blk, cmd.offset, total, cmd.sizes, always_poll=True)
    except BlockError as e:
        session.out.failed("readv", "readv", cmd.offset, total, e.code, str(e))
        return -e.code
    ns = time.monotonic_ns() - t1
    ret = 0
    if cmd.pattern is not None and not verify(buf, cmd.pattern):
        session.out.mismatch("readv", cmd.offset, total)
        ret = EINVAL
    if not cmd.quiet:
        if cmd.verbose:
            session.out.dump("readv", buf, cmd.offset)
        session.out.report("readv", "read", ns, cmd.offset, total, cmd.csv)
    return ret


def parse_writev(inv: Invocation) -> Vector:
    o, args = inv.options({"C": None, "f": None, "q": None, "P": partial(pattern, inv)})
    return _vector(inv, o, args, 0xCD)


async def run_writev(session: Session, cmd: Vector) -> int:
    blk = session.require_blk()
    total = sum(cmd.sizes)
    assert cmd.pattern is not None
    _prepare(session, cmd.sizes)
    ns = await _timed(session, ops.write(session.sync, blk, cmd.offset, total,
                                         pattern_vector(cmd.pattern, cmd.sizes), REQ_FUA if cmd.fua else 0,
                                         always_poll=True),
                      "writev", cmd.offset, total)
    if ns < 0:
        return ns
    if not cmd.quiet:
        session.out.report("writev", "wrote", ns, cmd.offset, total, cmd.csv)
    return 0


# -- write ---------------------------------------------------------------------------------------
class Write(NamedTuple):
    offset: int
    nbytes: int
    flags: int = 0
    csv: bool = False
    quiet: bool = False
    vmstate: bool = False
    zero: bool = False
    compressed: bool = False
    pattern: int = 0xCD
    source: str | None = None


def parse_write(inv: Invocation) -> Write:
    o, args = inv.options({"b": None, "c": None, "C": None, "f": None, "n": None, "p": None,
                           "P": partial(pattern, inv), "q": None, "s": str, "u": None, "z": None})
    if len(args) != 2:
        raise inv.usage(EINVAL)
    vmstate, compressed, zero = "b" in o, "c" in o, "z" in o
    flags = (REQ_FUA if "f" in o else 0) | (REQ_NO_FALLBACK if "n" in o else 0) | (REQ_MAY_UNMAP if "u" in o else 0)
    if flags or vmstate or zero or compressed:  # a plain write (the per-request path) has nothing to check
        conflict = ops.write_conflict(flags, zero, compressed, vmstate)
        if conflict is not None:
            raise inv.fail(EINVAL, conflict + "\n")
    if zero + ("P" in o) + ("s" in o) > 1:
        raise inv.fail(EINVAL, "Only one of -z, -P, and -s can be specified at the same time\n")
    offset, count = num(inv, args[0]), num(inv, args[1])
    if count > BDRV_REQUEST_MAX_BYTES and not flags & REQ_NO_FALLBACK:
        raise inv.fail(EINVAL, f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {args[1]}\n")
    if vmstate or compressed:
        _aligned(inv, offset, count)
    return Write(offset, count, flags, "C" in o, "q" in o, vmstate, zero, compressed, o.get("P", 0xCD), o.get("s"))

def _source_iov(session: Session, path: str, count: int) -> list[memoryview] | None:
    """``qemu_io_alloc_from_file``: the file's bytes, repeated to fill ``count``."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as e:
        session.out.err(f"{path}: {os.strerror(e.errno or errno.EIO)}\n")
        return None
    if not data and count:
        session.out.err(f"{path}: file is empty\n")
        return None
    if not data:
        session.out.err(f"{path}: file is empty\n")
        return None
    reps, rest = divmod(count, len(data))
    return [memoryview(data * reps + data[:rest])]


async def run_write(session: Session, cmd: Write) -> int:
    blk = session.blk  # the shell checked it (no Session.require_blk call: this is the per-request path)
    assert blk is not None
    iov = None
    if not cmd.zero:
        if cmd.source is not None:
            iov = _source_iov(session, cmd.source, cmd.nbytes)
            if iov is None:
                return EINVAL
        else:
            iov = pattern_iov(cmd.pattern, cmd.nbytes)
        _prepare(session, (cmd.nbytes,))
    # ops.write's request, waited for here directly (one coroutine less per request than ops.write)
    ns = await _timed(session, session.sync(ops.write_request(blk, cmd.offset, cmd.nbytes, iov, cmd.flags, cmd.zero,
                                                              cmd.compressed, cmd.vmstate)),
                      "write", cmd.offset, cmd.nbytes)
    if ns < 0:
        return ns
    if not cmd.quiet:
        session.out.report("write", "wrote", ns, cmd.offset, cmd.nbytes, cmd.csv)
    return 0


# -- aio_read / aio_write / aio_flush --------------------------------------------------------------
class AioInvalid(NamedTuple):
    """``-i``: count an invalid request, submit nothing."""

    what: str


class _Invalid(Exception):
    """``-i`` of aio_read/aio_write: qemu-io acts on it inside its getopt loop and returns."""


def _invalid(_: str) -> None:
    raise _Invalid


def parse_aio_read(inv: Invocation) -> Vector | AioInvalid:
    try:
        o, args = inv.options({"C": None, "P": partial(pattern, inv), "i": _invalid, "q": None, "v": None})
    except _Invalid:
        return AioInvalid("read")
    return _vector(inv, o, args)

async def run_aio_read(session: Session, cmd: Vector | AioInvalid) -> int:
    if isinstance(cmd, AioInvalid):
        session.out.out(f"injecting invalid {cmd.what} request\n")
        return 0
    blk = session.require_blk()
    total = sum(cmd.sizes)
    _prepare(session, cmd.sizes)
    t1 = time.monotonic_ns()

    def done(exc: BaseException | None, _: object) -> None:
        t2 = time.monotonic_ns()
        if exc is not None:
            session.out.failed("aio_read", "readv", cmd.offset, total, *_errinfo(exc))
            return
        if cmd.pattern is not None and not verify(buf, cmd.pattern):
            session.out.mismatch("aio_read", cmd.offset, total)
        if cmd.quiet:
            return
        if cmd.verbose:
            session.out.dump("aio_read", buf, cmd.offset)
        session.out.report("aio_read", "read", t2 - t1, cmd.offset, total, cmd.csv)

    buf = ops.submit_read(session, blk, cmd.offset, total, cmd.sizes, done)
    return 0


class AioWrite(NamedTuple):
    offset: int
    sizes: tuple[int, ...]
    flags: int = 0
    csv: bool = False
    quiet: bool = False
    zero: bool = False
    pattern: int = 0xCD


def parse_aio_write(inv: Invocation) -> AioWrite | AioInvalid:
    try:
        o, args = inv.options({"C": None, "f": None, "i": _invalid, "q": None, "P": partial(pattern, inv),
                               "u": None, "z": None})
    except _Invalid:
        return AioInvalid("write")
    flags = (REQ_FUA if "f" in o else 0) | (REQ_MAY_UNMAP if "u" in o else 0)
    zero = "z" in o
    if len(args) < 2:
        raise inv.usage(EINVAL)
    if zero and len(args) != 2:
        raise inv.fail(EINVAL, "-z supports only a single length parameter\n")
    if flags & REQ_MAY_UNMAP and not zero:
        raise inv.fail(EINVAL, "-u requires -z to be specified\n")
    offset = num(inv, args[0])
    sizes = (num(inv, args[1]),) if zero else tuple(iovec_sizes(inv, args[1:]))
    return AioWrite(offset, sizes, flags, "C" in o, "q" in o, zero, o.get("P", 0xCD))

def fast_aio_write(words: list[str]) -> AioWrite | None:
    """:func:`parse_aio_write` of the commonest lines, ``aio_write [-q] OFF LEN`` with numbers that parse
    without a message: the same command without an :class:`Invocation` or getopt.  None for anything
    else (``tests/shell/test_hotpath.py`` compares both)."""
    n = len(words)
    if n == 4:
        if words[1] != "-q":
            return None
        quiet = True
    elif n == 3:
        quiet = False
    else:
        return None
    off, length = words[n - 2], words[n - 1]
    if off.isdigit() and off.isascii() and len(off) < 18:  # cvtnum's own first case, without the call
        offset = int(off)
    else:
        if off[:1] == "-":
            return None
        err, offset, warn = cvtnum(off)
        if err or warn:
            return None
    count = _FAST_LENGTHS.get(length)
    if count is None:
        if length[:1] == "-":
            return None
        err, count, warn = cvtnum(length)
        if err or warn or count > BDRV_REQUEST_MAX_BYTES:
            return None
        if len(_FAST_LENGTHS) >= 64:
            _FAST_LENGTHS.clear()
        _FAST_LENGTHS[length] = count
    return AioWrite(offset, (count,), 0, False, quiet)


#: Lengths :func:`fast_aio_write` accepted, by their word (a script uses a few sizes many times).
_FAST_LENGTHS: dict[str, int] = {}


async def run_aio_write(session: Session, cmd: AioWrite | AioInvalid) -> int:
    return submit_aio_write(session, cmd)


def submit_aio_write(session: Session, cmd: AioWrite | AioInvalid) -> int:
    """``aio_write``'s executor (it never waits: the request is submitted, its completion printed later)."""
    if isinstance(cmd, AioInvalid):
        session.out.out(f"injecting invalid {cmd.what} request\n")
        return 0
    blk = session.blk  # the shell checked it (no Session.require_blk call: this is the per-request path)
    assert blk is not None
    total = sum(cmd.sizes)
    if not cmd.zero:
        _prepare(session, cmd.sizes)
    # qemu-io never records the start time of ``aio_write -z``: its duration is the system uptime.
    # (-q prints no times: a long queue of quiet requests does not read the clock.)
    t1 = 0 if cmd.zero or cmd.quiet else time.monotonic_ns()

    def done(exc: BaseException | None, _: object) -> None:
        if exc is not None:
            session.out.failed("aio_write", "aio_write", cmd.offset, total, *_errinfo(exc))
            return
        if not cmd.quiet:
            session.out.report("aio_write", "wrote", time.monotonic_ns() - t1, cmd.offset, total, cmd.csv)

    ops.submit_write(session, blk, cmd.offset, total, None if cmd.zero else pattern_vector(cmd.pattern, cmd.sizes),
                     cmd.flags, cmd.zero, done)
    return 0


def _prepare(session: Session, sizes: tuple[int, ...]) -> None:
    """qemu-io fills a buffer per length before it submits (``qemu_io_alloc``): large ones take
    simulated time, during which requests in the pool go on (docs/architecture.md, rule 8)."""
    cost = buffer_cost(sizes)
    if cost:
        session.aio.pool.tick(cost)


def _errinfo(exc: BaseException) -> tuple[int, str]:
    """The errno and message of an asynchronous request's failure."""
    if isinstance(exc, BlockError):
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno, os.strerror(exc.errno)
    # A bug in qio, not an I/O error: say so (on stderr) rather than hide it behind EIO.
    stdio.release()
    os.write(2, f"qio: internal error: {type(exc).__name__}: {exc}\n".encode())
    return errno.EIO, os.strerror(errno.EIO)


async def run_aio_flush(session: Session, cmd: object) -> int:
    await session.drain("aio_flush")
    return 0


async def run_flush(session: Session, cmd: object) -> int:
    blk = session.require_blk()
    try:
        await ops.flush(session.sync, blk)
    except BlockError as e:
        return -e.code
    return 0


# -- discard -------------------------------------------------------------------------------------
class Discard(NamedTuple):
    offset: int
    nbytes: int
    csv: bool = False
    quiet: bool = False


def parse_discard(inv: Invocation) -> Discard:
    o, args = inv.options({"C": None, "q": None})
    offset, count = _offset_count(inv, args)
    return Discard(offset, count, "C" in o, "q" in o)

async def run_discard(session: Session, cmd: Discard) -> int:
    blk = session.require_blk()
    ns = await _timed(session, ops.discard(session.sync, blk, cmd.offset, cmd.nbytes), "discard", cmd.offset,
                      cmd.nbytes)
    if ns < 0:
        return ns
    if not cmd.quiet:
        session.out.report("discard", "discard", ns, cmd.offset, cmd.nbytes, cmd.csv)
    return 0


# -- truncate, length, info ------------------------------------------------------------------------
PREALLOC_MODES = ops.PREALLOC_MODES


class Truncate(NamedTuple):
    offset: int
    prealloc: str = "off"


def parse_truncate(inv: Invocation) -> Truncate:
    prealloc = "off"
    g = inv.getopt()
    for c, arg in g:
        if c == "m":
            if arg not in PREALLOC_MODES:
                inv.messages.append((STDERR, f"{inv.prg}: Invalid preallocation mode '{arg}'\n"))
                raise ParseFailure(EINVAL, inv.messages)
            prealloc = arg
        else:
            raise inv.usage(EINVAL)
    if not g.args:
        # qemu-io 7.2 dereferences a NULL argument here and crashes; qio prints the usage instead.
        raise inv.usage(EINVAL)
    err_word = inv.argv[1]  # qemu-io blames argv[1], even when that is "-m"
    try:
        offset = num(inv, g.args[0])
    except ParseFailure as f:
        f.messages[-1] = (STDOUT, f.messages[-1][1].rsplit(" -- ", 1)[0] + f" -- {err_word}\n")
        raise
    return Truncate(offset, prealloc)


async def run_truncate(session: Session, cmd: Truncate) -> int:
    blk = session.require_blk()
    try:
        await ops.truncate(session.sync, blk, cmd.offset, cmd.prealloc)
    except QemuError as e:
        session.out.error_report(str(e))
        return -e.errno
    except BlockError as e:
        session.out.error_report(str(e))
        return -e.code
    return 0


async def run_length(session: Session, cmd: object) -> int:
    try:
        size = ops.length(session.require_blk())
    except BlockError as e:
        session.out.out(f"getlength: {e}\n")
        return -e.code
    session.out.length(size)
    return 0


async def run_info(session: Session, cmd: object) -> int:
    blk = session.require_blk()
    if not blk.root.has_driver():  # bs->drv is NULL: no format name, bdrv_get_info fails silently
        return -errno.ENOMEDIUM
    session.out.out(f"format name: {blk.root.format_name}\n")
    if blk.root.protocol_name:
        session.out.out(f"format name: {blk.root.protocol_name}\n")
    try:
        info = ops.info(blk)
    except BlockError as e:
        return -e.code
    if info.info is None:
        return -errno.ENOTSUP
    session.out.out(f"cluster size: {render.cvtstr(info.info.cluster_size)}\n")
    session.out.out(f"vm state offset: {render.cvtstr(info.info.vm_state_offset)}\n")
    if info.specific:
        session.out.out("Format specific information:\n" + render.dump_specific(info.specific, 1))
    return 0


# -- alloc, map ----------------------------------------------------------------------------------
class Alloc(NamedTuple):
    offset: int
    nbytes: int


def parse_alloc(inv: Invocation) -> Alloc:
    offset = num(inv, inv.argv[1])
    count = num(inv, inv.argv[2]) if len(inv.argv) == 3 else SECTOR
    return Alloc(offset, count)


async def run_alloc(session: Session, cmd: Alloc) -> int:
    blk = session.require_blk()
    try:
        total, count = await ops.allocated_bytes(session.sync, blk, cmd.offset, cmd.nbytes)
    except BlockError as e:
        session.out.out(f"is_allocated failed: {e}\n")
        return -e.code
    session.out.allocation(cmd.offset, count, total)
    return 0


async def run_map(session: Session, cmd: object) -> int:
    blk = session.require_blk()
    try:
        size = ops.length(blk)
    except BlockError as e:
        session.out.error_report(f"Failed to query image length: {e}")
        return -e.code
    try:
        async for ext in ops.extents(session.sync, blk, size):
            session.out.extent(*ext)
    except BlockError as e:
        session.out.error_report(f"Failed to get allocation status: {e}")
        return -e.code
    except ops.UnexpectedEnd:
        session.out.error_report("Unexpected end of image")
        return -errno.EIO
    return 0


# -- aio_discard (qio extension: proposed for qemu-io upstream, never merged) -------------------------
class AioDiscard(NamedTuple):
    offset: int
    nbytes: int
    csv: bool = False
    quiet: bool = False


def parse_aio_discard(inv: Invocation) -> AioDiscard | AioInvalid:
    """``aio_discard [-Ciq] off len``: aio_write's option conventions, discard's length check."""
    try:
        o, args = inv.options({"C": None, "i": _invalid, "q": None})
    except _Invalid:
        return AioInvalid("discard")
    offset, count = _offset_count(inv, args)
    return AioDiscard(offset, count, "C" in o, "q" in o)


async def run_aio_discard(session: Session, cmd: AioDiscard | AioInvalid) -> int:
    """Submit the discard and return; its completion prints like ``discard``'s report."""
    if isinstance(cmd, AioInvalid):
        session.out.out(f"injecting invalid {cmd.what} request\n")
        return 0
    blk = session.require_blk()
    t1 = time.monotonic_ns()

    def done(exc: BaseException | None, _: object) -> None:
        t2 = time.monotonic_ns()
        if exc is not None:
            session.out.failed("aio_discard", "aio_discard", cmd.offset, cmd.nbytes, *_errinfo(exc))
            return
        if not cmd.quiet:
            session.out.report("aio_discard", "discard", t2 - t1, cmd.offset, cmd.nbytes, cmd.csv)

    ops.submit_discard(session, blk, cmd.offset, cmd.nbytes, done)
    return 0
