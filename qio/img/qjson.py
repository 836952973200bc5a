"""QEMU's JSON output: ``qobject_to_json_pretty`` of a QDict built by a QAPI output visitor.

A QDict iterates its 512 hash buckets in order (``tdb_hash``), newest entry first within a bucket, so
the key order qemu-img prints is a function of the key names and of the order the visitor inserted
them (the QAPI struct's field order).  Objects here are lists of ``(key, value)`` pairs in field order.
"""

from __future__ import annotations

from typing import Any

_BUCKETS = 512


def tdb_hash(name: str) -> int:
    """``tdb_hash`` (qobject/qdict.c), on the UTF-8 bytes, in 32-bit unsigned arithmetic."""
    data = name.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, b in enumerate(data):
        value = (value + (b << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The iteration order of a QDict filled with ``items`` in that order."""
    indexed = list(enumerate(items))
    indexed.sort(key=lambda p: (tdb_hash(p[1][0]) % _BUCKETS, -p[0]))
    return [item for _, item in indexed]


def _quoted(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte: QEMU's replacement character
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 | (cp >> 10), 0xDC00 | (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _is_object(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], tuple)


def to_json_pretty(value: Any, indent: int = 0) -> str:
    """``qobject_to_json_pretty``; objects are (key, value) lists in QAPI field order."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quoted(value)
    nl = "\n" + "    " * (indent + 1)
    end = "\n" + "    " * indent
    if isinstance(value, dict) or _is_object(value):
        pairs = list(value.items()) if isinstance(value, dict) else value
        body = ",".join(f"{nl}{_quoted(k)}: {to_json_pretty(v, indent + 1)}" for k, v in qdict_order(pairs))
        return "{" + body + end + "}"
    assert isinstance(value, list)
    return "[" + ",".join(nl + to_json_pretty(v, indent + 1) for v in value) + end + "]"
