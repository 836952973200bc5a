"""QEMU 7.2's own qemu-iotests, run with qemu-io replaced by qio (qemu-img stays the real one).

The runner script beside this file fetches QEMU's Debian source package on first use; the test is
skipped where qemu-img is missing or the source cannot be fetched (no Debian archive reachable).  qio is run
through a script named ``qemu-io`` that imports this checkout's qio (not an installed copy): like
qemu-io, qio names its prompt after argv[0], and the iotests filter only strips ``qemu-io> `` prompts.
The tests run in batches of a few, so that one batch stays well inside the runner's 15-minute limit
on a loaded machine and a failure names a short list.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from oracle import qio_wrapper

RUNNER = Path(__file__).with_name("run_qemu_iotests.sh")
NO_SOURCE = 3  # the runner's exit status when QEMU's source cannot be fetched
RAW_TESTS = [
    "001", "002", "003", "004", "005", "008", "009", "010", "011", "012", "021", "025", "032", "033", "048", "052",
    "063", "077", "086", "101", "159", "160", "170", "171", "221", "226", "251", "253",
]
# 026: the blkdebug inject-error matrix; 046: break/resume/wait_break races on qcow2.
QCOW2_TESTS = [
    "001", "002", "003", "004", "005", "008", "024", "026", "046", "048", "050", "062", "080", "086", "089", "090",
    "097", "103", "105", "107", "112", "114", "121", "122", "137", "138", "154", "159", "170", "177", "179", "187",
    "204", "217", "226", "250", "251", "252", "265", "268", "272", "290", "292", "305", "313",
    # issue 17: reopen, encryption (aes, luks), compression (zlib, zstd, the compress filter), extended L2
    "133", "134", "158", "188", "189", "198", "214", "270", "271", "284", "287", "289", "293",
]
# the tests whose `_require_working_luks` runs real `qemu-img create -f luks` first
NEED_LUKS_CREATE = {"134", "158", "188", "189", "198", "284", "293"}
# QEMU 7.2's luks driver as a format of its own
LUKS_TESTS = ["293"]
BATCH = 12
# where the runner unpacks QEMU's source (its own default)
QSRC = Path(os.environ.get("QSRC") or Path(tempfile.gettempdir()) / "qsrc")


def _batches() -> list[tuple[str, list[str]]]:
    """Each format's list cut into runs of BATCH tests."""
    lists = (("raw", RAW_TESTS), ("qcow2", QCOW2_TESTS), ("luks", LUKS_TESTS))
    return [(fmt, tests[i:i + BATCH]) for fmt, tests in lists for i in range(0, len(tests), BATCH)]


@contextlib.contextmanager
def _fetch_lock() -> Iterator[None]:
    """Held by the batch that fetches QEMU's source, so that parallel test workers (pytest -n) do not
    unpack it into the same folder at once; once it is there, batches run side by side."""
    QSRC.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{QSRC}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (QSRC / "qemu-7.2.0" / "tests" / "qemu-iotests" / "check").exists():
            fcntl.flock(lock, fcntl.LOCK_UN)  # fetched (by an earlier batch): no need to hold it
        yield


def _run(tmp_path: Path, fmt: str, tests: list[str]) -> subprocess.CompletedProcess[str]:
    with _fetch_lock():
        return subprocess.run(["bash", str(RUNNER), str(qio_wrapper(tmp_path / "qemu-io")), fmt, *tests],
                              capture_output=True, text=True, timeout=1700)


def _not_passed(stdout: str) -> tuple[list[str], list[str]]:
    """The tests the runner lists as failed, and those it lists as not run."""
    found: dict[str, list[str]] = {"Failures": [], "Not run": []}
    for line in stdout.splitlines():
        head, _, rest = line.partition(": ")
        if head in found:
            found[head] += rest.split()
    return found["Failures"], found["Not run"]


@pytest.mark.oracle("qemu-img")  # qemu-io is replaced by qio
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("fmt", "tests"), _batches(), ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_qemu_iotests(tmp_path: Path, fmt: str, tests: list[str]) -> None:
    res = _run(tmp_path, fmt, tests)
    if res.returncode == NO_SOURCE:
        pytest.skip(res.stdout.strip())
    log = res.stdout
    failed, not_run = _not_passed(res.stdout)
    # The encryption tests' own `qemu-img create -f luks` times its key derivation and fails ("Unable to
    # get accurate CPU usage") on a loaded machine: the test is then "not run" (or, inside it, fails).
    # Those are run again, three times at most; a batch with more than two failures is not retried.
    for _ in range(3):
        if res.returncode == 0 or not failed + not_run or len(failed) > 2:
            break
        res = _run(tmp_path, fmt, failed + not_run)
        log += res.stdout + res.stderr
        failed, not_run = _not_passed(res.stdout)
    if res.returncode != 0 and not failed and not_run and set(not_run) <= NEED_LUKS_CREATE:
        # still "not run" after the retries: real qemu-img cannot make a LUKS image here, so the iotests'
        # requirement check stops these before qio runs at all; every other test of the batch passed
        pytest.skip(f"qemu-img could not create a LUKS image on this machine (load); not run: {not_run}")
    assert res.returncode == 0, log
