"""Record the blkdebug events one request raises, in qemu-io or qio, with breakpoints.

The method of the qcow2 reference (section 3.1): an interactive session over pipes arms a one-shot
breakpoint on every event (``break EV EV``), submits one ``aio_*`` command, and each time a request is
suspended re-arms that event and resumes it, until the request's completion line appears.  The same
driver runs both programs, so the two sequences are directly comparable.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Sequence

PROMPT = b"qemu-io> "
_SUSPENDED = re.compile(rb"blkdebug: Suspended request '([a-z_0-9]+)'")
_DONE = re.compile(rb"^(wrote|read|aio_write failed|aio_read failed|readv failed|writev failed)", re.M)

#: Every event of QEMU 7.2's BlkdebugEvent except "none" (raised at open only).
EVENTS = [
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table", "l2_load",
    "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write", "read_aio",
    "read_backing_aio", "read_compressed", "write_aio", "write_compressed", "vmstate_load", "vmstate_save",
    "cow_read", "cow_write", "reftable_load", "reftable_grow", "reftable_update", "refblock_load",
    "refblock_update", "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os",
    "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail",
    "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare",
    "l1_shrink_write_table", "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space",
]


class Session:
    def __init__(self, argv: Sequence[str], timeout: float = 30.0) -> None:
        env = dict(os.environ, LC_ALL="C")
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env)
        self.timeout = timeout
        self.buf = b""
        self.read_prompt()

    def read_prompt(self) -> bytes:
        """Output up to (not including) the next prompt."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while PROMPT not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no prompt; output so far: {self.buf!r}")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"program exited; output: {self.buf!r}")
            self.buf += chunk
        out, self.buf = self.buf.split(PROMPT, 1)
        return out

    def cmd(self, line: str) -> bytes:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read_prompt()

    def close(self) -> str:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            out, _ = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return (self.buf + out).decode("utf-8", "replace")


def trace(argv: Sequence[str], setup: Sequence[str], command: str, max_steps: int = 2000) -> list[str]:
    """Events raised by ``command`` (an ``aio_*`` command) after the ``setup`` commands ran."""
    s = Session(argv)
    try:
        for line in setup:
            s.cmd(line)
        for ev in EVENTS:
            s.cmd(f"break {ev} {ev}")
        events: list[str] = []
        out = s.cmd(command)
        done = bool(_DONE.search(out))
        pending = [m.decode() for m in _SUSPENDED.findall(out)]
        steps = 0
        while not done or pending:
            steps += 1
            if steps > max_steps:
                raise RuntimeError(f"request did not finish; events so far {events}")
            if pending:
                ev = pending.pop(0)
                events.append(ev)
                s.cmd(f"break {ev} {ev}")
                out = s.cmd(f"resume {ev}")
            else:
                out = s.cmd("sleep 1")
            done = done or bool(_DONE.search(out))
            pending += [m.decode() for m in _SUSPENDED.findall(out)]
        for ev in EVENTS:
            s.cmd(f"remove_break {ev}")
        return events
    finally:
        s.close()
