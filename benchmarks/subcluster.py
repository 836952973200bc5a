#!/usr/bin/env python3
"""Subcluster-allocating 4 KiB writes on a qcow2 image with extended L2 entries: qio vs qemu-io.

Workload ``W5x``: COUNT x ``write -q -P 0xab OFF 4k`` piped into one process, OFF random 4 KiB-aligned
offsets of a fresh ``extended_l2=on`` image (64 KiB clusters, 2 KiB subclusters).  Most writes land in
a cluster that other writes already allocated, so they take the subcluster path: an in-place write into
unallocated subclusters of an allocated cluster (no COW, an L2 bitmap update), the rest allocate a new
cluster and mark just two of its 32 subclusters.  The image is verified afterwards (qemu-img check and
a pattern read of every written block by qemu-io).

The two tools run interleaved (qemu-io, qio, qemu-io, qio, ...) on identically prepared images.  Each
value is one whole process (spawn to exit): wall time and CPU time (user + system, from the kernel's
child accounting; less sensitive to other load on the machine than wall time).  The table shows the
medians and the ratio qio / qemu-io; the target is 1.5.

    python benchmarks/subcluster.py [--rounds 7] [--count 2000] [--qio "python -m qio"]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE = 256 << 20
BLOCK = 4096
TARGET = 1.5
#: what a failed command prints in piped mode (where stdout also holds the prompts)
FAILED = re.compile(r"fail|error|traceback|exception|not found|invalid|usage:", re.IGNORECASE)


def offsets(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.sample(range(0, SIZE // BLOCK), count)


def script(offs: list[int]) -> bytes:
    return "".join(f"write -q -P 0xab {o * BLOCK} 4k\n" for o in offs).encode()


def prepare(path: Path, extended_l2: bool) -> None:
    opts = f"extended_l2={'on' if extended_l2 else 'off'}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(SIZE)], check=True)


def timed(argv: list[str], stdin: bytes) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode or p.stderr.strip() or FAILED.search(p.stdout.decode("utf-8", "replace")):
        raise SystemExit(f"{argv[0]} failed ({p.returncode}): {p.stdout[:300]!r} {p.stderr[:300]!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def verify(path: Path, offs: list[int]) -> None:
    chk = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, check=False)
    if chk.returncode:
        raise SystemExit(f"qemu-img check failed on {path}:\n{chk.stdout}{chk.stderr}")
    reads = "".join(f"read -q -P 0xab {o * BLOCK} 4k\n" for o in offs).encode()
    p = subprocess.run(["qemu-io", str(path)], input=reads, capture_output=True, check=False)
    if p.returncode or FAILED.search(p.stdout.decode("utf-8", "replace")):
        raise SystemExit(f"verification of {path} failed: {p.stdout[:300]!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", choices=("writethrough", "writeback"), default="writethrough",
                    help="qemu-io's -t mode (writethrough, the default, flushes after every write)")
    ap.add_argument("--no-extended-l2", dest="extended_l2", action="store_false",
                    help="the same writes on a plain qcow2 image (the reference without subclusters)")
    ap.add_argument("--qio", default=f"{shlex.quote(sys.executable)} -m qio",
                    help="the qio command (default: this interpreter, -m qio from this checkout)")
    args = ap.parse_args(argv)
    if shutil.which("qemu-io") is None or shutil.which("qemu-img") is None:
        print("qemu-io/qemu-img not installed", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    offs = offsets(args.count, args.seed)
    stdin = script(offs)
    qio = shlex.split(args.qio)
    results: dict[str, list[tuple[float, float]]] = {"qemu-io": [], "qio": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, cmd in (("qemu-io", ["qemu-io"]), ("qio", qio)):
                img = Path(tmp) / f"{name}-{r}.qcow2"
                prepare(img, args.extended_l2)
                results[name].append(timed([*cmd, "-t", args.cache, str(img)], stdin))
                if r == 0:
                    verify(img, offs)
                img.unlink()
    ext = "on" if args.extended_l2 else "off"
    print(f"W5x: {args.count} x 'write -q -P 0xab OFF 4k' (random, subcluster-allocating) on a fresh "
          f"{SIZE >> 20} MiB extended_l2={ext} image, piped, -t {args.cache}; {args.rounds} interleaved rounds")
    med = {n: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for n, v in results.items()}
    for n, v in results.items():
        walls = [w for w, _ in v]
        print(f"  {n:8s} wall {med[n][0]:.3f}s ({min(walls):.3f}-{max(walls):.3f})  cpu {med[n][1]:.3f}s")
    wall_ratio = med["qio"][0] / med["qemu-io"][0]
    cpu_ratio = med["qio"][1] / med["qemu-io"][1]
    print(f"  ratio qio/qemu-io: wall {wall_ratio:.2f}  cpu {cpu_ratio:.2f}  (target {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
