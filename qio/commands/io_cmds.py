"""The I/O commands: read, readv, write, writev, aio_read, aio_write, aio_flush, flush, discard,
truncate, length, info, map, alloc.  Each has a parser producing a typed command and an executor."""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING, NamedTuple

from qio import render
from qio.block.driver import (
    BDRV_REQUEST_MAX_BYTES,
    REQ_FUA,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    REQ_WRITE_COMPRESSED,
    REQ_ZERO_WRITE,
    SECTOR,
)
from qio.block.errors import BlockError, QemuError
from qio.commands.common import iovec_sizes, num, pattern, pattern_iov, split_iov, verify
from qio.commands.spec import STDERR, STDOUT, Invocation, ParseFailure

if TYPE_CHECKING:
    from qio.shell import Shell

EINVAL = -errno.EINVAL


def _aligned(inv: Invocation, offset: int, count: int) -> None:
    if offset % SECTOR:
        raise inv.fail(EINVAL, f"{offset} is not a sector-aligned value for 'offset'\n")
    if count % SECTOR:
        raise inv.fail(EINVAL, f"{count} is not a sector-aligned value for 'count'\n")


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
    csv = quiet = verbose = vmstate = False
    pat: int | None = None
    poff = plen = 0
    sflag = lflag = False
    g = inv.getopt()
    for c, arg in g:
        if c == "b":
            vmstate = True
        elif c == "C":
            csv = True
        elif c == "l":
            lflag = True
            plen = num(inv, arg or "", inv.prg)
        elif c == "P":
            pat = pattern(inv, arg or "")
        elif c == "q":
            quiet = True
        elif c == "s":
            sflag = True
            poff = num(inv, arg or "", inv.prg)
        elif c == "v":
            verbose = True
        elif c != "p":
            raise inv.usage(EINVAL)
    if len(g.args) != 2:
        raise inv.usage(EINVAL)
    offset = num(inv, g.args[0], inv.prg)
    count = num(inv, g.args[1], inv.prg)
    if count > BDRV_REQUEST_MAX_BYTES:
        raise inv.fail(EINVAL, f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {g.args[1]}\n")
    if pat is None and (lflag or sflag):
        raise inv.usage(EINVAL)
    if not lflag:
        plen = count - poff
    if plen < 0 or plen + poff > count:
        raise inv.fail(EINVAL, "pattern verification range exceeds end of read data\n")
    if vmstate:
        _aligned(inv, offset, count)
    return Read(offset, count, csv, quiet, verbose, vmstate, pat, poff, plen)


async def run_read(sh: Shell, cmd: Read) -> int:
    blk = sh.require_blk()
    buf = memoryview(bytearray(b"\xab") * cmd.nbytes)  # qemu-io pre-fills read buffers with 0xab
    t1 = time.monotonic_ns()
    try:
        if cmd.vmstate:
            await sh.sync(blk.load_vmstate(cmd.offset, cmd.nbytes, [buf]))
        else:
            await sh.sync(blk.preadv(cmd.offset, cmd.nbytes, [buf]))
    except BlockError as e:
        sh.out.out(f"read failed: {e}\n")
        return -e.code
    t2 = time.monotonic_ns()
    ret = 0
    if cmd.pattern is not None and not verify(buf[cmd.poff : cmd.poff + cmd.plen], cmd.pattern):
        sh.out.out(f"Pattern verification failed at offset {cmd.offset + cmd.poff}, {cmd.plen} bytes\n")
        ret = EINVAL
    if not cmd.quiet:
        if cmd.verbose:
            sh.out.out(render.dump_buffer(buf, cmd.offset))
        render.report(sh.out, "read", t2 - t1, cmd.offset, cmd.nbytes, cmd.nbytes, cmd.csv)
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
    csv = quiet = verbose = False
    pat: int | None = None
    g = inv.getopt()
    for c, arg in g:
        if c == "C":
            csv = True
        elif c == "P":
            pat = pattern(inv, arg or "")
        elif c == "q":
            quiet = True
        elif c == "v":
            verbose = True
        else:
            raise inv.usage(EINVAL)
    if len(g.args) < 2:
        raise inv.usage(EINVAL)
    offset = num(inv, g.args[0], inv.prg)
    sizes = iovec_sizes(inv, g.args[1:], inv.prg)
    return Vector(offset, tuple(sizes), csv, quiet, verbose, pat)


async def run_readv(sh: Shell, cmd: Vector) -> int:
    blk = sh.require_blk()
    total = sum(cmd.sizes)
    buf = memoryview(bytearray(b"\xab") * total)
    t1 = time.monotonic_ns()
    try:
        await sh.sync(blk.preadv(cmd.offset, total, split_iov(buf, list(cmd.sizes))), always_poll=True)
    except BlockError as e:
        sh.out.out(f"readv failed: {e}\n")
        return -e.code
    t2 = time.monotonic_ns()
    ret = 0
    if cmd.pattern is not None and not verify(buf, cmd.pattern):
        sh.out.out(f"Pattern verification failed at offset {cmd.offset}, {total} bytes\n")
        ret = EINVAL
    if not cmd.quiet:
        if cmd.verbose:
            sh.out.out(render.dump_buffer(buf, cmd.offset))
        render.report(sh.out, "read", t2 - t1, cmd.offset, total, total, cmd.csv)
    return ret


def parse_writev(inv: Invocation) -> Vector:
    csv = quiet = fua = False
    pat = 0xCD
    g = inv.getopt()
    for c, arg in g:
        if c == "C":
            csv = True
        elif c == "f":
            fua = True
        elif c == "q":
            quiet = True
        elif c == "P":
            pat = pattern(inv, arg or "")
        else:
            raise inv.usage(EINVAL)
    if len(g.args) < 2:
        raise inv.usage(EINVAL)
    offset = num(inv, g.args[0], inv.prg)
    sizes = iovec_sizes(inv, g.args[1:], inv.prg)
    return Vector(offset, tuple(sizes), csv, quiet, False, pat, fua)


async def run_writev(sh: Shell, cmd: Vector) -> int:
    blk = sh.require_blk()
    total = sum(cmd.sizes)
    assert cmd.pattern is not None
    t1 = time.monotonic_ns()
    try:
        await sh.sync(blk.pwritev(cmd.offset, total, pattern_iov(cmd.pattern, total),
                                  REQ_FUA if cmd.fua else 0), always_poll=True)
    except BlockError as e:
        sh.out.out(f"writev failed: {e}\n")
        return -e.code
    t2 = time.monotonic_ns()
    if not cmd.quiet:
        render.report(sh.out, "wrote", t2 - t1, cmd.offset, total, total, cmd.csv)
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
    vmstate = compressed = csv = quiet = zero = pflag = False
    flags = 0
    pat = 0xCD
    source: str | None = None
    g = inv.getopt()
    for c, arg in g:
        if c == "b":
            vmstate = True
        elif c == "c":
            compressed = True
        elif c == "C":
            csv = True
        elif c == "f":
            flags |= REQ_FUA
        elif c == "n":
            flags |= REQ_NO_FALLBACK
        elif c == "P":
            pflag = True
            pat = pattern(inv, arg or "")
        elif c == "q":
            quiet = True
        elif c == "s":
            source = arg
        elif c == "u":
            flags |= REQ_MAY_UNMAP
        elif c == "z":
            zero = True
        elif c != "p":
            raise inv.usage(EINVAL)
    if len(g.args) != 2:
        raise inv.usage(EINVAL)
    if vmstate and zero:
        raise inv.fail(EINVAL, "-b and -z cannot be specified at the same time\n")
    if flags & REQ_FUA and (vmstate or compressed):
        raise inv.fail(EINVAL, "-f and -b or -c cannot be specified at the same time\n")
    if flags & REQ_NO_FALLBACK and not zero:
        raise inv.fail(EINVAL, "-n requires -z to be specified\n")
    if flags & REQ_MAY_UNMAP and not zero:
        raise inv.fail(EINVAL, "-u requires -z to be specified\n")
    if zero + pflag + (source is not None) > 1:
        raise inv.fail(EINVAL, "Only one of -z, -P, and -s can be specified at the same time\n")
    offset = num(inv, g.args[0], inv.prg)
    count = num(inv, g.args[1], inv.prg)
    if count > BDRV_REQUEST_MAX_BYTES and not flags & REQ_NO_FALLBACK:
        raise inv.fail(EINVAL, f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {g.args[1]}\n")
    if vmstate or compressed:
        _aligned(inv, offset, count)
    return Write(offset, count, flags, csv, quiet, vmstate, zero, compressed, pat, source)


def _source_iov(sh: Shell, path: str, count: int) -> list[memoryview] | None:
    """``qemu_io_alloc_from_file``: the file's bytes, repeated to fill ``count``."""
    try:
        with open(path, "rb") as f:
            data = f.read(count)
    except OSError as e:
        sh.out.err(f"{path}: {os.strerror(e.errno or errno.EIO)}\n")
        return None
    if not data and count:
        sh.out.err(f"{path}: file is empty\n")
        return None
    if not data:
        sh.out.err(f"{path}: file is empty\n")
        return None
    reps, rest = divmod(count, len(data))
    return [memoryview(data * reps + data[:rest])]


async def run_write(sh: Shell, cmd: Write) -> int:
    blk = sh.require_blk()
    iov = None
    if not cmd.zero:
        if cmd.source is not None:
            iov = _source_iov(sh, cmd.source, cmd.nbytes)
            if iov is None:
                return EINVAL
        else:
            iov = pattern_iov(cmd.pattern, cmd.nbytes)
    t1 = time.monotonic_ns()
    try:
        if cmd.vmstate:
            assert iov is not None
            await sh.sync(blk.save_vmstate(cmd.offset, cmd.nbytes, iov))
        elif cmd.zero:
            await sh.sync(blk.pwritev(cmd.offset, cmd.nbytes, None, cmd.flags | REQ_ZERO_WRITE))
        elif cmd.compressed:
            await sh.sync(blk.pwritev(cmd.offset, cmd.nbytes, iov, REQ_WRITE_COMPRESSED))
        else:
            await sh.sync(blk.pwritev(cmd.offset, cmd.nbytes, iov, cmd.flags))
    except BlockError as e:
        sh.out.out(f"write failed: {e}\n")
        return -e.code
    t2 = time.monotonic_ns()
    if not cmd.quiet:
        render.report(sh.out, "wrote", t2 - t1, cmd.offset, cmd.nbytes, cmd.nbytes, cmd.csv)
    return 0


# -- aio_read / aio_write / aio_flush --------------------------------------------------------------
class AioInvalid(NamedTuple):
    """``-i``: count an invalid request, submit nothing."""

    what: str


def parse_aio_read(inv: Invocation) -> Vector | AioInvalid:
    csv = quiet = verbose = False
    pat: int | None = None
    g = inv.getopt()
    for c, arg in g:
        if c == "C":
            csv = True
        elif c == "P":
            pat = pattern(inv, arg or "")
        elif c == "i":
            return AioInvalid("read")
        elif c == "q":
            quiet = True
        elif c == "v":
            verbose = True
        else:
            raise inv.usage(EINVAL)
    if len(g.args) < 2:
        raise inv.usage(EINVAL)
    offset = num(inv, g.args[0], inv.prg)
    sizes = iovec_sizes(inv, g.args[1:], inv.prg)
    return Vector(offset, tuple(sizes), csv, quiet, verbose, pat)


async def run_aio_read(sh: Shell, cmd: Vector | AioInvalid) -> int:
    if isinstance(cmd, AioInvalid):
        sh.out.out(f"injecting invalid {cmd.what} request\n")
        return 0
    blk = sh.require_blk()
    total = sum(cmd.sizes)
    buf = memoryview(bytearray(b"\xab") * total)
    t1 = time.monotonic_ns()

    def done(exc: BaseException | None, _: object) -> None:
        t2 = time.monotonic_ns()
        if exc is not None:
            sh.out.out(f"readv failed: {_errstr(exc)}\n")
            return
        if cmd.pattern is not None and not verify(buf, cmd.pattern):
            sh.out.out(f"Pattern verification failed at offset {cmd.offset}, {total} bytes\n")
        if cmd.quiet:
            return
        if cmd.verbose:
            sh.out.out(render.dump_buffer(buf, cmd.offset))
        render.report(sh.out, "read", t2 - t1, cmd.offset, total, total, cmd.csv)

    sh.aio.submit(blk.preadv(cmd.offset, total, split_iov(buf, list(cmd.sizes))), done)
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
    csv = quiet = zero = False
    flags = 0
    pat = 0xCD
    g = inv.getopt()
    for c, arg in g:
        if c == "C":
            csv = True
        elif c == "f":
            flags |= REQ_FUA
        elif c == "q":
            quiet = True
        elif c == "u":
            flags |= REQ_MAY_UNMAP
        elif c == "P":
            pat = pattern(inv, arg or "")
        elif c == "i":
            return AioInvalid("write")
        elif c == "z":
            zero = True
        else:
            raise inv.usage(EINVAL)
    if len(g.args) < 2:
        raise inv.usage(EINVAL)
    if zero and len(g.args) != 2:
        raise inv.fail(EINVAL, "-z supports only a single length parameter\n")
    if flags & REQ_MAY_UNMAP and not zero:
        raise inv.fail(EINVAL, "-u requires -z to be specified\n")
    offset = num(inv, g.args[0], inv.prg)
    if zero:
        return AioWrite(offset, (num(inv, g.args[1], inv.prg),), flags, csv, quiet, True, pat)
    sizes = iovec_sizes(inv, g.args[1:], inv.prg)
    return AioWrite(offset, tuple(sizes), flags, csv, quiet, False, pat)


async def run_aio_write(sh: Shell, cmd: AioWrite | AioInvalid) -> int:
    if isinstance(cmd, AioInvalid):
        sh.out.out(f"injecting invalid {cmd.what} request\n")
        return 0
    blk = sh.require_blk()
    total = sum(cmd.sizes)
    # qemu-io never records the start time of ``aio_write -z``: its duration is the system uptime.
    t1 = 0 if cmd.zero else time.monotonic_ns()

    def done(exc: BaseException | None, _: object) -> None:
        t2 = time.monotonic_ns()
        if exc is not None:
            sh.out.out(f"aio_write failed: {_errstr(exc)}\n")
            return
        if not cmd.quiet:
            render.report(sh.out, "wrote", t2 - t1, cmd.offset, total, total, cmd.csv)

    if cmd.zero:
        sh.aio.submit(blk.pwritev(cmd.offset, total, None, cmd.flags | REQ_ZERO_WRITE), done)
    else:
        sh.aio.submit(blk.pwritev(cmd.offset, total, pattern_iov(cmd.pattern, total), cmd.flags), done)
    return 0


def _errstr(exc: BaseException) -> str:
    if isinstance(exc, BlockError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    # A bug in qio, not an I/O error: say so (on stderr) rather than hide it behind EIO.
    os.write(2, f"qio: internal error: {type(exc).__name__}: {exc}\n".encode())
    return os.strerror(errno.EIO)


async def run_aio_flush(sh: Shell, cmd: object) -> int:
    await sh.drain("aio_flush")
    return 0


async def run_flush(sh: Shell, cmd: object) -> int:
    blk = sh.require_blk()
    try:
        await sh.sync(blk.flush())
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
    csv = quiet = False
    g = inv.getopt()
    for c, _ in g:
        if c == "C":
            csv = True
        elif c == "q":
            quiet = True
        else:
            raise inv.usage(EINVAL)
    if len(g.args) != 2:
        raise inv.usage(EINVAL)
    offset = num(inv, g.args[0], inv.prg)
    count = num(inv, g.args[1], inv.prg)
    if count > BDRV_REQUEST_MAX_BYTES:
        raise inv.fail(EINVAL, f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {g.args[1]}\n")
    return Discard(offset, count, csv, quiet)


async def run_discard(sh: Shell, cmd: Discard) -> int:
    blk = sh.require_blk()
    t1 = time.monotonic_ns()
    try:
        await sh.sync(blk.pdiscard(cmd.offset, cmd.nbytes))
    except BlockError as e:
        sh.out.out(f"discard failed: {e}\n")
        return -e.code
    t2 = time.monotonic_ns()
    if not cmd.quiet:
        render.report(sh.out, "discard", t2 - t1, cmd.offset, cmd.nbytes, cmd.nbytes, cmd.csv)
    return 0


# -- truncate, length, info ------------------------------------------------------------------------
PREALLOC_MODES = ("off", "metadata", "falloc", "full")


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
        offset = num(inv, g.args[0], inv.prg)
    except ParseFailure as f:
        f.messages[-1] = (STDOUT, f.messages[-1][1].rsplit(" -- ", 1)[0] + f" -- {err_word}\n")
        raise
    return Truncate(offset, prealloc)


async def run_truncate(sh: Shell, cmd: Truncate) -> int:
    blk = sh.require_blk()
    try:
        await sh.sync(blk.truncate(cmd.offset, cmd.prealloc))
    except QemuError as e:
        sh.out.error_report(str(e))
        return -e.errno
    except BlockError as e:
        sh.out.error_report(str(e))
        return -e.code
    return 0


async def run_length(sh: Shell, cmd: object) -> int:
    sh.out.out(render.cvtstr(sh.require_blk().getlength()) + "\n")
    return 0


async def run_info(sh: Shell, cmd: object) -> int:
    root = sh.require_blk().root
    sh.out.out(f"format name: {root.format_name}\n")
    if root.protocol_name:
        sh.out.out(f"format name: {root.protocol_name}\n")
    node = root
    info = node.get_info()
    while info is None and node.is_filter and node.children:
        node = node.children[0].node
        info = node.get_info()
    if info is None:
        return -errno.ENOTSUP
    sh.out.out(f"cluster size: {render.cvtstr(info.cluster_size)}\n")
    sh.out.out(f"vm state offset: {render.cvtstr(info.vm_state_offset)}\n")
    spec = root.get_specific_info()
    if spec:
        sh.out.out("Format specific information:\n" + render.dump_specific(spec, 1))
    return 0


# -- alloc, map ----------------------------------------------------------------------------------
class Alloc(NamedTuple):
    offset: int
    nbytes: int


def parse_alloc(inv: Invocation) -> Alloc:
    offset = num(inv, inv.argv[1], inv.prg)
    count = num(inv, inv.argv[2], inv.prg) if len(inv.argv) == 3 else SECTOR
    return Alloc(offset, count)


async def run_alloc(sh: Shell, cmd: Alloc) -> int:
    blk = sh.require_blk()
    offset, count, remaining, total = cmd.offset, cmd.nbytes, cmd.nbytes, 0
    while remaining:
        try:
            allocated, n = await sh.sync(blk.is_allocated(offset, remaining))
        except BlockError as e:
            sh.out.out(f"is_allocated failed: {e}\n")
            return -e.code
        offset += n
        remaining -= n
        if allocated:
            total += n
        if n == 0:
            count -= remaining
            remaining = 0
    sh.out.out(f"{total}/{count} bytes allocated at offset {render.cvtstr(cmd.offset)}\n")
    return 0


async def run_map(sh: Shell, cmd: object) -> int:
    blk = sh.require_blk()
    offset, remaining = 0, blk.getlength()
    while remaining:
        try:
            first, n = await sh.sync(blk.is_allocated(offset, remaining))
            pnum = n
            while remaining - pnum > 0 and n:
                more, n = await sh.sync(blk.is_allocated(offset + pnum, remaining - pnum))
                if more != first or not n:
                    break
                pnum += n
        except BlockError as e:
            sh.out.error_report(f"Failed to get allocation status: {e}")
            return -e.code
        if not pnum:
            sh.out.error_report("Unexpected end of image")
            return -errno.EIO
        state = "    allocated" if first else "not allocated"
        sh.out.out(f"{render.cvtstr(pnum)} (0x{pnum:x}) bytes {state} at offset "
                   f"{render.cvtstr(offset)} (0x{offset:x})\n")
        offset += pnum
        remaining -= pnum
    return 0
