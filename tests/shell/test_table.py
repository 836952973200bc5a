"""The command table (spec §2.4, §5.1): help listing, aliases, usage lines, extended help, argument limits,
and interactive completion derived from the table."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from qio.commands.spec import EXTENSION, GLOBAL, NOFILE_OK
from qio.commands.table import COMMANDS, build_table
from qio.interactive import CommandCompleter
from qio_helpers import InProc

# Verbatim from spec §5.1 (real qemu-io 7.2 `qemu-io -c help`).
HELP = """\
abort -- simulate a program crash using abort(3)
aio_flush -- completes all outstanding aio requests
aio_read [-Ciqv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes
aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes
alloc offset [count] -- checks if offset is allocated in the file
break event tag -- sets a breakpoint on event and tags the stopped request as tag
close -- close the current open file
discard [-Cq] off len -- discards a number of bytes at a specified offset
flush -- flush all in-core file state to disk
help [command] -- help for one or all commands
info -- prints information about the current file
length -- gets the length of the current file
map  -- prints the allocated areas of a file
open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path
quit -- exit the program
read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset
readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset
remove_break tag -- remove a breakpoint by tag
reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options
resume tag -- resumes the request tagged as tag
sigraise signal -- raises a signal
sleep -- waits for the given value in milliseconds
truncate [-m prealloc_mode] off -- truncates the current file at the given offset
wait_break tag -- waits for the suspension of a request
write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset
writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset

Use 'help commandname' for extended help.
"""

HELP_READ = """\
read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset

 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

"""

HELP_OPEN = """\
open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path

 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
"""

HELP_SIGRAISE = """\
sigraise signal -- raises a signal

 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where "signal" is the mandatory integer argument
 given to sigraise.

"""

HELP_REOPEN = """\
reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options

 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

"""

ALIASES = {"r": "read", "w": "write", "c": "close", "o": "open", "q": "quit", "f": "flush", "t": "truncate",
           "l": "length", "i": "info", "d": "discard", "a": "alloc", "?": "help"}

# spec §2.4 (wait_break is 1/1 and break 2/2 in qemu-io; qio adds "-t SECONDS" and "-o/-i/-n" predicates and
# checks the counts in their parsers, with qemu-io's messages: tests/test_blkdebug_prompt.py)
LIMITS = {"abort": (0, 0), "aio_flush": (0, 0), "aio_read": (2, -1), "aio_write": (2, -1), "alloc": (1, 2),
          "break": (0, -1), "close": (0, 0), "discard": (2, -1), "flush": (0, 0), "help": (0, 1), "info": (0, 0),
          "length": (0, 0), "map": (0, 0), "open": (1, -1), "quit": (-1, -1), "read": (2, -1), "readv": (2, -1),
          "remove_break": (1, 1), "reopen": (0, -1), "resume": (1, 1), "sigraise": (1, 1), "sleep": (1, 1),
          "truncate": (1, 3), "write": (2, -1), "writev": (2, -1)}

OPTSTRINGS = {"read": "bCl:pP:qs:v", "readv": "CP:qv", "write": "bcCfnpP:qs:uz", "writev": "CfqP:",
              "aio_read": "CP:iqv", "aio_write": "CfiqP:uz", "truncate": "m:", "discard": "Cq",
              "open": "snCro:ki:t:d:U", "reopen": "c:o:rw"}

EXTENDED = {"read", "readv", "write", "writev", "aio_read", "aio_write", "discard", "open", "reopen", "sigraise"}

table = build_table()
NAMES = [line.split(" ")[0] for line in HELP.splitlines()[:26]]
QEMU_IO_SPECS = [s for s in table if not s.flags & EXTENSION]  # qio's own commands are flagged EXTENSION
EXTENSIONS = {s.name for s in table if s.flags & EXTENSION}


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[InProc]:
    p = InProc(tmp_path)
    yield p
    p.close()


def test_help_listing_is_verbatim() -> None:
    assert table.help_all() == HELP


def test_help_command_without_image(proc: InProc) -> None:
    assert proc.run("help") == ([0], HELP, "")
    assert proc.run("?") == ([0], HELP, "")


def test_there_are_26_qemu_io_commands_in_strcmp_order() -> None:
    assert [s.name for s in QEMU_IO_SPECS] == NAMES
    assert sorted(NAMES, key=str.encode) == NAMES
    assert len([c for c in COMMANDS if not c.flags & EXTENSION]) == 26
    names = [s.name for s in table]
    assert names == sorted(names, key=str.encode)


def test_extensions_are_not_in_the_piped_help() -> None:
    assert not EXTENSIONS & set(NAMES)
    listing = table.help_all(extensions=True)  # at a terminal, qio's own commands follow in their own section
    trailer = "\nUse 'help commandname' for extended help.\n"
    assert listing.startswith(HELP.removesuffix(trailer))
    assert listing.endswith(trailer)
    for name in EXTENSIONS:
        assert f"\n{name} " in listing


@pytest.mark.parametrize(("alias", "name"), ALIASES.items())
def test_alias_resolves(alias: str, name: str) -> None:
    spec = table.find(alias)
    assert spec is not None
    assert spec.name == name
    assert spec.altname == alias


def test_words_are_names_and_aliases() -> None:
    assert sorted(table.words()) == sorted(NAMES + list(ALIASES) + list(EXTENSIONS))
    for word in table.words():
        assert table.find(word) is not None


@pytest.mark.parametrize("word", ["READ", "Read", "rea", "reads", "", " read", "read ", "x", "??", "map2"])
def test_unknown_words(word: str) -> None:
    assert table.find(word) is None


@pytest.mark.parametrize("name", NAMES)
def test_usage_line_matches_help_listing(name: str) -> None:
    spec = table.find(name)
    assert spec is not None
    expect = next(line for line in HELP.splitlines() if line.split(" ")[0] == name) + "\n"
    assert spec.usage_line() == expect


def test_map_has_two_spaces_and_argless_commands_one() -> None:
    spec = table.find("map")
    assert spec is not None and spec.args == ""
    assert spec.usage_line() == "map  -- prints the allocated areas of a file\n"
    for name in ("abort", "aio_flush", "close", "flush", "info", "length", "quit", "sleep"):
        s = table.find(name)
        assert s is not None and s.args is None
        assert s.usage_line().startswith(f"{name} -- ")


def test_usage_line_uses_the_word_as_typed() -> None:
    spec = table.find("r")
    assert spec is not None
    assert spec.usage_line("r") == \
        "r [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset\n"


@pytest.mark.parametrize(("name", "limits"), LIMITS.items())
def test_argument_limits(name: str, limits: tuple[int, int]) -> None:
    spec = table.find(name)
    assert spec is not None
    assert (spec.argmin, spec.argmax) == limits


@pytest.mark.parametrize(("name", "optstring"), OPTSTRINGS.items())
def test_getopt_strings(name: str, optstring: str) -> None:
    spec = table.find(name)
    assert spec is not None and spec.optstring == optstring


def test_global_and_nofile_flags() -> None:
    assert {s.name for s in QEMU_IO_SPECS if s.flags & GLOBAL} == {"help", "quit"}
    assert {s.name for s in QEMU_IO_SPECS if s.flags & NOFILE_OK} == {"open", "abort", "sigraise", "sleep"}


def test_extended_help_exists_for_exactly_ten_commands() -> None:
    assert {s.name for s in QEMU_IO_SPECS if s.help} == EXTENDED


@pytest.mark.parametrize("name", sorted(EXTENDED - {"open"}))
def test_extended_help_ends_with_one_empty_line(proc: InProc, name: str) -> None:
    rets, out, err = proc.run(f"help {name}")
    assert (rets, err) == ([0], "")
    assert out.endswith("\n\n") and not out.endswith("\n\n\n")


def test_open_extended_help_has_no_trailing_empty_line(proc: InProc) -> None:
    assert proc.run("help open") == ([0], HELP_OPEN, "")
    assert proc.run("help o")[1] == "o" + HELP_OPEN[len("open"):]


@pytest.mark.parametrize(("word", "text"), [("read", HELP_READ), ("sigraise", HELP_SIGRAISE), ("reopen", HELP_REOPEN)])
def test_extended_help_verbatim(proc: InProc, word: str, text: str) -> None:
    assert proc.run(f"help {word}") == ([0], text, "")


def test_help_for_alias_and_plain_commands(proc: InProc) -> None:
    assert proc.run("help ?") == ([0], "? [command] -- help for one or all commands\n", "")
    assert proc.run("help map") == ([0], "map  -- prints the allocated areas of a file\n", "")
    assert proc.run("help sleep") == ([0], "sleep -- waits for the given value in milliseconds\n", "")
    assert proc.run("help l") == ([0], "l -- gets the length of the current file\n", "")
    assert proc.run("help r")[1] == "r" + HELP_READ[len("read"):]


def test_help_unknown(proc: InProc) -> None:
    assert proc.run("help nosuch") == ([-errno.EINVAL], "command nosuch not found\n", "")
    assert proc.run("help a b") == ([-errno.EINVAL], "",
                                    "bad argument count 2 to help, expected between 0 and 1 arguments\n")


def test_dispatch_messages_use_the_word_as_typed(proc: InProc) -> None:
    EINVAL = -errno.EINVAL
    assert proc.run("nosuch") == ([EINVAL], "", 'command "nosuch" not found\n')
    assert proc.run("l") == ([EINVAL], "", "no file open, try 'help open'\n")
    assert proc.run("read 0") == ([EINVAL], "", "no file open, try 'help open'\n")  # before the count check
    assert proc.run("open") == ([EINVAL], "", "bad argument count 0 to open, expected at least 1 arguments\n")
    assert proc.run("o") == ([EINVAL], "", "bad argument count 0 to o, expected at least 1 arguments\n")
    assert proc.run("sleep") == ([EINVAL], "", "bad argument count 0 to sleep, expected 1 arguments\n")
    assert proc.run("quit a b c") == ([0], "", "")


def test_counts_with_an_image(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(4096))
    p = InProc(tmp_path, image=img)
    try:
        EINVAL = -errno.EINVAL
        assert p.run("l 1") == ([EINVAL], "", "bad argument count 1 to l, expected 0 arguments\n")
        assert p.run("read -P") == ([EINVAL], "", "bad argument count 1 to read, expected at least 2 arguments\n")
        assert p.run("t 1 2 3 4") == ([EINVAL], "", "bad argument count 4 to t, expected between 1 and 3 arguments\n")
        assert p.run("length") == ([0], "4 KiB\n", "")
    finally:
        p.close()


# -- completion ---------------------------------------------------------------------------------------
def complete(text: str, completer: CommandCompleter | None = None) -> list[tuple[str, int]]:
    c = completer or CommandCompleter(table)
    return [(x.text, x.start_position) for x in c.get_completions(Document(text), CompleteEvent())]


def test_complete_command_names() -> None:
    assert complete("re") == [(w, -2) for w in ("read", "readv", "record", "remove_break", "reopen", "resume")]
    assert complete("aio_") == [(w, -4) for w in ("aio_discard", "aio_flush", "aio_read", "aio_write")]
    assert complete("zz") == []


def test_complete_everything_from_nothing() -> None:
    assert [t for t, _ in complete("")] == table.words()
    assert set(table.words()) == set(NAMES) | set(ALIASES) | EXTENSIONS


def test_complete_exact_word_still_offers_longer_ones() -> None:
    assert [t for t, _ in complete("read")] == ["read", "readv"]


def test_complete_options_of_the_command() -> None:
    assert complete("read -") == [(o, -1) for o in ("-b", "-C", "-l", "-p", "-P", "-q", "-s", "-v")]
    assert complete("r 0 1 -") == complete("read -")  # aliases, options after operands
    assert complete("write -P") == [("-P", -2)]
    assert [t for t, _ in complete("aio_write -")] == ["-C", "-f", "-i", "-q", "-P", "-u", "-z"]
    assert [t for t, _ in complete("open -")] == ["-s", "-n", "-C", "-r", "-o", "-k", "-i", "-t", "-d", "-U"]
    assert complete("length -") == []
    assert complete("nosuch -") == []


def test_options_come_from_the_table() -> None:
    for spec in table:
        want = [f"-{c}" for c in spec.optstring if c != ":"]
        assert [t for t, _ in complete(f"{spec.name} -")] == want


def test_complete_no_options_for_operands() -> None:
    assert complete("read 0") == []
    assert complete("read ") == []


def test_complete_help_argument() -> None:
    assert [t for t, _ in complete("help wr")] == ["write", "writev"]
    assert complete("? aio_f") == [("aio_flush", -5)]


def test_complete_open_path(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"")
    (tmp_path / "disk.qcow2").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    got = [t for t, _ in complete(f"open {tmp_path}/di")]
    assert sorted(got) == ["sk.img", "sk.qcow2"]
