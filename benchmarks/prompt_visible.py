"""How soon the interactive prompt is visible at a terminal (issue 12's target: under 150 ms).

qio runs on a real pseudo-terminal (pexpect) with a raw image; for each run the script takes the time
from spawning the process to the first ``qio> `` on the terminal (written before the line editor
loads), and to the editor taking over the line (bracketed paste switched on: keys are edited from
then on).  A bare ``python -c`` on the same terminal is measured alongside: on a loaded machine every
figure grows, and the ratio to it is what stays comparable.

    python benchmarks/prompt_visible.py [--runs 7] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parent.parent


def spawn_time(args: list[str], marks: list[bytes], env: dict[str, str]) -> list[float]:
    """Seconds from spawn until each of ``marks`` appears, in order."""
    t0 = time.monotonic()
    child = pexpect.spawn(sys.executable, args, env=env, dimensions=(24, 100), timeout=30)
    seen = []
    for mark in marks:
        child.expect_exact(mark)
        seen.append(time.monotonic() - t0)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--root", type=Path, default=ROOT, help="the source tree whose qio runs")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "t.raw"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        env = dict(os.environ, PYTHONPATH=str(opts.root), TERM="xterm", LC_ALL="C.UTF-8",
                   XDG_STATE_HOME=str(Path(tmp) / "state"))
        bare, prompt, editor = [], [], []
        for _ in range(opts.runs):
            bare += spawn_time(["-c", "print('ready')"], [b"ready"], env)
            p, e = spawn_time(["-m", "qio", "-f", "raw", str(img)], [b"qio> ", b"\x1b[?2004h"], env)
            prompt.append(p)
            editor.append(e)
    for name, ts in (("bare python", bare), ("prompt visible", prompt), ("line editor ready", editor)):
        print(f"{name:18} median {statistics.median(ts) * 1000:6.0f} ms   min {min(ts) * 1000:6.0f} ms")
    print(f"prompt / bare python: {statistics.median(prompt) / statistics.median(bare):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
