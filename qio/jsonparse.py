"""QEMU's JSON parser (``qobject_from_json``): what a ``json:{...}`` file name means, and its errors.

QEMU does not use a standard JSON parser: a lexer (a byte-level state machine that also takes
'single-quoted' strings), a streamer that cuts the token stream into values (and limits nesting to
1024), and a recursive-descent parser with its own messages ("JSON parse error, duplicate key",
"Expecting at most one JSON value", "\\ud800 is not a valid Unicode character").  Python's ``json``
module accepts and rejects different inputs, so qio follows QEMU's grammar step by step.

Strings are QEMU's "modified UTF-8" (``\\u0000`` becomes the bytes C0 80); they are returned as
``str`` decoded with ``surrogateescape`` so such bytes survive to file names and messages unchanged.
Integers that fit neither int64 nor uint64 become floats, as QNums do.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from qio.block.errors import QemuError

# Token types (JSONTokenType) and lexer states; JSON_ERROR must be 0 (the table's default).
JSON_ERROR = 0
(IN_RECOVERY, IN_DQ_STRING_ESCAPE, IN_DQ_STRING, IN_SQ_STRING_ESCAPE, IN_SQ_STRING, IN_ZERO, IN_EXP_DIGITS,
 IN_EXP_SIGN, IN_EXP_E, IN_MANTISSA, IN_MANTISSA_DIGITS, IN_DIGITS, IN_SIGN, IN_KEYWORD, IN_START) = range(1, 16)
(JSON_LCURLY, JSON_RCURLY, JSON_LSQUARE, JSON_RSQUARE, JSON_COLON, JSON_COMMA, JSON_INTEGER, JSON_FLOAT,
 JSON_KEYWORD, JSON_STRING, JSON_END_OF_INPUT) = range(100, 111)
LOOKAHEAD = 0x200
_TOKENS = frozenset(range(JSON_LCURLY, JSON_STRING + 1))

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10


def _table() -> list[list[int]]:
    t = [[JSON_ERROR] * 256 for _ in range(IN_START + 1)]

    def put(state: int, chars: str | range, value: int) -> None:
        for c in (chars if isinstance(chars, range) else map(ord, chars)):
            t[state][c] = value

    def terminal(state: int, tok: int) -> None:
        put(state, range(256), tok | LOOKAHEAD)

    put(IN_RECOVERY, range(0x00, 0x20), IN_START | LOOKAHEAD)
    put(IN_RECOVERY, range(0x20, 0xFE), IN_RECOVERY)
    put(IN_RECOVERY, range(0xFE, 0x100), IN_START | LOOKAHEAD)
    put(IN_RECOVERY, "\t", IN_RECOVERY)
    put(IN_RECOVERY, "[]{}:,", IN_START | LOOKAHEAD)
    for esc, body, quote in ((IN_DQ_STRING_ESCAPE, IN_DQ_STRING, '"'), (IN_SQ_STRING_ESCAPE, IN_SQ_STRING, "'")):
        put(esc, range(0x20, 0xFE), body)
        put(body, range(0x20, 0xFE), body)
        put(body, "\\", esc)
        put(body, quote, JSON_STRING)
    digits, nonzero = "0123456789", "123456789"
    terminal(IN_ZERO, JSON_INTEGER)
    put(IN_ZERO, digits, JSON_ERROR)
    put(IN_ZERO, ".", IN_MANTISSA)
    terminal(IN_EXP_DIGITS, JSON_FLOAT)
    put(IN_EXP_DIGITS, digits, IN_EXP_DIGITS)
    put(IN_EXP_SIGN, digits, IN_EXP_DIGITS)
    put(IN_EXP_E, "-+", IN_EXP_SIGN)
    put(IN_EXP_E, digits, IN_EXP_DIGITS)
    terminal(IN_MANTISSA_DIGITS, JSON_FLOAT)
    put(IN_MANTISSA_DIGITS, digits, IN_MANTISSA_DIGITS)
    put(IN_MANTISSA_DIGITS, "eE", IN_EXP_E)
    put(IN_MANTISSA, digits, IN_MANTISSA_DIGITS)
    terminal(IN_DIGITS, JSON_INTEGER)
    put(IN_DIGITS, digits, IN_DIGITS)
    put(IN_DIGITS, "eE", IN_EXP_E)
    put(IN_DIGITS, ".", IN_MANTISSA)
    put(IN_SIGN, "0", IN_ZERO)
    put(IN_SIGN, nonzero, IN_DIGITS)
    terminal(IN_KEYWORD, JSON_KEYWORD)
    put(IN_KEYWORD, range(ord("a"), ord("z") + 1), IN_KEYWORD)
    put(IN_START, '"', IN_DQ_STRING)
    put(IN_START, "'", IN_SQ_STRING)
    put(IN_START, "0", IN_ZERO)
    put(IN_START, nonzero, IN_DIGITS)
    put(IN_START, "-", IN_SIGN)
    for ch, tok in (("{", JSON_LCURLY), ("}", JSON_RCURLY), ("[", JSON_LSQUARE), ("]", JSON_RSQUARE),
                    (",", JSON_COMMA), (":", JSON_COLON)):
        put(IN_START, ch, tok)
    put(IN_START, range(ord("a"), ord("z") + 1), IN_KEYWORD)
    put(IN_START, " \t\r\n", IN_START)
    return t


_TABLE: list[list[int]] | None = None


class _ParseError(Exception):
    pass


class _Null:
    """QNull inside the parser (None means "no value" there)."""


_NULL = _Null()


def _is_valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def _mod_utf8_encode(cp: int) -> bytes | None:
    if not _is_valid_codepoint(cp):
        return None
    if 0 < cp <= 0x7F:
        return bytes([cp])
    if cp <= 0x7FF:
        return bytes([0xC0 | (cp >> 6) & 0x1F, 0x80 | cp & 0x3F])
    if cp <= 0xFFFF:
        return bytes([0xE0 | (cp >> 12) & 0x0F, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F])
    return bytes([0xF0 | (cp >> 18) & 0x07, 0x80 | (cp >> 12) & 0x3F, 0x80 | (cp >> 6) & 0x3F, 0x80 | cp & 0x3F])


def _mod_utf8_codepoint(s: bytes, pos: int) -> tuple[int, int]:
    """``mod_utf8_codepoint(s + pos, 6, &end)``: (code point or -1, end position)."""
    min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)
    byte = s[pos]
    p = pos + 1
    if byte < 0x80:
        return byte, p
    if byte >= 0xFE or not byte & 0x40:
        return -1, p
    n = 0
    mask = 0x80
    while byte & mask:
        n += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for i in range(1, n):
        b = s[p] if i < 6 and p < len(s) else 0
        if b & 0xC0 != 0x80:
            return -1, p
        p += 1
        cp = cp << 6 | b & 0x3F
    if not _is_valid_codepoint(cp) or (cp < min_cp[n - 2] and not (cp == 0 and n == 2)):
        return -1, p
    return cp, p


def _cvt4hex(s: bytes, pos: int) -> int:
    cp = 0
    for i in range(4):
        c = s[pos + i:pos + i + 1]
        if not c or c not in b"0123456789abcdefABCDEF":
            return -1
        cp = cp << 4 | int(c, 16)
    return cp


class _Parser:
    """``json_parser_parse`` over one message's tokens; errors keep only the first message."""

    def __init__(self, tokens: list[tuple[int, bytes]]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.err: str | None = None

    def error(self, msg: str) -> None:
        if self.err is None:
            self.err = f"JSON parse error, {msg}"

    def peek(self) -> tuple[int, bytes] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pop(self) -> tuple[int, bytes] | None:
        tok = self.peek()
        if tok is not None:
            self.pos += 1
        return tok

    def value(self) -> Any:
        tok = self.peek()
        if tok is None:
            self.error("premature EOI")
            return None
        typ = tok[0]
        if typ == JSON_LCURLY:
            return self.obj()
        if typ == JSON_LSQUARE:
            return self.array()
        if typ in (JSON_INTEGER, JSON_FLOAT, JSON_STRING):
            return self.literal()
        if typ == JSON_KEYWORD:
            self.pop()
            word = tok[1]
            if word in (b"true", b"false"):
                return word == b"true"
            if word == b"null":
                return _NULL
            self.error(f"invalid keyword '{word.decode('utf-8', 'surrogateescape')}'")
            return None
        self.error("expecting value")
        return None

    def pair(self, out: dict[str, Any]) -> bool:
        if self.peek() is None:
            self.error("premature EOI")
            return False
        key = self.value()
        if not isinstance(key, str):
            self.error("key is not a string in object")
            return False
        tok = self.pop()
        if tok is None:
            self.error("premature EOI")
            return False
        if tok[0] != JSON_COLON:
            self.error("missing : in object pair")
            return False
        value = self.value()
        if value is None:
            self.error("Missing value in dict")
            return False
        if key in out:
            self.error("duplicate key")
            return False
        out[key] = value
        return True

    def obj(self) -> dict[str, Any] | None:
        self.pop()
        out: dict[str, Any] = {}
        peek = self.peek()
        if peek is None:
            self.error("premature EOI")
            return None
        if peek[0] == JSON_RCURLY:
            self.pop()
            return out
        if not self.pair(out):
            return None
        tok = self.pop()
        while True:
            if tok is None:
                self.error("premature EOI")
                return None
            if tok[0] == JSON_RCURLY:
                return out
            if tok[0] != JSON_COMMA:
                self.error("expected separator in dict")
                return None
            if not self.pair(out):
                return None
            tok = self.pop()

    def array(self) -> list[Any] | None:
        self.pop()
        out: list[Any] = []
        peek = self.peek()
        if peek is None:
            self.error("premature EOI")
            return None
        if peek[0] == JSON_RSQUARE:
            self.pop()
            return out
        while True:
            item = self.value()
            if item is None:
                self.error("expecting value")
                return None
            out.append(item)
            tok = self.pop()
            if tok is None:
                self.error("premature EOI")
                return None
            if tok[0] == JSON_RSQUARE:
                return out
            if tok[0] != JSON_COMMA:
                self.error("expected separator in list")
                return None

    def literal(self) -> Any:
        tok = self.pop()
        assert tok is not None
        typ, text = tok
        if typ == JSON_STRING:
            return self.string(text)
        if typ == JSON_INTEGER:
            v = int(text)
            if -(2**63) <= v < 2**64:
                return v
        return float(text)  # strtod; out-of-range integers become doubles too

    def string(self, s: bytes) -> str | None:
        quote = s[0]
        out = bytearray()
        p = 1
        while s[p] != quote:
            c = s[p]
            if c == 0x5C:  # backslash
                beg = p
                p += 1
                e = s[p:p + 1]
                p += 1
                simple = {b'"': b'"', b"'": b"'", b"\\": b"\\", b"/": b"/", b"b": b"\b", b"f": b"\f",
                          b"n": b"\n", b"r": b"\r", b"t": b"\t"}
                if e in simple:
                    out += simple[e]
                elif e == b"u":
                    cp = _cvt4hex(s, p)
                    p += 4
                    if 0xD800 <= cp <= 0xDBFF and s[p:p + 2] == b"\\u":
                        cp = 0x10000 + ((cp & 0x3FF) << 10)
                        trailing = _cvt4hex(s, p + 2)
                        if 0xDC00 <= trailing <= 0xDFFF:
                            cp |= trailing & 0x3FF
                            p += 6
                        else:
                            cp = -1
                    enc = _mod_utf8_encode(cp)
                    if enc is None:
                        shown = s[beg:p].split(b"\x00")[0].decode("utf-8", "surrogateescape")
                        self.error(f"{shown} is not a valid Unicode character")
                        return None
                    out += enc
                else:
                    self.error("invalid escape sequence in string")
                    return None
            else:
                cp, end = _mod_utf8_codepoint(s, p)
                if cp < 0:
                    self.error("invalid UTF-8 sequence in string")
                    return None
                p = end
                enc = _mod_utf8_encode(cp)
                assert enc is not None
                out += enc
        return bytes(out).decode("utf-8", "surrogateescape")


@contextlib.contextmanager
def deep_recursion() -> Iterator[None]:
    """Room for the recursive descent into values nested MAX_NESTING deep (and for walking them)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * MAX_NESTING + 500))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _parse_message(tokens: list[tuple[int, bytes]]) -> tuple[Any, str | None]:
    parser = _Parser(tokens)
    with deep_recursion():
        result = parser.value()
    if parser.err is not None:
        return None, parser.err
    return result, None


def _unwrap(v: Any) -> Any:
    if v is _NULL:
        return None
    if isinstance(v, dict):
        return {k: _unwrap(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unwrap(x) for x in v]
    return v


def qobject_from_json(text: str) -> Any:
    """Parse ``text`` as QEMU does; raise QemuError with QEMU's message.  JSON null is None."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    table = _TABLE
    data = text.encode("utf-8", "surrogateescape").split(b"\x00")[0]  # a C string
    results: list[tuple[Any, str | None]] = []
    tokens: list[tuple[int, bytes]] = []
    counts = [0, 0]  # brace, bracket
    size = [0]

    def emit(value: Any, err: str | None) -> None:
        tokens.clear()
        counts[0] = counts[1] = 0
        size[0] = 0
        results.append((value, err))

    def process(typ: int, tok: bytes) -> None:
        if typ == JSON_LCURLY:
            counts[0] += 1
        elif typ == JSON_RCURLY:
            counts[0] -= 1
        elif typ == JSON_LSQUARE:
            counts[1] += 1
        elif typ == JSON_RSQUARE:
            counts[1] -= 1
        elif typ == JSON_ERROR:
            emit(None, f"JSON parse error, stray '{tok.decode('utf-8', 'surrogateescape')}'")
            return
        elif typ == JSON_END_OF_INPUT:
            if tokens:
                emit(*_parse_message(list(tokens)))
            return
        if size[0] + len(tok) + 1 > MAX_TOKEN_SIZE:
            emit(None, "JSON token size limit exceeded")
            return
        if len(tokens) + 1 > MAX_TOKEN_COUNT:
            emit(None, "JSON token count limit exceeded")
            return
        if counts[0] + counts[1] > MAX_NESTING:
            emit(None, "JSON nesting depth limit exceeded")
            return
        tokens.append((typ, tok))
        size[0] += len(tok)
        if (counts[0] > 0 or counts[1] > 0) and counts[0] >= 0 and counts[1] >= 0:
            return
        emit(*_parse_message(list(tokens)))

    state = IN_START
    token = bytearray()

    def feed(ch: int, flush: bool) -> None:
        nonlocal state
        consumed = False
        while (state != IN_START) if flush else not consumed:
            nxt = table[state][ch]
            consumed = not flush and not nxt & LOOKAHEAD
            new = nxt & ~LOOKAHEAD
            if consumed:
                token.append(ch)
            if new in _TOKENS or new == IN_START:
                if new != IN_START:
                    process(new, bytes(token))
                token.clear()
                new = IN_START
            elif new == JSON_ERROR:
                process(JSON_ERROR, bytes(token))
                new = IN_RECOVERY
                token.clear()
            elif new == IN_RECOVERY:
                token.clear()
            state = new

    for ch in data:
        feed(ch, False)
    feed(0, True)
    process(JSON_END_OF_INPUT, bytes(token))

    result: Any = None
    err: str | None = None
    have = False
    for value, e in results:
        if have:
            result, have = None, False
            err = "Expecting at most one JSON value"
        if err is not None:
            continue
        result, err = value, e
        have = e is None
    if err is not None:
        raise QemuError(err)
    if not have:
        raise QemuError("Expecting a JSON value")
    with deep_recursion():
        return _unwrap(result)
