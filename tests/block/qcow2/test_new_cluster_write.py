"""The one-cluster allocating write path of qcow2 (``rw._pwritev_new_cluster``, issue 10's W6q) does what
the general path does: the same output, exit status and image bytes whatever it meets on the way (L2 and
refcount cache misses, new refcount blocks, lazy refcounts, snapshots and the inactive-L2 overlap check,
a partial last cluster, zero clusters, write-through, an external data file).  Each script runs twice in
qio, once with the path switched off, and the images must also pass ``qemu-img check``."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from filters import filter_qemu_io_stats
from oracle import ROOT, qemu_img, qemu_io

oracle = pytest.mark.oracle


def _qio(general: bool) -> list[str]:
    off = "import qio.block.qcow2.rw as rw; rw._new_cluster_write = lambda *a: -1; " if general else ""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv[0] = 'qemu-io'; "
            f"{off}from qio.cli import main; raise SystemExit(main())"]


def _writes(seed: int, n: int, span: int, block: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        off = rng.randrange(span // block) * block
        kind = rng.randrange(10)
        if kind == 0:
            out.append(f"write -q -P {i % 250 + 1} {off} {block}")
        elif kind == 1:
            out.append(f"write -q -z {off} {block}")
        elif kind == 2:
            out.append(f"aio_write -P {i % 250 + 1} {off} {block}")  # printed completion
        else:
            out.append(f"aio_write -q -P {i % 250 + 1} {off} {block}")
        if i % 97 == 96:
            out.append("aio_flush")
        if i % 151 == 150:
            out.append(f"discard -q {off & ~0xFFFF} 64k")
    return [*out, "aio_flush", f"read -P 0 {span - 512} 512"]


# (name, qemu-img create options, size, qio options before the image, extra opts for --image-opts, script)
CASES: list[tuple[str, str, str, list[str], str, list[str]]] = [
    ("plain", "", "64M", ["-t", "writeback"], "", _writes(1, 600, 64 << 20, 4096)),
    ("writethrough", "", "64M", ["-t", "writethrough"], "", _writes(2, 300, 64 << 20, 4096)),
    ("small-caches", "", "1G", ["-t", "writeback"], "l2-cache-size=131072,refcount-cache-size=262144",
     _writes(3, 500, 1 << 30, 4096)),
    ("lazy-refcounts", "lazy_refcounts=on", "64M", ["-t", "writeback"], "", _writes(4, 300, 64 << 20, 4096)),
    ("new-refblocks", "cluster_size=4096,refcount_bits=64", "32M", ["-t", "writeback"], "",
     _writes(5, 1500, 32 << 20, 2048)),
    ("whole-clusters", "cluster_size=4096", "32M", ["-t", "writeback"], "", _writes(10, 400, 32 << 20, 4096)),
    ("partial-last-cluster", "", "1000K", ["-t", "writeback"], "", _writes(6, 300, 1000 << 10, 4096)),
    ("overlap-all", "", "64M", ["-t", "writeback"], "overlap-check=all", _writes(7, 300, 64 << 20, 4096)),
    ("data-file", "data_file=d.raw", "64M", ["-t", "writeback"], "", _writes(8, 200, 64 << 20, 4096)),
    ("unaligned", "", "16M", ["-t", "writeback"], "", [f"aio_write -q {o * 4096 + 1000} 3000"
                                                        for o in random.Random(9).sample(range(4000), 400)]),
]


@oracle
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_as_general_path(tmp_path: Path, case: tuple[str, str, str, list[str], str, list[str]]) -> None:
    _compare(tmp_path, case)


@oracle
def test_same_on_tmpfs() -> None:
    """tmpfs has no FALLOC_FL_ZERO_RANGE: the new cluster's zero write fails with ENOTSUP and the COW
    copies the head and tail along with the data (the general L2 update)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        _compare(root, CASES[0])
    finally:
        shutil.rmtree(root)


def _compare(tmp_path: Path, case: tuple[str, str, str, list[str], str, list[str]]) -> None:
    name, create_opts, size, args, image_opts, script = case
    base = tmp_path / "base"
    base.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", create_opts] if create_opts else []), "t.qcow2", size,
             cwd=base)
    if name == "overlap-all":  # a snapshot (made once: it records the time): the inactive-L2 check reads it
        qemu_io("-c", "write -q -P 7 0 256k", "t.qcow2", cwd=base)
        qemu_img("snapshot", "-c", "s1", "t.qcow2", cwd=base)
    results = []
    for general in (False, True):
        d = tmp_path / ("general" if general else "fast")
        shutil.copytree(base, d)
        img = d / "t.qcow2"
        target = ["--image-opts", f"driver=qcow2,file.filename={img},{image_opts}"] if image_opts else [str(img)]
        proc = subprocess.run([*_qio(general), *args, *target], input="\n".join(script) + "\n",
                              capture_output=True, text=True, cwd=d, timeout=120)
        files = {p.name: p.read_bytes() for p in sorted(d.iterdir())}
        results.append((proc.returncode, filter_qemu_io_stats(proc.stdout), proc.stderr, files))
        chk = qemu_img("check", "-q", str(img), cwd=d, check=False)
        assert chk.returncode == 0, chk.stdout + chk.stderr
    (fast, slow) = results
    assert fast[:3] == slow[:3]
    assert fast[3].keys() == slow[3].keys()
    for k in fast[3]:
        assert fast[3][k] == slow[3][k], k
