"""External data files (qcow2 ``data_file``/``data_file_raw``), compared with the real QEMU 7.2 tools:
images made by ``qio-img create`` are byte-identical to ``qemu-img create``'s (the qcow2 file and the data
file); images written by qemu-io read back in qio and the reverse, both checked by ``qemu-img check``;
``info``/``map``/``check`` agree; hostile data-file header extensions fail as qemu-io fails, never with a
traceback, a hang or a write outside the image."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

from filters import filter_qemu_io
from oracle import QEMU_IO, ROOT, qemu_img, qemu_io, qio_img, sh

oracle = pytest.mark.oracle

QIO = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv[0] = 'qemu-io'; "
       "from qio.cli import main; raise SystemExit(main())"]


def _files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_blocks) for p in sorted(d.iterdir())}


@oracle
@pytest.mark.parametrize("opts", [
    "data_file=d.raw", "data_file=d.raw,data_file_raw=on", "data_file=d.raw,preallocation=metadata",
    "data_file=d.raw,preallocation=falloc", "data_file=d.raw,preallocation=full,cluster_size=4k",
    "data_file=d.raw,lazy_refcounts=on,refcount_bits=1", "data_file=d.raw,data_file_raw=on,preallocation=falloc",
    "data_file_raw=on", "data_file=d.raw,compat=0.10", "data_file=nodir/d.raw",
    # the data file is the image itself: the lock error, the image deleted, the data file reported gone
    "data_file=t.qcow2", "data_file=./t.qcow2,data_file_raw=on", "data_file=t.qcow2,preallocation=full",
    "data_file=t.qcow2,compat=bogus", "data_file=t.qcow2,compat=0.10",
])
def test_create_matches_qemu_img(tmp_path: Path, opts: str) -> None:
    """Same messages, same files left (bytes and allocated blocks), for successes and refusals."""
    results = []
    for name, run in (("q", qemu_img), ("r", qio_img)):
        d = tmp_path / name
        d.mkdir()
        p = run("create", "-f", "qcow2", "-o", opts, "t.qcow2", "3M", cwd=d, check=False)
        results.append((p.stdout, p.stderr, p.returncode, _files(d)))
    assert results[1] == results[0]


@oracle
def test_create_raw_with_backing_refused_like_qemu(tmp_path: Path) -> None:
    """The backing image is opened without I/O (its own data file need not exist) before the refusal."""
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path}/bd.raw", str(tmp_path / "b.qcow2"), "1M")
    (tmp_path / "bd.raw").unlink()
    results = []
    for name, run in (("q", qemu_img), ("r", qio_img)):
        d = tmp_path / name
        d.mkdir()
        p = run("create", "-f", "qcow2", "-o", f"data_file=d.raw,data_file_raw=on,backing_file={tmp_path}/b.qcow2,"
                "backing_fmt=qcow2", "t.qcow2", cwd=d, check=False)
        results.append((p.stdout, p.stderr, p.returncode, _files(d)))
    assert results[1] == results[0]


WRITES = ["write -P 0x11 0 100k", "write -P 0x22 300k 4k", "write -z 512k 128k", "discard 0 64k",
          "write -P 0x33 960k 64k", "write -z -u 700k 64k", "truncate 2M", "write -P 0x44 1536k 70k"]
READS = ["read -P 0 0 64k", "read -P 0x11 64k 36k", "read -P 0x22 300k 4k", "read -P 0 512k 128k",
         "read -P 0x33 960k 64k", "read -P 0x44 1536k 70k", "read -P 0 1700k 100k"]


def _cmds(lines: list[str]) -> list[str]:
    return [x for c in lines for x in ("-c", c)]


@oracle
@pytest.mark.parametrize("raw", [False, True], ids=["plain", "raw"])
def test_both_directions(tmp_path: Path, raw: bool) -> None:
    """qio writes, qemu-io reads and qemu-img check finds no errors; qemu-io writes, qio reads and
    qio-img check agrees; the images both write are identical."""
    opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "")
    for name in ("q", "r"):
        (tmp_path / name).mkdir()
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "1M", cwd=tmp_path / name)
    qio_w = sh([*QIO, *_cmds(WRITES), "t.qcow2"], cwd=tmp_path / "r", check=False)
    assert qio_w.returncode == 0, qio_w.stderr
    qemu_io(*_cmds(WRITES), "t.qcow2", cwd=tmp_path / "q")
    assert _files(tmp_path / "r") == _files(tmp_path / "q")
    qemu_io(*_cmds(READS), "t.qcow2", cwd=tmp_path / "r")  # check=True: a failed pattern exits 1
    chk = qemu_img("check", "t.qcow2", cwd=tmp_path / "r")
    assert "No errors were found on the image." in chk.stdout
    qio_r = sh([*QIO, *_cmds(READS), "t.qcow2"], cwd=tmp_path / "q", check=False)
    assert qio_r.returncode == 0 and "Pattern verification failed" not in qio_r.stdout, qio_r.stdout
    for args in (["check"], ["check", "--output=json"], ["map"], ["map", "--output=json"], ["info"],
                 ["info", "--output=json"]):
        assert qio_img(*args, "t.qcow2", cwd=tmp_path / "q", check=False).stdout == \
            qemu_img(*args, "t.qcow2", cwd=tmp_path / "q", check=False).stdout, args


# -- hostile data-file header extensions -------------------------------------------------------
EXT_DATA_FILE = 0x44415441


def _rewrite_exts(img: Path, data_ext: bytes | None, *, incompat: int | None = None, autoclear: int | None = None,
                  version: int | None = None, raw_len: int | None = None) -> None:
    """Replace the image's data file extension by ``data_ext`` (None: none), keeping the others;
    ``raw_len`` writes that length field instead of the real one."""
    buf = bytearray(img.read_bytes())
    hlen = struct.unpack_from(">I", buf, 100)[0]
    exts, off = [], hlen
    while True:
        magic, length = struct.unpack_from(">II", buf, off)
        if magic == 0:
            break
        if magic != EXT_DATA_FILE:
            exts.append((magic, bytes(buf[off + 8: off + 8 + length])))
        off += 8 + ((length + 7) & ~7)
    area = bytearray()
    if data_ext is not None:
        area += struct.pack(">II", EXT_DATA_FILE, len(data_ext) if raw_len is None else raw_len)
        area += data_ext + bytes(-len(data_ext) % 8)
    for magic, data in exts:
        area += struct.pack(">II", magic, len(data)) + data + bytes(-len(data) % 8)
    area += bytes(8)
    buf[hlen: hlen + len(area) + 64] = area + bytes(64)
    if incompat is not None:
        struct.pack_into(">Q", buf, 72, incompat)
    if autoclear is not None:
        struct.pack_into(">Q", buf, 88, autoclear)
    if version is not None:
        struct.pack_into(">I", buf, 4, version)
    img.write_bytes(bytes(buf))


HOSTILE = {
    "missing": dict(data_ext=b"nonexistent.raw"),
    "embedded-nul": dict(data_ext=b"d.raw\0junk"),
    "unterminated": dict(data_ext=b"d.raw"),  # no NUL in the extension (length 5, padded)
    "empty-name": dict(data_ext=b""),
    "long-name": dict(data_ext=b"a" * 4000),
    "too-large": dict(data_ext=b"d.raw", raw_len=0x7FFFFFF0),
    "past-cluster": dict(data_ext=b"d.raw", raw_len=65000),
    "directory": dict(data_ext=b"."),
    "null-co": dict(data_ext=b"null-co://"),
    "json": dict(data_ext=b'json:{"driver":"null-co","size":1048576}'),
    "bit-without-name": dict(data_ext=None),
    "name-without-bit": dict(data_ext=b"d.raw", incompat=0),
    "raw-bit-without-data-file": dict(data_ext=None, incompat=0, autoclear=2),
    "v2-with-data-file": dict(data_ext=b"d.raw", version=2),
    "unknown-incompat-and-name": dict(data_ext=b"d.raw", incompat=0x4 | 0x100),
}


@oracle
@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("cmds", [["read 0 64k", "write -P 5 0 4k", "map", "info"], ["open -r t.qcow2", "info"]],
                         ids=["rw", "ro"])
def test_hostile_data_file_extension(tmp_path: Path, case: str, cmds: list[str]) -> None:
    """Bad, huge or unterminated names, the feature bits without a name or without a data file, a v2
    image: qio answers exactly as qemu-io and leaves every file in the same state."""
    assert QEMU_IO is not None
    results = []
    for name in ("q", "r"):
        d = tmp_path / name
        d.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "t.qcow2", "1M", cwd=d)
        qemu_io("-c", "write -P 1 0 64k", "t.qcow2", cwd=d)
        _rewrite_exts(d / "t.qcow2", **HOSTILE[case])  # type: ignore[arg-type]
        args = _cmds(cmds) if cmds[0].startswith("open") else [*_cmds(cmds), "t.qcow2"]
        prog = [QEMU_IO] if name == "q" else QIO
        p = sh([*prog, *args], cwd=d, check=False, timeout=60)
        assert "Traceback" not in p.stderr
        # every file of the directory: qio writes nothing qemu-io does not (no write outside the image
        # or the data file qemu-io itself uses)
        results.append((filter_qemu_io(p.stdout), p.stderr, p.returncode, {k: v[0] for k, v in _files(d).items()}))
    assert results[1] == results[0]


@oracle
def test_data_file_option_forms(tmp_path: Path) -> None:
    """The ``data-file`` open option: a node reference, a non-dict, and the option on a plain image."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "t.qcow2", "1M", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "p.qcow2", "1M", cwd=tmp_path)
    assert QEMU_IO is not None
    for spec in ['"data-file":"foo"', '"data-file":""', '"data-file":null', '"data-file":{"driver":"null-co"}',
                 '"data-file":{"driver":"file","filename":"nonexistent"}']:
        for img in ("t.qcow2", "p.qcow2"):
            arg = f'json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{img}"}},{spec}}}'
            q = sh([QEMU_IO, "-c", "read 0 4k", arg], cwd=tmp_path, check=False)
            r = sh([*QIO, "-c", "read 0 4k", arg], cwd=tmp_path, check=False)
            assert (filter_qemu_io(r.stdout), r.stderr, r.returncode) == \
                (filter_qemu_io(q.stdout), q.stderr, q.returncode), (spec, img)
    assert not os.path.exists(tmp_path / "nonexistent")


@oracle
@pytest.mark.parametrize("args", [["info", "t.qcow2"], ["check", "t.qcow2"], ["check", "-r", "all", "t.qcow2"],
                                  ["check", "-r", "leaks", "t.qcow2"], ["map", "t.qcow2"]])
def test_img_on_an_image_that_is_its_own_data_file(tmp_path: Path, args: list[str]) -> None:
    """Read-only opens work (info does not even open the data file); a read-write open fails on the
    shared resize lock the data child asks for while the file child holds resize."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=t.qcow3", "t.qcow2", "1M", cwd=tmp_path)
    img = tmp_path / "t.qcow2"
    data = img.read_bytes()
    img.write_bytes(data.replace(b"t.qcow3", b"t.qcow2"))
    (tmp_path / "t.qcow3").unlink()
    q = qemu_img(*args, cwd=tmp_path, check=False)
    before = img.read_bytes()
    r = qio_img(*args, cwd=tmp_path, check=False)
    assert (r.stdout, r.stderr, r.returncode) == (q.stdout, q.stderr, q.returncode)
    assert img.read_bytes() == before
