"""The ``qio`` command: qemu-io 7.2's command line, start-up sequence, line sources and exit status.

Start-up stays light: ``-c`` and piped modes never import prompt_toolkit, and the qcow2/blkdebug
drivers are imported only when an image needs them.  ``main`` imports asyncio without ``ssl`` (see
:func:`_import_asyncio`); ``tests/shell/test_startup.py`` checks which modules a ``-c quit`` run loads.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from qio import __version__
from qio.block.modes import OpenFlags, parse_aio_mode, parse_cache_mode, parse_discard_mode
from qio.getopt import GetOpt, LongOpt
from qio.output import Output

SHORT = "hVc:d:f:rsnCmki:t:T:U"
LONG = (
    LongOpt("help", False, "h"), LongOpt("version", False, "V"), LongOpt("cmd", True, "c"),
    LongOpt("format", True, "f"), LongOpt("read-only", False, "r"), LongOpt("snapshot", False, "s"),
    LongOpt("nocache", False, "n"), LongOpt("copy-on-read", False, "C"), LongOpt("misalign", False, "m"),
    LongOpt("native-aio", False, "k"), LongOpt("aio", True, "i"), LongOpt("discard", True, "d"),
    LongOpt("cache", True, "t"), LongOpt("trace", True, "T"), LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U"),
)

USAGE = """Usage: {0} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{0} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
"""


def prgname(argv0: str) -> str:
    """``g_get_prgname()``: the basename of argv[0] (``qio`` under ``python -m qio``)."""
    base = os.path.basename(argv0)
    return "qio" if base in ("__main__.py", "") else base


class Args:
    def __init__(self) -> None:
        self.cmds: list[str] = []
        self.flags = OpenFlags()
        self.fmt: str | None = None
        self.image_opts = False
        self.image: str | None = None


def parse_args(argv: list[str], out: Output) -> Args | int:
    """Parse the command line; an int is the exit status to stop with."""
    a = Args()
    prg = out.prgname
    g = GetOpt(argv, SHORT, out.err, LONG)
    for c, arg in g:
        v = arg or ""
        if c == "s":
            a.flags.snapshot = True
        elif c == "n":
            a.flags.nocache, a.flags.writethrough = True, False
        elif c == "C":
            a.flags.copy_on_read = True
        elif c == "d":
            if not parse_discard_mode(v, a.flags):
                out.error_report(f"Invalid discard option: {v}")
                return 1
        elif c == "f":
            a.fmt = v
        elif c == "c":
            a.cmds.append(v)
        elif c == "r":
            a.flags.read_only = True
        elif c == "m":
            pass  # misaligned buffers only matter to C code doing O_DIRECT; qio bounces those anyway
        elif c == "k":
            a.flags.native_aio = True
        elif c == "i":
            if not parse_aio_mode(v, a.flags):
                out.error_report(f"Invalid aio option: {v}")
                return 1
        elif c == "t":
            if not parse_cache_mode(v, a.flags):
                out.error_report(f"Invalid cache option: {v}")
                return 1
        elif c == "T":
            from qio import trace

            stop = trace.parse_option(v, out.warn_report, out.out, out.error_report)
            if stop is not None:
                return stop
        elif c == "V":
            out.out(f"{prg} version {__version__} (qio, a re-creation of qemu-io 7.2)\n"
                    "Copyright (c) 2026 the qio developers\n")
            return 0
        elif c == "h":
            out.out(USAGE.format(prg))
            return 0
        elif c == "U":
            a.flags.force_share = True
        elif c == "object":
            out.error_report("--object is not supported by qio (no secrets or encrypted images)")
            return 1
        elif c == "image-opts":
            a.image_opts = True
        else:
            out.out(USAGE.format(prg))
            return 1
    if len(g.args) > 1:
        out.out(USAGE.format(prg))
        return 1
    if a.fmt is not None and a.image_opts:
        out.error_report("--image-opts and -f are mutually exclusive")
        return 1
    a.image = g.args[0] if g.args else None
    return a


async def _amain(args: Args, out: Output) -> int:
    from qio.shell import Shell

    sh = Shell(out, out.prgname, args.image_opts)
    session = sh.session
    if "qio.trace" in sys.modules:
        from qio import trace

        if not trace._sink:
            trace.set_sink(out.err)
    if args.image is not None:
        options: dict[str, Any] = {}
        path: str | None = args.image
        if args.image_opts:
            from qio.block.errors import QemuError
            from qio.qemuopts import parse_qemuopts

            try:
                options = parse_qemuopts(args.image, lambda m: out.warn_report(m))
            except QemuError as e:
                out.error_report(str(e))
                return 1
            path = None
        elif args.fmt is not None:
            options["driver"] = args.fmt
        if args.flags.force_share:
            fs = options.get("force-share")
            if fs is not None and fs != "on":
                out.error_report("-U conflicts with image options")
                return 1
            options["force-share"] = "on"
        if session.open_image(path, args.flags, options):
            return 1
    if args.cmds:
        for cmd in args.cmds:
            if session.quit:
                break
            await sh.execute(cmd)
    elif os.isatty(0):
        from qio.interactive import interactive_loop

        await interactive_loop(sh)
    else:
        from qio.lines import pipe_loop

        await pipe_loop(sh)
    await session.drain("exiting")
    await session.close_image()
    return 1 if sh.last_error < 0 else 0


def _import_asyncio() -> None:
    """Import asyncio without its optional ``ssl`` support: qio never opens TLS connections, and
    importing ``ssl`` (OpenSSL and its enums) costs ~6 ms of CPU per start on the project machines.

    A ``None`` entry in ``sys.modules`` makes asyncio's guarded ``import ssl`` fail, so it records ssl
    as unavailable; the entry is removed again at once, so any later ``import ssl`` works as usual.
    Nothing happens if asyncio or ssl is already loaded (qio used as a library, tests).
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    out = Output(prgname(argv[0]))
    parsed = parse_args(argv, out)
    if isinstance(parsed, int):
        out.flush()
        return parsed
    _import_asyncio()
    import asyncio

    try:
        rc = asyncio.run(_amain(parsed, out))
    except KeyboardInterrupt:
        rc = 130
    except OSError as e:
        out.flush()
        out.error_report(os.strerror(e.errno or errno.EIO))
        rc = 1
    out.flush()
    return rc
