"""qio's prompt commands for fault injection (issue 13, docs/blkdebug.md "Rules at the prompt"): rules
added and removed without reopening the image, predicate breakpoints, the pause gate and aio_discard.
Each is checked for its effect on data and return codes and for its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def qio(img: Path, *cmds: str, args: tuple[str, ...] = ("-f", "raw", "-t", "writeback"), image: str | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qio", *args]
    for c in cmds:
        argv += ["-c", c]
    argv.append(image or f"blkdebug::{img}")
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in res.stdout.splitlines() if "ops/sec" not in ln and not ln.startswith("seed: ")]


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "t.raw"
    p.write_bytes(bytes(1 << 20))
    return p


def clean(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr


# -- rules at the prompt ----------------------------------------------------------------------------
def test_inject_rules_unrule(img: Path) -> None:
    res = qio(img, "inject event=write_aio errno=28 iotype=write count=2", "rules", "write -P 1 0 512",
              "write -P 2 0 512", "write -P 3 0 512", "inject event=read_aio iotype=read", "rules", "read 0 512",
              "unrule 2", "read -P 3 0 512", "rules")
    assert lines(res) == [
        "rule #1 inject-error event=write_aio errno=28 iotype=write count=2",
        "#1 inject-error event=write_aio errno=28 iotype=write count=2 (matched 0, fired 0)",
        "write failed: No space left on device", "write failed: No space left on device",
        "wrote 512/512 bytes at offset 0",
        "rule #2 inject-error event=read_aio errno=5 iotype=read",
        "#2 inject-error event=read_aio errno=5 iotype=read (matched 0, fired 0)",
        "read failed: Input/output error",
        "read 512/512 bytes at offset 0",
        "no rules"]
    assert res.returncode == 1
    assert img.read_bytes()[:512] == b"\x03" * 512
    clean(res)


def test_delay_corrupt_set_state_at_the_prompt(img: Path) -> None:
    res = qio(img, "set_state event=write_aio new_state=2", "corrupt state=2 offset=0 length=1 bit=0",
              "delay event=read_aio ns=1000", "read -P 0 0 512", "write -P 0 4k 512", "read -P 0 0 512",
              "rules")
    out = lines(res)
    assert out[:3] == ["rule #1 set-state event=write_aio new_state=2",
                       "rule #2 corrupt state=2 offset=0 bit=0", "rule #3 delay event=read_aio ns=1000"]
    assert out[3:7] == ["read 512/512 bytes at offset 0", "wrote 512/512 bytes at offset 4096",
                        "Pattern verification failed at offset 0, 512 bytes", "read 512/512 bytes at offset 0"]
    assert out[7:] == ["#1 set-state event=write_aio new_state=2 (matched 1, fired 1)",
                       "#2 corrupt state=2 offset=0 bit=0 (matched 1, fired 1)",
                       "#3 delay event=read_aio ns=1000 (matched 2, fired 2)"]
    assert img.read_bytes()[:512] == bytes(512)


def test_bad_blocks_at_the_prompt(img: Path) -> None:
    res = qio(img, "bad_blocks offset=4k length=4k", "read 4k 512", "write -P 9 4k 4k", "read -P 9 4k 512",
              "bad_blocks offset=4k", "rules")
    assert lines(res) == ["rule #1 bad-blocks ranges=4096+4096", "read failed: Input/output error",
                          "wrote 4096/4096 bytes at offset 4096", "read 512/512 bytes at offset 4096",
                          "bad_blocks: A [bad-blocks] range needs 'offset' and 'length'",
                          "#1 bad-blocks ranges=none (matched 1, fired 1)"]
    assert res.returncode == 1


@pytest.mark.parametrize(("cmd", "message"), [
    ("inject foo=1", "inject: [inject-error] section doesn't support the option 'foo'"),
    ("inject event=write_aio probability=2", "inject: Parameter 'probability' expects a number between 0 and 1"),
    ("inject event=write_aio once=on count=3", "inject: Cannot use both 'once' and 'count' in [inject-error]"),
    ("inject errno=5", "inject: Missing event name for rule"),
    ("inject", "inject: Missing event name for rule"),
    ("inject event", "inject: Expected KEY=VALUE, got 'event'"),
    ("inject event=write_aio event=read_aio", "inject: Duplicate option 'event'"),
    ("delay event=write_aio", "delay: A [delay] rule needs 'ns' or 'jitter'"),
    ("delay event=write_aio ns=-x", "delay: Parameter 'ns' expects a number"),
    ("corrupt bit=1 count=1", "corrupt: Cannot use both 'bit' and 'count' in [corrupt]"),
    ("set_state event=nosuch", "set_state: invalid parameter value: nosuch"),
    ("unrule 9", "unrule: no rule #9"),
    ("unrule x", "unrule: 'x' is not a rule id"),
])
def test_prompt_rule_errors(img: Path, cmd: str, message: str) -> None:
    res = qio(img, cmd, "rules")
    assert lines(res) == [message, "no rules"]
    assert res.returncode == 1
    clean(res)


@pytest.mark.parametrize("cmd", ["inject event=write_aio", "delay event=write_aio ns=1", "corrupt", "rules",
                                 "bad_blocks offset=0 length=1",
                                 "unrule 1", "set_state event=write_aio new_state=2"])
def test_rules_need_a_blkdebug_node(img: Path, cmd: str) -> None:
    res = qio(img, cmd, image=str(img))
    assert res.stdout == f"{cmd.split()[0]}: no blkdebug node below the image\n"
    assert res.returncode == 1
    clean(res)


def test_extensions_hidden_from_piped_help(img: Path) -> None:
    res = qio(img, "help")
    for name in ("inject", "delay ", "corrupt", "set_state", "rules", "unrule", "pause", "aio_discard", "bad_blocks"):
        assert name not in res.stdout


# -- predicate breakpoints --------------------------------------------------------------------------
def test_predicate_break_suspends_only_the_matching_request(img: Path) -> None:
    res = qio(img, "break -o 1024,512 -i write -n 2 write_aio A", "debug_state", "aio_write -P 1 0 512",
              "aio_write -P 2 1024 512", "aio_read 1024 512", "aio_write -P 3 1536 512", "aio_write -P 4 1024 4k",
              "wait_break A", "debug_state", "resume A", "aio_flush")
    out = lines(res)
    assert "    #1 write_aio A -o 1024,512 -i write -n 2 (hits 0)" in out
    assert out.count("blkdebug: Suspended request 'A'") == 1
    st = out.index("blkdebug: Suspended request 'A'")
    resumed = out.index("blkdebug: Resuming request 'A'")
    assert "wrote 4096/4096 bytes at offset 1024" not in out[:resumed] and st < resumed
    assert out[resumed:].count("wrote 4096/4096 bytes at offset 1024") == 1
    assert res.returncode == 0
    assert img.read_bytes()[1024:5120] == b"\x04" * 4096


def test_plain_break_unchanged_and_argument_errors(img: Path) -> None:
    res = qio(img, "break -x 1 2", "break -o 1 a", "break", "break -n 0 a b", "break -i bogus a b",
              "break -o x a b", "break -o 1 nosuch A")
    assert res.stderr.splitlines() == ["bad argument count 3 to break, expected 2 arguments",
                                       "bad argument count 3 to break, expected 2 arguments",
                                       "bad argument count 0 to break, expected 2 arguments"]
    assert res.stdout.splitlines() == [
        "break: -n expects a positive number, not '0'",
        "break: unknown iotype 'bogus' (one of read, write, write-zeroes, discard, flush)",
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
        "Could not set breakpoint: No such file or directory"]


# -- pause / unpause --------------------------------------------------------------------------------
def test_pause_holds_and_releases_in_submission_order(img: Path) -> None:
    res = qio(img, "aio_write -P 1 0 512", "pause", "aio_write -P 2 0 512", "aio_write -P 3 0 512", "pause",
              "unpause", "aio_flush", "read -P 3 0 512", "unpause")
    out = lines(res)
    assert out[:4] == ["wrote 512/512 bytes at offset 0", "pause: quiet, no request in flight",
                       "pause: already paused", "unpause: 2 request(s) released"]
    assert out[-2:] == ["read 512/512 bytes at offset 0", "unpause: not paused"]
    assert img.read_bytes()[:512] == b"\x03" * 512  # the later write went second
    assert res.returncode == 1


def test_pause_then_sync_command_or_quit_never_hangs(img: Path) -> None:
    res = qio(img, "pause", "aio_write -P 5 0 512", "read -P 5 0 512", "pause", "aio_write -P 6 512 512")
    assert res.stderr.splitlines() == [
        "qio: the command would wait forever: 2 request(s) held by pause; unpausing",
        "qio: exiting would wait forever: 1 request(s) held by pause; unpausing"]
    assert res.returncode == 0
    assert img.read_bytes()[:1024] == b"\x05" * 512 + b"\x06" * 512


def test_pause_drains_requests_in_flight_first(img: Path) -> None:
    res = qio(img, "break write_aio A", "aio_write -P 7 0 512", "pause", "debug_state")
    assert "qio: pause would wait forever: request(s) 'A' suspended at blkdebug breakpoints; resuming them" \
        in res.stderr
    out = lines(res)
    assert out.index("wrote 512/512 bytes at offset 0") < out.index("pause: quiet, no request in flight")


# -- aio_discard ------------------------------------------------------------------------------------
def test_aio_discard(img: Path) -> None:
    img.write_bytes(b"\x11" * (1 << 20))
    res = qio(img, "aio_discard 0 4k", "aio_discard -q 4k 4k", "aio_discard -i 0 1", "aio_flush",
              "read -P 0 0 8k", "read -P 0x11 8k 4k", image=str(img))
    assert lines(res) == ["injecting invalid discard request", "discard 4096/4096 bytes at offset 0",
                          "read 8192/8192 bytes at offset 0", "read 4096/4096 bytes at offset 8192"]
    assert res.returncode == 0


def test_aio_discard_errors(img: Path) -> None:
    res = qio(img, "aio_discard 0", "aio_discard 0 3G", "aio_discard 0 x", "aio_discard 2M 4k", "aio_discard -x 0 1",
              "aio_flush", image=str(img))
    assert res.stderr.splitlines() == ["bad argument count 1 to aio_discard, expected at least 2 arguments",
                                       "aio_discard: invalid option -- 'x'"]
    assert lines(res) == ["length cannot exceed 2147483136, given 3G",
                          "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x",
                          "aio_discard [-Ciq] off len -- asynchronously discards a number of bytes",
                          "aio_discard failed: Input/output error"]
    assert res.returncode == 1


def test_aio_discard_help(img: Path) -> None:
    res = qio(img, "help aio_discard")
    assert res.stdout.startswith("aio_discard [-Ciq] off len -- asynchronously discards a number of bytes\n\n"
                                 " asynchronously discards a range of bytes from the given offset\n")


def test_aio_discard_races_a_write_under_a_breakpoint(img: Path) -> None:
    """The discard-versus-write race aio_discard exists for: the order is chosen with a breakpoint."""
    img.write_bytes(b"\x11" * (1 << 20))
    res = qio(img, "break write_aio A", "aio_write -P 0x22 0 4k", "aio_discard 0 4k", "aio_flush",
              "read -P 0x22 0 4k")
    out = lines(res)
    assert "discard 4096/4096 bytes at offset 0" in out and "read 4096/4096 bytes at offset 0" in out
    assert res.stderr.startswith("qio: aio_flush would wait forever")


def test_completion_knows_the_rule_keys() -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from qio.commands.table import build_table
    from qio.interactive import CommandCompleter

    def complete(text: str) -> list[str]:
        return [c.text for c in CommandCompleter(build_table()).get_completions(Document(text), CompleteEvent())]

    assert complete("inject e") == ["errno=", "event="]
    assert complete("delay event=write_aio j") == ["jitter="]
    assert complete("corrupt ") == ["after=", "bit=", "count=", "length=", "offset=", "once=", "probability=",
                                    "state="]
    assert complete("set_state new") == ["new_state="]
    assert complete("bad_blocks ") == ["length=", "offset="]
    assert complete("inject event=wr") == []
