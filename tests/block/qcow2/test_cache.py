"""Unit tests of the qcow2 metadata cache (``Qcow2Cache``): hits, QEMU's LRU victim, write-back.

No QEMU needed: the image is made by qio's own ``create`` and opened through the generic layer."""

from __future__ import annotations

import os
from pathlib import Path

from qio.aio import run_sync
from qio.block.backend import _close_sync, open_node
from qio.block.modes import OpenFlags
from qio.block.qcow2 import Qcow2Driver
from qio.block.qcow2.cache import Qcow2Cache
from qio.block.qcow2.create import create
from qio.block.qcow2.state import Qcow2State


def _open(path: Path) -> Qcow2Driver:
    node = open_node({"driver": "qcow2", "file.filename": str(path)}, OpenFlags(), lambda _m: None)
    assert isinstance(node, Qcow2Driver)
    return node


def _cache(s: Qcow2State, entries: int) -> Qcow2Cache:
    return Qcow2Cache(s, entries, s.cluster_size, False)


def test_hit_returns_the_same_entry(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(str(img), 1 << 20)
    node = _open(img)
    try:
        c = _cache(node.s, 4)
        i = run_sync(c.get(node.s.refcount_table_offset))
        c.put(i)
        assert run_sync(c.get(node.s.refcount_table_offset)) == i
        c.put(i)
        assert c.is_table_offset(node.s.refcount_table_offset) == i
    finally:
        _close_sync(node)


def test_victim_is_least_recently_used_unreferenced_entry(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(str(img), 1 << 20)
    node = _open(img)
    try:
        s = node.s
        cs = s.cluster_size
        c = _cache(s, 2)
        a = run_sync(c.get(cs))
        b = run_sync(c.get(2 * cs))
        assert a != b
        c.put(b)  # b released first: b is the least recently used
        c.put(a)
        third = run_sync(c.get(3 * cs))
        assert third == b
        assert c.is_table_offset(2 * cs) is None and c.is_table_offset(cs) == a
        c.put(third)
    finally:
        _close_sync(node)


def test_referenced_entries_are_never_evicted(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(str(img), 1 << 20)
    node = _open(img)
    try:
        s = node.s
        c = _cache(s, 1)
        run_sync(c.get(0))  # still referenced
        try:
            run_sync(c.get(s.cluster_size))
        except Exception as e:  # QEMU aborts; qio refuses with EBUSY
            assert "exhausted" in str(e)
        else:
            raise AssertionError("a referenced entry was evicted")
    finally:
        _close_sync(node)


def test_dirty_entry_written_back_on_flush(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create(str(img), 1 << 20)
    node = _open(img)
    try:
        s = node.s
        cs = s.cluster_size
        off = run_sync(_alloc(s, cs))
        c = _cache(s, 2)
        i = run_sync(c.get_empty(off))
        c.tables[i][:4] = b"qio!"
        c.mark_dirty(i)
        c.put(i)
        with open(img, "rb") as f:
            f.seek(off)
            assert f.read(4) != b"qio!"  # write-back, not write-through
        run_sync(c.flush())
        assert not c.dirty_set
        fd = os.open(img, os.O_RDONLY)
        try:
            assert os.pread(fd, 4, off) == b"qio!"
        finally:
            os.close(fd)
    finally:
        _close_sync(node)


async def _alloc(s: Qcow2State, size: int) -> int:
    from qio.block.qcow2.refcount import alloc_clusters

    return await alloc_clusters(s, size)
