r"""Python ports of the qemu-iotests output filters used by the differential tests.

Source: ``tests/qemu-iotests/common.filter`` of the Debian ``qemu 1:7.2+dfsg-7+deb12u18`` tree
(see ``/work/shared/reference/qemu-io.md`` section 9).  ``_filter_qemu_io`` is
``_filter_win32`` (``gsed -e 's/\r//g'``) piped into ``gsed`` with three expressions::

    -e "s/[0-9]* ops\; [0-9/:. sec]* ([0-9/.inf]* [EPTGMKiBbytes]*\/sec and [0-9/.inf]* ops\/sec)/
        X ops\; XX:XX:XX.X (XXX YYY\/sec and XXX ops\/sec)/"        (one line in the original)
    -e "s/: line [0-9][0-9]*:  *[0-9][0-9]*\( Aborted\| Killed\) \{2,\}/:\1 /"
    -e "s/qemu-io> //g"

and ``_filter_testdir`` is ``sed -e "s#$TEST_DIR/#TEST_DIR/#g" ...``.

The Aborted/Killed expression is the Debian 7.2.22 variant (with the ``\{2,\}`` trailing-space
run), not the upstream v7.2.0 one.

sed semantics are reproduced exactly: the text is processed line by line (split on ``\n``; a
missing final newline is preserved), the first two expressions replace only the first match
per line (no ``g`` flag) and use POSIX *leftmost-longest* matching, the prompt expression is
global.  All functions are pure (``str`` in, ``str`` out).
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = [
    "PROMPT",
    "filter_csv_stats",
    "filter_qemu_io",
    "filter_qemu_io_stats",
    "filter_testdir",
    "filter_win32",
    "sed_substitute",
]

PROMPT = "qemu-io> "

# BRE -> Python translations (in BRE "(" and ")" are literal, "\(" "\)" "\|" "\{2,\}" are special).
_STATS_RE = re.compile(
    r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)"
)
_STATS_REPL = "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"

# Debian 7.2.22 variant of the Aborted/Killed expression.
_ABORT_RE = re.compile(r": line [0-9][0-9]*:  *[0-9][0-9]*( Aborted| Killed) {2,}")

# `-C` report line: "%d,%d,%s,%.3f,%.3f" (total, count, H:MM:SS.ss, bytes/sec, ops/sec).
# NOT part of the iotests filter; used only by corpus scripts that opt in with `#! mask-csv`.
_CSV_RE = re.compile(
    r"^([0-9]+),([0-9]+),[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2},"
    r"(?:[0-9]+\.[0-9]{3}|inf|-?nan),(?:[0-9]+\.[0-9]{3}|inf|-?nan)$"
)


def _leftmost_longest(pattern: re.Pattern[str], line: str) -> tuple[int, int] | None:
    """Span of the POSIX (leftmost-longest) match of ``pattern`` in ``line``, or None.

    Python's ``search`` already returns the leftmost *start*; among the matches starting there
    POSIX regexec picks the longest one, which we find by trying end positions from the right.
    """
    m = pattern.search(line)
    if m is None:
        return None
    start = m.start()
    for end in range(len(line), m.end() - 1, -1):
        if pattern.fullmatch(line, start, end) is not None:
            return start, end
    return m.span()  # pragma: no cover - unreachable (m.end() itself always matches)


def sed_substitute(pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str] | str, line: str) -> str:
    """``s/pattern/repl/`` (first match only, leftmost-longest) on a single line."""
    span = _leftmost_longest(pattern, line)
    if span is None:
        return line
    start, end = span
    m = pattern.fullmatch(line, start, end)
    assert m is not None
    replacement = repl(m) if callable(repl) else m.expand(repl)
    return line[:start] + replacement + line[end:]


def _per_line(text: str, func: Callable[[str], str]) -> str:
    return "\n".join(func(line) for line in text.split("\n"))


def filter_win32(text: str) -> str:
    """``_filter_win32``: delete every carriage return."""
    return text.replace("\r", "")


def filter_qemu_io_stats(text: str) -> str:
    """Only the stats-line expression of ``_filter_qemu_io`` (keeps prompts; no ``\\r`` removal)."""
    return _per_line(text, lambda line: sed_substitute(_STATS_RE, _STATS_REPL, line))


def filter_qemu_io(text: str, *, strip_prompts: bool = True, prompt: str = PROMPT) -> str:
    """Port of iotests ``_filter_qemu_io`` (Debian 7.2.22 variant).

    ``strip_prompts=False`` skips only the final ``s/qemu-io> //g`` expression, so that prompt
    placement can still be compared.  ``prompt`` is the literal text deleted by that expression.
    """

    def one(line: str) -> str:
        line = sed_substitute(_STATS_RE, _STATS_REPL, line)
        line = sed_substitute(_ABORT_RE, r":\1 ", line)
        if strip_prompts:
            line = line.replace(prompt, "")
        return line

    return _per_line(filter_win32(text), one)


def filter_csv_stats(text: str) -> str:
    """Mask the timing/rate fields of ``-C`` report lines (whole lines only).

    ``512,1,0:00:00.00,782121.198,1527.580`` -> ``512,1,H:MM:SS.SS,RATE,OPS``.  Total and count
    are kept.  This is an extension, not part of the iotests filter.
    """
    return _per_line(text, lambda line: _CSV_RE.sub(r"\1,\2,H:MM:SS.SS,RATE,OPS", line))


def filter_testdir(text: str, test_dir: str, placeholder: str = "TEST_DIR", *, bare: bool = False) -> str:
    """``_filter_testdir``-like: replace every ``<test_dir>/`` with ``<placeholder>/``.

    Like the iotests original only occurrences followed by a slash are replaced (a trailing
    slash on ``test_dir`` is ignored), unless ``bare`` is true: then remaining occurrences of the
    directory itself (e.g. ``/tmp/x: Is a directory``) are replaced too.  An empty ``test_dir``
    leaves the text unchanged.
    """
    base = test_dir.rstrip("/")
    if not base:
        return text
    text = text.replace(base + "/", placeholder + "/")
    if bare:
        text = text.replace(base, placeholder)
    return text
