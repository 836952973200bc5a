"""qio-img against real qemu-img 7.2: ``create`` (output and resulting bytes), ``info``, ``map``, and
``check`` on a corpus of corrupted images (verdict, counts, text, JSON, exit code, repairs); hostile
images never crash or hang it.

qio-img runs with ``argv[0] = qemu-img`` so both print the same program name.  Tests that need the real
binaries are marked ``oracle`` and skipped without them.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import QEMU_IMG, QEMU_IO, ROOT, RUN_QIO_IMG, run
from oracle import qemu_img_run as qemu_img
from oracle import qio_img_run as qio_img

# list-argument forms returning (stdout, stderr, status), for comparing the two programs


def qemu_io(args: list[str], image: Path) -> None:
    assert QEMU_IO is not None
    run([QEMU_IO, *args, image.name], image.parent)


def same(args: list[str], cwd: Path) -> tuple[str, str, int]:
    """Run both; the results must be identical.  Returns qemu-img's."""
    ref = qemu_img(args, cwd)
    ours = qio_img(args, cwd)
    assert ours == ref, f"qemu-img {args}"
    return ref


# ================================================================================ create
CREATE_CASES = [
    "-f qcow2 FILE 1M", "-f qcow2 -o compat=0.10 FILE 1M", "-f qcow2 -o compat=v2 FILE 1M",
    "-f qcow2 -o compat=v3,lazy_refcounts=on FILE 1M", "-f qcow2 -o compat=1.1,refcount_bits=1 FILE 1G",
    "-f qcow2 -o refcount_bits=64,cluster_size=512 FILE 64M", "-f qcow2 -o refcount_bits=8,cluster_size=4k FILE 1T",
    "-f qcow2 -o preallocation=off FILE 3M",
    "-f qcow2 -o preallocation=metadata,cluster_size=4k FILE 5M", "-f qcow2 -o preallocation=metadata FILE 300M",
    "-f qcow2 -o preallocation=falloc FILE 3M", "-f qcow2 -o preallocation=falloc,cluster_size=512 FILE 1M",
    "-f qcow2 -o preallocation=full,cluster_size=2M FILE 5M", "-f qcow2 -o preallocation=full,refcount_bits=2 FILE 2M",
    "-f qcow2 -o lazy_refcounts=on,compat=0.10 FILE 1M", "-f qcow2 -o cluster_size=3000 FILE 1M",
    "-f qcow2 -o compat=2 FILE 1M", "-f qcow2 -o size=1M FILE 1M", "-f qcow2 -o size=2M FILE",
    "-f qcow2 -o refcount_bits=3 FILE 1M", "-f qcow2 -o refcount_bits=-1 FILE 1M",
    "-f qcow2 -o refcount_bits=0x10 FILE 1M", "-f qcow2 -o refcount_bits=x FILE 1M", "-f raw FILE 1M",
    "-f raw -o preallocation=full FILE 1M", "-f raw -o preallocation=falloc,nocow=off,extent_size_hint=0 FILE 1M",
    "-f raw -o preallocation=bogus FILE 1M", "-f raw FILE 1000", "-f qcow2 FILE 1000", "FILE", "-f qcow2 FILE",
    "-f qcow2 -b base.raw -F raw FILE", "-f qcow2 -b base.raw FILE", "-f qcow2 -b base.qcow2 -F qcow2 FILE 5M",
    "-q -f qcow2 FILE 1G", "-f qcow2 FILE 1P", "-f qcow2 FILE 4P", "-f qcow2 FILE 8E",
    "-f qcow2 -o cluster_size=512 FILE 1T", "-f qcow2 -o backing_fmt=raw FILE 1M",
    "-f qcow2 -b base.raw -F raw -o preallocation=metadata FILE", "-f qcow2 -o , FILE 1M",
    "-f qcow2 -b nope -F raw FILE", "-f qcow2 -b base.raw -F foo FILE", "-f qcow2 -b base.raw -F qcow2 FILE",
    "-f raw -b base.raw -F raw FILE", "-f qcow2 -o backing_file=base.raw,backing_fmt=raw,size=2M FILE",
    "-f qcow2 -u -b nonexist -F qcow2 FILE 1M", "-f qcow2 -u -b nonexist -F foo FILE 1M",
    "-f qcow2 -u -b nonexist FILE 1M", "-f qcow2 -o foo=bar FILE 1M", "-f qcow2 -o cluster_size=abc FILE 1M",
    "-f qcow2 -o lazy_refcounts=maybe FILE 1M", "-f qcow2 -o preallocation=bogus FILE 1M",
    "-f qcow2 -o compression_type=foo FILE 1M", "-f foo FILE 1M", "-f qcow2 FILE 1x", "-f qcow2 FILE 1M extra",
    "-f qcow2 -o cluster_size=1k,cluster_size=2k FILE 1M", "-f qcow2 -o cluster_size=2M FILE 100P",
    "-f qcow2 -o backing_file=a,,b,backing_fmt=raw -u FILE 1M", "-f qcow2 -o lazy_refcounts=yes FILE 1M",
    "-f qcow2 FILE -- -1", "-o", "", "-f qcow2 -o compat=1.1 -o refcount_bits=4 FILE 8G",
    # -o help: the format's creation options, merged with the protocol's when a file name is given
    "-f qcow2 -o help", "-f raw -o help", "-o help", "-f qcow2 -o help FILE", "-f raw -o help FILE 1M",
    "-f qcow2 -o help file:FILE", "-f foo -o help", "-o help,size=1M", "-f qcow2 -o cluster_size=abc,help",
    "-f qcow2 -o help,,x", "-f qcow2 -o x=help,,y,?", "-f qcow2 -o nohelp FILE 1M", "-f qcow2 -o ? FILE",
    "-f qcow2 -o size=1M -o help FILE", "-f qcow2 -o help nosuch:FILE", "-f qcow2 -o encrypt=on FILE 1M",
    "-f raw -o preallocation=metadata FILE 1M", "-f raw -o help,preallocation=metadata FILE 1M",
    "--image-opts -f qcow2 FILE 1M",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source images made by qemu-img/qemu-io: qcow2 with data and zero clusters, a raw backing file,
    an overlay with data, zero and compressed clusters, v2, metadata-preallocated, small clusters."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("img")
    qemu_img(["create", "-q", "-f", "qcow2", "base.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 0x11 0 128k", "-c", "write -z 1M 64k"], d / "base.qcow2")
    qemu_img(["create", "-q", "-f", "raw", "base.raw", "16M"], d)
    qemu_io(["-f", "raw", "-c", "write -P 1 0 1M"], d / "base.raw")
    qemu_img(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2"], d)
    qemu_io(["-c", "write -P 2 512k 128k", "-c", "write -z 2M 64k", "-c", "write -c -P 3 8M 64k"], d / "top.qcow2")
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 5 0 200k", "-c", "write -P 6 32M 4k"], d / "v2.qcow2")
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "meta.qcow2", "8M"], d)
    qemu_io(["-c", "write -P 7 1M 4k"], d / "meta.qcow2")
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=4", "small.qcow2", "3M"], d)
    qemu_io(["-c", "write -P 8 0 100k", "-c", "write -P 9 2M 10k", "-c", "discard 0 8k"], d / "small.qcow2")
    qemu_img(["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "chain.qcow2", "20M"], d)
    qemu_io(["-c", "write -P 4 16M 64k"], d / "chain.qcow2")
    return d


@pytest.mark.oracle
@pytest.mark.parametrize("case", CREATE_CASES)
def test_create_same_output_and_bytes(images: Path, tmp_path: Path, case: str) -> None:
    for name in ("base.raw", "base.qcow2"):
        shutil.copy(images / name, tmp_path / name)
    args = case.split()
    ref = qemu_img(["create", *[a.replace("FILE", "ref.img") for a in args]], tmp_path)
    ours = qio_img(["create", *[a.replace("FILE", "ours.img") for a in args]], tmp_path)
    assert (ours[0].replace("ours.img", "ref.img"), ours[1].replace("ours.img", "ref.img"), ours[2]) == ref
    assert (tmp_path / "ref.img").exists() == (tmp_path / "ours.img").exists()
    if (tmp_path / "ref.img").exists():
        assert (tmp_path / "ref.img").read_bytes() == (tmp_path / "ours.img").read_bytes()


def test_create_library_is_the_overlay_code() -> None:
    """One implementation of image creation: qio-img's qcow2 path is qcow2_create.create_async."""
    src = (ROOT / "qio" / "img" / "create.py").read_text()
    assert "create_async" in src and "HEADER_V2" not in src and "refcount_table" not in src


# ========================================================================= info and map
INFO_CASES = [
    "info base.qcow2", "info --output=json base.qcow2", "info base.raw", "info --output=json base.raw",
    "info top.qcow2", "info --output=json top.qcow2", "info --backing-chain chain.qcow2",
    "info --backing-chain --output=json chain.qcow2", "info v2.qcow2", "info --output=json v2.qcow2",
    "info meta.qcow2", "info small.qcow2", "info -f raw base.qcow2", "info -f qcow2 base.raw", "info nope",
    "info", "info a b", "info --output=xml base.qcow2", "info -U base.qcow2",
    "map base.qcow2", "map --output=json base.qcow2", "map top.qcow2", "map --output=json top.qcow2",
    "map base.raw", "map --output=json base.raw", "map chain.qcow2", "map --output=json chain.qcow2",
    "map v2.qcow2", "map --output=json v2.qcow2", "map --output=json meta.qcow2", "map meta.qcow2",
    "map --output=json small.qcow2", "map small.qcow2", "map nope", "map --output=yaml base.raw",
    "check base.qcow2", "check --output=json base.qcow2", "check base.raw", "check top.qcow2",
    "check --output=json top.qcow2", "check -q base.qcow2", "check v2.qcow2", "check meta.qcow2",
    "check --output=json small.qcow2", "check -r bad base.qcow2", "check -T bogus base.qcow2", "check nope",
    "foo", "", "check -x base.qcow2", "check -f", "check --output json base.qcow2",
    "info blkdebug::base.qcow2", "info --output=json blkdebug::base.qcow2",
]


IMAGE_OPTS_CASES = [
    "info --image-opts driver=qcow2,file.filename=base.qcow2", "info --image-opts file.filename=top.qcow2",
    "info --output=json --image-opts driver=qcow2,file.filename=top.qcow2", "info --image-opts base.qcow2",
    "info --image-opts driver=raw,file.filename=base.raw", "info --image-opts driver=file,filename=base.raw",
    "info --backing-chain --image-opts driver=qcow2,file.filename=chain.qcow2",
    "info --image-opts -f qcow2 driver=qcow2,file.filename=base.qcow2",
    "info --image-opts driver=qcow2,file.filename=base.qcow2,foo=bar", "info --image-opts",
    "info -U --image-opts driver=qcow2,file.filename=base.qcow2,force-share=off",
    "info -U --image-opts driver=qcow2,file.filename=base.qcow2,force-share=on",
    "info --image-opts driver=qcow2,file.filename=nope.qcow2",
    "check --image-opts driver=qcow2,file.filename=top.qcow2",
    "check --output=json --image-opts driver=qcow2,file.filename=base.qcow2",
    "check --image-opts driver=raw,file.filename=base.raw", "check --image-opts -f qcow2 base.qcow2",
    "map --image-opts driver=qcow2,file.filename=chain.qcow2",
    "map --output=json --image-opts driver=qcow2,file.filename=top.qcow2",
    "map --image-opts driver=qcow2,file.filename=top.qcow2,backing.driver=raw,backing.file.filename=base.raw",
    "map --output=json --image-opts driver=raw,file.filename=base.raw,offset=4096",
    "map --image-opts driver=qcow2,file.filename=base.qcow2,,x",
]


@pytest.mark.oracle
@pytest.mark.parametrize("case", IMAGE_OPTS_CASES)
def test_image_opts_same(images: Path, case: str) -> None:
    """``--image-opts``: the file name is an option string (a bare first value is ``file``, a node
    reference), as qemu-img's img_open parses and opens it."""
    same(case.split(), images)


@pytest.mark.oracle
@pytest.mark.parametrize("case", INFO_CASES)
def test_info_map_check_same(images: Path, case: str) -> None:
    same(case.split(), images)


# ====================================================================== corruption corpus
# The base image (64M, 64k clusters, 'write -P 0x11 0 128k'): clusters 0 header, 1 reftable,
# 2 refblock, 3 L1, 4 L2, 5-6 data.  Each recipe patches (offset, width 2, 4 or 8, value) triples.
REFBLOCK, L1, L2 = 0x20000, 0x30000, 0x40000
CORRUPTIONS: dict[str, list[tuple[int, int, int]]] = {
    "C1-refcount-too-high": [(REFBLOCK + 5 * 2, 2, 2)],
    "C1b-leaked-cluster": [(REFBLOCK + 7 * 2, 2, 1), (7 * 0x10000 + 0xFFF8, 8, 0)],
    "C2-refcount-too-low": [(REFBLOCK + 6 * 2, 2, 0)],
    "C3-double-reference": [(L2 + 2 * 8, 8, 0x8000000000050000)],
    "C5-data-on-L1": [(L2 + 2 * 8, 8, 0x8000000000030000)],
    "C6-misaligned-data": [(L2, 8, 0x8000000000050200)],
    "past-eof": [(L2 + 3 * 8, 8, 0x8000000010000000)],
    "copied-flag-missing": [(L2, 8, 0x0000000000050000)],
    "copied-flag-l1": [(L1, 8, 0x0000000000040000)],
    "L2-refcount-high": [(REFBLOCK + 4 * 2, 2, 3)],
    "reserved-bits-l2": [(L2 + 8, 8, 0x8000000000060100)],
    "misaligned-l2-table": [(L1, 8, 0x8000000000040200)],
    "corrupt-bit": [(72, 8, 2)],
    "no-reftable": [(56, 4, 0)],
    "no-reftable-no-offset": [(48, 8, 0), (56, 4, 0)],
    "leak-and-copied": [(REFBLOCK + 5 * 2, 2, 3), (REFBLOCK + 8 * 2, 2, 1), (8 * 0x10000 + 0xFFF8, 8, 0)],
    # a refblock past the end: -r all grows the file to cover it, which fails past the file size limit
    # (EFBIG), past BDRV_MAX_LENGTH (EIO) or past INT64_MAX (EINVAL), each with QEMU's report
    "refblock-past-file-limit": [(0x10008, 8, 0x0004000000000000)],
    "refblock-past-max-length": [(0x10008, 8, 0x7FFFFFFFC0000000)],
    "refblock-past-int64": [(0x10008, 8, 0x7FFFFFFFFFFF0000)],
}


def _patch(path: Path, patches: list[tuple[int, int, int]]) -> None:
    with open(path, "r+b") as f:
        for off, width, value in patches:
            f.seek(off)
            f.write(struct.pack({2: ">H", 4: ">I"}.get(width, ">Q"), value))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("corpus")
    qemu_img(["create", "-q", "-f", "qcow2", "clean.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 0x11 0 128k"], d / "clean.qcow2")
    for name, patches in CORRUPTIONS.items():
        shutil.copy(d / "clean.qcow2", d / f"{name}.qcow2")
        _patch(d / f"{name}.qcow2", patches)
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 0x11 0 128k", "-c", "sigraise 9"], d / "dirty.qcow2")
    return d


@pytest.mark.oracle
@pytest.mark.parametrize("mode", [[], ["--output=json"], ["-r", "leaks", "--output=json"], ["-r", "all"]],
                         ids=["human", "json", "leaks-json", "all"])
@pytest.mark.parametrize("name", ["clean", *CORRUPTIONS, "dirty"])
def test_check_corpus(corpus: Path, tmp_path: Path, name: str, mode: list[str]) -> None:
    """Same verdict, messages, counts and exit code; a repaired image is then clean for qemu-img too."""
    shutil.copy(corpus / f"{name}.qcow2", tmp_path / "ref.qcow2")
    shutil.copy(corpus / f"{name}.qcow2", tmp_path / "ours.qcow2")
    ref = qemu_img(["check", *mode, "ref.qcow2"], tmp_path)
    ours = qio_img(["check", *mode, "ours.qcow2"], tmp_path)
    assert (ours[0].replace("ours.qcow2", "ref.qcow2"), ours[1], ours[2]) == ref
    if "-r" in mode:
        after_ref = qemu_img(["check", "ref.qcow2"], tmp_path)
        after_ours = qemu_img(["check", "ours.qcow2"], tmp_path)
        assert after_ours == after_ref
        assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "ref.qcow2").read_bytes()


@pytest.mark.oracle
def test_check_huge_sparse_image(tmp_path: Path) -> None:
    """16 TiB virtual, three clusters of data: check must not allocate per virtual cluster."""
    qemu_img(["create", "-q", "-f", "qcow2", "huge.qcow2", "16T"], tmp_path)
    qemu_io(["-c", "write -P 1 0 64k", "-c", "write -P 2 8T 64k", "-c", "write -P 3 16383G 4k"],
            tmp_path / "huge.qcow2")
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
    for args in (["check", "huge.qcow2"], ["check", "--output=json", "huge.qcow2"], ["map", "huge.qcow2"],
                 ["info", "huge.qcow2"]):
        ours = run([sys.executable, "-c", limit + RUN_QIO_IMG, *args], tmp_path, timeout=60)
        assert ours == qemu_img(args, tmp_path)


# ========================================================================= hostile images
HOSTILE_DRIVER = """
import os, sys, traceback
from qio.img.cli import main
for path in sys.argv[1:]:
    for cmd in (["info"], ["info", "--output=json"], ["check"], ["map", "--output=json"], ["check", "-r", "all"]):
        try:
            rc = main(["qemu-img", *cmd, path])
        except BaseException:
            sys.__stderr__.write("CRASH " + path + " " + " ".join(cmd) + "\\n" + traceback.format_exc())
            sys.exit(99)
        assert rc in (0, 1, 2, 3, 63), rc
"""


def test_hostile_images_never_crash(tmp_path: Path) -> None:
    """Random header, table and refcount damage: qemu-img-style errors, never a traceback or a hang."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = tmp_path / "seed.qcow2"
    subprocess.run([sys.executable, "-c", RUN_QIO_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
                    str(base), "8M"], check=True, env=env)
    data = bytearray(base.read_bytes())
    data += bytes(4096 * 4)
    rng = random.Random(7202)
    paths = []
    for i in range(40):
        img = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            where = rng.choice([rng.randrange(0, 104), rng.randrange(0x1000, 0x1010), rng.randrange(0x2000, 0x2010),
                                rng.randrange(0x3000, 0x3010), rng.randrange(0, len(img))])
            img[where] = rng.randrange(256)
        p = tmp_path / f"h{i}.qcow2"
        p.write_bytes(bytes(img))
        paths.append(str(p))
    p = subprocess.run([sys.executable, "-c", HOSTILE_DRIVER, *paths], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


# ======================================================================= persistent bitmaps
def _bitmaps_ext(data: bytes) -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset) from the bitmaps header extension."""
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0x23852875:
            nb, _, size, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            return nb, size, offset
        assert magic, "no bitmaps extension"
        pos += 8 + ((length + 7) & ~7)


def _leak_one_cluster(path: Path) -> None:
    """Append a cluster and give it refcount 1 in the first refcount block (a leak)."""
    data = bytearray(path.read_bytes())
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    reftable = struct.unpack_from(">Q", data, 48)[0]
    refblock = struct.unpack_from(">Q", data, reftable)[0]
    cluster = -(-len(data) // cs)
    data += bytes(cluster * cs + cs - len(data))
    struct.pack_into(">H", data, refblock + 2 * cluster, 1)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bitmaps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images with persistent bitmaps made by qemu-img bitmap and qemu-io, and damaged variants."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("bitmaps")
    qemu_img(["create", "-q", "-f", "qcow2", "one.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 1 0 128k"], d / "one.qcow2")
    qemu_img(["bitmap", "--add", "one.qcow2", "bm0"], d)
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "many.qcow2", "64M"], d)
    qemu_img(["bitmap", "--add", "many.qcow2", "bm0"], d)
    qemu_img(["bitmap", "--add", "-g", "512", "many.qcow2", "fine"], d)
    qemu_img(["bitmap", "--add", "many.qcow2", "off"], d)
    qemu_img(["bitmap", "--disable", "many.qcow2", "off"], d)
    qemu_io(["-c", "write -P 2 1M 3M", "-c", "write 40M 64k", "-c", "write -z 50M 64k"], d / "many.qcow2")
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=1.1", "v3.qcow2", "8M"], d)
    qemu_img(["bitmap", "--add", "v3.qcow2", "a"], d)
    qemu_io(["-c", "write -P 3 0 1M"], d / "v3.qcow2")
    qemu_img(["bitmap", "--clear", "v3.qcow2", "a"], d)
    qemu_img(["bitmap", "--add", "--disabled", "v3.qcow2", "b"], d)
    qemu_img(["create", "-q", "-f", "qcow2", "snap.qcow2", "16M"], d)
    qemu_io(["-c", "write -P 1 0 256k"], d / "snap.qcow2")
    qemu_img(["bitmap", "--add", "snap.qcow2", "b1"], d)
    qemu_img(["snapshot", "-c", "s1", "snap.qcow2"], d)  # check -r: QEMU's header update drops the snapshot
    shutil.copy(d / "many.qcow2", d / "leak.qcow2")
    _leak_one_cluster(d / "leak.qcow2")
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "in-use.qcow2", "16M"], d)
    qemu_img(["bitmap", "--add", "in-use.qcow2", "x"], d)
    qemu_img(["bitmap", "--add", "in-use.qcow2", "y"], d)
    qemu_io(["-c", "write -P 4 0 1M", "-c", "sigraise 9"], d / "in-use.qcow2")  # killed: x, y stay in use
    qemu_img(["bitmap", "--add", "-g", "4k", "in-use.qcow2", "z"], d)
    data = (d / "one.qcow2").read_bytes()
    _, size, offset = _bitmaps_ext(data)
    table = struct.unpack_from(">Q", data, offset)[0]
    (d / "all-ones.qcow2").write_bytes(data[:table + 7] + b"\x01" + data[table + 8:])
    bad = {"bad-granularity": [(offset + 17, 40)], "bad-table-entry": [(table + 7, 3)],
           "bad-table-size": [(offset + 11, 5)], "bad-type": [(offset + 16, 2)]}
    for name, patches in bad.items():
        img = bytearray(data)
        for off, byte in patches:
            img[off] = byte
        (d / f"{name}.qcow2").write_bytes(bytes(img))
    img = bytearray(data)
    pos = struct.unpack_from(">I", img, 100)[0]
    while struct.unpack_from(">I", img, pos)[0] != 0x23852875:
        pos += 8 + ((struct.unpack_from(">I", img, pos + 4)[0] + 7) & ~7)
    struct.pack_into(">Q", img, pos + 16, size - 8)
    (d / "broken-dir.qcow2").write_bytes(bytes(img))
    variants = {"ext-reserved": (pos + 12, ">I", 1), "ext-length": (pos + 4, ">I", 16),
                "dir-extra-overflow": (offset + 20, ">I", 0xFFFFFFF0),  # C int overflow: not "broken"
                "ext-magic-lost": (pos, ">I", 0x23856875),  # autoclear bit without the extension
                "odd-name": (offset + 24, ">B", 0xCC)}  # not UTF-8: kept byte for byte
    for name, (off, fmt, value) in variants.items():
        img = bytearray(data)
        struct.pack_into(fmt, img, off, value)
        (d / f"{name}.qcow2").write_bytes(bytes(img))
    _leak_one_cluster(d / "ext-magic-lost.qcow2")  # -r then writes metadata: overlaps the empty directory
    return d


BITMAP_IMAGES = ["one", "many", "v3", "leak", "in-use", "all-ones", "bad-granularity", "bad-table-entry",
                 "bad-table-size", "bad-type", "broken-dir", "ext-reserved", "ext-length", "dir-extra-overflow",
                 "ext-magic-lost", "odd-name", "snap"]


@pytest.mark.oracle
@pytest.mark.parametrize("cmd", [["check"], ["check", "--output=json"], ["info"], ["info", "--output=json"],
                                 ["map", "--output=json"]], ids=["check", "check-json", "info", "info-json", "map"])
@pytest.mark.parametrize("name", BITMAP_IMAGES)
def test_bitmap_images(bitmaps: Path, name: str, cmd: list[str]) -> None:
    """The bitmap directory, tables and data clusters are references (no false leaks); a bitmap
    directory QEMU refuses to load makes the open fail with QEMU's message."""
    same([*cmd, f"{name}.qcow2"], bitmaps)


@pytest.mark.oracle
@pytest.mark.parametrize("mode", [[], ["-r", "leaks"], ["-r", "all"]], ids=["plain", "leaks", "all"])
def test_check_rebuilds_zero_size_reftable(tmp_path: Path, mode: list[str]) -> None:
    """refcount_table_clusters = 0: qemu-img opens the image for the check anyway (BDRV_O_CHECK),
    every reference is an error and ``-r all`` rebuilds the refcount structure; here with 512-byte
    clusters, a snapshot and compressed data, so the rebuild spans several refcount blocks."""
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "s.qcow2", "16M"], tmp_path)
    qemu_io(["-c", "write -P 1 0 2M", "-c", "write -c 4M 64k"], tmp_path / "s.qcow2")
    qemu_img(["snapshot", "-c", "snap1", "s.qcow2"], tmp_path)
    qemu_io(["-c", "write -P 2 1M 1M"], tmp_path / "s.qcow2")
    _patch(tmp_path / "s.qcow2", [(56, 4, 0)])
    shutil.copy(tmp_path / "s.qcow2", tmp_path / "ref.qcow2")
    shutil.copy(tmp_path / "s.qcow2", tmp_path / "ours.qcow2")
    ref = qemu_img(["check", *mode, "ref.qcow2"], tmp_path)
    ours = qio_img(["check", *mode, "ours.qcow2"], tmp_path)
    assert ours == ref
    assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "ref.qcow2").read_bytes()
    for cmd in (["info"], ["map"]):
        same([*cmd, "s.qcow2"], tmp_path)


# ====================================================================== broken snapshot tables
def _patched(src: Path, dst: Path, patches: list[tuple[int, int, int]], length: int | None = None) -> None:
    shutil.copy(src, dst)
    _patch(dst, patches)
    if length is not None:
        os.truncate(dst, length)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images with internal snapshots (qemu-img snapshot -c) whose snapshot table is damaged: entries
    past the end of the file (more entries than written, a truncated file, a table moved past the end),
    too much extra data, too many entries, a misaligned table, an entry without mandatory extra data,
    and a v2 image (where short entries are fine)."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("snapshots")
    qemu_img(["create", "-q", "-f", "qcow2", "s.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 1 0 128k"], d / "s.qcow2")
    qemu_img(["snapshot", "-c", "one", "s.qcow2"], d)
    qemu_img(["snapshot", "-c", "two", "s.qcow2"], d)
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 1 0 128k"], d / "v2.qcow2")
    qemu_img(["snapshot", "-c", "one", "v2.qcow2"], d)
    data = (d / "s.qcow2").read_bytes()
    nb, table = struct.unpack_from(">IQ", data, 60)
    assert nb == 2 and len(data) > table
    s = d / "s.qcow2"
    _patched(s, d / "more-entries.qcow2", [(60, 4, 4)])
    _patched(s, d / "truncated.qcow2", [], table + 60)
    _patched(s, d / "moved-past-eof.qcow2", [(64, 8, 2 * table)])
    _patched(s, d / "extra-too-big.qcow2", [(table + 36, 4, 2000)])
    _patched(s, d / "too-many.qcow2", [(60, 4, 70000)])
    _patched(s, d / "misaligned.qcow2", [(64, 8, table + 1)])
    _patched(s, d / "no-extra.qcow2", [(table + 36, 4, 8)])
    # 512-byte clusters, four snapshots: a table pointer far past the end (freeing the old table hits
    # QEMU's 32-bit refcount-table index) and a huge entry count whose repair trips the overlap check
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2", "4M"], d)
    qemu_io(["-c", "write -P 1 0 16k"], d / "small.qcow2")
    for tag in ("a", "bb", "ccc", "dddd"):
        qemu_img(["snapshot", "-c", tag, "small.qcow2"], d)
    qemu_io(["-c", "write -P 2 8k 8k"], d / "small.qcow2")
    _patched(d / "small.qcow2", d / "far-away.qcow2", [(64, 8, 0x2F00000000000000)])
    small_table = struct.unpack_from(">Q", (d / "small.qcow2").read_bytes(), 64)[0]
    _patched(d / "small.qcow2", d / "count-overlap.qcow2", [(60, 4, 13697028), (64, 8, small_table + 0x12000000)])
    v2 = (d / "v2.qcow2").read_bytes()
    _patched(d / "v2.qcow2", d / "v2-more-entries.qcow2", [(60, 4, 3)])
    assert struct.unpack_from(">I", v2, 60)[0] == 1
    return d


SNAPSHOT_IMAGES = ["s", "v2", "more-entries", "truncated", "moved-past-eof", "extra-too-big", "too-many",
                   "misaligned", "no-extra", "v2-more-entries", "far-away", "count-overlap"]


@pytest.mark.oracle
@pytest.mark.parametrize("mode", [[], ["--output=json"], ["-r", "leaks"], ["-r", "all"],
                                  ["-r", "all", "--output=json"]], ids=["human", "json", "leaks", "all", "all-json"])
@pytest.mark.parametrize("name", SNAPSHOT_IMAGES)
def test_check_snapshot_table(snapshots: Path, tmp_path: Path, name: str, mode: list[str]) -> None:
    """qcow2_check_read_snapshot_table / qcow2_check_fix_snapshot_table: each incomplete entry is
    reported, ``-r all`` drops what must go and rewrites the table; same text, exit code and bytes."""
    shutil.copy(snapshots / f"{name}.qcow2", tmp_path / "ref.qcow2")
    shutil.copy(snapshots / f"{name}.qcow2", tmp_path / "ours.qcow2")
    ref = qemu_img(["check", *mode, "ref.qcow2"], tmp_path)
    ours = qio_img(["check", *mode, "ours.qcow2"], tmp_path)
    assert (ours[0].replace("ours.qcow2", "ref.qcow2"), ours[1].replace("ours.qcow2", "ref.qcow2"), ours[2]) == ref
    assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "ref.qcow2").read_bytes()


# ==================================================================== info: internal snapshots
@pytest.fixture(scope="module")
def snapinfo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots made by qemu-img snapshot -c (long and non-ASCII tags), then entries patched to carry a
    VM state size, a VM clock, no icount (16 bytes of extra data) and values past 2^63."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("snapinfo")
    qemu_img(["create", "-q", "-f", "qcow2", "i.qcow2", "64M"], d)
    qemu_io(["-c", "write -P 1 0 128k"], d / "i.qcow2")
    for tag in ("one", "a longer tag name than sixteen", "snäp-ü"):
        qemu_img(["snapshot", "-c", tag, "i.qcow2"], d)
    data = (d / "i.qcow2").read_bytes()
    table = struct.unpack_from(">Q", data, 64)[0]
    second = table + ((40 + 24 + 1 + 3 + 7) & ~7)
    _patched(d / "i.qcow2", d / "patched.qcow2", [
        (table + 24, 8, 3725 * 10**9 + 123456789), (table + 36 - 4, 4, 5000), (table + 40, 8, 123456789),
        (table + 56, 8, (1 << 64) - 1),
        (second + 16, 4, 0), (second + 24, 8, (1 << 63) + 999999999), (second + 40, 8, (1 << 63) + 5),
        (second + 56, 8, 42)])
    qemu_img(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M"], d)
    qemu_img(["snapshot", "-c", "old", "v2.qcow2"], d)
    qemu_img(["create", "-q", "-f", "qcow2", "-b", "i.qcow2", "-F", "qcow2", "top.qcow2"], d)
    qemu_img(["snapshot", "-c", "top-snap", "top.qcow2"], d)
    return d


@pytest.mark.oracle
@pytest.mark.parametrize("args", ["info i.qcow2", "info --output=json i.qcow2", "info patched.qcow2",
                                  "info --output=json patched.qcow2", "info v2.qcow2", "info --output=json v2.qcow2",
                                  "info --backing-chain top.qcow2", "info --backing-chain --output=json top.qcow2"])
@pytest.mark.parametrize("tz", ["UTC", "America/New_York"])
def test_info_snapshot_list(snapinfo: Path, args: str, tz: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "Snapshot list" table (ID, TAG, VM SIZE, DATE in local time, VM CLOCK, ICOUNT) and the
    ``snapshots`` JSON array, as bdrv_snapshot_dump and SnapshotInfo show them."""
    monkeypatch.setenv("TZ", tz)
    same(args.split(), snapinfo)


@pytest.mark.oracle
@pytest.mark.parametrize("mode", [["-r", "leaks"], ["-r", "all"], ["-r", "all", "--output=json"]],
                         ids=["leaks", "all", "all-json"])
@pytest.mark.parametrize("name", BITMAP_IMAGES)
def test_bitmap_images_repair(bitmaps: Path, tmp_path: Path, name: str, mode: list[str]) -> None:
    """``check -r`` on an image with bitmaps: QEMU marks the bitmaps in use at open and stores them to
    new clusters at close; the repaired image must be byte-identical, and still readable by qemu-img."""
    shutil.copy(bitmaps / f"{name}.qcow2", tmp_path / "ref.qcow2")
    shutil.copy(bitmaps / f"{name}.qcow2", tmp_path / "ours.qcow2")
    ref = qemu_img(["check", *mode, "ref.qcow2"], tmp_path)
    ours = qio_img(["check", *mode, "ours.qcow2"], tmp_path)
    assert (ours[0].replace("ours.qcow2", "ref.qcow2"), ours[1].replace("ours.qcow2", "ref.qcow2"), ours[2]) == ref
    assert (tmp_path / "ours.qcow2").read_bytes() == (tmp_path / "ref.qcow2").read_bytes()
