"""Argument helpers shared by the commands: numbers, patterns, buffers, I/O vectors."""

from __future__ import annotations

import errno

from qio.block.driver import BDRV_REQUEST_MAX_BYTES
from qio.commands.spec import STDERR, Invocation
from qio.numbers import cvtnum, parse_pattern
from qio.ops import split_iov

PATTERN_CHUNK = 1 << 20


def num(inv: Invocation, arg: str) -> int:
    """``cvtnum`` with qemu-io's ``Parsing error`` messages (and the hex-suffix warning)."""
    err, val, warn = cvtnum(arg)
    if warn:
        inv.messages.append((STDERR, f"{inv.prg}: warning: Using a multiplier suffix on hex numbers "
                                     f"is deprecated: {arg}\n"))
    if err == -errno.EINVAL:
        raise inv.fail(err, f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n")
    if err == -errno.ERANGE:
        raise inv.fail(err, f"Parsing error: argument too large -- {arg}\n")
    return val


def pattern(inv: Invocation, arg: str) -> int:
    p = parse_pattern(arg)
    if p is None:
        raise inv.fail(-errno.EINVAL, f"{arg} is not a valid pattern byte\n")
    return p


def iovec_sizes(inv: Invocation, args: list[str]) -> list[int]:
    """``create_iovec``'s length checks."""
    sizes = []
    count = 0
    for arg in args:
        n = num(inv, arg)
        if n > BDRV_REQUEST_MAX_BYTES:
            raise inv.fail(-errno.EINVAL, f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}\n")
        if count > BDRV_REQUEST_MAX_BYTES - n:
            raise inv.fail(-errno.EINVAL,
                           f"The total number of bytes exceed the maximum size {BDRV_REQUEST_MAX_BYTES}\n")
        sizes.append(n)
        count += n
    return sizes


#: Small pattern buffers by (byte, length): read-only, so requests can share them (a long queue of
#: ``aio_write``s of one size then fills no buffer per request).
_SMALL_PATTERNS: dict[tuple[int, int], memoryview] = {}
SMALL_PATTERN_MAX = 64 * 1024


def pattern_iov(value: int, count: int) -> list[memoryview]:
    """A write buffer of ``count`` pattern bytes; large ones reuse one 1 MiB block many times."""
    if count <= SMALL_PATTERN_MAX:
        buf = _SMALL_PATTERNS.get((value, count))
        if buf is None:
            if len(_SMALL_PATTERNS) >= 64:
                _SMALL_PATTERNS.clear()
            buf = _SMALL_PATTERNS[value, count] = memoryview(bytes([value]) * count)
        return [buf]
    if count <= PATTERN_CHUNK:
        return [memoryview(bytes([value]) * count)]
    block = memoryview(bytes([value]) * PATTERN_CHUNK)
    full, rest = divmod(count, PATTERN_CHUNK)
    out = [block] * full
    if rest:
        out.append(block[:rest])
    return out


def pattern_vector(value: int, sizes: tuple[int, ...]) -> list[memoryview]:
    """The write vector of ``writev``/``aio_write``: one buffer per length (the count matters: more than
    IOV_MAX fail), a single length shared as in :func:`pattern_iov`."""
    total = sum(sizes)
    if len(sizes) == 1:
        return pattern_iov(value, total)
    return split_iov(memoryview(bytes([value]) * total), sizes)




def verify(buf: memoryview, value: int) -> bool:
    """True if every byte of ``buf`` equals ``value`` (compared in 1 MiB blocks)."""
    n = len(buf)
    if n <= PATTERN_CHUNK:
        return buf.tobytes() == bytes([value]) * n  # bytes == bytes is a memcmp; memoryview == is not
    block = bytes([value]) * PATTERN_CHUNK
    for i in range(0, n, PATTERN_CHUNK):
        part = buf[i : i + PATTERN_CHUNK].tobytes()
        if part != (block if len(part) == PATTERN_CHUNK else block[: len(part)]):
            return False
    return True
