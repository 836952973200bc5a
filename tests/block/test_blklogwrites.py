"""blklogwrites: logs written by qio and by real qemu-io are interchangeable (each appends to the other's
with ``log-append=on`` and the result is byte-identical), and ``read_log`` parses both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import QEMU_IO, ROOT
from qio.block.blklogwrites import LOG_DISCARD, LOG_FLUSH, LogError, read_log

pytestmark = pytest.mark.oracle


def _tool(name: str) -> list[str]:
    if name == "qemu-io":
        assert QEMU_IO is not None
        return [QEMU_IO]
    return [sys.executable, "-m", "qio"]


def _run(tool: str, opts: str, *cmds: str, cwd: Path) -> None:
    args = [*_tool(tool), "-t", "writeback", "--image-opts", opts]
    for c in cmds:
        args += ["-c", c]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr, (tool, r.stderr)


def _session_pair(tmp_path: Path, first: str, second: str) -> tuple[bytes, bytes]:
    d = tmp_path / f"{first}-{second}"
    d.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "4M"], check=True)
    (d / "a.log").write_bytes(b"")
    base = f"driver=qcow2,file.driver=blklogwrites,file.file.filename={d}/a.qcow2,file.log.filename={d}/a.log"
    _run(first, base, "write -P 1 0 64k", "write -z 1M 64k", "write -c -P 2 2M 64k", cwd=d)
    _run(second, base + ",file.log-append=on", "write -P 3 3M 4k", "discard 0 64k", "flush", "write -P 4 8k 1k", cwd=d)
    return (d / "a.log").read_bytes(), (d / "a.qcow2").read_bytes()


def test_each_tool_appends_to_the_others_log(tmp_path: Path) -> None:
    ref = _session_pair(tmp_path, "qemu-io", "qemu-io")
    for first, second in (("qio", "qemu-io"), ("qemu-io", "qio"), ("qio", "qio")):
        assert _session_pair(tmp_path, first, second) == ref, (first, second)


def test_read_log_parses_a_qemu_log(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(bytes(1 << 20))
    (tmp_path / "d.log").write_bytes(b"")
    opts = f"driver=blklogwrites,file.filename={tmp_path}/d.img,log.filename={tmp_path}/d.log"
    _run("qemu-io", opts, "write -P 0xaa 0 4k", "flush", "write -z 64k 64k", "discard 128k 64k", "flush",
         cwd=tmp_path)
    log = read_log(str(tmp_path / "d.log"))
    assert log.sectorsize == 512
    kinds = [(e.kind, e.offset, e.nbytes) for e in log.entries]
    # the last flush is the close's, which finds the node clean after the explicit flush: not logged
    assert kinds == [("write", 0, 4096), ("flush", 0, 0), ("write", 65536, 65536),
                     ("discard", 131072, 65536), ("flush", 0, 0)]
    data = (tmp_path / "d.log").read_bytes()
    first = log.entries[0]
    assert data[first.data_offset:first.data_offset + 4096] == b"\xaa" * 4096
    assert log.entries[3].flags == LOG_DISCARD and log.entries[4].flags == LOG_FLUSH


def test_read_log_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.log"
    p.write_bytes(b"\x5a" * 4096)
    with pytest.raises(LogError, match="Invalid log superblock magic"):
        read_log(str(p))
    with pytest.raises(LogError, match="Could not open"):
        read_log(str(tmp_path / "missing.log"))
