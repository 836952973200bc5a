"""Rendering: qemu-io's text primitives (``cvtstr``, ``timestr``, the statistics report, the hex dump,
the format-specific info dump).  Executors return data; this module turns it into qemu-io's text."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qio.output import Output

_UNITS = ((1 << 60, " EiB"), (1 << 50, " PiB"), (1 << 40, " TiB"), (1 << 30, " GiB"), (1 << 20, " MiB"),
          (1 << 10, " KiB"))


def cvtstr(v: float) -> str:
    """Human-readable size: ``512 bytes``, ``1.500 KiB``, ``64 KiB`` (the first ``.000`` is cut)."""
    suffix, s = " bytes", "%f" % v
    for size, unit in _UNITS:
        if v >= size:
            suffix, s = unit, "%.3f" % (v / size)
            break
    i = s.find(".000")
    return (s[:i] if i >= 0 else s) + suffix


def timestr(ns: int, verbose: bool = False) -> str:
    """Elapsed time: ``00.12 sec`` under a second, else ``H:MM:SS.ss``; ``-C`` always the latter."""
    sec, nsec = divmod(ns, 1_000_000_000)
    frac = nsec / 1e9
    if verbose or sec:
        return "%u:%02u:%05.2f" % (sec // 3600, (sec % 3600) // 60, (sec % 60) + frac)
    return "%05.2f sec" % frac


def _tdiv(value: float, ns: int) -> float:
    seconds = (ns // 1_000_000_000) + (ns % 1_000_000_000) / 1e9
    if seconds == 0:
        return math.nan if value == 0 else math.inf
    return value / seconds


def report_lines(op: str, ns: int, offset: int, count: int, total: int, cnt: int, csv: bool) -> list[str]:
    """``print_report``: the two stats lines (or the single ``-C`` line), one string per printf."""
    if csv:
        return ["%d,%d,%s,%.3f,%.3f\n" % (total, cnt, timestr(ns, True), _tdiv(total, ns), _tdiv(cnt, ns))]
    return [
        f"{op} {total}/{count} bytes at offset {offset}\n",
        "%s, %d ops; %s (%s/sec and %.4f ops/sec)\n"
        % (cvtstr(total), cnt, timestr(ns), cvtstr(_tdiv(total, ns)), _tdiv(cnt, ns)),
    ]


_PRINTABLE = bytes(c if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122) else 46 for c in range(256))
_HEX = ["%02x " % b for b in range(256)]


def dump_buffer(buf: bytes | bytearray | memoryview, offset: int) -> str:
    """``-v``: 16 bytes a line, absolute offsets, ``isalnum`` in the C locale as text."""
    lines = []
    for i in range(0, len(buf), 16):
        row = bytes(buf[i : i + 16])
        lines.append("%08x:  %s %s\n" % (offset + i, "".join([_HEX[b] for b in row]),
                                         row.translate(_PRINTABLE).decode("ascii")))
    return "".join(lines)


def report(out: Output, op: str, ns: int, offset: int, count: int, total: int, csv: bool) -> None:
    for line in report_lines(op, ns, offset, count, total, 1, csv):
        out.out(line)


def dump_specific(items: list[tuple[str, Any]], indent: int) -> str:
    """``dump_qdict``: ``key: value`` lines, nested dicts/lists indented by four spaces a level."""
    lines = []
    pad = "    " * indent
    for key, value in items:
        name = key.replace("-", " ")
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            lines.append(f"{pad}{name}:\n" + dump_specific(value, indent + 1))
        elif isinstance(value, list):
            lines.append(f"{pad}{name}:\n" + dump_specific([(f"[{i}]", v) for i, v in enumerate(value)],
                                                           indent + 1))
        elif isinstance(value, bool):
            lines.append(f"{pad}{name}: {'true' if value else 'false'}\n")
        else:
            lines.append(f"{pad}{name}: {value}\n")
    return "".join(lines)
