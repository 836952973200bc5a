"""Unit tests of qcow2 refcount allocation (qcow2-refcount.c): first fit, refcounts, freeing.

No QEMU needed: the image is made by qio's own ``create`` and opened through the generic layer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qio.aio import run_sync
from qio.block.backend import _close_sync, open_node
from qio.block.modes import OpenFlags
from qio.block.qcow2 import Qcow2Driver
from qio.block.qcow2.create import create
from qio.block.qcow2.refcount import alloc_clusters, alloc_clusters_at, free_clusters, get_refcount
from qio.block.qcow2.state import DISCARD_NEVER


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Qcow2Driver]:
    img = tmp_path / "a.qcow2"
    create(str(img), 4 << 20)
    n = open_node({"driver": "qcow2", "file.filename": str(img)}, OpenFlags(), lambda _m: None)
    assert isinstance(n, Qcow2Driver)
    yield n
    _close_sync(n)


def test_fresh_image_metadata_is_referenced(node: Qcow2Driver) -> None:
    s = node.s
    # header, refcount table, first refcount block: each referenced once
    for cluster in range(3):
        assert run_sync(get_refcount(s, cluster)) == 1


def test_alloc_is_first_fit_after_metadata(node: Qcow2Driver) -> None:
    s = node.s
    cs = s.cluster_size
    first = run_sync(alloc_clusters(s, cs))
    assert run_sync(get_refcount(s, first // cs)) == 1
    assert run_sync(get_refcount(s, first // cs - 1)) == 1  # nothing free below it
    second = run_sync(alloc_clusters(s, 2 * cs))
    assert second == first + cs
    assert [run_sync(get_refcount(s, second // cs + k)) for k in range(2)] == [1, 1]


def test_freed_clusters_are_reused(node: Qcow2Driver) -> None:
    s = node.s
    cs = s.cluster_size
    a = run_sync(alloc_clusters(s, cs))
    b = run_sync(alloc_clusters(s, cs))
    run_sync(free_clusters(s, a, cs, DISCARD_NEVER))
    assert run_sync(get_refcount(s, a // cs)) == 0
    assert s.free_cluster_index <= a // cs  # the search restarts at the hole
    assert run_sync(alloc_clusters(s, cs)) == a
    assert b == a + cs


def test_alloc_at_stops_at_a_used_cluster(node: Qcow2Driver) -> None:
    s = node.s
    cs = s.cluster_size
    a = run_sync(alloc_clusters(s, cs))
    run_sync(free_clusters(s, a, cs, DISCARD_NEVER))
    used = run_sync(alloc_clusters(s, 2 * cs))  # takes a and the cluster after it
    assert used == a
    run_sync(free_clusters(s, a, cs, DISCARD_NEVER))
    assert run_sync(alloc_clusters_at(s, a, 3)) == 1  # a is free, a + cs is not
    assert run_sync(get_refcount(s, a // cs)) == 1
