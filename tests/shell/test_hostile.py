"""Hostile input: random command lines must never crash qio (no exception, no traceback), whatever
they contain -- command words from the table, random option letters, numbers in every syntax, raw
bytes, unicode, very long words.

Excluded from generation because they legitimately end or stall the process: ``abort``, ``sigraise``,
``sleep`` with more than a few milliseconds and qio's ``wait_break -t SECONDS``; ``truncate`` is kept
below 1 MiB, and sizes between 1 MiB and the 2147483136-byte request limit are not generated (a valid
``read 0 2G`` allocates its whole buffer, as in qemu-io, which would only make the test slow).

Set ``QIO_FUZZ_SCALE=N`` to run N times as many examples (for a longer bug hunt).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qio.commands.table import build_table
from qio.numbers import cvtnum
from qio_helpers import InProc

SCALE = int(os.environ.get("QIO_FUZZ_SCALE", "1"))
FORBIDDEN = ("abort", "sigraise", "sleep")
COMMANDS = [w for w in build_table().words() if w not in FORBIDDEN]
IMG = "@IMG@"  # replaced by the image path

# -- words -----------------------------------------------------------------------------------------------
EDGE_NUMBERS = [
    "0", "1", "-1", "-0", "+0", "512", "1k", "64k", "0x10", "0x10b", "010", "08", "1.5", "1.5k", "1.0", "5.k",
    "0.0001k", "1e", "7E", "8E", "16E", "1kb", "0x", "0xg", "00x10", "1e3", "0x1k", "0x1.5", ".5k", "1.",
    "9223372036854775807", "9223372036854775808", "0xFFFFFFFFFFFFFFFF", "18446744073709551616",
    "2147483137", "2G", "3G", "1T", "4P", "0x7fffffffffffffff", "\t5", "1 k", "nan", "inf", "1M", "1m",
    "9" * 300, "0x" + "f" * 200, "1" + "0" * 100 + "k", "0." + "9" * 50 + "k", "65536", "65535", "65537",
]


@st.composite
def numbers(draw: st.DrawFn) -> str:
    n = draw(st.one_of(st.integers(0, 4096), st.integers(0, 70000), st.sampled_from([1 << 20, 1 << 16])))
    form = draw(st.sampled_from(["dec", "hex", "HEX", "oct", "k", "frac", "plus", "neg", "b", "tab"]))
    if form == "hex":
        return f"0x{n:x}"
    if form == "HEX":
        return f"0X{n:X}"
    if form == "oct":
        return f"0{n:o}"
    if form == "k":
        return f"{n // 1024}k"
    if form == "frac":
        return f"{n / 1024:.{draw(st.integers(0, 6))}f}k"
    if form == "plus":
        return f"+{n}"
    if form == "neg":
        return f"-{n}"
    if form == "b":
        return f"{n}b"
    if form == "tab":
        return f"\t{n}"
    return str(n)


options = st.one_of(
    st.builds(lambda c: "-" + c, st.characters(min_codepoint=33, max_codepoint=126)),
    st.builds(lambda s: "-" + s, st.text(st.sampled_from("abcCdfiklmnopPqrsStTuUvwz:?-"), min_size=1, max_size=6)),
    st.sampled_from(["-", "--", "---", "-P", "-s", "-l", "-m", "-o", "-t", "-c", "-d", "-i", "-zn", "-zu",
                     "-Cq", "-qv", "-P0x41", "-Pq", "--cmd", "--help"]),
)
patterns = st.sampled_from(["0x41", "065", "09", "-0", "256", "255", "0xff", "q", "-1", "0x", "1k", "0"])
keywords = st.sampled_from([
    "off", "metadata", "falloc", "full", "none", "writeback", "writethrough", "directsync", "unsafe", "ignore",
    "unmap", "threads", "native", "io_uring", "driver=raw", "driver=file", "driver=qcow2", "driver=blkdebug",
    "read-only=on", "cache.direct=on", "discard=unmap", "foo=bar", "x", "a=", "=b", ",", ",,", "driver=raw,",
    "json:{", "json:{}", 'json:{"driver":"raw"}', "blkdebug::", "file:", "nbd:x", "/", ".", "/nonexistent",
    "write_aio", "read_aio", "flush_to_disk", "tag", "A", IMG, "file.filename=" + IMG,
    "driver=raw,file.filename=" + IMG, "blkdebug::" + IMG, "driver=raw,file.driver=blkdebug,file.image=" + IMG,
])
random_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00 "), min_size=1,
                      max_size=12)
random_bytes = st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b"\x00", b"").replace(b" ", b"").decode("utf-8", "surrogateescape")).filter(bool)
long_words = st.sampled_from(["A" * 5000, "9" * 3000, "-" + "q" * 2000, "0x" + "1" * 1000, "é" * 1500,
                              "\udcff" * 1100, "r" * 1023, "read" + "\t" * 10])
word = st.one_of(numbers(), st.sampled_from(EDGE_NUMBERS), options, patterns, keywords, random_text, random_bytes,
                 st.sampled_from(COMMANDS), long_words)


@st.composite
def command_lines(draw: st.DrawFn) -> str:
    first = draw(st.one_of(st.sampled_from(COMMANDS), st.sampled_from(COMMANDS), word,
                           st.just("sleep"), st.just("")))
    rest = draw(st.lists(word, max_size=8))
    if first == "sleep":
        rest = [draw(st.sampled_from(["0", "1", "2", "0x2", "02", "-1", "1k", "x", "", "9" * 30]))]
        if rest[0] == "9" * 30:  # strtol saturates at LONG_MAX: reject instead of sleeping
            rest = ["x"]
    sep = draw(st.sampled_from([" ", "  ", " \t"]))
    return sep.join([first, *rest])


@st.composite
def plausible_lines(draw: st.DrawFn) -> str:
    """Closer to valid commands, to get past argument parsing into the I/O paths: a command, a few of its
    own options (with arguments where they take one), then numbers."""
    spec = draw(st.sampled_from([s for s in build_table() if s.name not in FORBIDDEN]))
    words = [draw(st.sampled_from([spec.name, spec.altname or spec.name]))]
    letters = [c for c in spec.optstring if c != ":"]
    for c in draw(st.lists(st.sampled_from(letters), max_size=3)) if letters else []:
        words.append("-" + c)
        if spec.optstring[spec.optstring.index(c) + 1 : spec.optstring.index(c) + 2] == ":":
            words.append(draw(st.one_of(patterns, numbers(), keywords)))
    fitting = max(spec.argmin, 0) if spec.argmax != -1 else max(spec.argmin, 2)  # usually the right count
    count = draw(st.one_of(st.just(fitting), st.just(fitting), st.integers(0, 4)))
    words += draw(st.lists(st.one_of(numbers(), numbers(), st.sampled_from(EDGE_NUMBERS)), min_size=count,
                           max_size=count))
    return " ".join(words)


def dangerous(line: str) -> bool:
    """Lines the exclusions above are about: they would kill the process or run for a long time."""
    words = [w for w in line.split(" ") if w]
    if not words:
        return False
    if words[0] in FORBIDDEN and not (words[0] == "sleep" and len(words) == 2 and words[1] in
                                      ("0", "1", "2", "0x2", "02", "-1", "1k", "x")):
        return True
    if words[0] == "wait_break" and any(w.startswith("-") and "t" in w for w in words[1:]):
        return True  # qio's "-t SECONDS" timeout may legitimately wait that long
    if words[0] in ("truncate", "t"):
        return any(cvtnum(w)[0] == 0 and cvtnum(w)[1] > (1 << 20) for w in words[1:])
    return False


def make_image(d: str) -> str:
    path = os.path.join(d, "test.img")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 256)  # 64 KiB
    return path


# -- in process ------------------------------------------------------------------------------------------
@settings(max_examples=400 * SCALE, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(command_lines(), plausible_lines()), min_size=1, max_size=8))
def test_shell_never_raises(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        img = make_image(d)
        lines = [line.replace(IMG, img) for line in lines]
        for line in lines:
            assume(not dangerous(line))
        p = InProc(Path(d), image=Path(img))
        try:
            rets, _, _ = p.run(*lines)
            assert len(rets) == len(lines)
            for ret in rets:
                assert type(ret) is int
                assert ret <= 0
            negatives = [r for r in rets if r < 0]
            assert p.sh.last_error == (negatives[-1] if negatives else 0)
        finally:
            p.close()  # drains outstanding AIO and closes the image: must not raise either


@settings(max_examples=100 * SCALE, deadline=None)
@given(st.lists(st.sampled_from([*COMMANDS, "open -o driver=raw " + IMG, "open " + IMG, "open -r " + IMG,
                                 "open -o driver=raw blkdebug::" + IMG, "break write_aio A", "resume A",
                                 "wait_break A", "remove_break A", "close", "reopen -r", "reopen -w",
                                 "reopen -c none", "aio_flush"]),
                max_size=12),
       st.lists(word, max_size=3))
def test_shell_state_changes_never_raise(cmds: list[str], extra: list[str]) -> None:
    """Sequences of open/close/reopen mixed with every command, with and without an image."""
    with tempfile.TemporaryDirectory() as d:
        img = make_image(d)
        lines = [f"{c} {' '.join(extra)}".replace(IMG, img) for c in cmds]
        for line in lines:
            assume(not dangerous(line))
        p = InProc(Path(d), image=Path(img))
        try:
            for ret in p.run(*lines)[0]:
                assert type(ret) is int and ret <= 0
        finally:
            p.close()


# -- subprocesses -----------------------------------------------------------------------------------------
QIO = [sys.executable, "-m", "qio"]


def fgets_pieces(script: bytes) -> list[str]:
    """The command lines qio's pipe reader produces, as ``fgets(line, 1024)`` does: at most 1023 bytes
    at a time (a longer line comes in pieces), without the newline, cut at a NUL."""
    pieces = []
    pos = 0
    while pos < len(script):
        nl = script.find(b"\n", pos, pos + 1023)
        if nl >= 0:
            piece, pos = script[pos:nl], nl + 1
        else:
            piece, pos = script[pos : pos + 1023], pos + 1023
        pieces.append(piece.split(b"\0")[0].decode("utf-8", "surrogateescape"))
    return pieces


def first_word(line: str) -> str:
    return next((w for w in line.split(" ") if w), "")


def test_fgets_pieces() -> None:
    assert fgets_pieces(b"") == []
    assert fgets_pieces(b"a\nb") == ["a", "b"]
    assert fgets_pieces(b"a\nb\n") == ["a", "b"]
    assert fgets_pieces(b"\n\n") == ["", ""]
    assert fgets_pieces(b"x" * 1023 + b"\n") == ["x" * 1023, ""]
    assert fgets_pieces(b"x" * 1022 + b"\n") == ["x" * 1022]
    assert fgets_pieces(b"x" * 2050) == ["x" * 1023, "x" * 1023, "xxxx"]
    assert fgets_pieces(b"ab\0cd\nef") == ["ab", "ef"]


script_lines = st.one_of(
    command_lines().map(lambda s: s.encode("utf-8", "surrogateescape")),
    plausible_lines().map(lambda s: s.encode("utf-8", "surrogateescape")),
    st.binary(max_size=40),
    st.sampled_from([b"", b" ", b"\t", b"\r", b"quit", b"read 0 512\r", b"\xff\xfe", b"read\x000 1",
                     b"r" * 2000, b"help " + b"x" * 1030 + b"length"]),
)


@settings(max_examples=25 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(script_lines, max_size=10), st.booleans())
def test_piped_scripts(lines: list[bytes], final_newline: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        img = make_image(d)
        script = b"\n".join(line.replace(IMG.encode(), img.encode()) for line in lines)
        if final_newline:
            script += b"\n"
        for piece in fgets_pieces(script):
            assume(not dangerous(piece))
            assume(not any(w in piece for w in FORBIDDEN))
        p = subprocess.run([*QIO, "-f", "raw", img], input=script, capture_output=True, timeout=60, cwd=d)
        assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
        assert p.returncode in (0, 1), (p.returncode, p.stderr)
        # one prompt before every line qio reads, and one more before it sees EOF; none after quit
        pieces = fgets_pieces(script)
        quits = [i for i, piece in enumerate(pieces) if first_word(piece) in ("quit", "q")]
        prompts = quits[0] + 1 if quits else len(pieces) + 1
        assert p.stdout.count(b"qio> ") == prompts, p.stdout[-300:]


main_tokens = st.one_of(
    st.sampled_from(["-c", "-f", "-r", "-s", "-n", "-C", "-m", "-k", "-i", "-t", "-d", "-T", "-U", "-h", "-V",
                     "-q", "-o", "-p", "-g", "-", "--", "-rU", "-fraw", "-cinfo", "-t", "--cmd", "--cmd=length",
                     "--format=raw", "--format", "--cache", "--cache=bogus", "--aio=x", "--aio=threads",
                     "--object", "--object=secret,id=s", "--image-opts", "--bogus", "--bogus=1", "--c", "--n=1",
                     "--help=x", "--read-only", "--force-share", "--trace", "--trace=foo", "--discard=unmap",
                     "--copy-on-read", "--native-aio", "--misalign", "--snapshot", "--nocache", "--version",
                     "raw", "file", "qcow2", "blkdebug", "none", "writeback", "unmap", "off", "native", "threads",
                     "help", "read 0 1", "write -P 0x41 0 1", "length", "info", "map", "quit", "nosuch",
                     "read -P", "open " + IMG, "close", "driver=raw,file.filename=" + IMG, "driver=file", IMG, IMG,
                     "json:{}", "blkdebug::" + IMG, "/nonexistent", "."]),
    random_text, random_bytes, st.sampled_from(EDGE_NUMBERS),
)


@settings(max_examples=25 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(main_tokens, max_size=7))
def test_malformed_main_command_lines(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        img = make_image(d)
        argv = [a.replace(IMG, img) for a in argv]
        for a in argv:
            assume(not dangerous(a))
            assume(not any(w in a for w in FORBIDDEN))
        env = dict(os.environ, XDG_STATE_HOME=d)
        p = subprocess.run([*QIO, *argv], stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=d, env=env)
        assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
        assert p.returncode in (0, 1), (p.returncode, p.stderr)
