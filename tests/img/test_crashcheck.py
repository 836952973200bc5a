"""The crash-state explorer: state enumeration on hand-made logs whose crash states are known, the
replay spec, replay up to an entry or a mark, and crashcheck finding a known corrupt state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import ROOT
from qio.block.blklogwrites import ENTRY, LOG_DISCARD, LOG_FLUSH, LOG_FUA, LOG_MARK, pack_super, read_log
from qio.img.crashcheck import Builder, State, enumerate_states, epochs, parse_spec

SS = 512


def write_log(path: Path, entries: list[tuple[int, int, int, bytes]]) -> None:
    """A dm-log-writes log from ``(flags, offset, nbytes, data)``; a mark's data is its name."""
    out = bytearray(pack_super(len(entries), SS))
    for flags, offset, nbytes, data in entries:
        head = ENTRY.pack(offset // SS, nbytes // SS, flags, len(data) if flags & LOG_MARK else 0)
        if flags & LOG_MARK:
            head += data
        out += head.ljust(SS, b"\0")
        if not flags & (LOG_DISCARD | LOG_FLUSH | LOG_MARK):
            out += data.ljust(nbytes, b"\0")
    path.write_bytes(bytes(out))


def W(offset: int, value: int, nbytes: int = SS, flags: int = 0) -> tuple[int, int, int, bytes]:
    return flags, offset, nbytes, bytes([value]) * nbytes


FLUSH = (LOG_FLUSH, 0, 0, b"")

# entries: 0 w, 1 w, 2 flush, 3 w(2 sectors), 4 w FUA, 5 w, 6 flush, 7 discard, 8 w
HAND = [W(0, 1), W(512, 2), FLUSH, W(1024, 3, 1024), W(2048, 4, flags=LOG_FUA), W(0, 5), FLUSH,
        (LOG_DISCARD, 512, 512, b""), W(4096, 6)]


def test_epochs_and_flush_states(tmp_path: Path) -> None:
    p = tmp_path / "h.log"
    write_log(p, HAND)
    log = read_log(str(p))
    assert [e.kind for e in log.entries] == ["write", "write", "flush", "write", "write", "write", "flush",
                                             "discard", "write"]
    assert epochs(log) == [(0, [0, 1]), (3, [3, 4, 5]), (7, [7, 8])]
    states = enumerate_states(log, samples=0, seed=0, limit=100, torn=False)
    assert {(s.prefix, s.kind) for s in states if s.kind == "flush"} == {(3, "flush"), (7, "flush"), (9, "flush")}
    # every write/discard is an ordered prefix, unless that prefix is also a flush state (the end)
    assert sorted(s.prefix for s in states if s.kind == "prefix") == [1, 2, 4, 5, 6, 8]


def test_subsets_keep_fua_and_stay_in_their_epoch(tmp_path: Path) -> None:
    p = tmp_path / "h.log"
    write_log(p, HAND)
    log = read_log(str(p))
    states = enumerate_states(log, samples=50, seed=7, limit=1000)
    assert states == enumerate_states(log, samples=50, seed=7, limit=1000)  # seeded
    seen_subsets = set()
    for s in states:
        if s.kind not in ("subset", "torn"):
            assert not s.extras
            continue
        start = s.prefix
        ep = dict(epochs(log))[start]
        idxs = [i for i, _ in s.extras]
        assert set(idxs) <= set(ep) and idxs == sorted(idxs)
        if 5 in idxs and start == 3:
            assert 4 in idxs  # the FUA write before the crash point is always there
        for i, secs in s.extras:
            if secs is not None:
                assert s.kind == "torn" and 0 < len(secs) < log.entries[i].nr_sectors
        if s.kind == "subset":
            seen_subsets.add((start, tuple(idxs)))
    # epoch 1 (entries 0, 1): every non-empty subset is reachable; with 50 samples all show up
    assert {x for x in seen_subsets if x[0] == 0} >= {(0, (0,)), (0, (1,)), (0, (0, 1))}
    assert any(s.kind == "torn" and s.extras in (((3, (0,)),), ((3, (1,)),)) for s in states)


def test_limit_keeps_flush_states_first(tmp_path: Path) -> None:
    p = tmp_path / "h.log"
    write_log(p, HAND)
    log = read_log(str(p))
    states = enumerate_states(log, samples=50, seed=1, limit=5)
    assert len(states) == 5
    assert sum(s.kind == "flush" for s in states) == 3


def test_spec_round_trip_and_builder(tmp_path: Path) -> None:
    p = tmp_path / "h.log"
    write_log(p, HAND)
    log = read_log(str(p))
    st = State(3, ((3, (1,)), (5, None)), "torn")
    assert st.spec() == "0-2,3:1,5"
    assert parse_spec(st.spec(), len(log.entries)) == [(0, None), (1, None), (2, None), (3, (1,)), (5, None)]
    with pytest.raises(ValueError, match="outside"):
        parse_spec("0-9", len(log.entries))
    base = tmp_path / "base.img"
    base.write_bytes(b"\x11" * 8192)
    b = Builder(str(p), log, str(base), str(tmp_path / "work.img"))
    try:
        b.build(st)
        data = (tmp_path / "work.img").read_bytes()
        assert data[:512] == b"\x05" * 512 and data[512:1024] == b"\x02" * 512
        assert data[1024:1536] == b"\x11" * 512 and data[1536:2048] == b"\x03" * 512  # torn: sector 1 only
        assert data[2048:2560] == b"\x11" * 512  # entry 4 not in this state
        b.build(State(9, (), "flush"))  # everything, the discard zeroes its range, the last write extends
        data = (tmp_path / "work.img").read_bytes()
        assert data[512:1024] == bytes(512) and data[2048:2560] == b"\x04" * 512 and data[4096:4608] == b"\x06" * 512
        b.build(State(0, (), "prefix"))  # undone to the base
        assert (tmp_path / "work.img").read_bytes() == base.read_bytes()
    finally:
        b.close()


def img(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qio.img", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_replay_end_and_mark(tmp_path: Path) -> None:
    p = tmp_path / "m.log"
    write_log(p, [W(0, 1), (LOG_MARK, 0, 0, b"before-two"), W(0, 2), FLUSH])
    (tmp_path / "base.img").write_bytes(bytes(1024))
    r = img("replay", "--end-mark", "before-two", str(p), "base.img", "out.img", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.img").read_bytes()[:512] == b"\x01" * 512
    r = img("replay", "--end", "2", str(p), "base.img", "out2.img", cwd=tmp_path)
    assert (tmp_path / "out2.img").read_bytes()[:512] == b"\x02" * 512
    r = img("replay", "--end-mark", "nope", str(p), "base.img", "out3.img", cwd=tmp_path)
    assert r.returncode == 1 and "No mark 'nope'" in r.stderr
    r = img("replay", "--end", "9", str(p), "base.img", "out3.img", cwd=tmp_path)
    assert r.returncode == 1 and "outside the log's 4 entries" in r.stderr
    r = img("replay", str(p), "base.img", "base.img", cwd=tmp_path)
    assert r.returncode == 1 and "is the base image" in r.stderr and (tmp_path / "base.img").read_bytes() == bytes(1024)


@pytest.mark.oracle("qemu-img")
def test_crashcheck_finds_the_known_corrupt_state(tmp_path: Path) -> None:
    """A qcow2 L1 entry pointing at a cluster with refcount 0 is corrupt until a later write in the same
    epoch removes it again: the prefix 0-2 and the subset {2} are corrupt, every other state clean."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M"], cwd=tmp_path, check=True)
    l1 = bytearray(SS)
    l1[:8] = (0x8000000000050000).to_bytes(8, "big")
    write_log(tmp_path / "c.log", [W(0x40000, 9), FLUSH, (0, 0x30000, SS, bytes(l1)), (0, 0x30000, SS, bytes(SS)),
                                   FLUSH])
    r = img("crashcheck", "--oracle", "--samples", "20", "--output=json", "c.log", "base.qcow2", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    rep = json.loads(r.stdout)
    assert rep["states"]["corrupt"] == 2 and rep["states"]["leaks"] == 0
    assert rep["states"]["tried"] == rep["states"]["clean"] + 2
    assert rep["oracle-disagreements"] == []
    first = rep["first-corrupt"]
    assert first["entries"] == "0-2"  # the ordered prefix: simpler than the subset {2} after the flush
    assert first["replayed"] == ["entries 0-2 in order, the last one entry 2: write offset 196608 length 512"]
    args = first["command"].split()[1:]
    assert img(*args, cwd=tmp_path).returncode == 0
    chk = subprocess.run(["qemu-img", "check", "state.img"], cwd=tmp_path, capture_output=True, check=False)
    assert chk.returncode == 2
    human = img("crashcheck", "c.log", "base.qcow2", cwd=tmp_path)
    assert "Corrupt: 2" in human.stdout and "Rebuild it with:" in human.stdout


def test_crashcheck_usage_errors(tmp_path: Path) -> None:
    r = img("crashcheck", "only-one", cwd=tmp_path)
    assert r.returncode == 1 and "Expecting a log and a base image" in r.stderr
    (tmp_path / "bad.log").write_bytes(b"x" * 600)
    r = img("crashcheck", "bad.log", "base", cwd=tmp_path)
    assert r.returncode == 1 and "Invalid log superblock magic" in r.stderr


@pytest.mark.oracle("qemu-img")
def test_worked_example_unsafe_corrupts_writeback_does_not(tmp_path: Path) -> None:
    """docs/crash-consistency.md: without flushes (cache=unsafe) a crash can leave an L1 entry whose L2
    table has refcount 0; with writeback the same session leaves no corrupt state."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M"], cwd=tmp_path, check=True)
    results = {}
    for mode in ("unsafe", "writeback"):
        shutil.copyfile(tmp_path / "base.qcow2", tmp_path / "disk.qcow2")
        (tmp_path / "disk.log").write_bytes(b"")
        opts = "driver=qcow2,file.driver=blklogwrites,file.file.filename=disk.qcow2,file.log.filename=disk.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "qio", "-t", mode, "--image-opts", opts, "-c", "write -P 1 0 64k",
                        "-c", "write -P 2 1M 64k", "-c", "flush"], cwd=tmp_path, env=env, check=True,
                       capture_output=True)
        if mode == "unsafe":  # never flushed: no superblock
            assert "try --all-entries" in img("crashcheck", "disk.log", "base.qcow2", cwd=tmp_path).stderr
        r = img("crashcheck", "--all-entries", "--samples", "64", "--no-torn", "--output=json", "disk.log",
                "base.qcow2", cwd=tmp_path)
        results[mode] = json.loads(r.stdout)
    unsafe, wb = results["unsafe"], results["writeback"]
    assert unsafe["entry-kinds"]["flush"] == 0 and unsafe["states"]["corrupt"] > 0
    assert unsafe["first-corrupt"]["entries"] == "1,2"  # L2 table and L1 entry without the refcount block
    assert "--all-entries --entries 1,2" in unsafe["first-corrupt"]["command"]
    assert wb["entry-kinds"]["flush"] == 5 and wb["states"]["corrupt"] == 0 and wb["states"]["leaks"] > 0


def test_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """stderr a terminal: a progress line rewritten in place and erased at the end; not a terminal: nothing."""
    import pty

    p = tmp_path / "h.log"
    write_log(p, HAND)
    (tmp_path / "base.img").write_bytes(bytes(8192))
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        r = subprocess.run([sys.executable, "-m", "qio.img", "crashcheck", "-f", "raw", "--limit", "20", str(p),
                            "base.img"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=slave, timeout=120,
                           check=False)
        os.close(slave)
        err = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(master)
    assert r.returncode == 0 and b"Clean: 20" in r.stdout
    assert b"\rcrashcheck: 20/20 states (" in err and err.endswith(b"\r\x1b[K")
    assert img("crashcheck", "-f", "raw", "--limit", "20", str(p), "base.img", cwd=tmp_path).stderr == ""


@pytest.mark.oracle("qemu-img")
def test_reused_verdicts_change_nothing(tmp_path: Path) -> None:
    """Torn and lost data writes leave the bytes the check reads unchanged: their verdicts are reused,
    and the counts are those of checking every state."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "64M"], cwd=tmp_path, check=True)
    shutil.copyfile(tmp_path / "base.qcow2", tmp_path / "disk.qcow2")
    (tmp_path / "disk.log").write_bytes(b"")
    opts = "driver=qcow2,file.driver=blklogwrites,file.file.filename=disk.qcow2,file.log.filename=disk.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "qio", "-t", "writeback", "--image-opts", opts, "-c", "write -P 1 0 64k",
                    "-c", "write -P 2 1M 4k", "-c", "write -P 3 5M 100k", "-c", "flush", "-c", "write -P 4 10M 64k"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    reps = [json.loads(img("crashcheck", "--samples", "24", *extra, "--output=json", "disk.log", "base.qcow2",
                           cwd=tmp_path).stdout) for extra in ([], ["--no-reuse"])]
    assert reps[0]["states"] == reps[1]["states"] and reps[0]["states"]["tried"] > 50
    assert reps[0]["verdicts-reused"] > reps[0]["states"]["tried"] // 2 and reps[1]["verdicts-reused"] == 0


@pytest.mark.oracle("qemu-img", "qemu-io")
def test_lazy_refcounts_repaired_and_the_state_repair_cannot_fix(tmp_path: Path) -> None:
    """lazy_refcounts=on: crash states are dirty and their refcount errors are repaired by the next
    read-write open ("repaired"), except the one documented in docs/crash-consistency.md: the L2 update of
    a new data cluster without the data write that extended the file; QEMU's (and qio's) rebuild puts the
    new refcount block into that cluster, which the L2 table still references."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "base.qcow2", "64M"],
                   cwd=tmp_path, check=True)
    shutil.copyfile(tmp_path / "base.qcow2", tmp_path / "disk.qcow2")
    (tmp_path / "disk.log").write_bytes(b"")
    opts = "driver=qcow2,file.driver=blklogwrites,file.file.filename=disk.qcow2,file.log.filename=disk.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "qio", "-t", "writeback", "--image-opts", opts, "-c", "write -P 1 0 64k",
                    "-c", "write -P 2 1M 4k", "-c", "flush", "-c", "write -P 4 10M 64k"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    r = img("crashcheck", "--oracle", "--samples", "8", "--output=json", "disk.log", "base.qcow2", cwd=tmp_path)
    rep = json.loads(r.stdout)
    assert rep["states"]["repaired"] > 10 and rep["states"]["corrupt"] == 2
    assert rep["oracle-disagreements"] == []  # qemu-img check sees the dirty states as corrupt, as qio did before
    assert rep["first-corrupt"]["entries"] == "0-12,14"
    assert img("replay", "--entries", "0-12,14", "disk.log", "base.qcow2", "state.img", cwd=tmp_path).returncode == 0
    opened = subprocess.run(["qemu-io", "-c", "read 0 512", "state.img"], cwd=tmp_path, capture_output=True,
                             text=True, check=False)
    assert "ERROR rebuilt refcount structure is still broken" in opened.stderr
    w = subprocess.run(["qemu-io", "-c", "write -P 9 10M 64k", "state.img"], cwd=tmp_path, capture_output=True,
                       text=True, check=False)
    assert "Preventing invalid write on metadata (overlaps with refcount block)" in w.stderr
