"""The interactive prompt on a real pseudo-terminal (pexpect): an unusable history file
(``$XDG_STATE_HOME/qio/history`` a directory, its parent a regular file, a file that cannot be
written) costs one warning before the first prompt, never an exception at every line."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
from oracle import ROOT  # noqa: E402  (after the importorskip)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _session(img: Path, state: Path, lines: tuple[str, ...]) -> tuple[list[str], int | None]:
    """Type ``lines`` at qio's prompts on a pty; returns what came before each prompt and after the
    last line, and the exit status."""
    env = dict(os.environ, XDG_STATE_HOME=str(state), PYTHONPATH=str(ROOT), TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "qio", "-f", "raw", str(img)], env=env, encoding="utf-8",
                          timeout=20)
    seen = []
    try:
        for line in lines:
            child.expect_exact("qio> ")
            seen.append(child.before)
            child.sendline(line)
        child.expect(pexpect.EOF)
        seen.append(child.before)
    finally:
        child.close(force=True)
    return seen, child.exitstatus


@pytest.mark.parametrize("kind", ["directory", "parent-is-file", "unwritable"])
def test_unusable_history_warns_once(tmp_path: Path, kind: str) -> None:
    img = tmp_path / "t.img"
    img.write_bytes(bytes(1 << 20))
    state = tmp_path / "state"
    state.mkdir()
    hist = state / "qio" / "history"
    if kind == "directory":
        hist.mkdir(parents=True)
        reason = "Is a directory"
    elif kind == "parent-is-file":
        (state / "qio").write_text("")
        reason = "File exists"
    else:
        hist.parent.mkdir()
        hist.symlink_to("/proc/version")  # readable, but writing it fails even for root
        reason = ""
    seen, status = _session(img, state, ("length", "write -q 0 512", "length", "quit"))
    text = ANSI.sub("", "".join(seen))
    assert status == 0
    assert "Traceback" not in text and "Press ENTER" not in text and "Exception" not in text
    warnings = re.findall(r"qio: warning: history file '([^']*)' is not usable \(([^)]*)\)", text)
    assert len(warnings) == 1, text
    assert warnings[0][0] == str(hist)
    if reason:
        assert warnings[0][1] == reason
    assert text.count("1 MiB") == 2
    # The warning comes before the first prompt: seen[0] is what preceded it.
    assert "warning: history file" in ANSI.sub("", seen[0])


def test_usable_history_is_written(tmp_path: Path) -> None:
    img = tmp_path / "t.img"
    img.write_bytes(bytes(1 << 20))
    state = tmp_path / "state"
    out, _ = _session(img, state, ("length", "quit"))
    assert "warning" not in "".join(out)
    assert "+length" in (state / "qio" / "history").read_text()
