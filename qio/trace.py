"""qio's trace events and the ``-T``/``--trace`` option.

The option keeps QEMU's syntax (``[enable=]PATTERN``, ``events=FILE``, ``file=FILE``, ``-T help``),
but the events are qio's own: QEMU's trace points belong to QEMU's code.  ``blkdebug_event`` prints
every blkdebug event as it fires, with the request that raised it -- the view qemu-io cannot give.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from qio import stdio

#: name -> description
EVENTS = {
    "blkdebug_event": "a blkdebug event fired: event, the request that raised it, blkdebug state",
    "blkdebug_rule": "a blkdebug rule acted on an event (inject-error armed, set-state, suspend)",
    "blkdebug_fire": "a blkdebug rule acted on a request (error injected, delay, bit flips, bad block)",
}

enabled: set[str] = set()
_sink: list[Callable[[str], None]] = []


def set_sink(write: Callable[[str], None]) -> None:
    _sink[:] = [write]


def enable(pattern: str, warn: Callable[[str], None]) -> None:
    """``do_trace_enable_events``: enable (or with a leading ``-`` disable) matching events."""
    on = not pattern.startswith("-")
    pat = pattern if on else pattern[1:]
    is_pattern = any(c in pat for c in "*?[")
    matched = [name for name in EVENTS if fnmatch.fnmatchcase(name, pat)]
    if not matched and not is_pattern:
        warn(f"trace event '{pat}' does not exist")
        return
    for name in matched:
        (enabled.add if on else enabled.discard)(name)


def emit(event: str, text: str) -> None:
    if event in enabled and _sink:
        _sink[0](f"{event} {text}\n")


def parse_option(optarg: str, warn: Callable[[str], None], out: Callable[[str], None],
                 error: Callable[[str], None]) -> int | None:
    """Apply one ``-T`` argument; an int is the exit status to stop with (``-T help`` lists)."""
    from qio.block.errors import QemuError
    from qio.qemuopts import parse_qemuopts

    try:
        opts = parse_qemuopts(optarg, warn, implied="enable")
    except QemuError as e:
        error(str(e))
        return 1
    for key in opts:
        if key not in ("enable", "events", "file"):
            error(f"Invalid parameter '{key}'")
            return 1
    pattern = opts.get("enable")
    if pattern is not None:
        if pattern in ("help", "?"):
            out("".join(f"{name}\n" for name in EVENTS))
            return 0
        enable(pattern, warn)
    events = opts.get("events")
    if events is not None:
        try:
            with open(events, encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if len(line) > 0 and not line.startswith("#"):
                        enable(line, warn)
        except OSError as e:
            error(e.strerror or str(e))
            return 1
    path = opts.get("file")
    if path is not None:
        try:
            fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
        except OSError as e:
            error(f"could not open trace file '{path}': {e.strerror}")
            return 1

        def write(text: str) -> None:
            stdio.release()  # the file may be the terminal's or stdout's
            fh.write(text)
            fh.flush()

        set_sink(write)
    return None
