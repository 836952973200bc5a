"""Number parsing with qemu-io 7.2's exact rules (``qemu_strtosz``/``cvtnum``, ``strtol``)."""

from __future__ import annotations

import errno
import functools
import re

#: C's limits, which QEMU's checks and clamps are written in.
INT_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
U64 = 2**64
# Patterns, compiled on first use (:func:`_re`): compiling them all costs ~0.5 ms of every start.
_DEC = r"[ \t\n\v\f\r]*\+?([0-9]+)"
_HEX = r"[ \t\n\v\f\r]*\+?0[xX]([0-9a-fA-F]+)"
_ZERO_X = r"[ \t\n\v\f\r]*[+-]?0(?=[xX])"
_FRAC = r"\.([0-9]+)([eE][+-]?[0-9]+)?"
_SUFFIX = "BKMGTPE"


@functools.cache
def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


_FAST_SUFFIX = {c: 1024**i for i, c in enumerate(_SUFFIX)} | {c.lower(): 1024**i for i, c in enumerate(_SUFFIX)}


def qemu_strtosz(s: str) -> tuple[int, int, bool]:
    """Parse a size; returns ``(err, value, hex_suffix_warning)`` with err 0, -EINVAL or -ERANGE."""
    m = _re(_DEC).match(s)
    if m is None:
        z = _re(_ZERO_X).match(s)
        if z is None:
            return -errno.EINVAL, 0, False
        val, end = 0, z.end()  # "0x" with no digits: strtoull stops after the '0'
    else:
        val, end = int(m.group(1)), m.end()
        if val >= U64:
            return -errno.ERANGE, 0, False
    hexa, valf = False, 0
    nxt = s[end : end + 1]
    if val == 0 and nxt in ("x", "X"):
        h = _re(_HEX).match(s)
        if h:
            val, end = int(h.group(1), 16), h.end()
            if val >= U64:
                return -errno.ERANGE, 0, False
        if s[end : end + 1] == ".":
            return -errno.EINVAL, 0, False
        hexa = True
    elif nxt == ".":
        f = _re(_FRAC).match(s, end)
        if f is None:
            end += 1
        elif f.group(2):
            return -errno.EINVAL, 0, False
        else:
            valf = int(float("0." + f.group(1)) * 2.0**64) & (U64 - 1)
            end = f.end()
    c = s[end : end + 1].upper()
    mul = 1
    warn = False
    if c and c in _SUFFIX:
        mul = 1024 ** _SUFFIX.index(c)
        end += 1
        warn = hexa
    if mul == 1:
        if valf:
            return -errno.EINVAL, 0, warn
    else:
        fp = valf * mul
        val = val * mul + (fp >> 64) + ((fp & (U64 - 1)) >> 63)
        if val >> 64:
            return -errno.ERANGE, 0, warn
    if end != len(s):
        return -errno.EINVAL, 0, warn
    return 0, val, warn


def cvtnum(s: str) -> tuple[int, int, bool]:
    """qemu-io's ``cvtnum``: a size no larger than INT64_MAX.  Returns ``(err, value, warn)``."""
    # fast paths for plain decimals and "64k"-style sizes (ASCII only: str.isdigit also accepts "²" and
    # other scripts' digits, which strtoull rejects)
    if s.isdigit() and len(s) < 18 and s.isascii():
        return 0, int(s), False
    if len(s) < 16 and s[:-1].isdigit() and s[-1] in _FAST_SUFFIX and s.isascii():
        v = int(s[:-1]) * _FAST_SUFFIX[s[-1]]
        if v <= INT64_MAX:
            return 0, v, False
    err, val, warn = qemu_strtosz(s)
    if err:
        return err, 0, warn
    if val > INT64_MAX:
        return -errno.ERANGE, 0, warn
    return 0, val, warn


_STRTOL = r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)"


def _base0(body: str) -> int:
    """The digits of a base-0 C number: hex after 0x, octal after a leading 0, else decimal."""
    if body.startswith(("0x", "0X")):
        return int(body, 16)
    if body.startswith("0") and len(body) > 1:
        return int(body, 8)
    return int(body)


def strtol0(s: str) -> int | None:
    """C ``strtol(s, &end, 0)`` requiring the whole string to be consumed; None if not."""
    m = _re(_STRTOL).fullmatch(s)
    if m is None:
        return None
    v = _base0(m.group(2))
    v = -v if m.group(1) == "-" else v
    return max(min(v, INT64_MAX), -(2**63))


def strtou64(s: str) -> str | None:
    """``qemu_strtou64(s, NULL, 0, ...)``'s verdict: None (a number; negatives wrap as in strtoull),
    "range" (beyond 64 bits) or "invalid"."""
    m = _re(_STRTOL).fullmatch(s)
    if m is None:
        return "invalid"
    return "range" if _base0(m.group(2)) >= 2**64 else None


def strtou64_value(s: str) -> int:
    """The value ``qemu_strtou64`` gives a string ``strtou64`` accepted (a negative wraps modulo 2^64)."""
    m = _re(_STRTOL).fullmatch(s)
    assert m is not None
    v = _base0(m.group(2))
    return (-v if m.group(1) == "-" else v) % 2**64


def parse_pattern(s: str) -> int | None:
    """A ``-P`` pattern byte: strtol base 0, 0..255, fully consumed."""
    v = strtol0(s)
    if v is None or v < 0 or v > 255:
        return None
    return v
