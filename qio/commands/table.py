"""The one command table of qio: every qemu-io command's declaration, parser and executor, in one place."""

from __future__ import annotations

from qio.block.perms import PERM_RESIZE, PERM_WRITE
from qio.commands import crash_cmds as crash
from qio.commands import debug_cmds as debug
from qio.commands import help_texts as H
from qio.commands import io_cmds as io
from qio.commands import misc_cmds as misc
from qio.commands import nbd_cmds as nbd
from qio.commands import record_cmds as record
from qio.commands.spec import EXTENSION, GLOBAL, NOFILE_OK, QUICK, CommandSpec, CommandTable

C = CommandSpec
COMMANDS = (
    C("help", "help for one or all commands",
      misc.parse_help, misc.run_help, altname="?", args="[command]", argmin=0, argmax=1, flags=GLOBAL),
    C("read", "reads a number of bytes at a specified offset",
      io.parse_read, io.run_read, altname="r", args="[-abCqv] [-P pattern [-s off] [-l len]] off len", help=H.READ,
      argmin=2, argmax=-1, optstring="bCl:pP:qs:v"),
    C("readv", "reads a number of bytes at a specified offset",
      io.parse_readv, io.run_readv, args="[-Cqv] [-P pattern] off len [len..]", help=H.READV, argmin=2, argmax=-1,
      optstring="CP:qv"),
    C("write", "writes a number of bytes at a specified offset",
      io.parse_write, io.run_write, altname="w", args="[-bcCfnquz] [-P pattern | -s source_file] off len",
      help=H.WRITE, argmin=2, argmax=-1, optstring="bcCfnpP:qs:uz", perm=PERM_WRITE),
    C("writev", "writes a number of bytes at a specified offset",
      io.parse_writev, io.run_writev, args="[-Cfq] [-P pattern] off len [len..]", help=H.WRITEV, argmin=2, argmax=-1,
      optstring="CfqP:", perm=PERM_WRITE),
    C("aio_read", "asynchronously reads a number of bytes",
      io.parse_aio_read, io.run_aio_read, args="[-Ciqv] [-P pattern] off len [len..]", help=H.AIO_READ, argmin=2,
      argmax=-1, optstring="CP:iqv", flags=QUICK),
    C("aio_write", "asynchronously writes a number of bytes",
      io.parse_aio_write, io.run_aio_write, args="[-Cfiquz] [-P pattern] off len [len..]", help=H.AIO_WRITE,
      argmin=2, argmax=-1, optstring="CfiqP:uz", flags=QUICK, perm=PERM_WRITE, fast=io.fast_aio_write,
      run_now=io.submit_aio_write),
    C("aio_flush", "completes all outstanding aio requests",
      None, io.run_aio_flush, flags=QUICK),
    C("flush", "flush all in-core file state to disk",
      None, io.run_flush, altname="f"),
    C("truncate", "truncates the current file at the given offset",
      io.parse_truncate, io.run_truncate, altname="t", args="[-m prealloc_mode] off", argmin=1, argmax=3,
      optstring="m:", perm=PERM_WRITE | PERM_RESIZE),
    C("length", "gets the length of the current file",
      None, io.run_length, altname="l"),
    C("info", "prints information about the current file",
      None, io.run_info, altname="i"),
    C("discard", "discards a number of bytes at a specified offset",
      io.parse_discard, io.run_discard, altname="d", args="[-Cq] off len", help=H.DISCARD, argmin=2, argmax=-1,
      optstring="Cq", perm=PERM_WRITE),
    C("alloc", "checks if offset is allocated in the file",
      io.parse_alloc, io.run_alloc, altname="a", args="offset [count]", argmin=1, argmax=2),
    C("map", "prints the allocated areas of a file",
      None, io.run_map, args=""),
    C("reopen", "reopens an image with new options",
      misc.parse_reopen, misc.run_reopen, args="[(-r|-w)] [-c cache] [-o options]", help=H.REOPEN, argmin=0,
      argmax=-1, optstring="c:o:rw"),
    # qemu-io: exactly 2 arguments.  qio adds "-o/-i/-n" predicates, so its parser checks the count instead.
    C("break", "sets a breakpoint on event and tags the stopped request as tag",
      debug.parse_break, debug.run_break, args="event tag", argmin=0, argmax=-1, optstring="o:i:n:", flags=QUICK),
    C("remove_break", "remove a breakpoint by tag",
      debug.parse_remove_break, debug.run_remove_break, args="tag", argmin=1, argmax=1, flags=QUICK),
    C("resume", "resumes the request tagged as tag",
      debug.parse_resume, debug.run_resume, args="tag", argmin=1, argmax=1, flags=QUICK),
    # qemu-io: exactly 1 argument.  qio adds "-t SECONDS", so its parser checks the count instead.
    C("wait_break", "waits for the suspension of a request",
      debug.parse_wait_break, debug.run_wait_break, args="tag", argmin=0, argmax=-1, flags=QUICK),
    C("debug_state", "shows blkdebug breakpoints, suspended requests, state and rules",
      None, debug.run_debug_state, flags=EXTENSION),
    C("trace", "prints blkdebug events as they fire (PATTERN enables, -PATTERN disables)",
      debug.parse_trace, debug.run_trace, args="[[-]pattern]", argmin=0, argmax=1, flags=NOFILE_OK | EXTENSION),
    C("inject", "adds a blkdebug inject-error rule (the keys of an [inject-error] section)",
      debug.parse_inject, debug.run_inject, args="key=value...", argmin=0, argmax=-1, flags=EXTENSION),
    C("delay", "adds a blkdebug delay rule (the keys of a [delay] section)",
      debug.parse_delay, debug.run_delay, args="key=value...", argmin=0, argmax=-1, flags=EXTENSION),
    C("corrupt", "adds a blkdebug corrupt rule (the keys of a [corrupt] section)",
      debug.parse_corrupt, debug.run_corrupt, args="key=value...", argmin=0, argmax=-1, flags=EXTENSION),
    C("set_state", "adds a blkdebug set-state rule (the keys of a [set-state] section)",
      debug.parse_set_state, debug.run_set_state, args="key=value...", argmin=0, argmax=-1, flags=EXTENSION),
    C("bad_blocks", "adds a blkdebug bad-blocks range (the keys of a [bad-blocks] section)",
      debug.parse_bad_blocks, debug.run_bad_blocks, args="key=value...", argmin=0, argmax=-1, flags=EXTENSION),
    C("rules", "lists the blkdebug rules and breakpoints with their ids and counters",
      debug.parse_rules, debug.run_rules, flags=EXTENSION),
    C("unrule", "removes the blkdebug rule or breakpoint with the given id",
      debug.parse_unrule, debug.run_unrule, args="id", argmin=1, argmax=1, flags=EXTENSION),
    C("pause", "holds new requests at the top of the graph and waits until none is in flight",
      None, debug.run_pause, flags=EXTENSION),
    C("unpause", "lets the requests held by pause go, in submission order",
      None, debug.run_unpause, flags=EXTENSION),
    C("aio_discard", "asynchronously discards a number of bytes",
      io.parse_aio_discard, io.run_aio_discard, args="[-Ciq] off len", help=H.AIO_DISCARD, argmin=2, argmax=-1,
      optstring="Ciq",
      flags=EXTENSION, perm=PERM_WRITE),
    C("powerfail", "simulates a power failure of the disk under the image (writes since the last flush lost)",
      crash.parse_powerfail, crash.run_powerfail, args="[-a] [-m all|random|torn] [-s seed] [-v]", help=crash.HELP,
      argmin=0, argmax=-1, optstring="am:s:v", flags=EXTENSION),
    C("nbd_server_start", "serves the open image over NBD while commands go on (clients' requests hit breakpoints)",
      nbd.parse_nbd_server_start, nbd.run_nbd_server_start, args="[-r] [-n export] unix:PATH|HOST:PORT", argmin=1,
      argmax=-1, optstring="n:r", flags=EXTENSION),
    C("nbd_fault", "adds (KEY=VALUE...), lists or removes (-r ID) NBD protocol fault rules of the server",
      nbd.parse_nbd_fault, nbd.run_nbd_fault, args="[-r id] [point=handshake|reply action=... cmd= after= count= ns= "
      "errno=]", argmin=0, argmax=-1, optstring="r:", flags=NOFILE_OK | EXTENSION),
    C("nbd_server_stop", "stops the NBD server: requests in flight finish and are answered",
      nbd.parse_nbd_server_stop, nbd.run_nbd_server_stop, args="[-c clients]", argmin=0, argmax=2,
      optstring="c:", flags=NOFILE_OK | EXTENSION),
    C("record", "records the commands typed from now on as a replayable script (record stop ends)",
      record.parse_record, record.run_record, args="FILE | stop", argmin=1, argmax=1, flags=NOFILE_OK | EXTENSION),
    C("abort", "simulate a program crash using abort(3)",
      None, misc.run_abort, flags=NOFILE_OK),
    C("sleep", "waits for the given value in milliseconds",
      misc.parse_sleep, misc.run_sleep, argmin=1, argmax=1, flags=NOFILE_OK),
    C("sigraise", "raises a signal",
      misc.parse_sigraise, misc.run_sigraise, args="signal", help=H.SIGRAISE, argmin=1, argmax=1, flags=NOFILE_OK),
    C("quit", "exit the program",
      None, misc.run_quit, altname="q", argmin=-1, argmax=-1, flags=GLOBAL),
    C("open", "open the file specified by path",
      misc.parse_open, misc.run_open, altname="o", args="[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
      help=H.OPEN, argmin=1, argmax=-1, optstring="snCro:ki:t:d:U", flags=NOFILE_OK),
    C("close", "close the current open file",
      None, misc.run_close, altname="c"),
)


def build_table() -> CommandTable:
    table = CommandTable()
    for spec in COMMANDS:
        table.add(spec)
    return table
