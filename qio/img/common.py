"""What every ``qio-img`` subcommand shares: qemu-img's usage errors and option parsing, the output
helpers, and opening an image as ``img_open`` does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from qio import __version__
from qio.block.errors import QemuError
from qio.block.modes import OpenFlags
from qio.getopt import GetOpt, LongOpt
from qio.output import Output

HELP = """{0} version {1} (qio, a re-creation of qemu-img 7.2)
usage: {0} [standard options] command [command options]
QEMU disk image utility

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit

Command syntax:
  check [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--image-opts] [-f fmt] [--output=ofmt] [-U] filename

qio extensions:
  crashcheck [-f fmt] [--limit N] [--samples N] [--seed S] [--no-torn] [--oracle] [--all-entries]
             [--no-reuse] [--output=ofmt] log base
  replay [--end N | --end-mark NAME | --entries SPEC] [--all-entries] log base output

Supported formats: raw qcow2
"""


class UsageError(Exception):
    """``error_exit``: a message, the ``--help`` hint, exit status 1."""


class Ctx:
    """What every command gets: the output streams and qemu-img's program name."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.prg = out.prgname

    def qprintf(self, quiet: bool, text: str) -> None:
        if not quiet:
            self.out.out(text)


class Options:
    """getopt_long with a leading ':' in qemu-img's optstring: silent, then qemu-img's own messages.
    Iterate ``(option, argument)``; afterwards ``args`` holds the operands (glibc permutes them last)."""

    def __init__(self, ctx: Ctx, argv: list[str], short: str, longopts: tuple[LongOpt, ...] = ()) -> None:
        self.ctx = ctx
        self.argv = argv
        self._said: list[str] = []
        self._g = GetOpt(argv, short, self._said.append, (LongOpt("help", False, "h"), *longopts))
        self.args: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, str]]:
        g, argv = self._g, self.argv
        for c, arg in g:
            if c == "?":
                word = argv[min(g._i, len(argv)) - 1]
                if self._said and "requires an argument" in self._said[-1]:
                    raise UsageError(f"missing argument for option '{word}'")
                raise UsageError(f"unrecognized option '{word}'")
            if c == "h":
                self.ctx.out.out(HELP.format(self.ctx.prg, __version__))
                raise SystemExit(0)
            yield c, arg or ""
        self.args = g.args

    def one_filename(self) -> str:
        if len(self.args) != 1:
            raise UsageError("Expecting one image file name")
        return self.args[0]


def define_object(ctx: Ctx, text: str) -> bool:
    """``--object``: qemu-img's ``user_creatable_process_cmdline`` (help texts exit 0 via SystemExit)."""
    from qio import secrets
    from qio.block.errors import QemuError

    help_text = secrets.object_help(text)
    if help_text is not None:
        ctx.out.out(help_text)
        raise SystemExit(0)
    try:
        secrets.add_object(text)
    except QemuError as e:
        ctx.out.error_report(str(e))
        return False
    return True


def unsupported(ctx: Ctx, option: str) -> int:
    """``--object``: a qemu-img option qio-img does not implement (exit status 1)."""
    ctx.out.error_report(f"--{option} is not supported by qio-img")
    return 1


def output_format(ctx: Ctx, output: str | None) -> str | None:
    """``--output``: human or json; None after printing qemu-img's complaint."""
    if output is None or output in ("human", "json"):
        return output or "human"
    ctx.out.error_report("--output must be used with human or json as argument.")
    return None


def open_image(ctx: Ctx, filename: str, fmt: str | None, flags: OpenFlags, *, force_share: bool = False,
               no_backing: bool = False, image_opts: bool = False) -> Any:
    """``img_open``: a BlockBackend, or None after ``Could not open 'FILE': ...``.  With ``image_opts``
    the file name is an option string (``driver=qcow2,file.filename=x``; a bare first value is
    ``file``), parsed as qemu-img parses it for its "source" option list."""
    if image_opts:
        return _open_image_opts(ctx, filename, fmt, flags, force_share=force_share, no_backing=no_backing)
    try:
        return open_backend(ctx, filename, fmt, flags, force_share=force_share, no_backing=no_backing)
    except QemuError as e:
        ctx.out.error_report(f"Could not open '{filename}': {e}")
        return None


def _open_image_opts(ctx: Ctx, optstr: str, fmt: str | None, flags: OpenFlags, *, force_share: bool,
                     no_backing: bool) -> Any:
    """``img_open`` with ``--image-opts`` (``img_open_opts``)."""
    from qio.block.backend import BlockBackend
    from qio.qemuopts import parse_qemuopts

    if fmt is not None:
        ctx.out.error_report("--image-opts and --format are mutually exclusive")
        return None
    try:
        opts: dict[str, Any] = dict(parse_qemuopts(optstr, ctx.out.warn_report, implied="file"))
    except QemuError as e:
        ctx.out.error_report(str(e))
        return None
    if force_share:
        if opts.get("force-share", "on") != "on":
            ctx.out.error_report("--force-share/-U conflicts with image options")
            return None
        opts["force-share"] = "on"
    if no_backing and "backing" not in opts and not any(k.startswith("backing.") for k in opts) \
            and opts.get("driver") in (None, "qcow2"):
        opts["backing"] = None
    try:
        try:
            return BlockBackend.open(None, opts, flags, ctx.out.err)
        except QemuError as e:
            if opts.get("backing", 0) is not None or "support the option 'backing'" not in str(e):
                raise
            del opts["backing"]
            return BlockBackend.open(None, opts, flags, ctx.out.err)
    except QemuError as e:
        ctx.out.error_report(f"Could not open '{optstr}': {e}")
        return None


def open_backend(ctx: Ctx, filename: str, fmt: str | None, flags: OpenFlags, *, force_share: bool,
                 no_backing: bool) -> Any:
    """``blk_new_open`` with qemu-img's options; ``no_backing`` is BDRV_O_NO_BACKING, which qio expresses
    as ``backing: null`` -- an option only formats with backing files accept, so a probed raw image is
    opened again without it."""
    from qio.block.backend import BlockBackend

    opts: dict[str, Any] = {}
    if fmt is not None:
        opts["driver"] = fmt
    if force_share:
        opts["force-share"] = "on"
    if no_backing and fmt in (None, "qcow2"):
        opts["backing"] = None
    try:
        return BlockBackend.open(filename, opts, flags, ctx.out.reporter())
    except QemuError as e:
        if "backing" not in opts or "support the option 'backing'" not in str(e):
            raise
        del opts["backing"]
        return BlockBackend.open(filename, opts, flags, ctx.out.reporter())


async def close_image(ctx: Ctx, blk: Any) -> None:
    await blk.close(ctx.out.error_report)
