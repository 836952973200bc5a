"""The ``qio-img`` command line: qemu-img 7.2's global options and command dispatch (what the
commands share is in :mod:`qio.img.common`).

Each command runs as one coroutine on one asyncio loop, as qio's block layer expects.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable

from qio import __version__, program
from qio.img import check, crashcheck, create, info
from qio.img.common import HELP, Ctx, UsageError
from qio.output import Output

Command = Callable[[Ctx, list[str]], Awaitable[int]]
COMMANDS: dict[str, Command] = {
    "create": create.img_create, "check": check.img_check, "info": info.img_info, "map": info.img_map,
    "crashcheck": crashcheck.img_crashcheck, "replay": crashcheck.img_replay,
}


async def _run(ctx: Ctx, argv: list[str]) -> int:
    i = 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":  # "+hVT:": options before the command
        a = argv[i]
        i += 1
        if a in ("-h", "--help"):
            ctx.out.out(HELP.format(ctx.prg, __version__))
            return 0
        if a in ("-V", "--version"):
            ctx.out.out(f"{ctx.prg} version {__version__} (qio, a re-creation of qemu-img 7.2)\n")
            return 0
        if a == "--":
            break
        if a in ("-T", "--trace"):
            if i >= len(argv):
                raise UsageError(f"missing argument for option '{a}'")
            i += 1  # tracing is accepted and ignored
        elif not a.startswith(("-T", "--trace=")):
            raise UsageError(f"unrecognized option '{a}'")
    if i >= len(argv):
        raise UsageError("Not enough arguments")
    name = argv[i]
    cmd = COMMANDS.get(name)
    if cmd is None:
        raise UsageError(f"Command not found: {name}")
    return await cmd(ctx, argv[i:])


async def _main(ctx: Ctx, argv: list[str]) -> int:
    """``_run`` with qemu-img's ``error_exit`` for usage errors; ``--help`` inside a command exits 0."""
    try:
        return await _run(ctx, argv)
    except UsageError as e:
        ctx.out.flush()
        ctx.out.error_report(str(e))
        ctx.out.err(f"Try '{ctx.prg} --help' for more information\n")
        return 1
    except SystemExit as e:
        return int(e.code or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    out = Output(program.prgname(argv[0], "qio-img"))
    return program.run(out, _main(Ctx(out), argv))
