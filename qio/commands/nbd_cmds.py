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
    if any(e.address for e in session.exports):
        session.out.error_report("an NBD server is already running; stop it with nbd_server_stop")
        return -errno.EBUSY
    export = Export(session.aio, lambda: session.blk, cmd.name, cmd.writable and not blk.flags.read_only,
                    session.out.error_report)
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
