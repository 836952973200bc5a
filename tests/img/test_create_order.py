"""The order of ``qemu-img create -f qcow2``'s option checks, table-driven: every pair of conflicting
creation options, and every triple with ``compat=0.10``, run through real qemu-img and qio-img; the
messages, the exit status and the files left behind (names and bytes) must be the same.

QEMU 7.2 checks them in ``qcow2_co_create_opts`` (option parsing, then the QAPI visitor in schema order:
version, backing-fmt, encrypt, cluster-size, preallocation, compression-type, ...) and
``qcow2_co_create`` (size alignment, extended L2 and version, cluster size, backing file and
preallocation, backing format, lazy refcounts, refcount width, data-file-raw, data file and version,
compression type); the first failing check names the error.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from oracle import qemu_img_run, qio_img_run

#: options that conflict with one another (or with the defaults) in some combination; one per key
ATOMS = [
    "compat=0.10", "compression_type=zstd", "compression_type=lz4", "data_file=dd.raw", "data_file_raw=on",
    "extended_l2=on", "cluster_size=4k", "cluster_size=3000", "refcount_bits=8", "refcount_bits=3",
    "lazy_refcounts=on", "backing_file=base.raw", "backing_fmt=raw", "preallocation=metadata",
    "preallocation=bogus", "encrypt.format=luks", "encrypt.format=aes", "compat=bogus",
]


def _key(atom: str) -> str:
    return atom.split("=", 1)[0]


def _combos() -> list[str]:
    out = []
    for n in (2, 3):
        for combo in itertools.combinations(ATOMS, n):
            if len({_key(a) for a in combo}) < n:
                continue
            if n == 3 and "compat=0.10" not in combo:
                continue
            out.append(",".join(combo))
    return out


CASES = _combos()


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_the_table_is_large() -> None:
    assert len(CASES) > 150


@pytest.mark.oracle
@pytest.mark.parametrize("opts", CASES)
def test_conflicting_options_same_error(tmp_path: Path, opts: str) -> None:
    results = []
    for name, run in (("q", qemu_img_run), ("r", qio_img_run)):
        d = tmp_path / name
        d.mkdir()
        (d / "base.raw").write_bytes(bytes(65536))
        out = run(["create", "-f", "qcow2", "-o", opts, "t.qcow2", "1M"], d)
        results.append((out, _files(d)))
    assert results[1][0] == results[0][0]
    assert results[1][1].keys() == results[0][1].keys()
    for name, data in results[0][1].items():
        if not name.endswith(".qcow2"):  # a qcow2 image's header carries no run-dependent bytes either
            assert results[1][1][name] == data, name
    assert results[1][1] == results[0][1]
