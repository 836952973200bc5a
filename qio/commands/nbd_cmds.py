"""qio's NBD server commands (no qemu-io counterpart): ``nbd_server_start`` and ``nbd_server_stop``.

The export serves the open image while commands go on: client requests are the session's AIO
requests, so breakpoints, rules and ``trace`` apply to them (see :mod:`qio.nbd_server`).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, NamedTuple

from qio.block.errors import QemuError
from qio.commands.spec import Invocation

if TYPE_CHECKING:
    from qio.session import Session


class Start(NamedTuple):
    address: str
    name: str
    writable: bool


def parse_nbd_server_start(inv: Invocation) -> Start:
    o, args = inv.options({"n": str, "r": None})
    if len(args) != 1:
        raise inv.usage(-errno.EINVAL)
    return Start(args[0], o.get("n", ""), "r" not in o)


async def run_nbd_server_start(session: Session, cmd: Start) -> int:
    from qio.nbd_server import Export

    blk = session.require_blk()
    if session.exports:
        session.out.error_report("an NBD server is already running; stop it with nbd_server_stop")
        return -errno.EBUSY
    export = Export(session.aio, lambda: session.blk, cmd.name, cmd.writable and not blk.flags.read_only,
                    session.nbd_faults)
    try:
        await export.start(cmd.address)
    except QemuError as e:
        session.out.error_report(str(e))
        return -e.errno
    session.exports.append(export)
    mode = "read-write" if export.writable else "read-only"
    session.out.out(f"NBD server listening on {export.address}, export '{export.name}' ({mode})\n")
    return 0


def parse_nbd_server_stop(inv: Invocation) -> int:
    """``-c N``: first wait until N clients have come and gone (for scripts that serve known clients)."""
    from qio.commands.common import num

    o, args = inv.options({"c": lambda a: num(inv, a)})
    if args:
        raise inv.usage(-errno.EINVAL)
    return int(o.get("c", 0))


async def run_nbd_server_stop(session: Session, clients: int) -> int:
    if not session.exports:
        session.out.error_report("no NBD server is running")
        return -errno.ENOENT
    if clients:
        exports = session.exports
        await session.wait_for(lambda: all(e.served >= clients and not e.clients for e in exports), None)
    await session.stop_exports()
    return 0


class FaultCmd(NamedTuple):
    remove: int | None
    keys: dict[str, str]


def parse_nbd_fault(inv: Invocation) -> FaultCmd:
    """``nbd_fault KEY=VALUE...`` adds a rule, ``nbd_fault -r ID`` removes one, no words list them."""
    from qio.commands.common import num

    o, args = inv.options({"r": lambda a: num(inv, a)})
    keys: dict[str, str] = {}
    for word in args:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise inv.fail(-errno.EINVAL, f"nbd_fault: expected KEY=VALUE, not '{word}'\n")
        keys[key] = value
    if "r" in o and keys:
        raise inv.fail(-errno.EINVAL, "nbd_fault: -r takes no KEY=VALUE words\n")
    return FaultCmd(o.get("r"), keys)


async def run_nbd_fault(session: Session, cmd: FaultCmd) -> int:
    from qio.nbd_server import Fault

    faults = session.nbd_faults
    if cmd.remove is not None:
        for f in faults:
            if f.id == cmd.remove:
                faults.remove(f)
                return 0
        session.out.error_report(f"nbd_fault: no rule #{cmd.remove}")
        return -errno.ENOENT
    if not cmd.keys:
        for f in faults:
            session.out.out(f"{f.describe()}\n")
        return 0
    try:
        fault = Fault(max((f.id for f in faults), default=0) + 1, cmd.keys)
    except QemuError as e:
        session.out.error_report(str(e))
        return -errno.EINVAL
    faults.append(fault)
    session.out.out(f"nbd_fault: rule #{fault.id} added\n")
    return 0
