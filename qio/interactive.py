"""The interactive prompt (only when stdin is a terminal): prompt_toolkit with history and completion.

Completions of asynchronous requests print above the prompt while it waits for input, as qemu-io's
own readline does.  History lives in ``$XDG_STATE_HOME/qio/history``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.lexers import Lexer
from prompt_toolkit.patch_stdout import patch_stdout

from qio.commands import record_cmds
from qio.shell import split_words

if TYPE_CHECKING:
    from qio.commands.spec import CommandTable
    from qio.session import Session
    from qio.shell import Shell


def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "qio" / "history"


#: Values of the options that take one, per command (``-t``/``-c`` cache, ``-d`` discard, ...).
CACHE_MODES = {"none": "O_DIRECT, write cache on", "off": "same as none",
               "writeback": "host page cache, write cache on",
               "writethrough": "host page cache, every write flushed (default)",
               "directsync": "O_DIRECT, every write flushed", "unsafe": "flushes ignored"}
DISCARD_MODES = {"unmap": "discard punches holes (default)", "on": "same as unmap",
                 "ignore": "discard does nothing", "off": "same as ignore"}
PREALLOC_MODES = {"off": "no preallocation (default)", "metadata": "qcow2 metadata only",
                  "falloc": "posix_fallocate", "full": "write zeroes"}
AIO_MODES = {"threads": "thread pool (default)", "native": "Linux AIO (needs -n)", "io_uring": "io_uring"}
OPTION_VALUES: dict[tuple[str, str], dict[str, str]] = {
    ("open", "-t"): CACHE_MODES, ("reopen", "-c"): CACHE_MODES, ("open", "-d"): DISCARD_MODES,
    ("truncate", "-m"): PREALLOC_MODES, ("open", "-i"): AIO_MODES,
}
#: Options every node takes (``-o`` keys), with what they mean.
GENERIC_KEYS = {"driver": "the node's driver", "node-name": "name of the node", "read-only": "on/off",
                "cache.direct": "O_DIRECT on/off", "cache.no-flush": "ignore flushes on/off",
                "discard": "unmap/ignore", "detect-zeroes": "off/on/unmap", "force-share": "on/off",
                "auto-read-only": "on/off"}
DRIVERS = {"raw": "format: the bytes as they are", "qcow2": "format: QEMU copy-on-write v2",
           "file": "protocol: a host file", "blkdebug": "filter: error injection and breakpoints",
           "null-co": "protocol: stores nothing (size, latency-ns)", "null-aio": "protocol: null-co via callbacks",
           "nbd": "protocol: an NBD export", "host_device": "protocol: a host block device"}


class CommandCompleter(Completer):
    """Context completion from the command table and the live session: command names (with their
    one-line help), option letters, option values, blkdebug event names and tags, ``-o`` keys, paths."""

    def __init__(self, table: CommandTable, sh: Session | None = None) -> None:
        self.table = table
        self.sh = sh
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split(" ")
        cur = words[-1]
        if len(words) == 1:
            for w in self.table.words():
                if w.startswith(cur):
                    spec = self.table.find(w)
                    yield Completion(w, -len(cur), display_meta=spec.oneline if spec else "")
            return
        spec = self.table.find(words[0])
        if spec is None:
            return
        args = [w for w in words[1:-1] if w]
        prev = words[-2] if len(words) >= 2 else ""
        values = OPTION_VALUES.get((spec.name, prev))
        if values is not None:
            yield from _from(values, cur)
        elif prev == "-o" and spec.name in ("open", "reopen"):
            yield from self._option_keys(spec.name, cur)
        elif prev == "-s" and spec.name == "write":
            yield from self.paths.get_completions(Document(cur), event)
        elif cur.startswith("-") and spec.name != "trace":
            for opt in spec.options():
                if opt.startswith(cur):
                    yield Completion(opt, -len(cur))
        elif spec.name == "open":
            yield from self.paths.get_completions(Document(cur), event)
        elif spec.name == "help" and not args:
            for w in self.table.words():
                if w.startswith(cur):
                    found = self.table.find(w)
                    yield Completion(w, -len(cur), display_meta=found.oneline if found else "")
        elif spec.name == "break" and not [a for a in args if not a.startswith("-")]:
            yield from _events(cur)
        elif spec.name == "trace" and not args and cur != "-":
            sign = "-" if cur.startswith("-") else ""
            for c in _events(cur[len(sign):]):
                yield Completion(sign + c.text, -len(cur), display=c.display, display_meta=c.display_meta)
        elif spec.name in ("resume", "wait_break", "remove_break") and not [a for a in args if a[:1] != "-"]:
            yield from self._tags(cur)
        elif spec.name in _RULE_SECTIONS and "=" not in cur:  # qio's rule commands: their section's keys
            from qio.block.blkdebug_config import rule_keys

            for key in rule_keys(_RULE_SECTIONS[spec.name]):
                if key.startswith(cur):
                    yield Completion(key + "=", -len(cur))

    def _tags(self, cur: str) -> Iterable[Completion]:
        """Suspended requests first, then armed breakpoints (a request may still stop there)."""
        suspended, armed = session_tags(self.sh)
        seen = set()
        for tag in suspended:
            if tag.startswith(cur) and tag not in seen:
                seen.add(tag)
                yield Completion(tag, -len(cur), display_meta="suspended")
        for tag, ev in armed:
            if tag.startswith(cur) and tag not in seen:
                seen.add(tag)
                yield Completion(tag, -len(cur), display_meta=f"armed at {ev}")

    def _option_keys(self, cmd: str, cur: str) -> Iterable[Completion]:
        """``-o key=value,key=...``: keys of the open image's driver chain (or of the driver named so far)."""
        head, comma, part = cur.rpartition(",")
        prefix = head + comma
        key, eq, val = part.partition("=")
        if eq:
            if key == "driver" or key.endswith(".driver"):
                for name, meta in DRIVERS.items():
                    if name.startswith(val):
                        yield Completion(f"{prefix}{key}={name}", -len(cur), display=name, display_meta=meta)
            return
        keys = dict(GENERIC_KEYS)
        for dotted, meta in chain_keys(self.sh, cmd, cur).items():
            keys.setdefault(dotted, meta)
        for k, meta in sorted(keys.items()):
            if k.startswith(key):
                yield Completion(f"{prefix}{k}=", -len(cur), display=k, display_meta=meta)


#: qio's rule commands and the configuration section whose keys they take (docs/blkdebug.md)
_RULE_SECTIONS = {"inject": "inject-error", "delay": "delay", "corrupt": "corrupt", "set_state": "set-state",
                  "bad_blocks": "bad-blocks"}


def _from(values: dict[str, str], cur: str) -> Iterable[Completion]:
    for v, meta in values.items():
        if v.startswith(cur):
            yield Completion(v, -len(cur), display_meta=meta)


def _events(cur: str) -> Iterable[Completion]:
    from qio.block.events import Event

    for ev in Event:
        if ev.value.startswith(cur):
            yield Completion(ev.value, -len(cur), display_meta="blkdebug event")


def _nodes(sh: Session | None) -> list[Any]:
    """The open image's nodes along primary children (format, filters, protocol)."""
    if sh is None or sh.blk is None:
        return []
    out = []
    node: Any = sh.blk.root
    while node is not None:
        out.append(node)
        node = node.primary_child()
    return out


def chain_keys(sh: Session | None, cmd: str, cur: str) -> dict[str, str]:
    """Options of the drivers in the chain: the open image's for ``reopen``; for ``open``, those of a
    ``driver=`` already typed (else of the usual ones)."""
    from qio.block import registry

    keys: dict[str, str] = {}
    if cmd == "reopen":
        prefix = ""
        for node in _nodes(sh):
            for k in sorted(type(node).runtime_opts):
                keys[prefix + k] = f"{node.format_name} option"
            child = next((c.name for c in node.children if c.role_primary), None)
            if child is None:
                break
            prefix += child + "."
        return keys
    named = [p.partition("=")[2] for p in cur.split(",") if p.startswith("driver=")]
    for name in named or ["raw", "file"]:
        cls = registry.find(name)
        if cls is not None:
            for k in sorted(cls.runtime_opts):
                keys[k if named or name == "raw" else "file." + k] = f"{name} option"
    return keys


def session_tags(sh: Session | None) -> tuple[list[str], list[tuple[str, str]]]:
    """(suspended tags, [(armed tag, event)]) of the image's blkdebug node."""
    if sh is None or sh.blk is None:
        return [], []
    node = sh.debug_node()
    if node is None:
        return [], []
    from qio.block.blkdebug import SUSPEND

    armed = []
    for rules in getattr(node, "rules", {}).values():
        for rule in rules:
            if rule.action == SUSPEND:
                armed.append((rule.tag, rule.event.value))
    return list(node.debug_suspended_tags()), armed


class SafeFileHistory(FileHistory):
    """A history file that cannot be read or written (a directory, a read-only place) costs one warning;
    the prompt then keeps this session's history in memory instead of failing at every line."""

    def __init__(self, filename: str, warn: Callable[[str], None]) -> None:
        super().__init__(filename)
        self._warn = warn
        self._failed = False

    def _fail(self, e: OSError) -> None:
        if not self._failed:
            self._failed = True
            self._warn(f"history file '{self.filename!s}' is not usable ({os.strerror(e.errno or 0)}); "
                       "history is kept for this session only")

    def check(self) -> None:
        """Find an unusable file before the first prompt, so the warning comes before it."""
        try:
            with open(self.filename, "ab"):
                pass
        except OSError as e:
            self._fail(e)

    def load_history_strings(self) -> Iterable[str]:
        if self._failed:
            return []
        try:
            return list(super().load_history_strings())
        except OSError as e:
            self._fail(e)
            return []

    def store_string(self, string: str) -> None:
        if self._failed:
            return
        try:
            super().store_string(string)
        except OSError as e:
            self._fail(e)


class _State:
    """What the key bindings and the loop share."""

    def __init__(self) -> None:
        self.toolbar = os.environ.get("TERM", "") != "dumb"
        self.last_empty_ctrl_c = -10.0
        self.ctrl_c_on_empty = False


QUIT_HINT = "(to leave qio, type quit or press Ctrl-D at an empty prompt)"


def make_session(sh: Shell, history: History | None = None, **kw: object) -> PromptSession[str]:
    if history is None:
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = SafeFileHistory(str(path), sh.out.warn_report)
            history.check()
        except OSError as e:
            sh.out.warn_report(f"history file '{path}' is not usable ({os.strerror(e.errno or 0)}); "
                               "history is kept for this session only")
            history = InMemoryHistory()
    from prompt_toolkit.auto_suggest import AutoSuggestFromHistory

    state = _State()
    color = "NO_COLOR" not in os.environ and os.environ.get("TERM", "") != "dumb"
    toolbar = StatusLine(sh)
    session: PromptSession[str] = PromptSession(
        completer=CommandCompleter(sh.table, sh.session), history=history, complete_while_typing=False,
        auto_suggest=AutoSuggestFromHistory(), key_bindings=_bindings(state, toolbar),
        bottom_toolbar=toolbar if state.toolbar else None, lexer=CommandLexer(sh.table) if color else None,
        **kw)  # type: ignore[arg-type]
    session.qio_state = state  # type: ignore[attr-defined]
    # A terminal that does not answer cursor-position requests costs no warning text on the screen.
    session.app.renderer.cpr_not_supported_callback = None
    return session


def _bindings(state: _State, toolbar: StatusLine) -> Any:
    from prompt_toolkit.completion import get_common_complete_suffix
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("tab")
    def _(event: Any) -> None:
        """readline's TAB: a single match is inserted with its trailing space; several insert their
        common prefix and open the menu (with descriptions); TAB again walks the menu."""
        buf = event.current_buffer
        if buf.complete_state:
            buf.complete_next()
            return
        doc = buf.document
        comps = list(buf.completer.get_completions(doc, CompleteEvent(completion_requested=True)))
        if not comps:
            return
        if len(comps) == 1:
            c = comps[0]
            buf.apply_completion(c)
            if not c.text.endswith(("/", "=", ",")):
                buf.insert_text(" ")
            return
        common = get_common_complete_suffix(doc, comps)
        if common:
            buf.insert_text(common)
        buf.start_completion(select_first=False)

    @kb.add("c-c")
    def _(event: Any) -> None:
        state.ctrl_c_on_empty = not event.current_buffer.text
        event.app.exit(exception=KeyboardInterrupt())

    @kb.add("f2")
    def _(event: Any) -> None:
        """F2 shows or hides the status line."""
        state.toolbar = not state.toolbar
        session = getattr(event.app, "qio_session", None)
        if session is not None:
            session.bottom_toolbar = toolbar if state.toolbar else None

    return kb


class StatusLine:
    """The bottom toolbar: what is open and through which drivers, requests in flight, suspended and
    armed blkdebug tags; while a line is typed, what qemu-io would say about it (unknown command,
    argument count)."""

    def __init__(self, sh: Shell) -> None:
        self.sh = sh

    def __call__(self) -> Any:
        from prompt_toolkit.application import get_app_or_none

        app = get_app_or_none()
        line = app.current_buffer.text if app is not None else ""
        problem = check_line(self.sh.table, line)
        if problem:
            return [("class:bottom-toolbar.error", f" {problem} ")]
        return status_text(self.sh.session)


def status_text(sh: Session) -> str:
    """``qcow2 > blkdebug > file  t.qcow2  rw writeback  in flight 1  suspended A  armed B``."""
    if sh.blk is None:
        return " no image open (open PATH)   F2: hide"
    nodes = _nodes(sh)
    chain = " > ".join(n.format_name for n in nodes)
    fn = nodes[-1].filename if nodes else ""
    name = os.path.basename(fn) or fn
    f = sh.blk.flags
    mode = "ro" if f.read_only else "rw"
    cache = ("unsafe" if f.no_flush else "directsync" if f.nocache and f.writethrough else
             "none" if f.nocache else "writethrough" if sh.blk.writethrough else "writeback")
    parts = [chain, name, f"{mode} {cache}", f"in flight {len(sh.aio.inflight)}"]
    suspended, armed = session_tags(sh)
    if suspended:
        parts.append("suspended " + " ".join(suspended))
    if armed:
        parts.append("armed " + " ".join(f"{t}@{e}" for t, e in armed))
    for export in sh.exports:  # qio's NBD server: its clients and what they have in flight
        n = len(export.clients)
        busy = sum(c.pending for c in export.clients)
        where = os.path.basename(export.address) if export.address.startswith("unix:") else export.address
        parts.append(f"nbd {where} {n} client{'s' if n != 1 else ''}" + (f" ({busy} req)" if busy else ""))
    return " " + "  ".join(p for p in parts if p) + "   F2: hide"


def check_line(table: CommandTable, line: str) -> str:
    """What qemu-io would reject in ``line`` as typed so far ('' if nothing, or not yet known)."""
    words = split_words(line)
    if not words:
        return ""
    spec = table.find(words[0])
    if spec is None:
        if len(words) > 1 or line.endswith(" ") or not any(w.startswith(words[0]) for w in table.words()):
            return f'command "{words[0]}" not found'
        return ""
    argc = len(words) - 1
    if spec.argmax != -1 and argc > spec.argmax:
        return f"bad argument count {argc} to {words[0]}, expected at most {spec.argmax} arguments"
    if argc < spec.argmin and spec.argmin > 0:
        return f"{words[0]}: {spec.argmin - argc} more argument(s): {spec.args or ''}"
    return ""


class CommandLexer(Lexer):
    """Colours the line: the command (red if unknown), options, numbers."""

    def __init__(self, table: CommandTable) -> None:
        self.table = table

    def lex_document(self, document: Document) -> Callable[[int], Any]:
        import re

        def line(i: int) -> list[tuple[str, str]]:
            text = document.lines[i]
            out: list[tuple[str, str]] = []
            first = True
            for tok in re.split(r"( +)", text):
                if not tok or tok.isspace():
                    out.append(("", tok))
                    continue
                if first:
                    known = self.table.find(tok) is not None
                    typing = not known and not text[len(tok):] and any(w.startswith(tok) for w in self.table.words())
                    out.append(("ansigreen bold" if known else "" if typing else "ansired", tok))
                    first = False
                elif tok.startswith("-") and len(tok) == 2:
                    out.append(("ansicyan", tok))
                elif re.fullmatch(r"(0[xX][0-9a-fA-F]+|[0-9]+[kKmMgGtTpPeEbB]?)", tok):
                    out.append(("ansiyellow", tok))
                else:
                    out.append(("", tok))
            return out

        return line


def _quiet_tty() -> Any:
    """While a command runs, lines typed ahead stay in the terminal's line buffer unechoed: the next
    prompt shows and runs them in order (with echo on they would be printed in the middle of the
    command's output)."""
    import contextlib

    @contextlib.contextmanager
    def quiet() -> Any:
        try:
            import termios

            fd = sys.stdin.fileno()
            old = termios.tcgetattr(fd)
        except (ImportError, OSError, ValueError):
            yield
            return
        new = list(old)
        new[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, new)
        try:
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, old)

    return quiet()


async def _run_command(sh: Shell, line: str, state: _State) -> None:
    """Run one line; Ctrl-C interrupts the wait (not the requests, which run on and report later); a
    command that takes longer than half a second shows a progress line until it ends."""
    import signal
    import time

    rec = record_cmds.active(sh.session)
    if rec is not None and line.split(" ")[0:1] != ["record"] and line.strip():
        rec.command(line)
    loop = asyncio.get_running_loop()
    tty = os.isatty(1)
    progress = Progress(sh, line) if tty and os.environ.get("TERM", "") != "dumb" else None
    if progress is not None and progress.meter is not None:
        # the command's requests (and their sub-requests) run in a copy of this context
        import contextvars

        from qio.block.io import progress_meter

        ctx = contextvars.copy_context()
        ctx.run(progress_meter.set, progress.meter)
        task = loop.create_task(sh.execute(line), context=ctx)
    else:
        task = asyncio.ensure_future(sh.execute(line))
    interrupts: list[float] = []

    def on_sigint() -> None:
        now = time.monotonic()
        if interrupts and now - interrupts[-1] < 2:
            sh.out.out(f"\n{QUIT_HINT}\n")
        interrupts.append(now)
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        installed = True
    except (RuntimeError, ValueError, NotImplementedError):
        installed = False
    # While no prompt is up, output goes straight to the terminal (patch_stdout's proxy would queue it
    # and could print it after the next prompt).
    if tty:
        sh.out.restore()
        sh.out.redirect(_direct(1), _direct(2))
    try:
        with _quiet_tty():
            start = time.monotonic()
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.5 if progress is None or not progress.shown else 0.2)
                if not done and progress is not None:
                    progress.show(time.monotonic() - start)
            if progress is not None:
                progress.clear()
                if progress in _progress:
                    _progress.remove(progress)
            try:
                task.result()
            except asyncio.CancelledError:
                state.last_empty_ctrl_c = time.monotonic()  # another Ctrl-C soon: say how to leave
                sh.last_error = -4  # EINTR
                left = len(sh.session.aio.inflight)
                sh.out.out(f"^C\ninterrupted: {line}" + (f" ({left} request(s) still in flight; their completions "
                                                          "print when they finish)" if left else "") + "\n")
    finally:
        if tty:
            sh.out.restore()
            sh.out.redirect(_writer(sys.stdout), _writer(sys.stderr))
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


class Progress:
    """The live line of a long command: what runs, how many of the bytes it asked for are done (its
    sub-requests that completed, see :class:`qio.block.io.Meter`), the rate, the time so far, and the
    ``aio_*`` requests in flight."""

    def __init__(self, sh: Shell, line: str) -> None:
        self.sh = sh
        self.line = line
        self.shown = False
        words = line.split()
        spec = sh.table.find(words[0]) if words else None
        self.total = _request_bytes(words, spec.optstring if spec is not None else "")
        blk = sh.session.blk
        if self.total and blk is not None:
            from qio.block.io import Meter

            self.meter: Meter | None = Meter(blk.root)
        else:
            self.meter = None

    def text(self, elapsed: float) -> str:
        """The line's text after ``elapsed`` seconds."""
        from qio import render

        parts = [f"{self.line}:"]
        if self.meter is not None:
            done = min(self.meter.done, self.total)
            parts.append(f"{render.cvtstr(done)} of {render.cvtstr(self.total)},"
                         f" {render.cvtstr(done / elapsed if elapsed > 0 else 0)}/s,")
        parts.append(f"running {elapsed:.1f} s")
        inflight = len(self.sh.session.aio.inflight)
        return " ".join(parts) + (f", {inflight} aio in flight" if inflight else "")

    def show(self, elapsed: float) -> None:
        os.write(1, f"\r\x1b[2K\x1b[7m{self.text(elapsed)}\x1b[0m".encode())
        self.shown = True
        if self not in _progress:
            _progress.append(self)

    def clear(self) -> None:
        if self.shown:
            self.shown = False
            os.write(1, b"\r\x1b[2K")


def _request_bytes(words: list[str], optstring: str = "") -> int:
    """The bytes a read/write-like line asks for (its length operands), 0 if unknown.  ``optstring``
    is the command's getopt string: the argument of an option that takes one (``-P 0x14``) is not an
    operand."""
    from qio.numbers import cvtnum

    if words[:1] == [] or words[0] not in ("read", "r", "write", "w", "readv", "writev", "discard", "d"):
        return 0
    ops: list[str] = []
    it = iter(words[1:])
    for w in it:
        if len(w) > 1 and w[0] == "-" and not ops:
            for k, c in enumerate(w[1:], 1):
                if optstring[optstring.find(c) + 1 : optstring.find(c) + 2] == ":" and c in optstring:
                    if k == len(w) - 1:
                        next(it, None)  # the argument is the next word
                    break
        else:
            ops.append(w)
    if len(ops) < 2:
        return 0
    total = 0
    for w in ops[1:]:
        err, v, _ = cvtnum(w)
        if err:
            return 0
        total += v
    return total


async def interactive_loop(sh: Shell, session: PromptSession[str] | None = None) -> None:
    """Read commands at a ``prgname>`` prompt until EOF (Ctrl-D) or ``quit``."""
    session = session or make_session(sh)
    session.app.qio_session = session  # type: ignore[attr-defined]
    state: _State = getattr(session, "qio_state", None) or _State()
    sh.session.interactive = True
    prompt = f"{sh.prgname}> "

    async def background() -> None:
        from prompt_toolkit.application import get_app_or_none

        aio = sh.session.aio
        while True:
            if aio.flush_pending():  # write-through: the group commit that lets completions report
                aio.run_flushes()
            await aio.wait()
            await aio.poll()
            sh.out.flush()
            app = get_app_or_none()
            if app is not None and app.is_running:
                app.invalidate()  # the status line follows requests in flight

    with patch_stdout(raw=True):
        sh.out.redirect(_writer(sys.stdout), _writer(sys.stderr))
        poller = asyncio.ensure_future(background())
        try:
            while not sh.session.quit:
                if sh.session.aio.flush_pending():
                    sh.session.aio.run_flushes()
                await sh.session.aio.poll()
                sh.out.flush()
                try:
                    line = await session.prompt_async(prompt)
                except KeyboardInterrupt:
                    import time

                    now = time.monotonic()
                    if state.ctrl_c_on_empty and now - state.last_empty_ctrl_c < 3:
                        sh.out.out(QUIT_HINT + "\n")
                    state.last_empty_ctrl_c = now if state.ctrl_c_on_empty else -10.0
                    continue
                except EOFError:
                    sh.out.out("\n")
                    break
                await _run_command(sh, line, state)
                sh.out.flush()
        finally:
            poller.cancel()
            sh.out.restore()
            rec = record_cmds.active(sh.session)
            if rec is not None:  # leaving qio ends the recording (the files are complete)
                record_cmds.record(sh.session, ["stop"])


def _direct(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        for p in _progress:
            p.clear()
        record_cmds.output(data)
        while data:
            data = data[os.write(fd, data):]

    return write


#: The progress line on the screen, if any: output clears it first.
_progress: list[Progress] = []


def _writer(stream: TextIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        for p in _progress:
            p.clear()
        record_cmds.output(data)
        stream.write(data.decode("utf-8", "surrogateescape"))
        stream.flush()

    return write
