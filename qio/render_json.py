"""``--output=json``: the shell's results as one JSON object per line instead of qemu-io's text.

Imported only when the option is given (start-up of the text mode never loads ``json``).  Every object
has a ``type``; the schema is docs/json-output.md and ``docs/json-output.schema.json``:

- ``result``: a request's outcome (``command``, ``op``, ``offset``, ``bytes``, ``status`` ``ok``/``error``/
  ``mismatch``, ``errno``, ``message`` on failure, ``elapsed_ns`` and ``elapsed`` seconds on success);
- ``data``: ``read -v`` bytes as hex; ``extent``: a line of ``map``;
- ``event``: ``suspend``/``resume`` of a request at a blkdebug breakpoint (``tag``), ``trace`` lines;
- ``message``: any other line the command printed (``stream`` ``stdout``/``stderr``, ``text``);
- ``command``: the end of a command line (``command``, ``args``, ``status``, ``errno``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from qio.output import Output

_SUSPENDED = "blkdebug: Suspended request '"
_RESUMING = "blkdebug: Resuming request '"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


class JsonOutput(Output):
    """An :class:`Output` whose results, events and text lines all become JSON objects on stdout."""

    structured = True

    def __init__(self, prgname: str, out_fd: int = 1, err_fd: int = 2) -> None:
        super().__init__(prgname, out_fd, err_fd)
        #: The command of the line being executed (None before the first and between lines).
        self.command: str | None = None
        self._partial = {"stdout": "", "stderr": ""}

    def emit(self, obj: dict[str, Any]) -> None:
        """One JSON object, one line, on stdout (buffered as qemu-io's stdout is)."""
        Output.out(self, _encode(obj) + "\n")

    # -- text lines ----------------------------------------------------------------------------------
    def out(self, text: str) -> None:
        self._text("stdout", text)

    def err(self, text: str) -> None:
        self._text("stderr", text)

    def prompt(self, text: str) -> None:
        """No prompt between JSON lines."""

    def _text(self, stream: str, text: str) -> None:
        text = self._partial[stream] + text
        lines = text.split("\n")
        self._partial[stream] = lines.pop()
        for line in lines:
            self._line(stream, line)

    def _line(self, stream: str, line: str) -> None:
        if stream == "stdout" and line.endswith("'"):
            for prefix, event in ((_SUSPENDED, "suspend"), (_RESUMING, "resume")):
                if line.startswith(prefix):
                    self.emit({"type": "event", "event": event, "tag": line[len(prefix) : -1]})
                    return
        self.emit({"type": "message", "command": self.command, "stream": stream, "text": line})

    def _end_partial(self) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._partial[stream] = ""
                self._line(stream, rest)

    def flush(self) -> None:
        """A line left unfinished at a flush (exit, ``sigraise``) still becomes an object."""
        self._end_partial()
        Output.flush(self)

    # -- results ----------------------------------------------------------------------------------------
    def report(self, command: str, op: str, ns: int, offset: int, count: int, csv: bool) -> None:
        self.emit({"type": "result", "command": command, "op": op, "offset": offset, "bytes": count,
                   "status": "ok", "errno": 0, "elapsed_ns": ns, "elapsed": ns / 1e9})

    def failed(self, command: str, what: str, offset: int, count: int, code: int, message: str) -> None:
        self.emit({"type": "result", "command": command, "op": what, "offset": offset, "bytes": count,
                   "status": "error", "errno": code, "message": message})

    def mismatch(self, command: str, offset: int, count: int) -> None:
        self.emit({"type": "result", "command": command, "op": "verify", "offset": offset, "bytes": count,
                   "status": "mismatch", "errno": 22,
                   "message": f"Pattern verification failed at offset {offset}, {count} bytes"})

    def dump(self, command: str, buf: bytes | bytearray | memoryview, offset: int) -> None:
        self.emit({"type": "data", "command": command, "offset": offset, "bytes": len(buf),
                   "hex": bytes(buf).hex()})

    def length(self, size: int) -> None:
        self.emit({"type": "result", "command": "length", "op": "length", "offset": 0, "bytes": size,
                   "status": "ok", "errno": 0})

    def allocation(self, offset: int, count: int, allocated: int) -> None:
        self.emit({"type": "result", "command": "alloc", "op": "alloc", "offset": offset, "bytes": count,
                   "allocated_bytes": allocated, "status": "ok", "errno": 0})

    def extent(self, offset: int, count: int, allocated: bool) -> None:
        self.emit({"type": "extent", "command": "map", "offset": offset, "bytes": count, "allocated": allocated})

    def trace(self, line: str) -> None:
        name, _, text = line.rstrip("\n").partition(" ")
        self.emit({"type": "event", "event": "trace", "name": name, "text": text})

    # -- command lines ------------------------------------------------------------------------------
    def command_start(self, argv: list[str]) -> None:
        self.command = argv[0]

    def command_done(self, argv: list[str], ret: int) -> None:
        self._end_partial()
        self.emit({"type": "command", "command": argv[0], "args": argv[1:], "status": "error" if ret < 0 else "ok",
                   "errno": -ret if ret < 0 else 0,
                   **({"message": os.strerror(-ret)} if ret < 0 else {})})
        self.command = None
