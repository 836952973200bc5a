#!/usr/bin/env python3
"""Compressed-cluster speed: ``write -c`` into (and reads out of) a zstd or zlib qcow2, qio against qemu-io.

Both tools run the same piped script against a fresh image (made by qemu-img, not timed), interleaved
(qemu-io, qio, qemu-io, qio, ...); each value is the wall time of one whole process.  The clusters hold
text-like data of varying compressibility (eight seeded source files used in turn, so the compressor
does real work), one ``write -c -s SRC OFF CLUSTER`` per cluster.  After every pair the two images must
be byte-identical (the write figure is only worth something if qio writes QEMU's bytes).  Then the
read workload reads every cluster back (decompression) from the image qemu-io wrote.

Usage: ``python benchmarks/compress.py [--type zstd|zlib] [--clusters N] [--runs N] [--qio CMD]``.
Prints the medians (min-max) and the ratio qio / qemu-io per workload, of the wall time and of the CPU
time (user + system, all threads): on a loaded machine the wall time of a single-threaded CPU-bound
process stretches more than that of qemu-io, whose worker threads sleep and wake (see the README).
"""

from __future__ import annotations

import argparse
import os
import random
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


def make_sources(workdir: Path, cluster: int, seed: int) -> list[Path]:
    """Eight cluster-sized files of words, from nearly constant to mostly random."""
    rng = random.Random(seed)
    words = [bytes(rng.randrange(97, 123) for _ in range(rng.randrange(2, 10))) for _ in range(500)]
    out = []
    for i in range(8):
        b = bytearray()
        while len(b) < cluster:
            b += rng.choice(words[: 20 + 60 * i]) + b" "
            if rng.random() < i / 40:
                b += rng.randbytes(rng.randrange(1, 16))
        p = workdir / f"src{i}.bin"
        p.write_bytes(bytes(b[:cluster]))
        out.append(p)
    return out


def timed(argv: list[str], script: str, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the process and its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    p = subprocess.run(argv, input=script, capture_output=True, text=True, cwd=cwd, check=False, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    bad = [ln for ln in (p.stdout + p.stderr).splitlines() if "fail" in ln.lower() or "error" in ln.lower()
           or "Traceback" in ln]
    if p.returncode != 0 or bad:
        raise SystemExit(f"{argv[0]} failed (status {p.returncode}): {bad[:3] or p.stderr[-500:]}")
    return elapsed, cpu


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):6.3f}s ({min(values):.3f}-{max(values):.3f})"


def ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", choices=("zstd", "zlib"), default="zstd")
    ap.add_argument("--clusters", type=int, default=512)
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qemu-io", default=shutil.which("qemu-io") or "qemu-io")
    ap.add_argument("--qio", default=f"{shlex.quote(sys.executable)} -m qio",
                    help="command running qio (default: this checkout's, with PYTHONPATH set)")
    a = ap.parse_args(argv)
    cs = a.cluster_size
    qemu_img = shutil.which("qemu-img") or "qemu-img"
    with tempfile.TemporaryDirectory(prefix="qio-compress-bench-") as tmp:
        work = Path(tmp)
        srcs = make_sources(work, cs, a.seed)
        size = a.clusters * cs
        wscript = "".join(f"write -c -s {srcs[i % 8]} {i * cs} {cs}\n" for i in range(a.clusters))
        rscript = "".join(f"read {i * cs} {cs}\n" for i in range(a.clusters))
        tools = {"qemu-io": [a.qemu_io], "qio": shlex.split(a.qio)}
        envs = {"qemu-io": dict(os.environ), "qio": dict(os.environ, PYTHONPATH=str(REPO_ROOT))}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for run in range(a.runs):
            images = {}
            for name, cmd in tools.items():
                img = work / f"{name}.qcow2"
                img.unlink(missing_ok=True)
                subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o",
                                f"compression_type={a.type},cluster_size={cs}", str(img), str(size)], check=True)
                full = [*cmd, "-f", "qcow2", str(img)]
                times.setdefault(("write -c", name), []).append(timed(full, wscript, work, envs[name]))
                images[name] = img
            if images["qemu-io"].read_bytes() != images["qio"].read_bytes():
                raise SystemExit(f"run {run}: qio's image differs from qemu-io's")
            for name, cmd in tools.items():
                full = [*cmd, "-r", "-f", "qcow2", str(images["qemu-io"])]
                times.setdefault(("read", name), []).append(timed(full, rscript, work, envs[name]))
        ratio_img = images["qemu-io"].stat().st_size / size
        print(f"{a.type}, {a.clusters} clusters of {cs} bytes, {a.runs} interleaved runs "
              f"(image {ratio_img:.2f} of the data; images byte-identical)")
        head = f"{'qemu-io':>22s} {'qio':>22s} {'ratio':>6s}"
        print(f"{'':9s} wall {head}   CPU {head}")
        for wl in ("write -c", "read"):
            qw, qc = (list(v) for v in zip(*times[(wl, "qemu-io")], strict=True))
            ow, oc = (list(v) for v in zip(*times[(wl, "qio")], strict=True))
            print(f"{wl:9s}      {fmt(qw):>22s} {fmt(ow):>22s} {ratio(ow, qw):>6s}       "
                  f"{fmt(qc):>22s} {fmt(oc):>22s} {ratio(oc, qc):>6s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
