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
from typing import TYPE_CHECKING, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout

if TYPE_CHECKING:
    from qio.commands.spec import CommandTable
    from qio.shell import Shell


def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "qio" / "history"


class CommandCompleter(Completer):
    """Completes command names and aliases, then the options of the command from the table."""

    def __init__(self, table: CommandTable) -> None:
        self.table = table
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split(" ")
        if len(words) == 1:
            for w in self.table.words():
                if w.startswith(words[0]):
                    yield Completion(w, -len(words[0]))
            return
        spec = self.table.find(words[0])
        if spec is None:
            return
        cur = words[-1]
        if cur.startswith("-"):
            for opt in spec.options():
                if opt.startswith(cur):
                    yield Completion(opt, -len(cur))
        elif spec.name == "open":
            yield from self.paths.get_completions(Document(cur), event)
        elif spec.name == "help":
            for w in self.table.words():
                if w.startswith(cur):
                    yield Completion(w, -len(cur))
        elif spec.name in _RULE_SECTIONS and "=" not in cur:  # qio's rule commands: their section's keys
            from qio.block.blkdebug_config import rule_keys

            for key in rule_keys(_RULE_SECTIONS[spec.name]):
                if key.startswith(cur):
                    yield Completion(key + "=", -len(cur))


#: qio's rule commands and the configuration section whose keys they take (docs/blkdebug.md)
_RULE_SECTIONS = {"inject": "inject-error", "delay": "delay", "corrupt": "corrupt", "set_state": "set-state"}


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
    return PromptSession(completer=CommandCompleter(sh.table), history=history,
                         complete_while_typing=False, **kw)  # type: ignore[arg-type]


async def interactive_loop(sh: Shell, session: PromptSession[str] | None = None) -> None:
    """Read commands at a ``prgname>`` prompt until EOF (Ctrl-D) or ``quit``."""
    session = session or make_session(sh)
    sh.session.interactive = True
    prompt = f"{sh.prgname}> "

    async def background() -> None:
        while True:
            await sh.session.aio.wait()
            await sh.session.aio.poll()
            sh.out.flush()

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
                    continue
                except EOFError:
                    sh.out.out("\n")
                    break
                await sh.execute(line)
                sh.out.flush()
        finally:
            poller.cancel()
            sh.out.restore()


def _writer(stream: TextIO) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data.decode("utf-8", "surrogateescape"))
        stream.flush()

    return write
