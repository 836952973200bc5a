"""The blkdebug breakpoint commands: break, remove_break, resume, wait_break.

They talk to the session's debug node: the first node down the primary-child chain that implements
the debug hooks (a blkdebug node, see :func:`qio.block.backend.debug_node`).  Unlike qemu-io,
``wait_break`` never hangs: it fails at once when no request could ever be suspended under the tag,
and accepts ``-t SECONDS`` as a timeout.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, NamedTuple

from qio import ops
from qio.block.errors import QemuError
from qio.commands.spec import STDERR, Invocation, ParseFailure
from qio.numbers import strtol0

if TYPE_CHECKING:
    from qio.block.blkdebug import BlkdebugDriver
    from qio.session import Session


class Break(NamedTuple):
    event: str
    tag: str
    # qio's predicate (``break -o OFFSET[,LEN] -i IOTYPE -n NTH EVENT TAG``); None: qemu-io's plain break
    predicate: tuple[int, int, str | None, int] | None = None


def parse_break(inv: Invocation) -> Break:
    """``break EVENT TAG`` exactly as qemu-io (two words, whatever they look like), or qio's predicate
    form, recognised by its option words: then any other word count keeps qemu-io's message."""
    args = inv.argv[1:]
    if len(args) == 2:
        return Break(args[0], args[1])
    if len(args) > 2 and args[0][:2] in ("-o", "-i", "-n"):
        return _parse_predicate(inv)
    inv.messages.append((STDERR, f"bad argument count {len(args)} to {inv.argv[0]}, expected 2 arguments\n"))
    raise ParseFailure(-errno.EINVAL, inv.messages)


def _parse_predicate(inv: Invocation) -> Break:
    from qio.block.blkdebug_config import IOTYPES
    from qio.commands.common import num

    offset, length, iotype, nth = -1, 1, None, 1
    usage = "usage: break [-o OFFSET[,LEN]] [-i IOTYPE] [-n NTH] EVENT TAG\n"
    g = inv.getopt()
    for c, arg in g:
        arg = arg or ""
        if c == "o":
            off, comma, ln = arg.partition(",")
            offset = num(inv, off)
            length = num(inv, ln) if comma else 1
            if length <= 0:
                raise inv.fail(-errno.EINVAL, f"break: the length in -o {arg} must be positive\n")
        elif c == "i":
            if arg not in IOTYPES[:5]:
                raise inv.fail(-errno.EINVAL, f"break: unknown iotype '{arg}' (one of {', '.join(IOTYPES[:5])})\n")
            iotype = arg
        elif c == "n":
            v = strtol0(arg)
            if v is None or v <= 0:
                raise inv.fail(-errno.EINVAL, f"break: -n expects a positive number, not '{arg}'\n")
            nth = v
        else:
            raise inv.fail(-errno.EINVAL, usage)
    if len(g.args) != 2:
        inv.messages.append((STDERR, f"bad argument count {len(inv.argv) - 1} to {inv.argv[0]}, expected 2 "
                                     "arguments\n"))
        raise ParseFailure(-errno.EINVAL, inv.messages)
    return Break(g.args[0], g.args[1], (offset, length, iotype, nth))


async def run_break(session: Session, cmd: Break) -> int:
    ret = ops.set_breakpoint(session, cmd.event, cmd.tag, cmd.predicate)
    if ret < 0:
        session.out.out(f"Could not set breakpoint: {os.strerror(-ret)}\n")
    return ret


def parse_tag(inv: Invocation) -> str:
    return inv.argv[1]


parse_remove_break = parse_resume = parse_tag


async def run_remove_break(session: Session, tag: str) -> int:
    ret = ops.remove_breakpoint(session, tag)
    await session.settle()
    if ret < 0:
        session.out.out(f"Could not remove breakpoint {tag}: {os.strerror(-ret)}\n")
    return ret


async def run_resume(session: Session, tag: str) -> int:
    ret = ops.resume(session, tag)
    if ret < 0:
        session.out.out(f"Could not resume request: {os.strerror(-ret)}\n")
        return ret
    await session.settle()
    return 0


class WaitBreak(NamedTuple):
    tag: str
    timeout: float | None = None


def parse_wait_break(inv: Invocation) -> WaitBreak:
    """``wait_break TAG`` as in qemu-io (any word is a tag), or qio's ``wait_break -t SECONDS TAG``."""
    args = inv.argv[1:]
    if len(args) == 1:
        return WaitBreak(args[0])
    if len(args) == 3 and args[0] == "-t":
        v = strtol0(args[1])
        if v is None or v < 0:
            raise inv.fail(-errno.EINVAL, f"{args[1]} is not a valid number\n")
        return WaitBreak(args[2], float(v))
    inv.messages.append((STDERR, f"bad argument count {len(args)} to {inv.argv[0]}, expected 1 arguments\n"))
    raise ParseFailure(-errno.EINVAL, inv.messages)


async def run_wait_break(session: Session, cmd: WaitBreak) -> int:
    outcome = await ops.wait_break(session, cmd.tag, cmd.timeout)
    if outcome == "no-node":
        session.out.out(f"wait_break: no blkdebug node below the image, request '{cmd.tag}' can never be "
                        "suspended\n")
        return -errno.ENOTSUP
    if outcome == "ok":
        return 0
    if outcome == "timeout":
        session.out.out(f"wait_break: timed out after {cmd.timeout:g} s waiting for request '{cmd.tag}'\n")
        return -errno.ETIMEDOUT
    session.out.out(f"wait_break: no request can reach a breakpoint tagged '{cmd.tag}'\n")
    return -errno.ENOENT


async def run_debug_state(session: Session, cmd: object) -> int:
    """qio extension: what the debugger knows (qemu-io cannot show any of it)."""
    for export in session.exports:
        session.out.out("".join(f"{line}\n" for line in export.describe()))
    node = session.debug_node()
    if node is None:
        session.out.out("no blkdebug node below the image\n")
        return -errno.ENOTSUP
    state = getattr(node, "debug_state", None)
    lines = state() if state is not None else []
    session.out.out("".join(f"{line}\n" for line in lines))
    return 0


def parse_trace(inv: Invocation) -> str | None:
    return inv.argv[1] if len(inv.argv) > 1 else None


async def run_trace(session: Session, pattern: str | None) -> int:
    """qio extension: enable/disable trace events at run time, or list them."""
    from qio import trace

    if not trace._sink:
        trace.set_sink(session.out.trace)
    if pattern is None:
        for name, what in trace.EVENTS.items():
            mark = "on " if name in trace.enabled else "off"
            session.out.out(f"{mark} {name}: {what}\n")
        return 0
    warned: list[str] = []
    trace.enable(pattern, warned.append)
    for w in warned:
        session.out.error_report(f"warning: {w}")
    return -errno.ENOENT if warned else 0


# -- qio extensions: rules edited at the prompt (docs/blkdebug.md, "Rules at the prompt") ------------
#: command -> the configuration section whose keys it takes
RULE_COMMANDS = {"inject": "inject-error", "delay": "delay", "corrupt": "corrupt", "set_state": "set-state",
                 "bad_blocks": "bad-blocks"}


def _blkdebug(session: Session, name: str) -> BlkdebugDriver | None:
    """The blkdebug node the rule commands edit, or None after printing why there is none."""
    node = ops.blkdebug(session)
    if node is None:
        session.out.out(f"{name}: no blkdebug node below the image\n")
        return None
    return node


def parse_words(inv: Invocation) -> list[str]:
    return inv.argv


parse_inject = parse_delay = parse_corrupt = parse_set_state = parse_bad_blocks = parse_words
parse_rules = parse_unrule = parse_words


async def _add_rule(session: Session, argv: list[str]) -> int:
    """``inject``/``delay``/``corrupt``/``set_state KEY=VALUE...``: add a rule as a config section would."""
    name = argv[0]
    node = _blkdebug(session, name)
    if node is None:
        return -errno.ENOTSUP
    group = RULE_COMMANDS[name]
    try:
        rule = ops.add_rule(node, group, argv[1:])
    except QemuError as e:
        session.out.out(f"{name}: {e}\n")
        return -errno.EINVAL
    session.out.out(f"rule {rule.describe()}\n")
    return 0


run_inject = run_delay = run_corrupt = run_set_state = run_bad_blocks = _add_rule


async def run_rules(session: Session, argv: list[str]) -> int:
    """``rules``: every rule and breakpoint with its id, conditions and counters."""
    node = _blkdebug(session, "rules")
    if node is None:
        return -errno.ENOTSUP
    found = ops.rules(node)
    session.out.out("".join(f"{line}\n" for line in found) if found else "no rules\n")
    return 0


async def run_unrule(session: Session, argv: list[str]) -> int:
    """``unrule ID``: delete one rule (or breakpoint) by the id ``rules`` shows (``#3`` or ``3``)."""
    node = _blkdebug(session, "unrule")
    if node is None:
        return -errno.ENOTSUP
    word = argv[1].removeprefix("#")
    rule_id = strtol0(word)
    if rule_id is None or rule_id <= 0:
        session.out.out(f"unrule: '{argv[1]}' is not a rule id\n")
        return -errno.EINVAL
    if not ops.remove_rule(node, rule_id):
        session.out.out(f"unrule: no rule #{rule_id}\n")
        return -errno.ENOENT
    return 0


# -- qio extensions: the pause gate -----------------------------------------------------------------
async def run_pause(session: Session, cmd: object) -> int:
    """``pause``: hold new requests at the top of the graph, let those in flight finish, say so."""
    from qio.block.backend import PauseGate

    blk = session.require_blk()
    if blk.gate is not None:
        session.out.out("pause: already paused\n")
        return -errno.EALREADY
    blk.gate = PauseGate()
    await session.drain("pause")
    session.out.out("pause: quiet, no request in flight\n")
    return 0


async def run_unpause(session: Session, cmd: object) -> int:
    """``unpause``: the held requests go on in the order they were submitted."""
    blk = session.require_blk()
    gate = blk.gate
    if gate is None:
        session.out.out("unpause: not paused\n")
        return -errno.EINVAL
    blk.gate = None
    n = gate.release()
    session.out.out(f"unpause: {n} request(s) released\n")
    return 0
