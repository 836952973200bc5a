"""qio-img on the null drivers answers as qemu-img 7.2 does: ``info`` (disk size 0 B) and ``map``
(nothing allocated, or zeroes with ``read-zeroes=on``), through raw or directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from oracle import qemu_img, qio_img

NAMES = [
    ["null-co://"],
    ["-f", "raw", "null-aio://"],
    ["--image-opts", "driver=null-co,size=1M,read-zeroes=on"],
    ["--image-opts", "driver=null-aio,size=1000"],
    ["--image-opts", "driver=raw,file.driver=null-co,file.size=64k,file.read-zeroes=on"],
]


CMDS = [["map"], ["map", "--output=json"], ["info"], ["info", "--output=json"]]
# qemu-img names an image opened with options json:{...} in QDict hash order, which qio-img does not
# model: info only for plain file names.
CASES = [(c, n) for n in NAMES for c in CMDS if c[0] == "map" or "--image-opts" not in n]


@pytest.mark.oracle
@pytest.mark.parametrize(("cmd", "name"), CASES, ids=lambda x: " ".join(x))
def test_null_like_qemu_img(tmp_path: Path, cmd: list[str], name: list[str]) -> None:
    want = qemu_img(*cmd, *name, cwd=tmp_path, check=False)
    got = qio_img(*cmd, *name, cwd=tmp_path, check=False)
    assert (got.stdout, got.stderr, got.returncode) == (want.stdout, want.stderr, want.returncode)
