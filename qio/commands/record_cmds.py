"""``record FILE`` / ``record stop`` (qio's own): turn an investigation at the prompt into a test.

Every command typed after ``record FILE`` is appended to FILE, a script that ``qio ARGS < FILE``
replays (piped input reads one command per line), and what qio printed for it goes to ``FILE.out``,
with the timing fields masked as qemu-iotests' ``_filter_qemu_io`` masks them, so the two files are a
regression test as they stand.  Recording happens at the interactive prompt, whose output path copies
what is printed here (:func:`output`).
"""

from __future__ import annotations

import errno
import re
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from qio.commands.spec import Invocation
    from qio.session import Session

_STATS = re.compile(r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)")
_STATS_REPL = "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"


class Recorder:
    def __init__(self, path: str, script: TextIO, expected: TextIO) -> None:
        self.path = path
        self.script = script
        self.expected = expected
        self.pending = ""

    def command(self, line: str) -> None:
        self.script.write(line + "\n")
        self.script.flush()

    def output(self, data: bytes) -> None:
        """Text qio printed; whole lines are filtered and written (a stats line may arrive in pieces)."""
        self.pending += data.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
        head, nl, self.pending = self.pending.rpartition("\n")
        if nl:
            self.expected.write(_STATS.sub(_STATS_REPL, head + nl))
            self.expected.flush()

    def close(self) -> None:
        if self.pending:
            self.expected.write(_STATS.sub(_STATS_REPL, self.pending))
        self.script.close()
        self.expected.close()


#: The recording of each shell (at most one).
_active: dict[int, Recorder] = {}


def active(sh: Session) -> Recorder | None:
    return _active.get(id(sh))


def output(data: bytes) -> None:
    for rec in _active.values():
        rec.output(data)


def parse_record(inv: Invocation) -> list[str]:
    return inv.argv[1:]


async def run_record(sh: Session, args: list[str]) -> int:
    return record(sh, args)


def record(sh: Session, args: list[str]) -> int:
    rec = _active.get(id(sh))
    if args == ["stop"]:
        if rec is None:
            sh.out.err("record: not recording\n")
            return -errno.EINVAL
        rec.close()
        del _active[id(sh)]
        sh.out.out(f"record: stopped; replay with: qio ... < {rec.path} (expected output in {rec.path}.out)\n")
        return 0
    if len(args) != 1:
        sh.out.err("usage: record FILE | record stop\n")
        return -errno.EINVAL
    if not sh.interactive:
        sh.out.err("record: only at the interactive prompt\n")
        return -errno.ENOTSUP
    if rec is not None:
        sh.out.err(f"record: already recording to {rec.path} (record stop first)\n")
        return -errno.EBUSY
    path = args[0]
    try:
        script = open(path, "w", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 (kept open)
        expected = open(path + ".out", "w", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as e:
        sh.out.err(f"record: {path}: {e.strerror}\n")
        return -(e.errno or errno.EIO)
    sh.out.out(f"record: writing the commands to {path}, their output to {path}.out (record stop ends)\n")
    sh.out.flush()
    _active[id(sh)] = Recorder(path, script, expected)
    return 0
