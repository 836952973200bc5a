"""``sleep`` runs the event loop for its duration on the simulated clock (docs/architecture.md, rule 14).

qemu-io's ``sleep_f`` runs ``main_loop_wait`` until its timer expires, so host I/O that takes longer
than the sleep completes after it.  qio decides this on its simulated clock, not in real time, so the
same script gives the same output on every run whatever the machine's load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

WRITES = ("aio_write -P 1 0 512", "aio_write -P 2 4k 512", "aio_write -P 3 8k 512")
DONE = ["wrote 512/512 bytes at offset 8192", "wrote 512/512 bytes at offset 4096",
        "wrote 512/512 bytes at offset 0"]


def qio(img: Path, *cmds: str) -> list[str]:
    argv = [sys.executable, "-m", "qio", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    argv.append(f"blkdebug::{img}")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return [line for line in res.stdout.splitlines() if " ops; " not in line]


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "t.raw"
    p.write_bytes(bytes(1 << 20))
    return p


def test_short_sleep_leaves_slow_flushes_running(img: Path) -> None:
    """Three write-through writes need two ``fdatasync`` calls (the 2nd flush of the file node finds
    the other writes' generation): more than 1 ms at the model's 500 us each, so none completes inside
    ``sleep 1``.  qemu-io follows the host's fdatasync, which drifts: the same in 18 of 20 runs when it
    took about a millisecond, all three done inside the sleep in 18 of 20 runs when it took ~80 us
    (docs/fuzzing.md, "fdatasync costs")."""
    assert qio(img, *WRITES, "sleep 1", "length", "aio_flush") == ["1 MiB", *DONE]


def test_long_sleep_completes_them(img: Path) -> None:
    assert qio(img, *WRITES, "sleep 50", "length", "aio_flush") == [*DONE, "1 MiB"]


def test_work_left_by_a_sleep_completes_at_the_next_poll(img: Path) -> None:
    """The clock stands at the end of the sleep: the next waiting command finds the I/O finished."""
    assert qio(img, *WRITES, "sleep 1", "sleep 0", "length") == [*DONE, "1 MiB"]


def test_sleep_is_deterministic(img: Path) -> None:
    """race-repros.md, appendix: whether a breakpoint fires inside ``sleep 1`` decided ``resume B``."""
    cmds = ("break pwritev_done B", *WRITES, "sleep 1", "resume B", "sleep 1", "length", "aio_flush")
    outs = {tuple(qio(img, *cmds)) for _ in range(3)}
    assert len(outs) == 1
