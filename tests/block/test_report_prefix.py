"""Messages the block drivers print (QEMU's ``warn_report``/``error_report``) carry the name of the
program that opened the image, as in QEMU: qemu-io prints its argv[0] basename, qemu-img ``qemu-img``.
Checked against the real tools on a qcow2 image whose bitmaps a "program lacking bitmap support"
modified (the autoclear bit cleared): the driver warns at open time."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import QEMU_IMG, QEMU_IO, RUN_QIO_IMG, qio_wrapper, run

pytestmark = pytest.mark.oracle


def _bitmap_image(path: Path) -> bytes:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    subprocess.run([QEMU_IMG, "bitmap", "--add", str(path), "b0"], check=True)
    data = bytearray(path.read_bytes())
    autoclear = struct.unpack_from(">Q", data, 88)[0]
    assert autoclear & 1
    struct.pack_into(">Q", data, 88, autoclear & ~1)
    path.write_bytes(data)
    return bytes(data)


def test_qio_warning_carries_its_argv0_name(tmp_path: Path) -> None:
    img = tmp_path / "bm.qcow2"
    data = _bitmap_image(img)
    wrapper = qio_wrapper(tmp_path / "qio-wrapper")
    results = []
    for target in (QEMU_IO, str(wrapper)):
        assert target is not None
        link = tmp_path / "bin" / "my-io"
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        img.write_bytes(data)
        results.append(run([str(link), "-c", "read -q 0 512", img.name], tmp_path))
    assert results[0] == results[1]
    assert results[0][1].startswith("my-io: warning: a program lacking bitmap support modified this file")


def test_qio_img_warning_says_qemu_img(tmp_path: Path) -> None:
    img = tmp_path / "bm.qcow2"
    data = _bitmap_image(img)
    assert QEMU_IMG is not None
    ref = run([QEMU_IMG, "info", img.name], tmp_path)
    img.write_bytes(data)
    ours = run([sys.executable, "-c", RUN_QIO_IMG, "info", img.name], tmp_path)
    assert ours == ref
    assert ref[1].startswith("qemu-img: warning: a program lacking bitmap support")
