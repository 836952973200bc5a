"""qio-img against real qemu-img 7.2 on qcow2 images with extended L2 entries (subclusters):
``create -o extended_l2=on`` (output, refusals, bytes), ``info``/``map``/``check`` (text and JSON) on
images with data, zero, unallocated and compressed subclusters, ``check`` (and ``-r``) on images with
hostile subcluster bitmaps, and images written by qio that qemu-img finds clean.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import pytest

from oracle import QEMU_IMG, QEMU_IO, run
from oracle import qemu_img_run as qemu_img
from oracle import qio_img_run as qio_img

pytestmark = pytest.mark.oracle


def qemu_io(args: list[str], image: Path) -> None:
    assert QEMU_IO is not None
    out = run([QEMU_IO, *args, image.name], image.parent)
    assert out[2] == 0, out


def qio_io(args: list[str], image: Path) -> tuple[str, str, int]:
    return run([sys.executable, "-m", "qio", *args, image.name], image.parent)


@pytest.fixture(autouse=True)
def _tools() -> None:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")


CREATE_CASES = [
    "extended_l2=on", "extended_l2=off", "extended_l2=on,cluster_size=16k", "extended_l2=on,cluster_size=32k",
    "extended_l2=on,cluster_size=128k", "extended_l2=on,cluster_size=1M", "extended_l2=on,cluster_size=2M",
    "extended_l2=on,cluster_size=8k", "extended_l2=on,cluster_size=512", "extended_l2=on,cluster_size=4M",
    "extended_l2=on,compat=0.10", "extended_l2=on,compat=0.10,cluster_size=4k",
    "extended_l2=on,preallocation=metadata", "extended_l2=on,preallocation=metadata,cluster_size=16k",
    "extended_l2=on,preallocation=falloc", "extended_l2=on,preallocation=full,cluster_size=2M",
    "extended_l2=on,lazy_refcounts=on", "extended_l2=on,refcount_bits=1", "extended_l2=on,refcount_bits=64",
    "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2",
    "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2,preallocation=metadata",
    "extended_l2=off,backing_file=base.qcow2,backing_fmt=qcow2,preallocation=metadata",
    "extended_l2=foo", "extended_l2", "extended_l2=on,compat=0.10,cluster_size=8k",
]


@pytest.mark.parametrize("size", ["5M", "1T"])
@pytest.mark.parametrize("opts", CREATE_CASES)
def test_create_same_output_and_bytes(tmp_path: Path, opts: str, size: str) -> None:
    qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", size], tmp_path)
    if "preallocation=" in opts and size == "1T":
        pytest.skip("preallocating 1T is slow in both tools")
    ref = qemu_img(["create", "-f", "qcow2", "-o", opts, "ref.img", size], tmp_path)
    ours = qio_img(["create", "-f", "qcow2", "-o", opts, "ours.img", size], tmp_path)
    assert (ours[0].replace("ours.img", "ref.img"), ours[1].replace("ours.img", "ref.img"), ours[2]) == ref
    assert (tmp_path / "ref.img").exists() == (tmp_path / "ours.img").exists()
    if (tmp_path / "ref.img").exists():
        assert (tmp_path / "ref.img").read_bytes() == (tmp_path / "ours.img").read_bytes()


def fill(opts: str) -> list[str]:
    """qemu-io commands that leave every kind of subcluster behind (one compressed cluster: QEMU
    compresses several clusters in parallel threads, so their host order is not deterministic)."""
    cs = opts.split("cluster_size=")[1].split(",")[0] if "cluster_size=" in opts else "64k"
    compressed = {"16k": "128k 16k", "2M": "2M 2M"}.get(cs, "128k 64k")
    return ["write -P 1 0 4k", "write -P 2 66k 2k", "write -z 80k 8k", f"write -c -P 3 {compressed}",
            "write -z -u 192k 64k", "discard 256k 64k", "write -P 4 1000k 100k", "write -z 1030k 3k"]


def _args(cmds: list[str]) -> list[str]:
    return [a for c in cmds for a in ("-c", c)]


def _filled(d: Path, name: str, opts: str = "extended_l2=on", size: str = "4M") -> Path:
    img = d / name
    qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, name, size], d)
    qemu_io(_args(fill(opts)), img)
    return img


@pytest.mark.parametrize("cmd", [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                                 ["check"], ["check", "--output=json"], ["info", "--backing-chain"]])
@pytest.mark.parametrize("opts", ["extended_l2=on", "extended_l2=on,cluster_size=16k",
                                  "extended_l2=on,cluster_size=2M", "extended_l2=on,lazy_refcounts=on"])
def test_info_map_check_same(tmp_path: Path, cmd: list[str], opts: str) -> None:
    _filled(tmp_path, "x.qcow2", opts)
    assert qio_img([*cmd, "x.qcow2"], tmp_path) == qemu_img([*cmd, "x.qcow2"], tmp_path)


L2 = 0x40000  # the first L2 table of a fresh 64k-cluster image


def _poke(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


#: (name, patches): each patch is (L2 slot, word 0 = entry / 1 = bitmap, value); the image holds
#: data in clusters 0 and 1 (slot 0 fully allocated, slot 1 subclusters 0-1), cluster 2 compressed,
#: cluster 3 all zero, cluster 4 unallocated.
HOSTILE: dict[str, list[tuple[int, int, int]]] = {
    "alloc-and-zero": [(0, 1, 0x00000001FFFFFFFF)],
    "alloc-and-zero-partial": [(1, 1, 0x0000000300000003)],
    "unallocated-with-alloc-bits": [(4, 1, 0x00000000000000F0)],
    "unallocated-with-both": [(4, 1, 0xFFFFFFFFFFFFFFFF)],
    "compressed-with-bitmap": [(2, 1, 0x00000000FFFFFFFF)],
    "compressed-with-zero-bits": [(2, 1, 0xFFFF000000000000)],
    "zero-flag-bit0": [(3, 0, 1)],
    "unaligned-prealloc-zero": [(3, 0, 0x8000000000A00200)],
    "unaligned-data": [(1, 0, 0x8000000000060200)],
    "reserved-bits": [(0, 0, 0x8000000000050000 | 0x100)],
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("extl2")
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "clean.qcow2", "4M"], d)
    qemu_io(["-c", "write -P 1 0 64k", "-c", "write -P 2 64k 4k", "-c", "write -c -P 3 128k 64k",
             "-c", "write -z 192k 64k"], d / "clean.qcow2")
    for name, patches in HOSTILE.items():
        shutil.copy(d / "clean.qcow2", d / f"{name}.qcow2")
        for slot, word, value in patches:
            _poke(d / f"{name}.qcow2", L2 + slot * 16 + word * 8, value)
    return d


@pytest.mark.parametrize("mode", [[], ["--output=json"], ["-r", "leaks"], ["-r", "all"]],
                         ids=["human", "json", "leaks", "all"])
@pytest.mark.parametrize("name", ["clean", *HOSTILE])
def test_check_hostile_bitmaps(hostile: Path, tmp_path: Path, name: str, mode: list[str]) -> None:
    """Same messages, counts and exit code; repairs leave the same bytes."""
    shutil.copy(hostile / f"{name}.qcow2", tmp_path / "ref.qcow2")
    shutil.copy(hostile / f"{name}.qcow2", tmp_path / "ours.qcow2")
    ref = qemu_img(["check", *mode, "ref.qcow2"], tmp_path)
    ours = qio_img(["check", *mode, "ours.qcow2"], tmp_path)
    assert (ours[0].replace("ours.qcow2", "ref.qcow2"), ours[1], ours[2]) == ref
    assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "ref.qcow2").read_bytes()


@pytest.mark.parametrize("cmd", [["map", "--output=json"], ["map"], ["info"]])
@pytest.mark.parametrize("name", [*HOSTILE])
def test_map_info_hostile_bitmaps(hostile: Path, name: str, cmd: list[str]) -> None:
    assert qio_img([*cmd, f"{name}.qcow2"], hostile) == qemu_img([*cmd, f"{name}.qcow2"], hostile)


@pytest.mark.parametrize("opts", ["extended_l2=on", "extended_l2=on,cluster_size=16k",
                                  "extended_l2=on,cluster_size=2M"])
def test_qio_written_images_are_clean_for_qemu(tmp_path: Path, opts: str) -> None:
    """The reverse direction: qio writes every kind of subcluster; qemu-img check finds no error and
    qemu-img compare finds the image equal to the one qemu-io wrote (which is also byte-identical)."""
    qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, "ours.qcow2", "4M"], tmp_path)
    out = qio_io(_args(fill(opts)), tmp_path / "ours.qcow2")
    assert out[2] == 0 and not out[1], out
    ref = _filled(tmp_path, "ref.qcow2", opts)
    check = qemu_img(["check", "ours.qcow2"], tmp_path)
    assert check[2] == 0 and check[0].startswith("No errors were found on the image."), check
    assert qemu_img(["compare", "ours.qcow2", "ref.qcow2"], tmp_path)[2] == 0
    assert (tmp_path / "ours.qcow2").read_bytes() == ref.read_bytes()
