"""Random blkdebug configs and random breakpoint command sequences: never a traceback, never a hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qio.block.blkdebug_config import inline_sections, make_rule, parse_config_text
from qio.block.errors import QemuError
from qio.block.events import EVENT_NAMES

KEYS = ["event", "state", "iotype", "errno", "sector", "once", "immediately", "new_state", "bogus", "#"]
VALUES = st.one_of(st.sampled_from([*EVENT_NAMES, "read", "write", "flush", "on", "off", "yes", "5", "28", "-5",
                                    "0x10", "010", "99999999999999999999999", "", "x y"]),
                   st.text(max_size=12))
LINE = st.one_of(
    st.sampled_from(["[inject-error]", "[set-state]", '[inject-error "r1"]', "[bogus]", "[]", "", "   ", "# c",
                     "  # c"]),
    st.builds(lambda k, v, q, sp: f"{sp}{k}{' = ' if q else '='}{chr(34) + v + chr(34) if q else v}",
              st.sampled_from(KEYS), VALUES, st.booleans(), st.sampled_from(["", "  ", "\t"])),
    st.text(max_size=40),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, max_size=12))
def test_random_config_files_parse_or_fail_cleanly(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    try:
        sections = parse_config_text(text)
        for s in sections:
            make_rule(s.group, s.values)
    except QemuError as e:
        assert str(e)  # a QEMU-style message, never an empty one


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([f"inject-error.{i}.{k}" for i in range(3) for k in KEYS[:7]]
                                       + [f"set-state.{i}.{k}" for i in range(2) for k in ("event", "state")]),
                       st.one_of(VALUES, st.integers(-10, 2**65), st.booleans()), max_size=8))
def test_random_inline_rules(options: dict[str, object]) -> None:
    try:
        for group, values in inline_sections(dict(options)):
            make_rule(group, values)
    except QemuError as e:
        assert str(e)


EVENTS = ["write_aio", "read_aio", "pwritev", "pwritev_done", "flush_to_os", "flush_to_disk", "none", "bogus"]
COMMAND = st.one_of(
    st.builds(lambda e, t: f"break {e} {t}", st.sampled_from(EVENTS), st.sampled_from("AB")),
    st.builds(lambda c, t: f"{c} {t}", st.sampled_from(["resume", "remove_break", "wait_break"]),
              st.sampled_from("AB")),
    st.builds(lambda c, o: f"{c} {o} 512", st.sampled_from(["aio_write", "aio_read", "write", "read"]),
              st.sampled_from(["0", "512", "4k"])),
    st.sampled_from(["aio_flush", "flush", "debug_state", "length", "close", "wait_break -t 0 A"]),
)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("bd") / "t.raw"
    p.write_bytes(bytes(64 * 1024))
    return p


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(COMMAND, min_size=1, max_size=12), st.sampled_from(["writeback", "writethrough"]),
       st.booleans())
def test_random_breakpoint_sequences_never_hang(image: Path, cmds: list[str], cache: str, piped: bool) -> None:
    argv = [sys.executable, "-m", "qio", "-f", "raw", "-t", cache]
    stdin = None
    if piped:
        stdin = "\n".join(cmds) + "\n"
    else:
        for c in cmds:
            argv += ["-c", c]
    argv.append(f"blkdebug::{image}")
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode in (0, 1), (res.returncode, res.stderr)
