"""``qio-img crashcheck LOG BASE`` and ``qio-img replay LOG BASE OUTPUT``: crash states of a write log.

Why: a format driver is crash safe when every state a power failure can leave opens and checks
clean.  A dm-log-writes log (qio's or QEMU's ``blklogwrites`` driver) holds every write, discard and
flush the driver sent to its file, so the states a crash could leave can be rebuilt from the image the
log started on (BASE) and checked one by one.

States (``enumerate_states``).  Entries up to a flush are durable.  Between two flushes (an *epoch*)
a disk with a volatile cache may have kept any subset of the epoch's writes, and torn any of them at
sector granularity.  The explorer tries, in this order and within ``--limit``:

1. every flush boundary and the end of the log (replay up to and including the flush);
2. every ordered prefix (replay up to entry N: the crash hit between two writes, nothing reordered);
3. per epoch, ``--samples`` seeded subsets: a crash point in the epoch, every write before it kept
   or lost at random (FUA writes before it are always kept);
4. per epoch, ``--samples`` seeded torn variants: a subset as in 3 with one of its writes torn (each
   of its sectors kept or lost).

A state is written as a *replay spec*: ``0-12`` replays entries 0 to 12, ``14`` entry 14, ``17:0-3+6``
only log sectors 0-3 and 6 of entry 17; specs are comma-separated and applied in log order.  ``qio-img
replay --entries SPEC LOG BASE OUT`` rebuilds any state; ``--end N`` and ``--end-mark NAME`` replay
a prefix as dm-log-writes' ``replay-log`` does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from qio.block.blklogwrites import LOG_DISCARD, LOG_FLUSH, LOG_FUA, LOG_MARK, Log, LogEntry, LogError, read_log
from qio.getopt import LongOpt
from qio.img.common import Ctx, Options, UsageError

Extra = tuple[int, tuple[int, ...] | None]  # entry number, the log sectors kept (None: all)


class State(NamedTuple):
    """Entries ``0..prefix-1`` replayed whole, then ``extras`` (later entries, maybe torn)."""

    prefix: int
    extras: tuple[Extra, ...]
    kind: str  # flush, prefix, subset, torn

    def spec(self) -> str:
        parts = [f"0-{self.prefix - 1}"] if self.prefix > 1 else (["0"] if self.prefix == 1 else [])
        for idx, sectors in self.extras:
            parts.append(str(idx) if sectors is None else f"{idx}:{_ranges(sectors)}")
        return ",".join(parts) or "none"


def _ranges(values: Iterable[int]) -> str:
    out: list[str] = []
    vals = sorted(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return "+".join(out)


def parse_spec(spec: str, n_entries: int) -> list[Extra]:
    """A replay spec into (entry, sectors) in log order; raises ValueError with a message."""
    out: dict[int, tuple[int, ...] | None] = {}
    if spec == "none":
        return []
    for part in spec.split(","):
        idx_s, colon, secs = part.partition(":")
        lo_s, dash, hi_s = idx_s.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
        except ValueError:
            raise ValueError(f"invalid entry range '{part}'") from None
        if lo < 0 or hi < lo or hi >= n_entries:
            raise ValueError(f"entry range '{idx_s}' outside the log's {n_entries} entries")
        if colon and dash:
            raise ValueError(f"sectors can only be given for one entry: '{part}'")
        sectors: tuple[int, ...] | None = None
        if colon:
            chosen: set[int] = set()
            for r in secs.split("+"):
                a, d, b = r.partition("-")
                try:
                    chosen.update(range(int(a), (int(b) if d else int(a)) + 1))
                except ValueError:
                    raise ValueError(f"invalid sector list '{secs}'") from None
            sectors = tuple(sorted(chosen))
        for i in range(lo, hi + 1):
            out[i] = sectors
    return sorted(out.items())


# -- enumeration -----------------------------------------------------------------------------------
def epochs(log: Log) -> list[tuple[int, list[int]]]:
    """``(durable prefix length, data entries of the epoch)`` for every stretch between flushes."""
    out: list[tuple[int, list[int]]] = []
    start = 0
    cur: list[int] = []
    for e in log.entries:
        if e.flags & LOG_FLUSH:
            if cur:
                out.append((start, cur))
            start, cur = e.seq + 1, []
        elif not e.flags & LOG_MARK:
            cur.append(e.seq)
    if cur:
        out.append((start, cur))
    return out


def enumerate_states(log: Log, *, samples: int, seed: int, limit: int, torn: bool = True) -> list[State]:
    """The states to try, deduplicated, in the documented order, at most ``limit`` of them (flush
    boundaries first; the other kinds are thinned out evenly with the seed when over the limit)."""
    rng = random.Random(seed)
    n = len(log.entries)
    flush: list[State] = [State(e.seq + 1, (), "flush") for e in log.entries if e.flags & LOG_FLUSH]
    if n and not log.entries[-1].flags & LOG_FLUSH:
        flush.append(State(n, (), "flush"))
    prefix = [State(e.seq + 1, (), "prefix") for e in log.entries if not e.flags & (LOG_FLUSH | LOG_MARK)]
    subset: list[State] = []
    tornv: list[State] = []
    for start, writes in epochs(log):
        if len(writes) < 2 and not torn:
            continue
        for _ in range(samples):
            if len(writes) >= 2:
                subset.append(State(start, _pick(log, writes, rng), "subset"))
            if torn:
                extras = list(_pick(log, writes, rng))
                candidates = [i for i, (idx, _) in enumerate(extras) if log.entries[idx].nr_sectors > 1
                              and not log.entries[idx].flags & (LOG_DISCARD | LOG_FUA)]
                if not candidates:
                    # tear the epoch's largest write instead
                    big = [w for w in writes if log.entries[w].nr_sectors > 1
                           and not log.entries[w].flags & (LOG_DISCARD | LOG_FUA)]
                    if not big:
                        continue
                    w = rng.choice(big)
                    extras = sorted({*extras, (w, None)})
                    candidates = [i for i, (idx, _) in enumerate(extras) if idx == w]
                k = rng.choice(candidates)
                idx = extras[k][0]
                nsec = log.entries[idx].nr_sectors
                keep = tuple(s for s in range(nsec) if rng.random() < 0.5)
                if len(keep) in (0, nsec):  # not torn: one sector goes the other way
                    r = rng.randrange(nsec)
                    keep = tuple(s for s in range(nsec) if s != r) if keep else (r,)
                extras[k] = (idx, keep)
                tornv.append(State(start, tuple(extras), "torn"))
    seen: set[tuple[int, tuple[Extra, ...]]] = set()
    groups: list[list[State]] = []
    for group in (flush, prefix, subset, tornv):
        g = []
        for s in group:
            key = (s.prefix, s.extras)
            if key not in seen:
                seen.add(key)
                g.append(s)
        groups.append(g)
    out = groups[0][:limit] if len(groups[0]) <= limit else _even(groups[0], limit)
    rest = limit - len(out)
    others = groups[1] + groups[2] + groups[3]
    if len(others) > rest:
        keep_idx = sorted(random.Random(seed).sample(range(len(others)), rest))
        others = [others[i] for i in keep_idx]
    out += others
    return sorted(out, key=_order)


def _order(s: State) -> tuple[int, tuple[tuple[int, tuple[int, ...]], ...]]:
    return s.prefix, tuple((i, (-1,) if secs is None else secs) for i, secs in s.extras)


def _even(states: list[State], k: int) -> list[State]:
    if k <= 0:
        return []
    step = len(states) / k
    return [states[int(i * step)] for i in range(k)]


def _pick(log: Log, writes: list[int], rng: random.Random) -> tuple[Extra, ...]:
    """A crash point in the epoch; FUA writes before it kept, the others at random."""
    cut = rng.randrange(1, len(writes) + 1)
    chosen = [w for w in writes[:cut] if log.entries[w].flags & LOG_FUA or rng.random() < 0.5]
    return tuple((w, None) for w in chosen)


# -- building states -------------------------------------------------------------------------------
class Builder:
    """A working copy of BASE that entries are applied to and undone from (cheaper than a copy of the
    base per state: only the bytes that the state changes are written back)."""

    def __init__(self, log_path: str, log: Log, base: str, work: str) -> None:
        self.log = log
        self.logf = open(log_path, "rb")  # noqa: SIM115 (closed by close())
        shutil.copyfile(base, work)
        self.fd = os.open(work, os.O_RDWR)
        self.undo: list[tuple[int, bytes, int]] = []
        self.prefix = 0  # entries applied whole at the bottom of the undo stack
        self.prefix_depth = 0

    def close(self) -> None:
        os.close(self.fd)
        self.logf.close()

    def _data(self, e: LogEntry) -> bytes:
        if e.flags & LOG_DISCARD:
            return bytes(e.nbytes)
        self.logf.seek(e.data_offset)
        data = self.logf.read(e.nbytes)
        return data.ljust(e.nbytes, b"\0")

    def apply(self, e: LogEntry, sectors: tuple[int, ...] | None = None) -> None:
        if e.flags & (LOG_FLUSH | LOG_MARK) or not e.nr_sectors:
            return
        data = self._data(e)
        ss = e.sectorsize
        pieces = [(0, e.nbytes)] if sectors is None else [(s * ss, ss) for s in sectors if s < e.nr_sectors]
        size = os.fstat(self.fd).st_size
        for start, length in pieces:
            off = e.offset + start
            old = os.pread(self.fd, length, off) if off < size else b""
            self.undo.append((off, old, size))
            _pwrite(self.fd, data[start:start + length], off)
            size = max(size, off + length)

    def _undo_to(self, depth: int) -> None:
        while len(self.undo) > depth:
            off, old, size = self.undo.pop()
            _pwrite(self.fd, old, off)
            if os.fstat(self.fd).st_size > size:
                os.ftruncate(self.fd, size)

    def build(self, state: State) -> None:
        self._undo_to(self.prefix_depth)
        if state.prefix < self.prefix:
            self._undo_to(0)
            self.prefix = 0
        for e in self.log.entries[self.prefix:state.prefix]:
            self.apply(e)
        self.prefix, self.prefix_depth = state.prefix, len(self.undo)
        for idx, sectors in state.extras:
            self.apply(self.log.entries[idx], sectors)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# -- checking --------------------------------------------------------------------------------------
class Verdict(NamedTuple):
    result: str  # clean, leaks, corrupt, repaired
    detail: str
    #: for ``repaired``: what the check said before the repair (what ``qemu-img check`` says too)
    before: str = ""


def _dirty(path: str) -> bool:
    """A qcow2 v3 image with the dirty bit (lazy refcounts): its refcounts are rebuilt at the next
    read-write open, so refcount errors in a crash state are expected and repaired."""
    with open(path, "rb") as f:
        head = f.read(80)
    return (len(head) >= 80 and head[:4] == b"QFI\xfb" and int.from_bytes(head[4:8], "big") >= 3
            and bool(int.from_bytes(head[72:80], "big") & 1))


async def _repaired(path: str, fmt: str) -> Verdict:
    """Open a copy read-write, as the next user of the image would (which repairs a dirty image), close
    it, and check the result."""
    from qio.block.backend import BlockBackend
    from qio.block.errors import QemuError
    from qio.block.modes import OpenFlags

    copy = path + ".rw"
    shutil.copyfile(path, copy)
    try:
        warnings: list[str] = []
        try:
            blk = BlockBackend.open(copy, {"driver": fmt}, OpenFlags(), warnings.append)
        except QemuError as e:
            return Verdict("corrupt", f"read-write open failed: {e}")
        await blk.close(warnings.append)
        return await qio_check(copy, fmt, repair=False)
    finally:
        os.unlink(copy)


async def qio_check(path: str, fmt: str, repair: bool = True) -> Verdict:
    """qio's own check of one state (an image that does not open counts as corrupt).  A corrupt dirty
    image (lazy refcounts) that a read-write open repairs to a clean or leaking one is ``repaired``."""
    verdict = await _check_once(path, fmt)
    if repair and verdict.result == "corrupt" and fmt == "qcow2" and _dirty(path):
        after = await _repaired(path, fmt)
        if after.result in ("clean", "leaks"):
            return Verdict("repaired", f"dirty image, refcounts rebuilt at a read-write open ({verdict.detail})",
                           "corrupt")
    return verdict


async def _check_once(path: str, fmt: str) -> Verdict:
    from qio.img.check import check_file

    found = await check_file(path, fmt, run=fmt == "qcow2")
    if found.open_error is not None:
        return Verdict("corrupt", f"open failed: {found.open_error}")
    if found.check_error is not None:
        return Verdict("corrupt", f"check failed: {found.check_error}")
    res = found.result
    if res is None:
        return Verdict("clean", "no check for this format")
    if res.corruptions or res.check_errors:
        return Verdict("corrupt", f"{res.corruptions} corruptions, {res.check_errors} check errors, "
                                  f"{res.leaks} leaked clusters")
    if res.leaks:
        return Verdict("leaks", f"{res.leaks} leaked clusters")
    return Verdict("clean", "")


Ranges = tuple[tuple[int, int], ...]


class VerdictCache:
    """Reuse a verdict when the bytes the check read are unchanged.

    Why: most states differ from an already checked one only in data clusters (torn or lost data
    writes), which the check never reads.  The check is deterministic in the bytes it reads and the file
    size, so a state whose file has the same size and the same bytes at every range an earlier check
    read gets that check's verdict.  The ranges are recorded by wrapping the file driver's reads while
    the check runs; a few recently used range sets are tried per state (hashing them costs far less than
    a check)."""

    TRIES = 4

    def __init__(self) -> None:
        from collections import OrderedDict

        self.sets: OrderedDict[tuple[int, Ranges], dict[bytes, Verdict]] = OrderedDict()
        self.hits = 0

    @staticmethod
    def _digest(fd: int, ranges: Ranges) -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for off, n in ranges:
            h.update(os.pread(fd, n, off))
        return h.digest()

    def lookup(self, fd: int) -> Verdict | None:
        size = os.fstat(fd).st_size
        for key in list(reversed(self.sets))[:self.TRIES]:
            if key[0] != size:
                continue
            v = self.sets[key].get(self._digest(fd, key[1]))
            if v is not None:
                self.sets.move_to_end(key)
                self.hits += 1
                return v
        return None

    def store(self, fd: int, ranges: Ranges, verdict: Verdict) -> None:
        key = (os.fstat(fd).st_size, ranges)
        self.sets.setdefault(key, {})[self._digest(fd, ranges)] = verdict
        self.sets.move_to_end(key)


async def recorded_check(path: str, fmt: str) -> tuple[Verdict, Ranges]:
    """``qio_check``, with the byte ranges of ``path`` that it read (through the file driver)."""
    from qio.block.file import FileDriver

    reads: set[tuple[int, int]] = set()
    original = FileDriver.co_preadv

    async def recording(self: FileDriver, offset: int, nbytes: int, qiov: Any) -> None:
        if self.filename in (path, path + ".rw"):  # the state, and its copy opened read-write
            reads.add((offset, nbytes))
        await original(self, offset, nbytes, qiov)

    FileDriver.co_preadv = recording  # type: ignore[method-assign]
    try:
        verdict = await qio_check(path, fmt)
    finally:
        FileDriver.co_preadv = original  # type: ignore[method-assign]
    return verdict, tuple(sorted(reads))


def qemu_check(path: str, fmt: str) -> Verdict:
    """``qemu-img check`` (the oracle): exit 0 clean, 3 leaks, 2 corrupt, anything else an error."""
    r = subprocess.run(["qemu-img", "check", "-f", fmt, "--output=json", path], capture_output=True, text=True,
                       check=False)
    if r.returncode == 0:
        return Verdict("clean", "")
    if r.returncode == 3:
        return Verdict("leaks", "")
    detail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
    return Verdict("corrupt", detail)


# -- the commands ----------------------------------------------------------------------------------
USAGE_CRASHCHECK = ("crashcheck [-f fmt] [--limit N] [--samples N] [--seed S] [--no-torn] [--oracle] "
                    "[--all-entries] [--no-reuse] [--output=ofmt] LOG BASE")


def _int_opt(name: str, arg: str) -> int:
    try:
        v = int(arg, 0)
    except ValueError:
        raise UsageError(f"Invalid {name} '{arg}'") from None
    if v < 0:
        raise UsageError(f"Invalid {name} '{arg}'")
    return v


def _read(ctx: Ctx, path: str, all_entries: bool) -> Log | None:
    try:
        return read_log(path, all_entries=all_entries)
    except LogError as e:
        ctx.out.error_report(str(e))
        return None


async def img_crashcheck(ctx: Ctx, argv: list[str]) -> int:
    fmt = "qcow2"
    limit, samples, seed = 1000, 16, 0
    torn = True
    oracle = all_entries = False
    output = "human"
    opts = Options(ctx, argv, "hf:", (LongOpt("limit", True, "limit"), LongOpt("samples", True, "samples"),
                                     LongOpt("seed", True, "seed"), LongOpt("no-torn", False, "no-torn"),
                                     LongOpt("oracle", False, "oracle"), LongOpt("output", True, "output"),
                                     LongOpt("all-entries", False, "all-entries"),
                                     LongOpt("no-reuse", False, "no-reuse")))
    reuse = True
    for c, arg in opts:
        if c == "f":
            fmt = arg
        elif c == "no-reuse":
            reuse = False
        elif c == "limit":
            limit = _int_opt("limit", arg)
        elif c == "samples":
            samples = _int_opt("number of samples", arg)
        elif c == "seed":
            seed = _int_opt("seed", arg)
        elif c == "no-torn":
            torn = False
        elif c == "oracle":
            oracle = True
        elif c == "all-entries":
            all_entries = True
        elif c == "output":
            if arg not in ("human", "json"):
                ctx.out.error_report("--output must be used with human or json as argument.")
                return 1
            output = arg
    if len(opts.args) != 2:
        raise UsageError(f"Expecting a log and a base image: {ctx.prg} {USAGE_CRASHCHECK}")
    log_path, base = opts.args
    if fmt not in ("raw", "qcow2"):
        ctx.out.error_report(f"Unknown file format '{fmt}'")
        return 1
    log = _read(ctx, log_path, all_entries)
    if log is None:
        return 1
    if not os.path.isfile(base):
        ctx.out.error_report(f"Could not open '{base}': No such file or directory")
        return 1
    states = enumerate_states(log, samples=samples, seed=seed, limit=limit, torn=torn)
    report = await explore(ctx, log_path, log, base, fmt, states, oracle=oracle, all_entries=all_entries,
                           reuse=reuse)
    report["seed"] = seed
    if output == "json":
        ctx.out.out(json.dumps(report, indent=4) + "\n")
    else:
        ctx.out.out(_human(report))
    counts = report["states"]
    if report.get("oracle-disagreements"):
        return 2
    return 2 if counts["corrupt"] else (3 if counts["leaks"] else 0)


async def explore(ctx: Ctx, log_path: str, log: Log, base: str, fmt: str, states: list[State], *,
                  oracle: bool = False, all_entries: bool = False, reuse: bool = True) -> dict[str, Any]:
    """Build and check every state; the report as a dict (the JSON output)."""
    counts = {"tried": 0, "clean": 0, "leaks": 0, "corrupt": 0, "repaired": 0}
    kinds: dict[str, int] = {}
    first: dict[str, Any] | None = None  # the simplest corrupt state (see _rank)
    first_rank: tuple[int, int] = (0, 0)
    disagreements: list[dict[str, str]] = []
    tty = sys.stderr.isatty()
    cache = VerdictCache() if reuse else None
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qio-crash-", dir=shm) as tmp:
        work = os.path.join(tmp, "state.img")
        builder = Builder(log_path, log, base, work)
        try:
            for i, state in enumerate(states):
                builder.build(state)
                verdict = cache.lookup(builder.fd) if cache is not None else None
                if verdict is None:
                    verdict, ranges = await recorded_check(work, fmt)
                    if cache is not None:
                        cache.store(builder.fd, ranges, verdict)
                counts["tried"] += 1
                counts[verdict.result] += 1
                kinds[state.kind] = kinds.get(state.kind, 0) + 1
                if oracle:
                    ref = qemu_check(work, fmt)
                    if ref.result != (verdict.before or verdict.result):
                        disagreements.append({"entries": state.spec(), "qio": verdict.result,
                                              "qemu-img": ref.result, "qemu-img-detail": ref.detail})
                if verdict.result == "corrupt" and (first is None or _rank(state) < first_rank):
                    first_rank = _rank(state)
                    first = {"kind": state.kind, "entries": state.spec(), "check": verdict.detail,
                             "replayed": _describe(log, state),
                             "command": f"qio-img replay{' --all-entries' if all_entries else ''} "
                                        f"--entries {state.spec()} {log_path} {base} state.img"}
                if tty and (i % 8 == 0 or i + 1 == len(states)):
                    rate = (i + 1) / max(time.monotonic() - start, 1e-9)
                    sys.stderr.write(f"\rcrashcheck: {i + 1}/{len(states)} states ({rate:.1f}/s)")
                    sys.stderr.flush()
        finally:
            builder.close()
    if tty and states:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
    elapsed = time.monotonic() - start
    n_kind = {k: sum(1 for e in log.entries if e.kind == k) for k in ("write", "discard", "flush", "mark")}
    report: dict[str, Any] = {
        "log": log_path, "base": base, "format": fmt, "entries": len(log.entries), "entry-kinds": n_kind,
        "sector-size": log.sectorsize, "states": counts, "state-kinds": kinds,
        "verdicts-reused": cache.hits if cache is not None else 0,
        "seconds": round(elapsed, 3), "states-per-second": round(counts["tried"] / elapsed, 1) if elapsed else 0.0,
        "first-corrupt": first,
    }
    if oracle:
        report["oracle-disagreements"] = disagreements
    return report


_KIND_RANK = {"flush": 0, "prefix": 1, "subset": 2, "torn": 3}


def _rank(state: State) -> tuple[int, int]:
    """Which corrupt state to report: flush boundaries before ordered prefixes before subsets before
    torn writes, then the one with the fewest out-of-order entries (the easiest to understand)."""
    return _KIND_RANK[state.kind], len(state.extras)


def _describe(log: Log, state: State) -> list[str]:
    lines = []
    if state.prefix:
        last = log.entries[state.prefix - 1]
        lines.append(f"entries 0-{state.prefix - 1} in order, the last one entry {last.seq}: {last.kind}"
                     + (f" offset {last.offset} length {last.nbytes}" if last.kind != "flush" else ""))
    for idx, sectors in state.extras:
        e = log.entries[idx]
        what = f"entry {idx}: {e.kind} offset {e.offset} length {e.nbytes}"
        if sectors is not None:
            what += f", only log sectors {_ranges(sectors)} of {e.nr_sectors} (torn)"
        lines.append(what)
    return lines


def _human(r: dict[str, Any]) -> str:
    k = r["entry-kinds"]
    c = r["states"]
    out = [f"Log {r['log']}: {r['entries']} entries ({k['write']} writes, {k['discard']} discards, "
           f"{k['flush']} flushes), sector size {r['sector-size']}\n",
           f"States tried: {c['tried']} (" + ", ".join(f"{n} {kind}" for kind, n in sorted(r["state-kinds"].items()))
           + ")\n",
           f"Clean: {c['clean']}\nLeaks only: {c['leaks']}\nCorrupt: {c['corrupt']}\n"
           + (f"Repaired at a read-write open (dirty, lazy refcounts): {c['repaired']}\n" if c["repaired"] else ""),
           f"Speed: {r['states-per-second']} states/s ({r['seconds']} s)\n"]
    first = r["first-corrupt"]
    if first is not None:
        out.append(f"\nFirst corrupt state ({first['kind']}): {first['check']}\nReplayed:\n")
        out.extend(f"    {line}\n" for line in first["replayed"])
        out.append(f"Rebuild it with:\n    {first['command']}\n")
    if "oracle-disagreements" in r:
        d = r["oracle-disagreements"]
        out.append(f"qemu-img check agrees on {c['tried'] - len(d)} of {c['tried']} states\n")
        for item in d[:5]:
            out.append(f"    {item['entries']}: qio {item['qio']}, qemu-img {item['qemu-img']} "
                       f"({item['qemu-img-detail']})\n")
    return "".join(out)


USAGE_REPLAY = "replay [--end N | --end-mark NAME | --entries SPEC] [--all-entries] LOG BASE OUTPUT"


async def img_replay(ctx: Ctx, argv: list[str]) -> int:
    """Copy BASE to OUTPUT and apply log entries (all, up to ``--end N`` inclusive, up to the mark
    ``--end-mark NAME``, or a replay spec from crashcheck)."""
    end: int | None = None
    mark: str | None = None
    spec: str | None = None
    all_entries = False
    opts = Options(ctx, argv, "h", (LongOpt("end", True, "end"), LongOpt("end-mark", True, "end-mark"),
                                   LongOpt("entries", True, "entries"), LongOpt("all-entries", False, "all-entries")))
    for c, arg in opts:
        if c == "end":
            end = _int_opt("entry number", arg)
        elif c == "end-mark":
            mark = arg
        elif c == "entries":
            spec = arg
        elif c == "all-entries":
            all_entries = True
    if len(opts.args) != 3:
        raise UsageError(f"Expecting a log, a base image and an output file: {ctx.prg} {USAGE_REPLAY}")
    if sum(x is not None for x in (end, mark, spec)) > 1:
        raise UsageError("--end, --end-mark and --entries are mutually exclusive")
    log_path, base, output = opts.args
    log = _read(ctx, log_path, all_entries)
    if log is None:
        return 1
    n = len(log.entries)
    try:
        if spec is not None:
            extras = parse_spec(spec, n)
        else:
            if mark is not None:
                found = [e.seq for e in log.entries if e.flags & LOG_MARK and _mark_name(log_path, e) == mark]
                if not found:
                    ctx.out.error_report(f"No mark '{mark}' in the log")
                    return 1
                end = found[0]
            last = n - 1 if end is None else end
            if last >= n:
                raise ValueError(f"entry {last} outside the log's {n} entries")
            extras = [(i, None) for i in range(last + 1)]
    except ValueError as e:
        ctx.out.error_report(str(e))
        return 1
    if not os.path.isfile(base):
        ctx.out.error_report(f"Could not open '{base}': No such file or directory")
        return 1
    if os.path.exists(output) and os.path.samefile(base, output):
        ctx.out.error_report(f"'{output}' is the base image: replay writes a copy of it")
        return 1
    builder = Builder(log_path, log, base, output)
    try:
        for idx, sectors in extras:
            builder.apply(log.entries[idx], sectors)
    finally:
        builder.close()
    ctx.out.out(f"Replayed {len(extras)} of {n} entries onto '{output}'\n")
    return 0


def _mark_name(log_path: str, e: LogEntry) -> str:
    """dm-log-writes keeps a mark's name in its header sector, after the entry (``data_len`` bytes)."""
    with open(log_path, "rb") as f:
        f.seek(e.header_offset + 32)
        return f.read(e.data_len).split(b"\0")[0].decode("utf-8", "replace")
