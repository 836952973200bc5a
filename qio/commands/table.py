"""The one command table of qio: every qemu-io command's declaration, in one place."""

from __future__ import annotations

from functools import partial

from qio.block.driver import PERM_RESIZE, PERM_WRITE
from qio.commands import debug_cmds as dbg
from qio.commands import help_texts as H
from qio.commands import io_cmds as io
from qio.commands import misc_cmds as misc
from qio.commands.spec import GLOBAL, NOFILE_OK, CommandSpec, CommandTable, Invocation


def _none(inv: Invocation) -> None:
    return None


def build_table(prgname: str, image_opts: bool = False) -> CommandTable:
    p = prgname
    t = CommandTable()
    add = t.add
    add(CommandSpec("help", "help for one or all commands", misc.run_help, partial(misc.parse_help, prg=p),
                    altname="?", args="[command]", argmin=0, argmax=1, flags=GLOBAL))
    add(CommandSpec("read", "reads a number of bytes at a specified offset", io.run_read,
                    partial(io.parse_read, prg=p), altname="r",
                    args="[-abCqv] [-P pattern [-s off] [-l len]] off len", help=H.READ, argmin=2, argmax=-1,
                    optstring="bCl:pP:qs:v"))
    add(CommandSpec("readv", "reads a number of bytes at a specified offset", io.run_readv,
                    partial(io.parse_readv, prg=p), args="[-Cqv] [-P pattern] off len [len..]", help=H.READV,
                    argmin=2, argmax=-1, optstring="CP:qv"))
    add(CommandSpec("write", "writes a number of bytes at a specified offset", io.run_write,
                    partial(io.parse_write, prg=p), altname="w",
                    args="[-bcCfnquz] [-P pattern | -s source_file] off len", help=H.WRITE, argmin=2,
                    argmax=-1, optstring="bcCfnpP:qs:uz", perm=PERM_WRITE))
    add(CommandSpec("writev", "writes a number of bytes at a specified offset", io.run_writev,
                    partial(io.parse_writev, prg=p), args="[-Cfq] [-P pattern] off len [len..]",
                    help=H.WRITEV, argmin=2, argmax=-1, optstring="CfqP:", perm=PERM_WRITE))
    add(CommandSpec("aio_read", "asynchronously reads a number of bytes", io.run_aio_read,
                    partial(io.parse_aio_read, prg=p), args="[-Ciqv] [-P pattern] off len [len..]",
                    help=H.AIO_READ, argmin=2, argmax=-1, optstring="CP:iqv"))
    add(CommandSpec("aio_write", "asynchronously writes a number of bytes", io.run_aio_write,
                    partial(io.parse_aio_write, prg=p), args="[-Cfiquz] [-P pattern] off len [len..]",
                    help=H.AIO_WRITE, argmin=2, argmax=-1, optstring="CfiqP:uz", perm=PERM_WRITE))
    add(CommandSpec("aio_flush", "completes all outstanding aio requests", io.run_aio_flush, _none))
    add(CommandSpec("flush", "flush all in-core file state to disk", io.run_flush, _none, altname="f"))
    add(CommandSpec("truncate", "truncates the current file at the given offset", io.run_truncate,
                    partial(io.parse_truncate, prg=p), altname="t", args="[-m prealloc_mode] off",
                    argmin=1, argmax=3, optstring="m:", perm=PERM_WRITE | PERM_RESIZE))
    add(CommandSpec("length", "gets the length of the current file", io.run_length, _none, altname="l"))
    add(CommandSpec("info", "prints information about the current file", io.run_info, _none, altname="i"))
    add(CommandSpec("discard", "discards a number of bytes at a specified offset", io.run_discard,
                    partial(io.parse_discard, prg=p), altname="d", args="[-Cq] off len", help=H.DISCARD,
                    argmin=2, argmax=-1, optstring="Cq", perm=PERM_WRITE))
    add(CommandSpec("alloc", "checks if offset is allocated in the file", io.run_alloc,
                    partial(io.parse_alloc, prg=p), altname="a", args="offset [count]", argmin=1, argmax=2))
    add(CommandSpec("map", "prints the allocated areas of a file", io.run_map, _none, args=""))
    add(CommandSpec("reopen", "reopens an image with new options", misc.run_reopen,
                    partial(misc.parse_reopen, prg=p), args="[(-r|-w)] [-c cache] [-o options]",
                    help=H.REOPEN, argmin=0, argmax=-1, optstring="c:o:rw"))
    add(CommandSpec("abort", "simulate a program crash using abort(3)", misc.run_abort, _none,
                    flags=NOFILE_OK))
    add(CommandSpec("sleep", "waits for the given value in milliseconds", misc.run_sleep,
                    partial(misc.parse_sleep, prg=p), argmin=1, argmax=1, flags=NOFILE_OK))
    add(CommandSpec("sigraise", "raises a signal", misc.run_sigraise, partial(misc.parse_sigraise, prg=p),
                    args="signal", help=H.SIGRAISE, argmin=1, argmax=1, flags=NOFILE_OK))
    add(CommandSpec("quit", "exit the program", misc.run_quit, _none, altname="q", argmin=-1, argmax=-1,
                    flags=GLOBAL))
    add(CommandSpec("open", "open the file specified by path", misc.run_open,
                    partial(misc.parse_open, prg=p, image_opts=image_opts), altname="o",
                    args="[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", help=H.OPEN, argmin=1,
                    argmax=-1, optstring="snCro:ki:t:d:U", flags=NOFILE_OK))
    add(CommandSpec("close", "close the current open file", misc.run_close, _none, altname="c"))
    add(CommandSpec("break", "sets a breakpoint on event and tags the stopped request as tag", dbg.run_break,
                    dbg.parse_break, args="event tag", argmin=2, argmax=2))
    add(CommandSpec("remove_break", "remove a breakpoint by tag", dbg.run_remove_break, dbg.parse_tag,
                    args="tag", argmin=1, argmax=1))
    add(CommandSpec("resume", "resumes the request tagged as tag", dbg.run_resume, dbg.parse_tag,
                    args="tag", argmin=1, argmax=1))
    # qemu-io: argmax 1.  qio adds "-t SECONDS", so the count check for it happens in its parser.
    add(CommandSpec("wait_break", "waits for the suspension of a request", dbg.run_wait_break,
                    dbg.parse_wait_break, args="tag", argmin=1, argmax=3, optstring="t:"))
    return t
