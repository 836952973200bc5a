"""Unit tests of the block-status walk (``qio.block.io.co_block_status`` / ``block_status_above``).

No QEMU needed: qcow2 images are made by qio's own ``create`` and written through the generic layer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qio.aio import run_sync
from qio.block import io
from qio.block.backend import _close_sync, open_node
from qio.block.driver import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_EOF,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockDriver,
)
from qio.block.modes import OpenFlags
from qio.block.qcow2.create import create

CS = 65536
SIZE = 8 * CS


def _open(path: Path) -> BlockDriver:
    return open_node({"driver": "qcow2", "file.filename": str(path)}, OpenFlags(), lambda _m: None)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[BlockDriver]:
    """Cluster 0 data, cluster 1 a zero cluster, the rest unallocated (no backing file)."""
    img = tmp_path / "top.qcow2"
    create(str(img), SIZE)
    node = _open(img)
    run_sync(io.pwritev(node, 0, CS, [memoryview(b"\x5a" * CS)]))
    run_sync(io.pwrite_zeroes(node, CS, CS))
    yield node
    _close_sync(node)


def test_data_cluster_maps_to_the_file(image: BlockDriver) -> None:
    ret, pnum, host, file = run_sync(io.co_block_status(image, True, 0, SIZE))
    want = BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID
    assert ret & want == want
    assert not ret & BLOCK_ZERO
    assert pnum == CS
    assert host > 0 and host % CS == 0
    assert file is image.file
    # the host offset really holds the data
    buf = bytearray(4)
    run_sync(io.preadv(image.file, host, 4, [memoryview(buf)]))
    assert buf == b"\x5a" * 4


def test_zero_cluster_is_allocated_zero(image: BlockDriver) -> None:
    ret, pnum, _, _ = run_sync(io.co_block_status(image, True, CS, SIZE - CS))
    assert ret & BLOCK_ZERO and ret & BLOCK_ALLOCATED and not ret & BLOCK_DATA
    assert pnum == CS


def test_unallocated_without_backing_reads_as_zero_up_to_eof(image: BlockDriver) -> None:
    ret, pnum, _, _ = run_sync(io.co_block_status(image, True, 2 * CS, SIZE - 2 * CS))
    assert ret & BLOCK_ZERO and not ret & BLOCK_ALLOCATED
    assert pnum == SIZE - 2 * CS
    assert ret & BLOCK_EOF


def test_past_the_end_is_eof(image: BlockDriver) -> None:
    assert run_sync(io.co_block_status(image, True, SIZE, CS)) == (BLOCK_EOF, 0, 0, None)


def test_without_want_zero_a_protocol_node_is_plain_data(image: BlockDriver) -> None:
    ret, pnum, host, file = run_sync(io.co_block_status(image.file, False, 0, CS))
    want = BLOCK_DATA | BLOCK_ALLOCATED | BLOCK_OFFSET_VALID
    assert ret & want == want
    assert (pnum, host, file) == (CS, 0, image.file)


def test_status_above_finds_data_in_the_backing_file(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(str(base), SIZE)
    node = _open(base)
    run_sync(io.pwritev(node, 3 * CS, CS, [memoryview(b"\x01" * CS)]))
    run_sync(node.close())  # write the metadata caches back
    _close_sync(node)
    create(str(top), SIZE, backing_file=str(base), backing_fmt="qcow2")
    node = _open(top)
    try:
        assert node.backing is not None
        ret, pnum, _, _ = run_sync(io.co_block_status(node, True, 3 * CS, CS))
        assert not ret & BLOCK_ALLOCATED and not ret & BLOCK_ZERO  # the top layer defers to its backing file
        ret, pnum = run_sync(io.block_status_above(node, True, 3 * CS, CS))
        assert ret & BLOCK_DATA and ret & BLOCK_ALLOCATED and pnum == CS
        ret, pnum = run_sync(io.block_status_above(node, True, 0, CS))
        assert ret & BLOCK_ZERO and pnum == CS  # unallocated everywhere: zero, at the bottom
    finally:
        _close_sync(node)
