"""Host costs that decide races on the simulated clock (docs/architecture.md, rule 8).

Each cost is measured (a C program on the test file system, qemu-io 7.2 on ``null-co``); the script
tests pin the order it gives where quiet qemu-io runs agree.  They run qio only: their qemu-io
counterparts depend on the machine's load (docs/fuzzing.md, "Corpus cases must hold under load").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qio.aio import BUFFER_MMAP_MIN, COST_EXTEND, COST_FRESH_PER_BYTE, COST_PER_BYTE, COST_TRANSFER, buffer_cost
from qio.block.file import FileDriver


def qio(img: Path, *cmds: str, args: tuple[str, ...] = ()) -> list[str]:
    argv = [sys.executable, "-m", "qio", *args]
    for c in cmds:
        argv += ["-c", c]
    argv.append(f"blkdebug::{img}")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if " ops; " not in line]


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    """A qcow2 image with its first 4 MiB allocated, and with the L2 table and refcount block that the
    tests' writes need read in by the tests' first two commands (so those writes do host I/O only)."""
    img = tmp_path / "t.qcow2"
    subprocess.run([sys.executable, "-m", "qio.img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    res = subprocess.run([sys.executable, "-m", "qio", "-f", "qcow2", "-c", "write -q -P 0x11 0 4M", str(img)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return img


WARM = ("read -q 0 4M", "write -q -P 0x13 16M 64k")


def test_buffer_cost() -> None:
    """Only buffers that glibc maps fresh (a 4 KiB-aligned allocation padded to its 128 KiB mmap
    threshold) cost: ~0.53 us per KiB, one per length of the request."""
    assert buffer_cost((512,)) == buffer_cost((65536,)) == buffer_cost((BUFFER_MMAP_MIN - 1,)) == 0
    assert buffer_cost((BUFFER_MMAP_MIN,)) == BUFFER_MMAP_MIN * COST_FRESH_PER_BYTE
    assert 520 < buffer_cost((1 << 20,)) < 560
    assert buffer_cost((1 << 20, 4096, 1 << 20)) == 2 * buffer_cost((1 << 20,))


def test_write_past_the_end_costs_more() -> None:
    """An extending ``pwrite`` allocates blocks: 5 us up to 4 KiB and 17.5 us at 64 KiB on ext4,
    against 1-2.4 us for an overwrite of cached pages (the transfer's default cost, 0 here)."""
    drv = FileDriver.__new__(FileDriver)
    drv.size = 1 << 20
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qio.aio.AIO.yield_on_io", True)
        assert drv._write_cost(0, 65536) == 0
        assert drv._write_cost((1 << 20) - 512, 4096) > COST_EXTEND
        assert drv._write_cost(1 << 20, 65536) == pytest.approx(13)
        assert drv._write_cost(1 << 20, 65536) > COST_TRANSFER + 65536 * COST_PER_BYTE


def test_large_buffer_is_filled_before_its_request_is_submitted(qcow2: Path) -> None:
    """An extending 1 MiB write, then a 1 MiB overwrite: the overwrite's buffer takes ~530 us to fill,
    so the first write has finished before the second is submitted.  qemu-io prints the extending
    write first in 20 of 20 quiet runs through difftest's harness (15 of 20 beside a busy loop) and
    in 17 of 20 from a shell loop; without the buffer cost qio printed the other order."""
    out = qio(qcow2, *WARM, "aio_write -P 0x22 32M 1M", "aio_write -P 0x33 0 1M", "aio_flush",
              args=("-f", "qcow2", "-t", "writeback"))
    assert out == ["wrote 1048576/1048576 bytes at offset 33554432", "wrote 1048576/1048576 bytes at offset 0"]


def test_small_buffers_are_submitted_together(qcow2: Path) -> None:
    """The same sizes as 64 KiB, in the other order: both are submitted within a few microseconds, and
    the extending write, the slower one, completes second (qemu-io: 20 of 20 quiet runs through
    difftest's harness, 16 of 20 from a shell loop)."""
    out = qio(qcow2, *WARM, "aio_write -P 0x33 0 64k", "aio_write -P 0x22 32M 64k", "aio_flush",
              args=("-f", "qcow2", "-t", "writeback"))
    assert out == ["wrote 65536/65536 bytes at offset 0", "wrote 65536/65536 bytes at offset 33554432"]
