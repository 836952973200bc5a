"""The command table: every command is declared once, here, as data.

Dispatch (name/alias lookup, the "no file open" and argument-count checks, permission requests),
``help``, usage lines and interactive completion are all derived from these declarations.  Each
command has a parser that turns its words into a typed command object (or a :class:`ParseFailure`
carrying qemu-io's messages) and an executor that runs it on a :class:`~qio.session.Session`;
rendering of results lives in :mod:`qio.render`.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from qio.getopt import GetOpt

if TYPE_CHECKING:
    from qio.session import Session

GLOBAL = 1  # works without an image, before any check (help, quit)
NOFILE_OK = 2  # works without an image (open, sleep, sigraise, abort)
EXTENSION = 4  # qio's own command: listed by ``help`` only at a terminal, so piped output stays qemu-io's
#: Does no work before its first poll or its return (submits, changes blkdebug state, drains, waits for a
#: breakpoint): a shorter step of the simulated clock (docs/architecture.md, rule 8).
QUICK = 8

STDOUT, STDERR = 1, 2
Message = tuple[int, str]


class ParseFailure(Exception):
    """A command line that qemu-io rejects: the messages to print and the (negative) return value."""

    def __init__(self, ret: int, messages: list[Message]) -> None:
        super().__init__(ret)
        self.ret = ret
        self.messages = messages


#: A command's parser: its words to a typed command (None: the command takes its words as they are).
Parser = Callable[["Invocation"], Any]
#: A command's executor: runs the parsed command on the session, returns 0 or a negative errno.
Runner = Callable[["Session", Any], Awaitable[int]]


class CommandSpec(NamedTuple):
    """One command: its declaration, its parser and its executor."""

    name: str
    oneline: str
    parse: Parser | None
    run: Runner
    altname: str | None = None
    args: str | None = None
    help: str | None = None
    argmin: int = 0
    argmax: int = 0
    optstring: str = ""
    flags: int = 0
    perm: int = 0
    #: A parser of the command's commonest lines only (``aio_write -q OFF LEN``): the command ``parse``
    #: would return, or None to leave the line to ``parse``.  Used with ``run_now``.
    fast: Callable[[list[str]], Any] | None = None
    #: The executor for commands that never wait (the same steps as ``run``, as a plain call).
    run_now: Callable[[Session, Any], int] | None = None

    def usage_line(self, word: str | None = None) -> str:
        """``help_oneline``: ``name args -- oneline`` (``map`` has empty args, hence two spaces)."""
        args = f"{self.args} " if self.args is not None else ""
        return f"{word or self.name} {args}-- {self.oneline}\n"

    def options(self) -> list[str]:
        """Option letters for completion, e.g. ``['-C', '-P', ...]``."""
        return [f"-{c}" for c in self.optstring if c != ":"]


_FLAG_LETTERS: dict[str, frozenset[str]] = {}


def _flag_letters(optstring: str) -> frozenset[str]:
    """The option letters of ``optstring`` that take no argument (as :meth:`GetOpt._has_arg` reads it)."""
    letters = _FLAG_LETTERS.get(optstring)
    if letters is None:
        letters = frozenset(c for c in optstring
                            if c != ":" and optstring[optstring.find(c) + 1 : optstring.find(c) + 2] != ":")
        _FLAG_LETTERS[optstring] = letters
    return letters


def _flags_only(argv: list[str], optstring: str, convert: dict[str, Callable[[str], Any] | None],
                found: dict[str, Any]) -> list[str] | None:
    """getopt's result for the common line whose options are all plain flags the command handles
    (``aio_write -q 0 4k``), without running getopt: the flags in order into ``found``, the other words
    (permuted, as GNU getopt does) returned.  None for anything else (``--``, an option argument, an
    unknown or converted letter, which may print or fail): :class:`GetOpt` decides those.

    Each request line of a long piped script pays for its parsing, so this is on the hot path."""
    args: list[str] = []
    flags: frozenset[str] | None = None
    for a in argv[1:]:
        if len(a) > 1 and a[0] == "-":
            if flags is None:
                flags = _flag_letters(optstring)
            for c in a[1:]:
                if c not in flags or c not in convert or convert[c] is not None:
                    return None
                found[c] = True
        else:
            args.append(a)
    return args


class Invocation:
    """The words of one command line, with getopt and qemu-io's error conventions."""

    def __init__(self, spec: CommandSpec, argv: list[str], prg: str, table: CommandTable,
                 image_opts: bool = False) -> None:
        self.spec = spec
        self.argv = argv
        self.prg = prg
        #: The table the command was found in (``help`` lists it).
        self.table = table
        self.image_opts = image_opts
        self.messages: list[Message] = []

    def getopt(self) -> GetOpt:
        return GetOpt(self.argv, self.spec.optstring, lambda text: self.messages.append((STDERR, text)))

    def options(self, convert: dict[str, Callable[[str], Any] | None]) -> tuple[dict[str, Any], list[str]]:
        """getopt over the command's option string: ``{letter: value}`` and the positional words.

        A letter mapped to None is a flag (True); otherwise its argument is converted at once, in
        command-line order, as qemu-io converts it inside its getopt loop (so ``-P x -s y`` reports the
        bad pattern first).  A letter the command does not handle prints the usage line.
        """
        found: dict[str, Any] = {}
        args = _flags_only(self.argv, self.spec.optstring, convert, found)
        if args is not None:
            return found, args
        found.clear()
        g = self.getopt()
        for c, arg in g:
            if c not in convert:
                raise self.usage(-errno.EINVAL)
            conv = convert[c]
            found[c] = True if conv is None else conv(arg or "")
        return found, g.args

    def fail(self, ret: int, text: str | None = None) -> ParseFailure:
        """A failure with an optional stdout message, after any getopt messages so far."""
        if text is not None:
            self.messages.append((STDOUT, text))
        return ParseFailure(ret, self.messages)

    def usage(self, ret: int) -> ParseFailure:
        self.messages.append((STDOUT, self.spec.usage_line()))
        return ParseFailure(ret, self.messages)


class CommandTable:
    """Commands by name and alias; iteration is in ``help`` order (sorted by name)."""

    def __init__(self) -> None:
        self._by_name: dict[str, CommandSpec] = {}
        self._lookup: dict[str, CommandSpec] = {}

    def add(self, spec: CommandSpec) -> None:
        self._by_name[spec.name] = spec
        self._lookup[spec.name] = spec
        if spec.altname:
            self._lookup[spec.altname] = spec

    def find(self, word: str) -> CommandSpec | None:
        return self._lookup.get(word)

    def __iter__(self) -> Any:
        return iter(sorted(self._by_name.values(), key=lambda s: s.name.encode()))

    def words(self) -> list[str]:
        """Every name and alias, for completion."""
        return sorted(self._lookup)

    def help_all(self, extensions: bool = False) -> str:
        text = "".join(s.usage_line() for s in self if not s.flags & EXTENSION)
        if extensions:
            text += "\nqio extensions:\n" + "".join(s.usage_line() for s in self if s.flags & EXTENSION)
        return text + "\nUse 'help commandname' for extended help.\n"
