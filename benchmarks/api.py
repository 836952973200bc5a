#!/usr/bin/env python3
"""Cost per request of the public API against the shell (issue 14: ``await img.write`` of 4 KiB on raw
must cost no more than the shell's ``write`` command).

Both run in this process on the same kind of image, interleaved in rounds: the shell executes
``write -q OFF 4k`` lines (parsing, permission check, the request through ``Session.sync``, no output),
the API awaits ``img.write(OFF, 4 KiB)``.  Offsets walk a 64 MiB raw image so every write lands on
fresh blocks in both.  Prints the median time per request of each and the ratio API / shell.

    python benchmarks/api.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qio
from qio.block.modes import OpenFlags, parse_cache_mode
from qio.output import Output
from qio.shell import Shell

SIZE = 64 << 20
BLOCK = 4096


def _image(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


async def shell_round(path: str, n: int, cache: str) -> float:
    """Seconds per ``write`` command, the image opened as ``qio -f raw -t CACHE PATH`` opens it."""
    out = Output("qio", os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY))
    sh = Shell(out, "qio")
    flags = OpenFlags()
    parse_cache_mode(cache, flags)
    if sh.session.open_image(path, flags, {"driver": "raw"}):
        raise SystemExit("shell: cannot open the image")
    lines = [f"write -q {(i * BLOCK) % SIZE} 4k" for i in range(n)]
    t0 = time.perf_counter()
    for line in lines:
        await sh.execute(line)
    t1 = time.perf_counter()
    await sh.session.close_image()
    out.flush()
    return (t1 - t0) / n


async def api_round(path: str, n: int, cache: str) -> float:
    """Seconds per ``await img.write`` of 4 KiB."""
    data = b"\xcd" * BLOCK
    async with qio.open(path, fmt="raw", cache=cache) as img:
        t0 = time.perf_counter()
        for i in range(n):
            await img.write((i * BLOCK) % SIZE, data)
        t1 = time.perf_counter()
    return (t1 - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", nargs="+", default=["writeback", "writethrough"],
                    help="cache modes to measure (writethrough, qemu-io's default, syncs every write)")
    args = ap.parse_args()
    for cache in args.cache:
        shell_t: list[float] = []
        api_t: list[float] = []
        with tempfile.TemporaryDirectory() as d:
            for r in range(args.rounds):  # alternate which goes first (the disk's state, the machine's load)
                if r % 2:
                    api_t.append(asyncio.run(api_round(_image(d, f"a{r}.raw"), args.requests, cache)))
                shell_t.append(asyncio.run(shell_round(_image(d, f"s{r}.raw"), args.requests, cache)))
                if not r % 2:
                    api_t.append(asyncio.run(api_round(_image(d, f"a{r}.raw"), args.requests, cache)))
        s, a = statistics.median(shell_t), statistics.median(api_t)
        print(f"cache={cache}: shell write 4k {s * 1e6:8.1f} us/request, api {a * 1e6:8.1f} us/request "
              f"(medians of {args.rounds} x {args.requests}); ratio api/shell {a / s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
