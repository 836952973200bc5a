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

from qio.commands.spec import STDERR, Invocation, ParseFailure
from qio.numbers import strtol0

if TYPE_CHECKING:
    from qio.session import Session


class Break(NamedTuple):
    event: str
    tag: str


def parse_break(inv: Invocation) -> Break:
    return Break(inv.argv[1], inv.argv[2])


async def run_break(session: Session, cmd: Break) -> int:
    node = session.debug_node()
    ret = node.debug_breakpoint(cmd.event, cmd.tag) if node else -errno.ENOTSUP
    if ret < 0:
        session.out.out(f"Could not set breakpoint: {os.strerror(-ret)}\n")
    return ret


def parse_tag(inv: Invocation) -> str:
    return inv.argv[1]


parse_remove_break = parse_resume = parse_tag


async def run_remove_break(session: Session, tag: str) -> int:
    node = session.debug_node()
    ret = node.debug_remove_breakpoint(tag) if node else -errno.ENOTSUP
    await session.settle()
    if ret < 0:
        session.out.out(f"Could not remove breakpoint {tag}: {os.strerror(-ret)}\n")
    return ret


async def run_resume(session: Session, tag: str) -> int:
    node = session.debug_node()
    ret = node.debug_resume(tag) if node else -errno.ENOTSUP
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
    node = session.debug_node()
    if node is None:
        session.out.out(f"wait_break: no blkdebug node below the image, request '{cmd.tag}' can never be "
                   "suspended\n")
        return -errno.ENOTSUP
    outcome = await session.wait_for(lambda: node.debug_is_suspended(cmd.tag), cmd.timeout)
    if outcome == "ok":
        return 0
    if outcome == "timeout" and node.debug_can_suspend(cmd.tag, bool(session.aio.inflight)):
        session.out.out(f"wait_break: timed out after {cmd.timeout:g} s waiting for request '{cmd.tag}'\n")
        return -errno.ETIMEDOUT
    session.out.out(f"wait_break: no request can reach a breakpoint tagged '{cmd.tag}'\n")
    return -errno.ENOENT


async def run_debug_state(session: Session, cmd: object) -> int:
    """qio extension: what the debugger knows (qemu-io cannot show any of it)."""
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
        trace.set_sink(session.out.err)
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
