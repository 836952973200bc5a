#!/usr/bin/env python3
"""What blkdebug's rule engine costs when no rule matches (issue 13): W5r's random 4 KiB writes through

  raw      ``-f raw IMG``                       (no blkdebug)
  bare     ``-f raw blkdebug::IMG``             (blkdebug, no rules)
  rules    ``-f raw blkdebug:CFG:IMG``          (blkdebug, one rule of every kind, none matching)

run interleaved (raw, bare, rules, raw, bare, rules, ...) so that machine load hits all three alike.
Prints the median wall time of each and the ratios rules/bare (the cost of the rules) and rules/raw.

    python benchmarks/blkdebug_cost.py                 # 65536 writes, 5 runs each
    python benchmarks/blkdebug_cost.py --count 8192 --runs 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1 << 30

#: One rule of every kind; none matches a raw image's random 4 KiB writes: qcow2 events are never raised
#: on a raw image, the delay waits for discards, the corrupt and bad-blocks ranges lie past every write.
RULES = """\
[inject-error]
event = "l2_update"
errno = "5"
[inject-error]
event = "write_aio"
iotype = "discard"
probability = "0.5"
[set-state]
event = "refblock_alloc"
new_state = "2"
[delay]
event = "write_aio"
iotype = "discard"
ns = "1000000"
[corrupt]
offset = "{past}"
length = "4096"
bit = "1"
[bad-blocks]
offset = "{past}"
length = "4096"
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=65536, help="random 4 KiB writes per run (default 65536)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per variant (default 5)")
    ap.add_argument("--seed", type=int, default=42, help="offsets' seed (W5r's is 42)")
    ap.add_argument("--qio", default=f"{sys.executable} -m qio", help="the qio command (default: python -m qio)")
    a = ap.parse_args()

    span = GiB
    rng = random.Random(a.seed)
    offsets = [rng.randrange(span // 4096) * 4096 for _ in range(a.count)]
    with tempfile.TemporaryDirectory(prefix="blkdebug-cost-") as d:
        tmp = Path(d)
        img = tmp / "t.raw"
        with open(img, "wb") as f:
            f.truncate(span + 8192)
        cfg = tmp / "rules.cfg"
        cfg.write_text(RULES.format(past=span + 4096))
        script = tmp / "script"
        script.write_text("".join(f"write -q {o} 4k\n" for o in offsets) + f"read -P 0xcd {offsets[-1]} 4k\n")
        variants = {"raw": str(img), "bare": f"blkdebug::{img}", "rules": f"blkdebug:{cfg}:{img}"}
        times: dict[str, list[float]] = {k: [] for k in variants}
        cmd = a.qio.split()
        for run in range(a.runs):
            for name, target in variants.items():
                with open(script, "rb") as stdin:
                    t0 = time.perf_counter()
                    res = subprocess.run([*cmd, "-f", "raw", "-t", "writeback", target], stdin=stdin,
                                         capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
                    dt = time.perf_counter() - t0
                if res.returncode != 0 or b"read 4096/4096" not in res.stdout:
                    print(f"{name}: run failed (status {res.returncode}): {res.stderr.decode()[:300]}")
                    return 1
                times[name].append(dt)
                print(f"run {run + 1} {name:5s} {dt:7.3f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    for k, v in med.items():
        print(f"{k:5s} median {v:7.3f} s  (runs: {', '.join(f'{x:.3f}' for x in times[k])})")
    print(f"rules / bare = {med['rules'] / med['bare']:.3f}  (cost of non-matching rules; target <= 1.10)")
    print(f"bare  / raw  = {med['bare'] / med['raw']:.3f}  (a blkdebug node without rules)")
    print(f"rules / raw  = {med['rules'] / med['raw']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
