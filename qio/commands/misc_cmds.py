"""Commands that manage the image and the session: open, close, reopen, help, quit, sleep, sigraise,
abort."""

from __future__ import annotations

import errno
import os
import signal
from typing import TYPE_CHECKING, Any, NamedTuple

from qio.block.errors import QemuError
from qio.block.modes import OPEN_FLAG_OPTIONS, OpenFlags, parse_cache_mode, set_open_flag
from qio.commands.common import num
from qio.commands.spec import STDERR, CommandTable, Invocation, ParseFailure
from qio.numbers import strtol0

if TYPE_CHECKING:
    from qio.session import Session

EINVAL = -errno.EINVAL
NSIG = 65


# -- open / close / reopen -----------------------------------------------------------------------
class Open(NamedTuple):
    path: str | None
    flags: OpenFlags
    options: dict[str, Any]


def _stderr(inv: Invocation, msg: str) -> ParseFailure:
    inv.messages.append((STDERR, f"{inv.prg}: {msg}\n"))
    return ParseFailure(EINVAL, inv.messages)


def _qemuopts(inv: Invocation, text: str, into: dict[str, Any]) -> None:
    from qio.qemuopts import parse_qemuopts  # only `open -o`/`reopen -o` need it: not at start-up

    try:
        into.update(parse_qemuopts(text, lambda m: inv.messages.append((STDERR, f"{inv.prg}: warning: {m}\n"))))
    except QemuError as e:
        raise _stderr(inv, str(e)) from None


def parse_open(inv: Invocation) -> Open:
    flags = OpenFlags()
    options: dict[str, Any] = {}
    g = inv.getopt()
    for c, arg in g:
        a = arg or ""
        if c in OPEN_FLAG_OPTIONS:
            bad = set_open_flag(c, a, flags)
            if bad is not None:
                raise _stderr(inv, bad)
        elif c == "o":
            if inv.image_opts:
                raise inv.fail(EINVAL, "--image-opts and 'open -o' are mutually exclusive\n")
            _qemuopts(inv, a, options)
        else:
            raise inv.usage(EINVAL)
    args = g.args
    if inv.image_opts and len(args) == 1:
        _qemuopts(inv, args[0], options)
        args = []
    if len(args) > 1:
        raise inv.usage(EINVAL)
    return Open(args[0] if args else None, flags, options)


async def run_open(session: Session, cmd: Open) -> int:
    return EINVAL if session.open_image(cmd.path, cmd.flags, cmd.options) else 0


async def run_close(session: Session, cmd: object) -> int:
    await session.close_image()
    return 0


class Reopen(NamedTuple):
    read_only: bool | None
    cache: str | None
    options: dict[str, Any]


def parse_reopen(inv: Invocation) -> Reopen:
    ro: bool | None = None
    cache: str | None = None
    options: dict[str, Any] = {}
    g = inv.getopt()
    for c, arg in g:
        a = arg or ""
        if c == "c":
            if not parse_cache_mode(a, OpenFlags()):
                raise _stderr(inv, f"Invalid cache option: {a}")
            cache = a
        elif c == "o":
            _qemuopts(inv, a, options)
        elif c in "rw":
            if ro is not None:
                raise _stderr(inv, "Only one -r/-w option may be given")
            ro = c == "r"
        else:
            raise inv.usage(EINVAL)
    if g.args:
        raise inv.usage(EINVAL)
    return Reopen(ro, cache, options)


async def run_reopen(session: Session, cmd: Reopen) -> int:
    try:
        await session.reopen(cmd.read_only, cmd.cache, dict(cmd.options))
    except QemuError as e:
        session.out.error_report(str(e))
        return EINVAL
    return 0


# -- help / quit ---------------------------------------------------------------------------------
class Help(NamedTuple):
    word: str | None
    table: CommandTable


def parse_help(inv: Invocation) -> Help:
    return Help(inv.argv[1] if len(inv.argv) > 1 else None, inv.table)


async def run_help(session: Session, cmd: Help) -> int:
    if cmd.word is None:
        session.out.out(cmd.table.help_all(extensions=session.interactive))
        return 0
    spec = cmd.table.find(cmd.word)
    if spec is None:
        session.out.out(f"command {cmd.word} not found\n")
        return EINVAL
    session.out.out(spec.usage_line(cmd.word) + (spec.help or ""))
    return 0


async def run_quit(session: Session, cmd: object) -> int:
    session.quit = True
    return 0


# -- sleep / sigraise / abort ----------------------------------------------------------------------
def parse_sleep(inv: Invocation) -> int:
    ms = strtol0(inv.argv[1]) if inv.argv[1] else None
    if ms is None or ms < 0:
        raise inv.fail(EINVAL, f"{inv.argv[1]} is not a valid number\n")
    return ms


def sleep_ns(ms: int, now_ns: int) -> int:
    """How long qemu-io's ``sleep`` really waits: ``now + SCALE_MS * ms`` is computed in wrapping
    int64 arithmetic on the host clock and a negative deadline is clamped to 0 by ``timer_mod``, so
    a huge value returns at once instead of sleeping forever."""
    def wrap(v: int) -> int:
        return (v + 2**63) % 2**64 - 2**63

    deadline = max(wrap(now_ns + wrap(1_000_000 * ms)), 0)
    return max(deadline - now_ns, 0)


async def run_sleep(session: Session, ms: int) -> int:
    import time

    await session.sleep(sleep_ns(ms, time.time_ns()) / 1e9)
    return 0


def parse_sigraise(inv: Invocation) -> int:
    sig = num(inv, inv.argv[1])
    if sig > NSIG:
        raise inv.fail(EINVAL, f"signal argument '{inv.argv[1]}' is too large to be a valid signal\n")
    return sig


#: Signals qemu-io ignores (SIGPIPE) or blocks in its main loop (SIG_IPI=SIGUSR1, SIGIO, SIGALRM,
#: SIGBUS): raising them leaves it running.
_HARMLESS = {signal.SIGPIPE, signal.SIGUSR1, signal.SIGIO, signal.SIGALRM, signal.SIGBUS}


async def run_sigraise(session: Session, sig: int) -> int:
    session.out.flush()
    if sig == 0 or sig in _HARMLESS or not 0 < sig < signal.NSIG:
        return 0
    try:
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    try:
        signal.raise_signal(sig)
    except (OSError, ValueError):
        pass
    return 0


async def run_abort(session: Session, cmd: object) -> int:
    session.out.discard()
    signal.signal(signal.SIGABRT, signal.SIG_DFL)
    os.abort()
