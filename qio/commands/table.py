"""The one command table of qio: every qemu-io command's declaration, in one place."""

from __future__ import annotations

from qio.block.perms import PERM_RESIZE, PERM_WRITE
from qio.commands import help_texts as H
from qio.commands.spec import EXTENSION, GLOBAL, NOFILE_OK, CommandSpec, CommandTable

C = CommandSpec
COMMANDS = (
    C("help", "help for one or all commands", "misc_cmds.help", altname="?", args="[command]", argmin=0,
      argmax=1, flags=GLOBAL),
    C("read", "reads a number of bytes at a specified offset", "io_cmds.read", altname="r",
      args="[-abCqv] [-P pattern [-s off] [-l len]] off len", help=H.READ, argmin=2, argmax=-1,
      optstring="bCl:pP:qs:v"),
    C("readv", "reads a number of bytes at a specified offset", "io_cmds.readv",
      args="[-Cqv] [-P pattern] off len [len..]", help=H.READV, argmin=2, argmax=-1, optstring="CP:qv"),
    C("write", "writes a number of bytes at a specified offset", "io_cmds.write", altname="w",
      args="[-bcCfnquz] [-P pattern | -s source_file] off len", help=H.WRITE, argmin=2, argmax=-1,
      optstring="bcCfnpP:qs:uz", perm=PERM_WRITE),
    C("writev", "writes a number of bytes at a specified offset", "io_cmds.writev",
      args="[-Cfq] [-P pattern] off len [len..]", help=H.WRITEV, argmin=2, argmax=-1, optstring="CfqP:",
      perm=PERM_WRITE),
    C("aio_read", "asynchronously reads a number of bytes", "io_cmds.aio_read",
      args="[-Ciqv] [-P pattern] off len [len..]", help=H.AIO_READ, argmin=2, argmax=-1,
      optstring="CP:iqv"),
    C("aio_write", "asynchronously writes a number of bytes", "io_cmds.aio_write",
      args="[-Cfiquz] [-P pattern] off len [len..]", help=H.AIO_WRITE, argmin=2, argmax=-1,
      optstring="CfiqP:uz", perm=PERM_WRITE),
    C("aio_flush", "completes all outstanding aio requests", "io_cmds.aio_flush"),
    C("flush", "flush all in-core file state to disk", "io_cmds.flush", altname="f"),
    C("truncate", "truncates the current file at the given offset", "io_cmds.truncate", altname="t",
      args="[-m prealloc_mode] off", argmin=1, argmax=3, optstring="m:", perm=PERM_WRITE | PERM_RESIZE),
    C("length", "gets the length of the current file", "io_cmds.length", altname="l"),
    C("info", "prints information about the current file", "io_cmds.info", altname="i"),
    C("discard", "discards a number of bytes at a specified offset", "io_cmds.discard", altname="d",
      args="[-Cq] off len", help=H.DISCARD, argmin=2, argmax=-1, optstring="Cq", perm=PERM_WRITE),
    C("alloc", "checks if offset is allocated in the file", "io_cmds.alloc", altname="a",
      args="offset [count]", argmin=1, argmax=2),
    C("map", "prints the allocated areas of a file", "io_cmds.map", args=""),
    C("reopen", "reopens an image with new options", "misc_cmds.reopen", args="[(-r|-w)] [-c cache] [-o options]",
      help=H.REOPEN, argmin=0, argmax=-1, optstring="c:o:rw"),
    C("break", "sets a breakpoint on event and tags the stopped request as tag", "debug_cmds.break",
      args="event tag", argmin=2, argmax=2),
    C("remove_break", "remove a breakpoint by tag", "debug_cmds.remove_break", args="tag", argmin=1,
      argmax=1),
    C("resume", "resumes the request tagged as tag", "debug_cmds.resume", args="tag", argmin=1, argmax=1),
    # qemu-io: exactly 1 argument.  qio adds "-t SECONDS", so its parser checks the count instead.
    C("wait_break", "waits for the suspension of a request", "debug_cmds.wait_break", args="tag", argmin=0,
      argmax=-1),
    C("debug_state", "shows blkdebug breakpoints, suspended requests, state and rules", "debug_cmds.debug_state",
      flags=EXTENSION),
    C("trace", "prints blkdebug events as they fire (PATTERN enables, -PATTERN disables)", "debug_cmds.trace",
      args="[[-]pattern]", argmin=0, argmax=1, flags=NOFILE_OK | EXTENSION),
    C("powerfail", "simulates a power failure of the disk under the image (writes since the last flush lost)",
      "crash_cmds.powerfail", args="[-a] [-m all|random|torn] [-s seed] [-v]", argmin=0, argmax=-1,
      optstring="am:s:v", flags=EXTENSION),
    C("record", "records the commands typed from now on as a replayable script (record stop ends)",
      "record_cmds.record", args="FILE | stop", argmin=1, argmax=1, flags=NOFILE_OK | EXTENSION),
    C("abort", "simulate a program crash using abort(3)", "misc_cmds.abort", flags=NOFILE_OK),
    C("sleep", "waits for the given value in milliseconds", "misc_cmds.sleep", argmin=1, argmax=1,
      flags=NOFILE_OK),
    C("sigraise", "raises a signal", "misc_cmds.sigraise", args="signal", help=H.SIGRAISE, argmin=1,
      argmax=1, flags=NOFILE_OK),
    C("quit", "exit the program", "misc_cmds.quit", altname="q", argmin=-1, argmax=-1, flags=GLOBAL),
    C("open", "open the file specified by path", "misc_cmds.open", altname="o",
      args="[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", help=H.OPEN, argmin=1, argmax=-1,
      optstring="snCro:ki:t:d:U", flags=NOFILE_OK),
    C("close", "close the current open file", "misc_cmds.close", altname="c"),
)


def build_table() -> CommandTable:
    table = CommandTable()
    for spec in COMMANDS:
        table.add(spec)
    return table
