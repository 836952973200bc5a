#!/usr/bin/env python3
"""NBD throughput over a Unix socket, side by side with QEMU (issue 16's figure).

* client: qio's ``nbd`` driver and real qemu-io, both against the same ``qemu-nbd`` export;
* server: real qemu-io as the client, against qio's ``nbd_server_start`` export and against ``qemu-nbd``.

Workloads: 64 KiB sequential writes, then 64 KiB sequential reads, piped (one process per run, the
wall time of the client process).  Runs are interleaved (QEMU, qio, QEMU, qio, ...); the table gives
medians and the ratio qio / QEMU (lower is better).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024


def script(op: str, count: int) -> str:
    return "".join(f"{op} -q {i * 64 * KiB} 64k\n" for i in range(count))


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server for {path} did not start")
        time.sleep(0.01)


def timed_client(argv: list[str], stdin: str) -> float:
    t = time.perf_counter()
    res = subprocess.run(argv, input=stdin.encode(), capture_output=True, timeout=600)
    elapsed = time.perf_counter() - t
    out = res.stdout.decode(errors="replace")
    if res.returncode != 0 or "fail" in out or "error" in out.lower():
        raise SystemExit(f"client failed: {argv}\n{out[-2000:]}{res.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def qemu_nbd(img: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "--cache=writeback", str(img)])
    wait_socket(sock, proc)
    return proc


def stop(proc: subprocess.Popen[bytes], sock: Path) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    sock.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qio", default=f"{sys.executable} -m qio", help="how to run qio (default: this python)")
    ap.add_argument("--count", type=int, default=4096, help="64 KiB requests per run (default 4096 = 256 MiB)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    qio = args.qio.split()
    env_root = {**os.environ, "PYTHONPATH": str(ROOT)}
    os.environ.update(env_root)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="qio-nbd-bench-") as d:
        img = Path(d) / "t.raw"
        with open(img, "wb") as f:
            f.truncate(args.count * 64 * KiB)
        sock = Path(d) / "s.sock"
        uri = f"nbd+unix:///?socket={sock}"
        client_cases: dict[str, Callable[[str], list[str]]] = {
            "qemu-io": lambda _op: ["qemu-io", "-f", "raw", "-t", "writeback", uri],
            "qio": lambda _op: [*qio, "-f", "raw", "-t", "writeback", uri],
        }
        for op in ("write", "read"):
            for _ in range(args.runs):
                for tool, argv in client_cases.items():
                    srv = qemu_nbd(img, sock)
                    try:
                        t = timed_client(argv(op), script(op, args.count))
                    finally:
                        stop(srv, sock)
                    results.setdefault(f"client {op}", {}).setdefault(tool, []).append(t)
                for tool in ("qemu-nbd", "qio"):
                    if tool == "qemu-nbd":
                        srv = qemu_nbd(img, sock)
                    else:
                        srv = subprocess.Popen([*qio, "-f", "raw", "-t", "writeback", "-c",
                                                f"nbd_server_start unix:{sock}", "-c", "nbd_server_stop -c 1",
                                                str(img)], stdout=subprocess.DEVNULL)
                        wait_socket(sock, srv)
                    try:
                        t = timed_client(["qemu-io", "-f", "raw", "-t", "writeback", uri], script(op, args.count))
                    finally:
                        if tool == "qio":
                            srv.wait(timeout=60)
                            sock.unlink(missing_ok=True)
                        else:
                            stop(srv, sock)
                    results.setdefault(f"server {op}", {}).setdefault(tool, []).append(t)
    mib = args.count * 64 / 1024
    print(f"{args.count} x 64 KiB ({mib:.0f} MiB) per run, {args.runs} runs, medians; ratio = qio / QEMU")
    print("| workload | QEMU s | qio s | QEMU MiB/s | qio MiB/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, by_tool in results.items():
        ref = statistics.median(by_tool["qemu-io" if name.startswith("client") else "qemu-nbd"])
        ours = statistics.median(by_tool["qio"])
        print(f"| {name} | {ref:.3f} | {ours:.3f} | {mib / ref:.0f} | {mib / ours:.0f} | {ours / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
