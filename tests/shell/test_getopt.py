"""GNU getopt / getopt_long emulation (spec §1.1, §2.4).

Expected messages were taken from glibc 2.36 as used by the real qemu-io 7.2 (``qemu-io --c``,
``qemu-io --bogus=x``, ``qemu-io -f raw -c 'read 0 1 -P' x.raw`` ...).
"""

from __future__ import annotations

from qio.cli import LONG, SHORT
from qio.getopt import GetOpt, LongOpt

READ_OPTS = "bCl:pP:qs:v"


def run(argv: list[str], optstring: str = READ_OPTS,
        longopts: tuple[LongOpt, ...] = ()) -> tuple[list[tuple[str, str | None]], list[str], str]:
    """All (option, argument) pairs, the remaining operands and the error text."""
    errors: list[str] = []
    g = GetOpt(argv, optstring, errors.append, longopts)
    opts = list(g)
    return opts, g.args, "".join(errors)


def main(*args: str) -> tuple[list[tuple[str, str | None]], list[str], str]:
    return run(["qemu-io", *args], SHORT, LONG)


# -- short options ------------------------------------------------------------------------------------
def test_no_options() -> None:
    assert run(["read", "0", "512"]) == ([], ["0", "512"], "")


def test_permutation_options_after_operands() -> None:
    assert run(["read", "0", "1", "-q"]) == ([("q", None)], ["0", "1"], "")
    assert run(["read", "0", "-v", "1", "-C"]) == ([("v", None), ("C", None)], ["0", "1"], "")


def test_double_dash_ends_options() -> None:
    assert run(["read", "-q", "--", "-1", "-v"]) == ([("q", None)], ["-1", "-v"], "")
    assert run(["read", "0", "--", "-q"]) == ([], ["0", "-q"], "")  # operands before -- come first
    assert run(["read", "--"]) == ([], [], "")


def test_only_first_double_dash_is_special() -> None:
    assert run(["read", "--", "--", "1"]) == ([], ["--", "1"], "")


def test_lone_dash_is_an_operand() -> None:
    assert run(["read", "-", "1"]) == ([], ["-", "1"], "")


def test_clusters() -> None:
    assert run(["read", "-qv", "0", "1"]) == ([("q", None), ("v", None)], ["0", "1"], "")
    assert run(["read", "-P0x41", "0", "1"]) == ([("P", "0x41")], ["0", "1"], "")
    assert run(["read", "-qvP0x41", "0", "1"]) == ([("q", None), ("v", None), ("P", "0x41")], ["0", "1"], "")
    # the rest of the cluster is the argument, even if it looks like options
    assert run(["read", "-Pq", "0", "1"]) == ([("P", "q")], ["0", "1"], "")


def test_argument_taken_from_the_next_word() -> None:
    assert run(["read", "-P", "0x41", "0", "1"]) == ([("P", "0x41")], ["0", "1"], "")
    assert run(["read", "0", "-P", "65", "1"]) == ([("P", "65")], ["0", "1"], "")
    # ... even if that word starts with a dash, or is "--"
    assert run(["read", "-P", "-q", "0", "1"]) == ([("P", "-q")], ["0", "1"], "")
    assert run(["read", "-P", "--", "0", "1"]) == ([("P", "--")], ["0", "1"], "")
    assert run(["read", "-s", "1", "-l", "2", "0", "4"]) == ([("s", "1"), ("l", "2")], ["0", "4"], "")


def test_missing_argument() -> None:
    opts, args, err = run(["read", "0", "1", "-P"])
    assert opts == [("?", None)]
    assert args == ["0", "1"]
    assert err == "read: option requires an argument -- 'P'\n"


def test_missing_argument_at_end_of_cluster() -> None:
    opts, _, err = run(["read", "-qP"])
    assert opts == [("q", None), ("?", None)]
    assert err == "read: option requires an argument -- 'P'\n"


def test_invalid_option() -> None:
    opts, args, err = run(["read", "-x", "0", "1"])
    assert opts == [("?", None)]
    assert args == ["0", "1"]
    assert err == "read: invalid option -- 'x'\n"


def test_negative_number_is_an_invalid_option() -> None:
    opts, _, err = run(["read", "-1", "512"])
    assert opts == [("?", None)]
    assert err == "read: invalid option -- '1'\n"


def test_colon_is_never_an_option() -> None:
    assert run(["read", "-:"])[2] == "read: invalid option -- ':'\n"


def test_message_uses_the_word_as_typed() -> None:
    assert run(["r", "-x"])[2] == "r: invalid option -- 'x'\n"


def test_parsing_continues_after_an_error() -> None:
    opts, args, err = run(["read", "-xq", "-y", "0", "1", "-v"])
    assert opts == [("?", None), ("q", None), ("?", None), ("v", None)]
    assert args == ["0", "1"]
    assert err == "read: invalid option -- 'x'\nread: invalid option -- 'y'\n"


def test_options_are_produced_lazily() -> None:
    """Commands act on each option as it comes (``aio_read -i`` returns before a later bad option)."""
    errors: list[str] = []
    g = GetOpt(["aio_read", "-i", "-x", "0", "1"], "CP:iqv", errors.append)
    assert next(g) == ("i", None)
    assert errors == []
    assert next(g) == ("?", None)
    assert errors == ["aio_read: invalid option -- 'x'\n"]


def test_no_optstring() -> None:
    assert run(["flush", "-q"], "")[2] == "flush: invalid option -- 'q'\n"
    assert run(["alloc", "0", "1"], "") == ([], ["0", "1"], "")


# -- long options (the main command line) -------------------------------------------------------------
def test_long_with_equals() -> None:
    assert main("--cmd=read 0 1", "img") == ([("c", "read 0 1")], ["img"], "")
    assert main("--cmd=") == ([("c", "")], [], "")
    assert main("--cmd=a=b") == ([("c", "a=b")], [], "")


def test_long_with_separate_argument() -> None:
    assert main("--cmd", "help", "img") == ([("c", "help")], ["img"], "")
    assert main("img", "--format", "raw") == ([("f", "raw")], ["img"], "")
    assert main("--cmd", "--format") == ([("c", "--format")], [], "")


def test_long_without_argument() -> None:
    assert main("--read-only", "--force-share", "--image-opts") == (
        [("r", None), ("U", None), ("image-opts", None)], [], "")


def test_unique_prefix_abbreviation() -> None:
    assert main("--cm=help") == ([("c", "help")], [], "")
    assert main("--co") == ([("C", None)], [], "")  # copy-on-read
    assert main("--ca", "none") == ([("t", "none")], [], "")
    assert main("--re") == ([("r", None)], [], "")
    assert main("--i") == ([("image-opts", None)], [], "")
    assert main("--nat") == ([("k", None)], [], "")


def test_exact_match_beats_prefix() -> None:
    longopts = (LongOpt("aio", True, "i"), LongOpt("aiox", False, "x"))
    assert run(["p", "--aio=threads"], "", longopts) == ([("i", "threads")], [], "")


def test_same_option_twice_is_not_ambiguous() -> None:
    longopts = (LongOpt("alpha", False, "a"), LongOpt("alps", False, "a"))
    assert run(["p", "--al"], "", longopts) == ([("a", None)], [], "")


def test_ambiguous_prefix() -> None:
    opts, _, err = main("--c")
    assert opts == [("?", None)]
    assert err == "qemu-io: option '--c' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'\n"
    assert main("--n")[2] == "qemu-io: option '--n' is ambiguous; possibilities: '--nocache' '--native-aio'\n"


def test_ambiguous_prefix_with_value() -> None:
    assert main("--c=x")[2] == \
        "qemu-io: option '--c=x' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'\n"


def test_unrecognized() -> None:
    opts, args, err = main("--bogus", "img")
    assert (opts, args) == ([("?", None)], ["img"])
    assert err == "qemu-io: unrecognized option '--bogus'\n"


def test_unrecognized_with_value() -> None:
    assert main("--bogus=x")[2] == "qemu-io: unrecognized option '--bogus=x'\n"


def test_doesnt_allow_an_argument() -> None:
    opts, _, err = main("--help=x")
    assert opts == [("?", None)]
    assert err == "qemu-io: option '--help' doesn't allow an argument\n"
    # the message names the full option, not the abbreviation typed
    assert main("--he=x")[2] == "qemu-io: option '--help' doesn't allow an argument\n"
    assert main("--read-only=")[2] == "qemu-io: option '--read-only' doesn't allow an argument\n"


def test_long_requires_an_argument() -> None:
    opts, _, err = main("--cmd")
    assert opts == [("?", None)]
    assert err == "qemu-io: option '--cmd' requires an argument\n"
    assert main("--cm")[2] == "qemu-io: option '--cmd' requires an argument\n"


def test_short_main_options() -> None:
    assert main("-rc", "help") == ([("r", None), ("c", "help")], [], "")
    assert main("-c")[2] == "qemu-io: option requires an argument -- 'c'\n"
    assert main("-q")[2] == "qemu-io: invalid option -- 'q'\n"
    assert main("-fraw", "-Ut", "none") == ([("f", "raw"), ("U", None), ("t", "none")], [], "")


def test_main_uses_argv0_verbatim() -> None:
    errors: list[str] = []
    list(GetOpt(["/usr/bin/qemu-io", "-q"], SHORT, errors.append, LONG))
    assert errors == ["/usr/bin/qemu-io: invalid option -- 'q'\n"]


def test_double_dash_with_long_options() -> None:
    assert main("--", "--cmd", "-r") == ([], ["--cmd", "-r"], "")
