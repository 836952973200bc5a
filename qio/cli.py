"""The ``qio`` command: qemu-io 7.2's command line, start-up sequence, line sources and exit status.

Start-up stays light: ``-c`` and piped modes never import prompt_toolkit, and the qcow2/blkdebug
drivers are imported only when an image needs them.  ``main`` imports asyncio without ``ssl`` (see
:func:`qio.program.import_asyncio`); ``tests/shell/test_startup.py`` checks which modules a ``-c quit`` run loads.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from qio import __version__, program
from qio.block.modes import OPEN_FLAG_OPTIONS, OpenFlags, set_open_flag
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
    LongOpt("output", True, "output"),
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


class Args:
    def __init__(self) -> None:
        self.cmds: list[str] = []
        self.flags = OpenFlags()
        self.fmt: str | None = None
        self.image_opts = False
        self.image: str | None = None
        #: ``--output=json`` (qio's own option, qemu-img's spelling): results as JSON lines.
        self.json = False


def parse_args(argv: list[str], out: Output) -> Args | int:
    """Parse the command line; an int is the exit status to stop with."""
    a = Args()
    prg = out.prgname
    g = GetOpt(argv, SHORT, out.err, LONG)
    for c, arg in g:
        v = arg or ""
        if c in OPEN_FLAG_OPTIONS:
            bad = set_open_flag(c, v, a.flags)
            if bad is not None:
                out.error_report(bad)
                return 1
        elif c == "f":
            a.fmt = v
        elif c == "c":
            a.cmds.append(v)
        elif c == "m":
            pass  # misaligned buffers only matter to C code doing O_DIRECT; qio bounces those anyway
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
            text = USAGE.format(prg)
            out.out(text)
            return 0
        elif c == "object":
            from qio import secrets
            from qio.block.errors import QemuError

            help_text = secrets.object_help(v)
            if help_text is not None:
                out.out(help_text)
                return 0
            try:
                secrets.add_object(v)
            except QemuError as e:
                out.error_report(str(e))
                return 1
        elif c == "image-opts":
            a.image_opts = True
        elif c == "output":
            if v not in ("human", "json"):
                out.error_report("--output must be used with human or json as argument.")
                return 1
            a.json = v == "json"
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
            trace.set_sink(out.trace)
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
    _end_of_startup()
    if args.cmds:
        for cmd in args.cmds:
            if session.quit:
                break
            await sh.execute(cmd)
    elif os.isatty(0):
        saved = None
        if os.isatty(1) and os.environ.get("TERM", "dumb") != "dumb":
            # The prompt is visible at once; the line editor (whose import takes most of the start-up
            # time) then draws it again in place.  Keys typed meanwhile wait unechoed for it.
            sh.out.flush()
            saved = _no_echo()
            os.write(1, f"{sh.prgname}> \r".encode())
        try:
            from qio.interactive import interactive_loop

            await interactive_loop(sh)
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(0, termios.TCSANOW, saved)
    else:
        from qio.lines import pipe_loop

        await pipe_loop(sh)
    from qio.aio import QUICK_COMMAND_TIME  # imported with the session already

    session.aio.pool.tick(QUICK_COMMAND_TIME)  # bdrv_drain_all_begin quiesces every node, then polls
    await session.drain("exiting")
    await session.close_image()
    return 1 if sh.last_error < 0 else 0


_gc_paused = False


def _end_of_startup() -> None:
    """Start-up (parsing, imports, the command table, opening the image) allocates only objects that
    live as long as the process: garbage collections there are wasted work (~2.5 ms of a ~30 ms start).
    :func:`main` disables the collector; here the start-up objects are frozen out of later collections
    and collection resumes before the first command."""
    global _gc_paused
    if _gc_paused:
        _gc_paused = False
        gc.freeze()
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    global _gc_paused
    _gc_paused = gc.isenabled()
    gc.disable()
    try:
        return _main(argv)
    finally:
        if _gc_paused:
            _gc_paused = False
            gc.enable()


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv if argv is None else argv)
    out = Output(program.prgname(argv[0], "qio"))
    parsed = parse_args(argv, out)
    if isinstance(parsed, int):
        out.flush()
        return parsed
    if parsed.json:
        from qio.render_json import JsonOutput  # only here: the text mode never imports json

        out.flush()
        out = JsonOutput(out.prgname)
    return program.run(out, _amain(parsed, out))


def _no_echo() -> list[Any] | None:
    """Turn the terminal's echo off; returns the settings to restore at exit (None if impossible)."""
    try:
        import termios

        old = termios.tcgetattr(0)
        new = list(old)
        new[3] &= ~termios.ECHO
        termios.tcsetattr(0, termios.TCSANOW, new)
    except (ImportError, OSError):
        return None
    return old
