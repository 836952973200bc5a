#!/usr/bin/env python3
"""Crash-consistency scenarios (issue 15.5): qcow2 write paths recorded with blklogwrites by qio and by
real qemu-io, in writeback and writethrough mode, explored with ``qio-img crashcheck --oracle``.

Usage: ``python benchmarks/crash_scenarios.py [--limit N] [--samples N] [--seed S] [--only NAME]
[--tools qio,qemu-io] [--json]``.  Prints one table row per scenario, cache mode and tool: entries in
the log, states tried, clean, leaks only, corrupt, disagreements of qemu-img check with qio's check,
and the explorer's speed.  Bounded: every run has a state limit and a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZE = "64M"

# name -> (qemu-img create -o options, backing file commands or None, qemu-io commands)
SCENARIOS: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "alloc": ("", None, ["write -P 1 0 64k", "write -P 2 1M 4k", "write -P 3 5M 100k", "flush",
                         "write -P 4 10M 64k", "write -P 5 10M 512"]),
    "cow-backing": ("", ["write -P 0x11 0 2M"], ["write -P 2 4k 4k", "write -P 3 70k 1k", "write -P 4 1M 512",
                                                 "flush", "write -P 5 130k 3k"]),
    "discard": ("", None, ["write -P 1 0 256k", "flush", "discard 64k 128k", "write -P 5 64k 4k",
                           "discard 0 64k"]),
    "zero": ("", None, ["write -P 1 0 128k", "flush", "write -z 0 64k", "write -z -u 64k 64k", "write -z 1M 64k",
                        "write -P 2 1M 4k"]),
    "compressed": ("", None, ["write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -c 1M 64k", "flush",
                              "write -P 3 64k 4k"]),
    "refblock-growth": ("cluster_size=512,refcount_bits=64", None,
                        ["write -P 1 0 256k", "write -P 2 1M 512k", "flush", "write -P 3 3M 1M"]),
    "l1-growth": ("cluster_size=512", None, ["write -P 1 0 64k", "truncate 256M", "write -P 2 200M 64k",
                                             "write -P 3 100M 512"]),
    # not in issue 15's list: the dirty-bit mode, where crash states are repaired at the next open
    "lazy-refcounts": ("lazy_refcounts=on", None, ["write -P 1 0 64k", "write -P 2 1M 4k", "flush",
                                                   "write -P 4 10M 64k"]),
}
MODES = ("writeback", "writethrough")


def run_tool(tool: str, d: Path, mode: str, cmds: list[str]) -> None:
    opts = (f"driver=qcow2,file.driver=blklogwrites,file.file.filename={d}/work.qcow2,"
            f"file.log.filename={d}/work.log")
    prog = ["qemu-io"] if tool == "qemu-io" else [sys.executable, "-m", "qio"]
    args = [*prog, "-t", mode, "--image-opts", opts]
    for c in cmds:
        args += ["-c", c]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(args, cwd=d, env=env, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode or r.stderr:
        raise RuntimeError(f"{tool} failed: {r.stderr}")


def scenario(name: str, mode: str, tool: str, limit: int, samples: int, seed: int) -> dict[str, Any]:
    create_opts, backing, cmds = SCENARIOS[name]
    with tempfile.TemporaryDirectory(prefix="qio-crash-scn-") as tmp:
        d = Path(tmp)
        extra = ["-o", create_opts] if create_opts else []
        if backing is not None:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "backing.qcow2"), SIZE], check=True)
            bargs = ["qemu-io"] + [a for c in backing for a in ("-c", c)] + [str(d / "backing.qcow2")]
            subprocess.run(bargs, check=True, capture_output=True)
            extra += ["-b", str(d / "backing.qcow2"), "-F", "qcow2"]
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(d / "base.qcow2"), SIZE], check=True)
        shutil.copyfile(d / "base.qcow2", d / "work.qcow2")
        (d / "work.log").write_bytes(b"")
        run_tool(tool, d, mode, cmds)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-m", "qio.img", "crashcheck", "--oracle", "--output=json",
                            "--limit", str(limit), "--samples", str(samples), "--seed", str(seed),
                            str(d / "work.log"), str(d / "base.qcow2")],
                           cwd=d, env=env, capture_output=True, text=True, timeout=1200, check=False)
        if r.returncode not in (0, 2, 3):
            raise RuntimeError(f"crashcheck failed: {r.stderr}")
        rep: dict[str, Any] = json.loads(r.stdout)
        rep.update(scenario=name, mode=mode, tool=tool)
        return rep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append")
    ap.add_argument("--tools", default="qio,qemu-io")
    ap.add_argument("--json", action="store_true")
    o = ap.parse_args()
    rows = []
    print(f"{'scenario':16} {'cache':12} {'tool':8} {'entries':>7} {'tried':>6} {'clean':>6} {'leaks':>6} "
          f"{'corrupt':>7} {'repaired':>8} {'oracle!=':>8} {'states/s':>8}")
    for name in o.only or SCENARIOS:
        for mode in MODES:
            for tool in o.tools.split(","):
                rep = scenario(name, mode, tool, o.limit, o.samples, o.seed)
                rows.append(rep)
                c = rep["states"]
                print(f"{name:16} {mode:12} {tool:8} {rep['entries']:>7} {c['tried']:>6} {c['clean']:>6} "
                      f"{c['leaks']:>6} {c['corrupt']:>7} {c['repaired']:>8} {len(rep['oracle-disagreements']):>8} "
                      f"{rep['states-per-second']:>8}", flush=True)
                if rep["first-corrupt"]:
                    print(f"    first corrupt: {rep['first-corrupt']['entries']}: {rep['first-corrupt']['check']}")
    if o.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
